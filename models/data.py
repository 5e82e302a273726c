"""Session data: readers for four formats, the paper's preprocessing, the item id map and a
seeded synthetic shop.

Sessions are lists of item ids in click order. Internally items are 1..N with 0 as padding;
`ItemMap` converts between the shop's (external) ids, always kept as strings, and internal ids.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

FORMATS = ("text", "otto", "diginetica", "yoochoose")
# Days of the newest sessions that form the test set, as in the papers (SR-GNN, GRU4Rec).
DEFAULT_TEST_DAYS = {"diginetica": 7, "yoochoose": 1, "otto": 7}


class DataError(ValueError):
    """Unreadable or malformed session data; the message names the file and the line."""


class ItemMap:
    """External item id (str) <-> internal id 1..N; 0 is the padding id and maps to nothing."""

    def __init__(self, external_ids: list[str]) -> None:
        self._ext = [str(e) for e in external_ids]
        self._int = {e: i for i, e in enumerate(self._ext, start=1)}
        if len(self._int) != len(self._ext):
            raise ValueError("ItemMap: external ids must be unique")

    def __len__(self) -> int:
        return len(self._ext)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ItemMap) and self._ext == other._ext

    def to_internal(self, ext: str | int) -> int | None:
        return self._int.get(str(ext))

    def to_external(self, i: int) -> str:
        if not 1 <= i <= len(self._ext):
            raise KeyError(f"internal item id {i} is not in 1..{len(self._ext)}")
        return self._ext[i - 1]

    @property
    def external_ids(self) -> list[str]:
        """External ids in internal order (index 0 is internal id 1)."""
        return list(self._ext)

    def to_json(self) -> str:
        return json.dumps(self._ext, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | list) -> ItemMap:
        ids = json.loads(text) if isinstance(text, str | bytes) else text
        if not isinstance(ids, list):
            raise ValueError("ItemMap JSON must be a list of external ids")
        return cls(ids)

    @classmethod
    def from_sessions(cls, sessions: list[list[str]]) -> ItemMap:
        """Items in order of first appearance, or numerically sorted when every id is an integer
        (so the already re-indexed Diginetica files keep their ids: internal == external)."""
        seen = dict.fromkeys(item for s in sessions for item in s)
        ids = list(seen)
        if all(i.isdigit() for i in ids):
            ids.sort(key=int)
        return cls(ids)


@dataclass
class RawSession:
    """One session as read from a file: external item ids in click order and the time of its last
    click (seconds since the epoch), when the format has one."""

    session_id: str
    items: list[str]
    time: float | None = None


@dataclass
class Dataset:
    """Train / validation / test sessions as internal-id lists, with the item map.

    `valid` is the chronological tail of the training sessions (for early stopping); `train` does
    not contain it. `popularity[i]` counts item i's clicks in `train` (index 0 unused).
    """

    train: list[list[int]]
    valid: list[list[int]]
    test: list[list[int]]
    item_map: ItemMap
    popularity: np.ndarray
    name: str = ""
    shop: SyntheticShop | None = field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.item_map)

    def popular(self, k: int = 100) -> list[int]:
        """The k most clicked internal ids in train (ties: lower id first)."""
        order = np.argsort(-self.popularity[1:], kind="stable") + 1
        return [int(i) for i in order[:k]]

    def fingerprint(self) -> str:
        """Identifies the training data and item map (sha256 prefix)."""
        h = hashlib.sha256()
        h.update(self.item_map.to_json().encode())
        for part in (self.train, self.valid):
            for s in part:
                h.update(np.asarray(s, dtype=np.int64).tobytes())
                h.update(b"|")
            h.update(b"#")
        return h.hexdigest()[:16]

    def remap(self, sessions: list[list[int]], item_map: ItemMap) -> list[list[int]]:
        """Translate this dataset's internal ids into another map's ids, dropping unknown items."""
        ext = self.item_map.external_ids
        out = []
        for s in sessions:
            mapped = [item_map.to_internal(ext[i - 1]) for i in s]
            out.append([i for i in mapped if i is not None])
        return out


# ---------------------------------------------------------------------------------------------
# Readers


def detect_format(path: Path) -> str:
    """Guess the format from the file name, then from the first line."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".json")):
        return "otto"
    if "yoochoose" in name or name.endswith(".dat"):
        return "yoochoose"
    if "item-views" in name:
        return "diginetica"
    with _open(path) as f:
        first = f.readline().strip()
    if not first:
        raise DataError(f"{path}: line 1: empty file")
    if first.startswith("{"):
        return "otto"
    if first.lower().startswith("session_id;"):
        return "diginetica"
    if first.count(",") == 3:
        return "yoochoose"
    if all(tok.strip() for tok in first.split(" ")) and ";" not in first and "," not in first:
        return "text"
    raise DataError(f"{path}: line 1: unknown session format (expected one of {', '.join(FORMATS)})")


def _open(path: Path):
    try:
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a session file") from None


def read_sessions(path: str | Path, fmt: str | None = None, *, event_types: tuple[str, ...] = ("clicks",)
                  ) -> list[RawSession]:
    """Read every session of a file. `fmt` is one of FORMATS or None to detect it.

    Raises DataError naming the file and line for malformed input, an unknown format or an
    empty file.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    readers = {"text": _read_text, "otto": _read_otto, "diginetica": _read_diginetica,
               "yoochoose": _read_yoochoose}
    if fmt not in readers:
        raise DataError(f"{path}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    sessions = readers[fmt](path, event_types) if fmt == "otto" else readers[fmt](path)
    if not sessions:
        raise DataError(f"{path}: line 1: empty file (no sessions)")
    return sessions


def _read_text(path: Path) -> list[RawSession]:
    sessions = []
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue  # a blank line is an empty session; it carries no click
            items = line.split()
            bad = next((t for t in items if not t.isprintable() or ";" in t or "," in t), None)
            if bad is not None:
                raise DataError(f"{path}: line {lineno}: malformed item id {bad!r} in plain session text")
            sessions.append(RawSession(str(lineno), items))
    return sessions


def _read_otto(path: Path, event_types: tuple[str, ...]) -> list[RawSession]:
    sessions = []
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                events = sorted(obj["events"], key=lambda e: e["ts"])
                items = [str(e["aid"]) for e in events if e["type"] in event_types]
                last = events[-1]["ts"] / 1000.0 if events else None
                sid = str(obj["session"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: line {lineno}: malformed OTTO session ({exc})") from None
            sessions.append(RawSession(sid, items, last))
    return sessions


def _grouped_csv(path: Path, delimiter: str, header: bool, parse) -> list[RawSession]:
    """Rows of (session, item, sort key, time) grouped into sessions in time order."""
    rows: dict[str, list[tuple[float, float, str]]] = {}
    with _open(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        for lineno, row in enumerate(reader, start=1):
            if header and lineno == 1:
                continue
            if not row:
                continue
            try:
                sid, item, order, when = parse(row)
            except (ValueError, IndexError) as exc:
                shown = delimiter.join(row)
                raise DataError(f"{path}: line {lineno}: malformed row {shown!r} ({exc})") from None
            rows.setdefault(sid, []).append((order, when, item))
    sessions = []
    for sid, events in rows.items():
        events.sort()
        sessions.append(RawSession(sid, [e[2] for e in events], max(e[1] for e in events)))
    return sessions


def _read_diginetica(path: Path) -> list[RawSession]:
    def parse(row: list[str]):
        if len(row) != 5:
            fields = "session_id;user_id;item_id;timeframe;eventdate"
            raise ValueError(f"expected 5 fields ({fields}), got {len(row)}")
        day = date.fromisoformat(row[4])
        when = (day - date(1970, 1, 1)).days * 86400.0 + int(row[3]) / 1000.0
        return row[0], str(int(row[2])), when, when

    with _open(path) as f:
        first = f.readline()
    return _grouped_csv(path, ";", first.lower().startswith("session_id"), parse)


def _read_yoochoose(path: Path) -> list[RawSession]:
    from datetime import datetime

    def parse(row: list[str]):
        if len(row) != 4:
            raise ValueError(f"expected 4 fields session,timestamp,item,category, got {len(row)}")
        when = datetime.fromisoformat(row[1].replace("Z", "+00:00")).timestamp()
        return row[0], str(int(row[2])), when, when

    return _grouped_csv(path, ",", False, parse)


# ---------------------------------------------------------------------------------------------
# Preprocessing


def preprocess(sessions: list[RawSession], *, test_days: float, min_item_count: int = 5,
               min_session_length: int = 2, valid_fraction: float = 0.05, name: str = "") -> Dataset:
    """The paper's preprocessing of raw, timestamped sessions.

    Drop sessions shorter than 2 clicks, drop items seen fewer than 5 times, drop sessions that
    became too short; the sessions whose last click falls in the last `test_days` days form the
    test set; test items unseen in train are removed; items are re-indexed 1..N by train.
    """
    if any(s.time is None for s in sessions):
        raise DataError(f"{name or 'sessions'}: a time-based split needs timestamps")
    kept = [s for s in sessions if len(s.items) >= min_session_length]
    counts = Counter(i for s in kept for i in s.items)
    kept = [RawSession(s.session_id, [i for i in s.items if counts[i] >= min_item_count], s.time)
            for s in kept]
    kept = [s for s in kept if len(s.items) >= min_session_length]
    if not kept:
        raise DataError(f"{name or 'sessions'}: no session is left after filtering")
    kept.sort(key=lambda s: s.time)
    cut = max(s.time for s in kept) - test_days * 86400.0
    train_raw = [s.items for s in kept if s.time <= cut]
    test_raw = [s.items for s in kept if s.time > cut]
    return _index(train_raw, test_raw, valid_fraction=valid_fraction, name=name)


def _index(train_raw: list[list[str]], test_raw: list[list[str]], *, valid_fraction: float,
           name: str, min_session_length: int = 2) -> Dataset:
    item_map = ItemMap.from_sessions(train_raw)
    train = [[item_map.to_internal(i) for i in s] for s in train_raw]
    test = []
    for s in test_raw:
        ids = [item_map.to_internal(i) for i in s]
        ids = [i for i in ids if i is not None]
        if len(ids) >= min_session_length:
            test.append(ids)
    n_valid = int(round(len(train) * valid_fraction))
    valid = train[len(train) - n_valid:] if n_valid else []
    train = train[: len(train) - n_valid]
    popularity = np.bincount(np.fromiter((i for s in train for i in s), dtype=np.int64),
                             minlength=len(item_map) + 1)
    return Dataset(train, valid, test, item_map, popularity, name=name)


def load_dataset(path_or_name: str | Path, *, valid_fraction: float = 0.05, fmt: str | None = None,
                 test_days: float | None = None) -> Dataset:
    """A dataset by name ("synthetic", "synthetic:SEED") or path.

    A directory holding train.txt and test.txt (the ../shared/data/diginetica layout) is read as
    already preprocessed, in time order; the chronological tail of train.txt is the validation
    split. A raw file (OTTO, Diginetica, Yoochoose) is preprocessed and split by time; a single
    plain text file has its last 10% of sessions as the test set.
    """
    spec = str(path_or_name)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else 0
        return synthetic_shop(seed=seed, valid_fraction=valid_fraction)
    path = Path(spec)
    if path.is_dir():
        train_file, test_file = path / "train.txt", path / "test.txt"
        if not train_file.exists() or not test_file.exists():
            raise DataError(f"{path}: a dataset directory needs train.txt and test.txt")
        train_raw = [s.items for s in read_sessions(train_file, "text")]
        test_raw = [s.items for s in read_sessions(test_file, "text")]
        return _index(train_raw, test_raw, valid_fraction=valid_fraction, name=path.name)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (or use --data synthetic)")
    fmt = fmt or detect_format(path)
    raw = read_sessions(path, fmt)
    if fmt == "text":
        items = [s.items for s in raw]
        n_test = max(1, len(items) // 10)
        return _index(items[:-n_test], items[-n_test:], valid_fraction=valid_fraction, name=path.stem)
    days = test_days if test_days is not None else DEFAULT_TEST_DAYS[fmt]
    return preprocess(raw, test_days=days, valid_fraction=valid_fraction, name=path.stem)


# ---------------------------------------------------------------------------------------------
# Synthetic shop


@dataclass
class SyntheticShop:
    """A shop whose shoppers follow a Markov chain over items with popularity skew.

    From item i a shopper moves to one of i's few `successors` (with probability `follow`,
    weighted by `successor_weights`) or to a popularity-weighted random item. A model that learns
    the successors beats popularity; the demo replays shoppers to click on recommendations.
    Item ids here are internal ids 1..N.
    """

    popularity: np.ndarray  # [N+1], probabilities, index 0 = 0
    successors: np.ndarray  # [N+1, S] internal ids
    successor_weights: np.ndarray  # [S], sums to 1
    follow: float
    mean_length: float

    def next_distribution(self, last_item: int | None) -> np.ndarray:
        """Probability of each item (index = internal id) being clicked next."""
        p = self.popularity.copy()
        if last_item:
            p *= 1.0 - self.follow
            np.add.at(p, self.successors[last_item], self.follow * self.successor_weights)
        return p

    def sample_session(self, rng: np.random.Generator) -> list[int]:
        """One shopper's clicks (at least 2), geometric length with mean `mean_length`."""
        length = 1 + int(rng.geometric(1.0 / (self.mean_length - 1.0)))
        pop_cdf = np.cumsum(self.popularity[1:])
        succ_cdf = np.cumsum(self.successor_weights)
        u = rng.random((length, 2))
        items = [int(np.searchsorted(pop_cdf, u[0, 0] * pop_cdf[-1]) + 1)]
        for a, b in u[1:]:
            if a < self.follow:
                nxt = self.successors[items[-1], min(int(np.searchsorted(succ_cdf, b * succ_cdf[-1])),
                                                     len(succ_cdf) - 1)]
            else:
                nxt = np.searchsorted(pop_cdf, b * pop_cdf[-1]) + 1
            items.append(int(min(nxt, len(pop_cdf))))
        return items


def make_shop(seed: int = 0, n_items: int = 1000, *, n_successors: int = 4, follow: float = 0.75,
              mean_length: float = 6.0, zipf: float = 1.0) -> SyntheticShop:
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(n_items) + 1
    pop = np.zeros(n_items + 1)
    pop[1:] = 1.0 / ranks**zipf
    pop /= pop.sum()
    # Successors are drawn by popularity too, so popular items are also common next clicks.
    successors = np.zeros((n_items + 1, n_successors), dtype=np.int64)
    for i in range(1, n_items + 1):
        successors[i] = rng.choice(n_items, size=n_successors, replace=False, p=pop[1:]) + 1
    weights = 1.0 / np.arange(1, n_successors + 1)
    return SyntheticShop(pop, successors, weights / weights.sum(), follow, mean_length)


def synthetic_shop(seed: int = 0, n_items: int = 1000, n_sessions: int = 12000, *,
                   valid_fraction: float = 0.05, test_fraction: float = 0.1) -> Dataset:
    """A seeded synthetic dataset: sessions of `make_shop(seed)`, the newest 10% as test.

    External ids are "sku-00001"...; internal ids equal the shop's ids, so `Dataset.shop` speaks
    the same ids as the models.
    """
    shop = make_shop(seed, n_items)
    rng = np.random.default_rng(seed + 1)
    sessions = [shop.sample_session(rng) for _ in range(n_sessions)]
    item_map = ItemMap([f"sku-{i:05d}" for i in range(1, n_items + 1)])
    n_test = int(math.ceil(n_sessions * test_fraction))
    train, test = sessions[:-n_test], sessions[-n_test:]
    n_valid = int(round(len(train) * valid_fraction))
    valid, train = train[len(train) - n_valid:], train[: len(train) - n_valid]
    popularity = np.bincount(np.concatenate([np.asarray(s) for s in train]), minlength=n_items + 1)
    return Dataset(train, valid, test, item_map, popularity, name=f"synthetic:{seed}", shop=shop)
