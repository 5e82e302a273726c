"""GrowthBook-compatible bucketing: FNV-1a hashing of a unit id, bucket ranges and the arm choice.

Follows GrowthBook's SDK specification (the JavaScript SDK is the reference), so that a GrowthBook
client SDK and abrec put the same user in the same arm for the same seed. Strings are hashed as
UTF-16 code units, because JavaScript's `charCodeAt` is what the reference hashes.
"""

from __future__ import annotations

from collections.abc import Sequence

FNV_OFFSET = 0x811C9DC5
FNV_PRIME = 0x01000193
MASK32 = 0xFFFFFFFF

Range = tuple[float, float]


def utf16_units(text: str) -> memoryview:
    """The UTF-16 code units of `text` (astral characters become surrogate pairs, as in JS)."""
    return memoryview(text.encode("utf-16-le", "surrogatepass")).cast("H")


def fnv1a32(text: str, state: int = FNV_OFFSET) -> int:
    """32-bit FNV-1a over UTF-16 code units; `state` lets a caller continue from a shared prefix."""
    h = state
    for unit in utf16_units(text):
        h = ((h ^ unit) * FNV_PRIME) & MASK32
    return h


def hash_unit(seed: str, unit: str, version: int = 2) -> float | None:
    """GrowthBook's `hash(seed, value, version)`: a number in [0, 1), or None for an unknown version.

    Version 2 hashes twice, which fixes the correlation version 1 has between experiments whose
    seeds share a suffix; version 1 is kept for SDK compatibility (namespaces still use it).
    """
    if version == 2:
        return fnv1a32(str(fnv1a32(seed + unit))) % 10000 / 10000
    if version == 1:
        return fnv1a32(unit + seed) % 1000 / 1000
    return None


def get_equal_weights(n: int) -> list[float]:
    return [1.0 / n] * n if n > 0 else []


def get_bucket_ranges(
    num_variations: int, coverage: float = 1.0, weights: Sequence[float] | None = None
) -> list[Range]:
    """One [start, end) range per variation: each starts at the cumulative weight and covers `coverage` of it.

    Because the starts depend only on the weights, changing the coverage moves users in or out of
    the experiment but never from one arm to another. Invalid weights fall back to equal weights,
    exactly as the GrowthBook SDKs do.
    """
    coverage = min(max(coverage, 0.0), 1.0)
    equal = get_equal_weights(num_variations)
    chosen = list(weights) if weights is not None else equal
    if len(chosen) != num_variations or not 0.99 <= sum(chosen) <= 1.01:
        chosen = equal
    ranges = []
    cumulative = 0.0
    for w in chosen:
        start = cumulative
        cumulative += w
        ranges.append((start, start + coverage * w))
    return ranges


def in_range(n: float, range_: Sequence[float]) -> bool:
    return range_[0] <= n < range_[1]


def choose_variation(n: float, ranges: Sequence[Sequence[float]]) -> int:
    """The index of the range that holds `n`, or -1 when `n` falls outside every range (not covered)."""
    for i, range_ in enumerate(ranges):
        if in_range(n, range_):
            return i
    return -1


def in_namespace(unit: str, namespace: tuple[str, float, float] | Sequence) -> bool:
    """Whether `unit` falls in the [start, end) slice of a namespace shared by exclusive experiments."""
    name, start, end = namespace
    n = hash_unit("__" + name, unit, 1)
    return n is not None and start <= n < end
