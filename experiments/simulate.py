"""`abrec simulate`: replay held-out sessions as simulated shoppers against the live HTTP API.

Every held-out test session becomes a shopper who walks through its logged clicks one by one.
Before each next click the shopper asks the API for a slate (`POST /v1/recommendations` with the
clicks so far) and reacts to it under the click model below; the session then goes on with its
logged next click whatever the slate was, so every arm sees exactly the same shoppers.

Click model (the defaults are the `ClickModel` field defaults):
- The slate has k items (default 20). Items already in the session are not excluded (as offline).
- Examination: the shopper looks at the item at rank r (1 = top) with probability r^-eta
  (position-based model, eta = 0.8: rank 1 always, rank 2 0.57, rank 10 0.16, rank 20 0.09).
- A looked-at item is clicked when it is the session's actual next click, so each impression
  gets at most one such "true" click, with probability e(rank of the next click), 0 if absent.
- Noise: with probability `noise` (default 0.01) per impression the shopper also clicks one
  slate item chosen uniformly (an accidental or curious click); a repeat of the true click counts
  once, as the metric does.
Hence the expected clicks of one impression whose next click sits at rank r of a slate of m items
are  e(r) + noise - noise * e(r) / m  (with e(r) = 0 when the next click is not in the slate).

Prediction: `predict_ctr` computes that expectation for every prefix of every session from a
model's own offline ranking (abrec.models.inference), so a model's expected CTR under this click
model is its examination-weighted hit rate at k. The replay's measured CTR per arm, and the lift
CI, must contain the prediction; a miss points at an assignment, serving, attribution or logging
bug, which is what this check is for.

Users: by default each session is a new user (`sim-<seed>-<session index>`). With `--users N` the
sessions belong to N returning users, each session drawn to a user uniformly at random (seeded).
Calendar: the sessions, in their time order, are spread evenly over `--days` simulated days; before
each day the simulator sets the server's simulated clock through the admin endpoint (this needs an
admin token; clients can never set the clock). Within a day the sessions run `--concurrency` at a
time, each one click by click.

Robustness: a refused connection, a 5xx or a 503 is retried with back-off for up to `--retry-s`
seconds (an API restart mid-replay is survived). An event counts as acknowledged once the API has
answered 200 with its id; the log (`impressions.jsonl` under --out) holds every acknowledged
impression with its acknowledged clicks, so a crash test can check that none was lost.

A/A mode (`--aa ALIAS`): the simulator first creates and starts the experiment with two arms, "a"
(control) and "b", both bound to the same registry alias, through the admin API.

Outputs under --out: `users.csv` (unit_id, arm, impressions, clicks: the input of
`abrec analyze-file`), `impressions.jsonl` and `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


@dataclass(frozen=True)
class ClickModel:
    """The simulated shopper's reaction to a slate (see the module docstring)."""

    k: int = 20  # slate size asked for
    eta: float = 0.8  # examination probability of rank r (1-based) is r ** -eta
    noise: float = 0.01  # probability of one extra click on a uniformly chosen slate item

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.eta < 0:
            raise ValueError(f"eta must be non-negative, got {self.eta}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be a probability, got {self.noise}")

    def examine(self, rank: int | None) -> float:
        """Probability that the shopper looks at 1-based `rank`; 0 for None (not in the slate)."""
        return 0.0 if rank is None else float(rank) ** -self.eta

    def expected_clicks(self, rank: int | None, slate_size: int) -> float:
        """Expected distinct clicks of one impression whose next click sits at `rank` (or None)."""
        if slate_size <= 0:
            return 0.0
        e = self.examine(rank)
        return e + self.noise - self.noise * e / slate_size

    def clicks(self, slate: Sequence[str], target: str, u: Sequence[float]) -> list[str]:
        """The items clicked on `slate`, given three uniforms u in [0, 1) (drawn by the caller so
        that a replay is reproducible whatever order the threads run in)."""
        out: list[str] = []
        if not slate:
            return out
        rank = _rank(slate, target)
        if rank is not None and u[0] < self.examine(rank):
            out.append(target)
        if u[1] < self.noise:
            noisy = slate[min(int(u[2] * len(slate)), len(slate) - 1)]
            if noisy not in out:
                out.append(noisy)
        return out


def _rank(slate: Sequence[str], target: str) -> int | None:
    try:
        return slate.index(target) + 1
    except ValueError:
        return None


def steps(session: Sequence[int], max_items: int) -> list[tuple[list[int], int]]:
    """(the clicks so far, at most `max_items` newest; the next click) for every step of a session."""
    return [(list(session[max(0, t - max_items) : t]), session[t]) for t in range(1, len(session))]


# ---------------------------------------------------------------------------------------------
# Prediction from the model's offline ranking


@dataclass
class Prediction:
    """A model's expected clicks under the click model, per session (sum over its impressions)."""

    expected_clicks: np.ndarray  # [sessions] float
    impressions: np.ndarray  # [sessions] int
    hits: np.ndarray  # [sessions] next clicks that were in the top k
    reciprocal_ranks: np.ndarray  # [sessions] sum of 1/rank of those hits

    def ctr(self, mask: np.ndarray | None = None) -> float:
        """Expected CTR over all sessions, or over those selected by a boolean mask."""
        x = self.expected_clicks if mask is None else self.expected_clicks[mask]
        y = self.impressions if mask is None else self.impressions[mask]
        return float(x.sum() / max(y.sum(), 1))

    def recall(self) -> float:
        """Recall@k over all targets (the offline metric at the same k)."""
        return float(self.hits.sum() / max(self.impressions.sum(), 1))

    def mrr(self) -> float:
        """MRR@k over all targets."""
        return float(self.reciprocal_ranks.sum() / max(self.impressions.sum(), 1))


def predict(model: nn.Module, sessions: Sequence[Sequence[int]], click_model: ClickModel, *,
            max_items: int = 50, batch_size: int = 256, progress: bool = False) -> Prediction:
    """Expected clicks of every session's impressions from `model`'s top-k (internal ids).

    The model sees exactly what the live API sends it: the `max_items` newest clicks, nothing
    excluded. Slates are full (k items) when the catalogue has at least k items.
    """
    import numpy as np
    import torch
    from abrec.models.inference import topk_batch
    from tqdm import tqdm

    pairs = [(i, prefix, target) for i, s in enumerate(sessions) for prefix, target in steps(s, max_items)]
    pairs.sort(key=lambda p: min(len(p[1]), model.max_len))  # bucket by length: little padding
    expected = np.zeros(len(sessions))
    impressions = np.zeros(len(sessions), dtype=np.int64)
    hits = np.zeros(len(sessions), dtype=np.int64)
    rr = np.zeros(len(sessions))
    k = min(click_model.k, model.num_items)
    for start in tqdm(range(0, len(pairs), batch_size), desc="predict", disable=not progress, mininterval=2):
        chunk = pairs[start : start + batch_size]
        top, _ = topk_batch(model, [p[1] for p in chunk], k)
        targets = torch.tensor([p[2] for p in chunk])
        found = top == targets[:, None]
        in_slate = found.any(1).numpy()
        rank = found.float().argmax(1).numpy() + 1
        e = np.where(in_slate, rank.astype(float) ** -click_model.eta, 0.0)
        exp_clicks = e + click_model.noise - click_model.noise * e / k
        idx = np.array([p[0] for p in chunk])
        np.add.at(expected, idx, exp_clicks)
        np.add.at(impressions, idx, 1)
        np.add.at(hits, idx, in_slate.astype(np.int64))
        np.add.at(rr, idx, np.where(in_slate, 1.0 / rank, 0.0))
    return Prediction(expected, impressions, hits, rr)


# ---------------------------------------------------------------------------------------------
# The replay


class ApiError(RuntimeError):
    """The API refused a request the simulator considers valid (a 4xx), or stayed down too long."""


class ApiClient:
    """A thread-safe keep-alive client of the abrec HTTP API that retries through outages."""

    def __init__(self, base_url: str, *, pool_size: int = 16, timeout_s: float = 10.0, retry_s: float = 60.0,
                 admin_token: str | None = None) -> None:
        import urllib3

        self.base_url = base_url.rstrip("/")
        self.retry_s = retry_s
        self.admin_token = admin_token
        self._timeout = urllib3.Timeout(total=timeout_s)
        self._pool = urllib3.connection_from_url(self.base_url, maxsize=pool_size, block=False, retries=False)
        self.retries = 0

    def post(self, path: str, body: dict[str, Any], *, admin: bool = False) -> dict[str, Any]:
        """POST JSON; retry connection failures, 5xx and 503 until `retry_s` has passed."""
        import urllib3

        headers = {"Content-Type": "application/json"}
        if admin:
            if not self.admin_token:
                raise ApiError(f"{path} is an admin endpoint: give --admin-token")
            headers["Authorization"] = f"Bearer {self.admin_token}"
        payload = json.dumps(body, separators=(",", ":")).encode()
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                resp = self._pool.request("POST", path, body=payload, headers=headers, timeout=self._timeout,
                                          retries=False)
                if resp.status < 500:
                    data = json.loads(resp.data) if resp.data else {}
                    if resp.status >= 400:
                        raise ApiError(f"POST {path} -> {resp.status}: {data.get('error', data)}")
                    return data
                reason = f"HTTP {resp.status}"
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                reason = str(exc)
            if time.monotonic() > deadline:
                raise ApiError(f"POST {self.base_url}{path} kept failing for {self.retry_s:.0f} s: {reason}")
            self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def close(self) -> None:
        self._pool.close()


@dataclass
class ImpressionRecord:
    """One acknowledged (or unlogged) impression as the simulator saw it."""

    user_id: str
    session: int
    step: int
    arm: str
    model_version: str | None
    impression_id: str | None
    fallback: bool
    rank: int | None  # 1-based rank of the next click in the served slate, None if absent
    expected_clicks: float  # under the click model, given the served slate
    clicks: list[str] = field(default_factory=list)  # acknowledged clicks


@dataclass
class ArmSummary:
    users: int = 0
    impressions: int = 0  # acknowledged (logged) impressions
    clicks: int = 0  # acknowledged clicks on logged impressions
    unlogged: int = 0  # slates served without an impression id (database unreachable)
    fallbacks: int = 0
    expected_clicks_given_slates: float = 0.0
    predicted_ctr: float | None = None  # from the model's offline ranking, all sessions
    predicted_ctr_assigned: float | None = None  # same, over the sessions this arm served

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None


@dataclass
class ReplayResult:
    records: list[ImpressionRecord]
    arms: dict[str, ArmSummary]
    session_arm: dict[int, str]  # session index -> the arm that served it (first impression)
    wall_s: float
    retries: int

    def user_table(self) -> list[tuple[str, str, int, int]]:
        """(unit_id, arm, impressions, clicks) per user over logged impressions: the analysis input."""
        rows: dict[tuple[str, str], list[int]] = {}
        for r in self.records:
            if r.impression_id is None:
                continue
            row = rows.setdefault((r.user_id, r.arm), [0, 0])
            row[0] += 1
            row[1] += len(r.clicks)
        return [(u, a, n, c) for (u, a), (n, c) in rows.items()]

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "users.csv", "w") as f:
            f.write("unit_id,arm,impressions,clicks\n")
            for u, a, n, c in self.user_table():
                f.write(f"{u},{a},{n},{c}\n")
        with open(out / "impressions.jsonl", "w") as f:
            for r in self.records:
                f.write(json.dumps(asdict(r), separators=(",", ":")) + "\n")
        summary = {"wall_s": self.wall_s, "retries": self.retries,
                   "arms": {a: asdict(s) | {"ctr": s.ctr} for a, s in self.arms.items()}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))


class Replay:
    """Replays sessions (lists of the shop's item ids) against one experiment of a live API."""

    def __init__(self, client: ApiClient, experiment: str, click_model: ClickModel, *, seed: int = 0,
                 concurrency: int = 8, max_items: int = 50, progress: bool = True) -> None:
        self.client = client
        self.experiment = experiment
        self.click_model = click_model
        self.seed = seed
        self.concurrency = concurrency
        self.max_items = max_items
        self.progress = progress
        self._lock = threading.Lock()
        self.completed = 0  # impressions done so far (a test may watch it to strike mid-replay)

    def set_clock(self, when: datetime) -> None:
        self.client.post("/v1/admin/clock", {"now": when.isoformat()}, admin=True)

    def run(self, sessions: Sequence[Sequence[str]], users: Sequence[str], days: int = 1,
            start: datetime | None = None, on_day: Callable[[int], None] | None = None) -> ReplayResult:
        """Replay every session (external ids) as `users[i]`, over `days` simulated days.

        With `start` the server clock is set to start + d days before day d (admin token needed).
        """
        import numpy as np
        from tqdm import tqdm

        n_steps = [max(len(s) - 1, 0) for s in sessions]
        offsets = np.concatenate([[0], np.cumsum(n_steps)]).astype(np.int64)
        # All uniforms drawn up front, three per step: the replay does not depend on thread order.
        uniforms = np.random.default_rng(self.seed).random((int(offsets[-1]), 3))
        records: list[ImpressionRecord] = []
        bar = tqdm(total=int(offsets[-1]), desc=f"replay {self.experiment}", unit="imp",
                   disable=not self.progress, mininterval=1)
        day_of = np.minimum((np.arange(len(sessions)) * days) // max(len(sessions), 1), days - 1)
        t0 = time.monotonic()
        with ThreadPoolExecutor(self.concurrency) as pool:
            for day in range(days):
                if start is not None:
                    self.set_clock(start + timedelta(days=day))
                if on_day:
                    on_day(day)
                todo = np.flatnonzero(day_of == day)
                futures = [pool.submit(self._session, int(i), sessions[i], users[i],
                                       uniforms[offsets[i] : offsets[i + 1]], bar) for i in todo]
                for fut in futures:
                    records.extend(fut.result())
        bar.close()
        return self._summarise(records, time.monotonic() - t0)

    def _session(self, index: int, items: Sequence[str], user: str, u: np.ndarray, bar
                 ) -> list[ImpressionRecord]:
        out = []
        for step in range(1, len(items)):
            prefix = list(items[max(0, step - self.max_items) : step])
            target = items[step]
            answer = self.client.post("/v1/recommendations", {
                "experiment": self.experiment, "user_id": user, "session_id": f"{user}/{index}",
                "items": prefix, "k": self.click_model.k})
            slate = [str(i) for i in answer["items"]]
            rank = _rank(slate, target)
            rec = ImpressionRecord(
                user_id=user, session=index, step=step, arm=answer["arm"],
                model_version=answer.get("model_version"), impression_id=answer.get("impression_id"),
                fallback=bool(answer.get("fallback")), rank=rank,
                expected_clicks=self.click_model.expected_clicks(rank, len(slate)))
            if rec.impression_id is not None:
                for item in self.click_model.clicks(slate, target, u[step - 1]):
                    self.client.post("/v1/clicks", {"impression_id": rec.impression_id, "item_id": item})
                    rec.clicks.append(item)
            out.append(rec)
            with self._lock:
                self.completed += 1
                bar.update(1)
        return out

    def _summarise(self, records: list[ImpressionRecord], wall_s: float) -> ReplayResult:
        arms: dict[str, ArmSummary] = {}
        users: dict[str, set[str]] = {}
        session_arm: dict[int, str] = {}
        for r in sorted(records, key=lambda r: (r.session, r.step)):
            s = arms.setdefault(r.arm, ArmSummary())
            session_arm.setdefault(r.session, r.arm)
            s.fallbacks += r.fallback
            if r.impression_id is None:
                s.unlogged += 1
                continue
            users.setdefault(r.arm, set()).add(r.user_id)
            s.impressions += 1
            s.clicks += len(r.clicks)
            s.expected_clicks_given_slates += r.expected_clicks
        for arm, s in arms.items():
            s.users = len(users.get(arm, ()))
        return ReplayResult(records, dict(sorted(arms.items())), session_arm, wall_s, self.client.retries)


def user_ids(n_sessions: int, seed: int, n_users: int | None = None) -> list[str]:
    """One new user per session, or `n_users` returning users drawn uniformly (seeded)."""
    if n_users is None:
        return [f"sim-{seed}-{i}" for i in range(n_sessions)]
    import numpy as np

    if n_users < 1:
        raise ValueError("--users must be at least 1")
    draw = np.random.default_rng([seed, 7]).integers(0, n_users, size=n_sessions)
    return [f"sim-{seed}-u{int(u)}" for u in draw]


def add_predictions(result: ReplayResult, predictions: dict[str, Prediction]) -> None:
    """Fill each arm's predicted CTR: over all sessions, and over the sessions it served."""
    import numpy as np

    for arm, pred in predictions.items():
        if arm not in result.arms:
            continue
        mask = np.zeros(len(pred.impressions), dtype=bool)
        served = [i for i, a in result.session_arm.items() if a == arm]
        mask[served] = True
        result.arms[arm].predicted_ctr = pred.ctr()
        result.arms[arm].predicted_ctr_assigned = pred.ctr(mask)


def format_summary(result: ReplayResult) -> str:
    lines = [f"{'arm':<14}{'users':>8}{'impr.':>9}{'clicks':>8}{'CTR':>9}{'E[CTR|slates]':>15}"
             f"{'predicted':>11}{'pred.(own)':>11}{'fallback':>10}{'unlogged':>10}"]
    for arm, s in result.arms.items():
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"

        given = s.expected_clicks_given_slates / s.impressions if s.impressions else None
        lines.append(f"{arm:<14}{s.users:>8}{s.impressions:>9}{s.clicks:>8}{f(s.ctr):>9}{f(given):>15}"
                     f"{f(s.predicted_ctr):>11}{f(s.predicted_ctr_assigned):>11}{s.fallbacks:>10}{s.unlogged:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="replay held-out sessions as shoppers against the live API",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", required=True, help="base URL of the API, e.g. http://127.0.0.1:8600")
    p.add_argument("--experiment", required=True, help="experiment key")
    p.add_argument("--data", default="synthetic",
                   help="synthetic[:SEED] or a dataset path (default synthetic)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N test sessions")
    p.add_argument("--users", type=int, default=None,
                   help="N returning users (default: one user per session)")
    p.add_argument("--days", type=int, default=3, help="simulated days (default 3)")
    p.add_argument("--start", default=None,
                   help="ISO date of the first simulated day (default today, UTC); needs --admin-token")
    p.add_argument("--concurrency", type=int, default=8, help="shoppers replayed at once (default 8)")
    p.add_argument("--k", type=int, default=ClickModel.k, help="slate size (default 20)")
    p.add_argument("--eta", type=float, default=ClickModel.eta, help="examination exponent (default 0.8)")
    p.add_argument("--noise", type=float, default=ClickModel.noise, help="noise-click rate (default 0.01)")
    p.add_argument("--max-items", type=int, default=50, help="newest clicks sent per request (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--admin-token", default=None, help="admin token: sets the simulated clock, creates A/A")
    p.add_argument("--aa", metavar="ALIAS", default=None,
                   help="A/A mode: create and start the experiment with arms a, b both bound to ALIAS")
    p.add_argument("--predict", action="append", default=[], metavar="ARM=CHECKPOINT",
                   help="predict ARM's CTR from this checkpoint's offline ranking (repeatable)")
    p.add_argument("--retry-s", type=float, default=60.0, help="how long to retry through an outage")
    p.add_argument("--out", type=Path, default=None, help="write users.csv, impressions.jsonl, summary.json")
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from abrec.models.data import DataError, load_dataset

    from abrec.errors import UsageError

    try:
        click_model = ClickModel(k=args.k, eta=args.eta, noise=args.noise)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.days < 1 or args.concurrency < 1:
        raise UsageError("--days and --concurrency must be at least 1")
    predict_paths: dict[str, str] = {}
    for spec in args.predict:
        arm, sep, path = spec.partition("=")
        if not sep or not arm or not path:
            raise UsageError(f"--predict takes ARM=CHECKPOINT, got {spec!r}")
        predict_paths[arm] = path
    start = None
    if args.start or args.admin_token:
        if not args.admin_token:
            raise UsageError("--start sets the server clock, which needs --admin-token")
        try:
            day0 = datetime.fromisoformat(args.start) if args.start else datetime.now(UTC)
        except ValueError:
            raise UsageError(f"--start must be an ISO date, got {args.start!r}") from None
        start = (day0 if day0.tzinfo else day0.replace(tzinfo=UTC)).replace(hour=9, minute=0, second=0,
                                                                            microsecond=0)
    try:
        dataset = load_dataset(args.data)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    sessions = dataset.test[: args.limit] if args.limit else dataset.test
    ext = dataset.item_map.external_ids
    sessions_ext = [[ext[i - 1] for i in s] for s in sessions]
    users = user_ids(len(sessions), args.seed, args.users)
    print(f"simulate: {len(sessions)} test sessions of {dataset.name or args.data} "
          f"({sum(len(s) - 1 for s in sessions)} impressions) as {len(set(users))} users "
          f"over {args.days} days, "
          f"{args.concurrency} at a time, against {args.api} experiment {args.experiment!r}")
    print(f"simulate: click model k={click_model.k}, examination r^-{click_model.eta}, "
          f"noise {click_model.noise}")

    client = ApiClient(args.api, pool_size=args.concurrency * 2, retry_s=args.retry_s,
                       admin_token=args.admin_token)
    try:
        if args.aa:
            create_aa_experiment(client, args.experiment, args.aa)
        replay = Replay(client, args.experiment, click_model, seed=args.seed, concurrency=args.concurrency,
                        max_items=args.max_items)
        result = replay.run(sessions_ext, users, days=args.days, start=start)
    except ApiError as exc:
        print(f"abrec simulate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()

    if predict_paths:
        add_predictions(result, predictions_from_checkpoints(predict_paths, dataset, sessions, click_model,
                                                             args.max_items))
    print(format_summary(result))
    print(f"simulate: {sum(s.impressions for s in result.arms.values())} impressions acknowledged in "
          f"{result.wall_s:.1f} s, {result.retries} retries")
    if args.out:
        result.write(args.out)
        print(f"simulate: wrote {args.out}/users.csv (abrec analyze-file), impressions.jsonl, summary.json")
    return 0


def predictions_from_checkpoints(paths: dict[str, str], dataset, sessions: Sequence[Sequence[int]],
                                 click_model: ClickModel, max_items: int) -> dict[str, Prediction]:
    """Each arm's prediction from its checkpoint, with the sessions translated to its item map."""
    from abrec.models.checkpoint import load_checkpoint

    out = {}
    for arm, path in paths.items():
        ckpt = load_checkpoint(path)
        mine = sessions if ckpt.item_map == dataset.item_map else dataset.remap(list(sessions), ckpt.item_map)
        out[arm] = predict(ckpt.model, mine, click_model, max_items=max_items, progress=True)
    return out


def create_aa_experiment(client: ApiClient, key: str, alias: str) -> None:
    """Create and start an A/A experiment: arms "a" (control) and "b" on the same model alias."""
    client.post("/v1/admin/experiments", {
        "key": key, "hypothesis": "A/A: both arms serve the same model",
        "arms": [{"name": "a", "weight": 0.5, "model": alias}, {"name": "b", "weight": 0.5, "model": alias}],
    }, admin=True)
    client.post(f"/v1/admin/experiments/{key}/start", {}, admin=True)


def lift_ci_contains(ci: Sequence[float], value: float) -> bool:
    return bool(ci[0] <= value <= ci[1]) and not math.isnan(value)
