"""Compatibility with GrowthBook's published SDK test cases (tests/data/growthbook_cases.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from abrec.assignment import (
    choose_variation,
    fnv1a32,
    get_bucket_ranges,
    get_equal_weights,
    hash_unit,
    in_namespace,
)
from abrec.assignment.vectorised import choose_many, hash_many
from hypothesis import given, settings
from hypothesis import strategies as st

CASES = json.loads((Path(__file__).parent / "data" / "growthbook_cases.json").read_text())


def _names(section: str) -> list[str]:
    return [case[0] for case in CASES[section]]


@pytest.mark.parametrize("seed,value,version,expected", CASES["hash"])
def test_hash(seed, value, version, expected):
    assert hash_unit(seed, value, version) == expected


@pytest.mark.parametrize("value,expected", CASES["fnv"])
def test_fnv_cases(value, expected):
    assert fnv1a32(value) % 1000 == expected


@pytest.mark.parametrize("name,args,expected", CASES["getBucketRange"], ids=_names("getBucketRange"))
def test_get_bucket_range(name, args, expected):
    ranges = get_bucket_ranges(*args)
    assert len(ranges) == len(expected)
    for got, want in zip(ranges, expected, strict=True):
        assert got == pytest.approx(tuple(want), abs=1e-9)


@pytest.mark.parametrize("name,n,ranges,expected", CASES["chooseVariation"], ids=_names("chooseVariation"))
def test_choose_variation(name, n, ranges, expected):
    assert choose_variation(n, ranges) == expected


@pytest.mark.parametrize("name,unit,namespace,expected", CASES["inNamespace"], ids=_names("inNamespace"))
def test_in_namespace(name, unit, namespace, expected):
    assert in_namespace(unit, tuple(namespace)) is expected


@pytest.mark.parametrize("n,expected", CASES["getEqualWeights"])
def test_get_equal_weights(n, expected):
    assert get_equal_weights(n) == pytest.approx(expected, abs=1e-8)


def test_fnv1a32_reference_vectors():
    # Published FNV-1a 32-bit vectors (Fowler/Noll/Vo test suite), all ASCII.
    assert fnv1a32("") == 0x811C9DC5
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("foobar") == 0xBF9CF968


def test_fnv1a32_hashes_utf16_code_units_like_javascript():
    # Value computed with the JavaScript SDK's loop (charCodeAt) under node: the emoji is hashed as
    # its two surrogates, 0xD83D 0xDE00, and "é" as one unit, not as UTF-8 bytes.
    assert fnv1a32("😀é") == 811076483
    assert fnv1a32("😀") == _fold([0xD83D, 0xDE00])
    assert fnv1a32("é") == _fold([0xE9])


def _fold(units: list[int]) -> int:
    h = 0x811C9DC5
    for u in units:
        h = ((h ^ u) * 0x01000193) % 2**32
    return h


@settings(max_examples=60, deadline=None)
@given(
    seed=st.text(max_size=12),
    units=st.lists(st.text(max_size=12), min_size=1, max_size=40),
    version=st.sampled_from([1, 2]),
)
def test_vectorised_hash_equals_scalar(seed, units, version):
    got = hash_many(seed, units, version)
    assert list(got) == [hash_unit(seed, u, version) for u in units]


def test_choose_many_equals_scalar():
    hashes = hash_many("s", [f"u{i}" for i in range(5000)])
    ranges = get_bucket_ranges(3, 0.7, [0.2, 0.3, 0.5])
    assert list(choose_many(hashes, ranges)) == [choose_variation(h, ranges) for h in hashes]


def test_unknown_hash_version():
    assert hash_unit("a", "b", 3) is None
    with pytest.raises(ValueError, match="hash version"):
        hash_many("a", ["b"], 3)
