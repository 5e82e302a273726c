"""Session readers on the real sample files, the paper's preprocessing, bad input, ItemMap and the
synthetic shop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from abrec.models.data import (
    DataError,
    ItemMap,
    load_dataset,
    preprocess,
    read_sessions,
    synthetic_shop,
)


def test_item_map_round_trip_keeps_strings() -> None:
    m = ItemMap([101, "sku-7", "3"])
    assert len(m) == 3
    assert m.to_internal(101) == 1 and m.to_internal("101") == 1 and m.to_internal("sku-7") == 2
    assert m.to_internal("nope") is None
    assert m.to_external(1) == "101"
    with pytest.raises(KeyError):
        m.to_external(0)
    again = ItemMap.from_json(m.to_json())
    assert again == m and json.loads(m.to_json()) == ["101", "sku-7", "3"]


def test_numeric_ids_keep_their_order() -> None:
    m = ItemMap.from_sessions([["10", "2"], ["7"]])
    assert m.external_ids == ["2", "7", "10"]


def test_plain_text_and_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "s.txt"
    good.write_text("1 2 3\n\n4 5\n")
    assert [s.items for s in read_sessions(good)] == [["1", "2", "3"], ["4", "5"]]
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n4,5 6\n")
    with pytest.raises(DataError, match=r"bad\.txt: line 2"):
        read_sessions(bad, "text")


def test_empty_and_unknown_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: line 1: empty"):
        read_sessions(empty)
    weird = tmp_path / "weird.txt"
    weird.write_text("a;b;c\n")
    with pytest.raises(DataError, match=r"weird\.txt: line 1: unknown session format"):
        read_sessions(weird)
    with pytest.raises(DataError, match="unknown format 'parquet'"):
        read_sessions(weird, "parquet")
    with pytest.raises(DataError, match="no such file"):
        read_sessions(tmp_path / "missing.txt")


def test_malformed_otto_and_csv_lines(tmp_path: Path) -> None:
    otto = tmp_path / "o.jsonl"
    otto.write_text('{"session": 1, "events": [{"aid": 5, "ts": 1, "type": "clicks"}]}\n{"session": 2\n')
    with pytest.raises(DataError, match=r"o\.jsonl: line 2: malformed OTTO"):
        read_sessions(otto)
    digi = tmp_path / "train-item-views.csv"
    digi.write_text("session_id;user_id;item_id;timeframe;eventdate\n1;NA;5;10;2016-05-09\n1;NA;x;20;2016-05-09\n")
    with pytest.raises(DataError, match=r"train-item-views\.csv: line 3: malformed row"):
        read_sessions(digi)
    yoo = tmp_path / "yoochoose-clicks.dat"
    yoo.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z\n")
    with pytest.raises(DataError, match=r"yoochoose-clicks\.dat: line 2: malformed row"):
        read_sessions(yoo)


def test_yoochoose_reader_orders_by_time(tmp_path: Path) -> None:
    yoo = tmp_path / "yoochoose-clicks.dat"
    yoo.write_text("1,2014-04-07T10:54:09.868Z,2,0\n1,2014-04-07T10:51:09.277Z,1,0\n2,2014-04-08T10:00:00.000Z,3,S\n")
    sessions = {s.session_id: s for s in read_sessions(yoo)}
    assert sessions["1"].items == ["1", "2"] and sessions["2"].items == ["3"]
    assert sessions["2"].time > sessions["1"].time


def test_preprocessing_filters_and_splits_by_time(tmp_path: Path) -> None:
    day = 86400.0
    from abrec.models.data import RawSession

    raw = [RawSession(str(i), ["a", "b", "c"], i * day) for i in range(5)]  # a, b, c: 5 clicks each
    raw += [RawSession("rare", ["a", "z"], 1 * day)]  # z is seen once: dropped, session too short
    raw += [RawSession("one", ["b"], 2 * day)]  # a single click
    raw += [RawSession("new", ["a", "b", "q", "q", "q", "q", "q"], 10 * day)]  # q only in test
    ds = preprocess(raw, test_days=3, valid_fraction=0.0)
    assert ds.item_map.external_ids == ["a", "b", "c"]
    assert ds.train == [[1, 2, 3]] * 5  # "rare" lost z and became too short; "one" was too short
    assert ds.test == [[1, 2]]  # q removed: unseen in train


def test_real_diginetica_raw_sample(shared_data: Path) -> None:
    path = shared_data / "diginetica-raw-sample" / "train-item-views-sample.csv"
    if not path.exists():
        pytest.skip("sample missing")
    raw = read_sessions(path)
    rows = [line for line in path.read_text().splitlines()[1:] if line.strip()]
    assert sum(len(s.items) for s in raw) == len(rows)
    assert len(raw) == len({line.split(";")[0] for line in rows})
    ds = load_dataset(path)
    counts = np.bincount([i for s in ds.train + ds.valid for i in s], minlength=ds.num_items + 1)
    assert ds.num_items > 100 and counts[1:].min() >= 1
    assert all(len(s) >= 2 for s in ds.train + ds.valid + ds.test)
    assert all(1 <= i <= ds.num_items for s in ds.test for i in s)


def test_real_otto_sample(shared_data: Path) -> None:
    path = shared_data / "otto-sample" / "sessions.jsonl"
    if not path.exists():
        pytest.skip("sample missing")
    clicks = read_sessions(path)
    everything = read_sessions(path, event_types=("clicks", "carts", "orders"))
    assert len(clicks) == 20
    assert sum(len(s.items) for s in everything) == 862
    assert sum(len(s.items) for s in clicks) < 862


def test_real_diginetica_directory(shared_data: Path) -> None:
    path = shared_data / "diginetica"
    if not (path / "train.txt").exists():
        pytest.skip("diginetica missing")
    ds = load_dataset(path)
    assert len(ds.train) + len(ds.valid) == 186670 and len(ds.test) == 15963
    assert sum(len(s) - 1 for s in ds.test) == 60858
    assert ds.item_map.to_external(5) == "5"  # already re-indexed ids keep their value


def test_synthetic_shop_is_seeded_and_learnable() -> None:
    a, b = synthetic_shop(seed=1, n_sessions=800), synthetic_shop(seed=1, n_sessions=800)
    c = synthetic_shop(seed=2, n_sessions=800)
    assert a.train == b.train and a.fingerprint() == b.fingerprint() and a.train != c.train
    assert min(len(s) for s in a.train) >= 2
    # Sequential structure: the most likely successor predicts the next click far better than
    # the most popular item does.
    shop = a.shop
    pairs = [(s[t - 1], s[t]) for s in a.train for t in range(1, len(s))]
    markov = np.mean([shop.next_distribution(p).argmax() == n for p, n in pairs])
    popular = np.mean([a.popular(1)[0] == n for _, n in pairs])
    assert markov > 2.5 * popular
    assert shop.next_distribution(3).sum() == pytest.approx(1.0)


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="train.txt and test.txt"):
        load_dataset(tmp_path / "dir")
