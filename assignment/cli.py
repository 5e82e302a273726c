"""`abrec assign`: which arm a unit gets for a seed, as JSON. Imports nothing heavy, so it starts fast."""

from __future__ import annotations

import argparse
import json
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "assign",
        help="hash a unit id into an arm (GrowthBook-compatible)",
        description="Print {'hash': float, 'arm_index': int} for a seed and unit id; "
        "arm_index is -1 when the unit falls outside the coverage.",
    )
    p.add_argument("--seed", required=True, help="experiment seed (GrowthBook: the experiment's seed or key)")
    p.add_argument("--unit", required=True, help="unit id to hash, e.g. a user id")
    p.add_argument("--hash-version", type=int, default=2, help="GrowthBook hash version: 1 or 2 (default 2)")
    p.add_argument(
        "--weights", default=None, help="comma-separated arm weights, summing to 1 (default 0.5,0.5)"
    )
    p.add_argument("--coverage", default="1", help="share of units included, in (0, 1] (default 1)")
    p.set_defaults(func=run_assign)


def _parse_weights(text: str | None) -> list[float]:
    from abrec.cli import UsageError

    if text is None:
        return [0.5, 0.5]
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) < 2:
        raise UsageError("--weights needs at least two arms")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UsageError(f"--weights must be finite and non-negative, got {text!r}")
    if not 0.99 <= sum(weights) <= 1.01:
        raise UsageError(f"--weights must sum to 1 (GrowthBook accepts 0.99..1.01), got {sum(weights):g}")
    return weights


def _parse_coverage(text: str) -> float:
    from abrec.cli import UsageError

    try:
        coverage = float(text)
    except ValueError:
        raise UsageError(f"--coverage must be a number in (0, 1], got {text!r}") from None
    if not 0 < coverage <= 1:
        raise UsageError(f"--coverage must be in (0, 1], got {text!r}")
    return coverage


def run_assign(args: argparse.Namespace) -> int:
    from abrec.assignment.hashing import choose_variation, get_bucket_ranges, hash_unit

    from abrec.cli import UsageError

    if args.hash_version not in (1, 2):
        raise UsageError(f"--hash-version must be 1 or 2, got {args.hash_version}")
    weights = _parse_weights(args.weights)
    coverage = _parse_coverage(args.coverage)
    h = hash_unit(args.seed, args.unit, args.hash_version)
    arm = choose_variation(h, get_bucket_ranges(len(weights), coverage, weights))
    print(json.dumps({"hash": h, "arm_index": arm}))
    return 0
