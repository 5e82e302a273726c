"""Deterministic arm assignment, compatible with GrowthBook's SDK hashing (pure functions, no I/O)."""

from abrec.assignment.hashing import (
    choose_variation,
    fnv1a32,
    get_bucket_ranges,
    get_equal_weights,
    hash_unit,
    in_namespace,
    in_range,
)

__all__ = [
    "choose_variation",
    "fnv1a32",
    "get_bucket_ranges",
    "get_equal_weights",
    "hash_unit",
    "in_namespace",
    "in_range",
]
