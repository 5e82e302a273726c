"""The hash of many unit ids at once with numpy, for simulations and statistical checks.

Gives exactly `hash_unit(seed, unit, version)` for every unit (the tests compare both), but runs
FNV-1a column by column over all ids instead of character by character over each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from abrec.assignment.hashing import FNV_OFFSET, FNV_PRIME, MASK32, fnv1a32, utf16_units

_POW10 = np.array([10**k for k in range(10)], dtype=np.uint64)


def _fnv_columns(
    state: np.ndarray, codes: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Continue FNV-1a states with each row's code units (row i: codes[offsets[i]:offsets[i]+lengths[i]])."""
    h = state.copy()
    for j in range(int(lengths.max(initial=0))):
        rows = np.nonzero(lengths > j)[0]
        h[rows] = ((h[rows] ^ codes[offsets[rows] + j]) * FNV_PRIME) & MASK32
    return h


def _fnv_constant(state: np.ndarray, text: str) -> np.ndarray:
    """Continue every state with the same string."""
    h = state.copy()
    for unit in utf16_units(text):
        h = ((h ^ unit) * FNV_PRIME) & MASK32
    return h


def _encode(units: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    joined = "".join(units)
    codes = np.frombuffer(joined.encode("utf-16-le", "surrogatepass"), dtype=np.uint16).astype(np.uint64)
    if len(codes) == len(joined):  # no astral characters: one code unit per character
        lengths = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
    else:
        lengths = np.fromiter((len(utf16_units(u)) for u in units), dtype=np.int64, count=len(units))
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    return codes, offsets, lengths


def _decimal_digits(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The code units of str(h) for each 32-bit value, in the layout `_fnv_columns` reads."""
    ndigits = 1 + (h[:, None] >= _POW10[None, 1:]).sum(axis=1)
    width = 10
    digits = np.zeros((len(h), width), dtype=np.uint64)
    for p in range(width):
        rows = ndigits > p
        power = _POW10[ndigits[rows] - 1 - p]
        digits[rows, p] = (h[rows] // power) % 10 + ord("0")
    offsets = np.arange(len(h), dtype=np.int64) * width
    return digits.ravel(), offsets, ndigits.astype(np.int64)


def hash_many(seed: str, units: Sequence[str], version: int = 2) -> np.ndarray:
    """`hash_unit(seed, u, version)` for every u in `units`, as a float64 array."""
    if version not in (1, 2):
        raise ValueError(f"unknown hash version {version}; GrowthBook defines 1 and 2")
    codes, offsets, lengths = _encode(units)
    if version == 2:
        start = np.full(len(units), fnv1a32(seed), dtype=np.uint64)
        first = _fnv_columns(start, codes, offsets, lengths)
        dcodes, doffsets, dlengths = _decimal_digits(first)
        second = _fnv_columns(np.full(len(units), FNV_OFFSET, dtype=np.uint64), dcodes, doffsets, dlengths)
        return (second % 10000).astype(np.float64) / 10000
    start = np.full(len(units), FNV_OFFSET, dtype=np.uint64)
    h = _fnv_constant(_fnv_columns(start, codes, offsets, lengths), seed)
    return (h % 1000).astype(np.float64) / 1000


def choose_many(hashes: np.ndarray, ranges: Sequence[Sequence[float]]) -> np.ndarray:
    """`choose_variation` for every hash: the arm index, or -1 outside every range."""
    out = np.full(len(hashes), -1, dtype=np.int64)
    for i, (start, end) in enumerate(ranges):
        out[(out == -1) & (hashes >= start) & (hashes < end)] = i
    return out
