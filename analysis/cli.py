"""`abrec analyze-file`: the experiment statistics on an exported per-user CSV table.

Light to import: numpy, scipy and the statistics are imported inside the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

REQUIRED = ("unit_id", "arm", "impressions", "clicks")
PRE = ("pre_impressions", "pre_clicks")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze-file",
        help="CTR lift with CIs, SRM and sequential CIs from a per-user CSV",
        description="Reads a per-user table (columns unit_id, arm, impressions, clicks and optionally "
        "pre_impressions, pre_clicks) and compares every arm with the control. With pre-period "
        "columns the lifts are CUPED-adjusted.",
    )
    p.add_argument("file", metavar="FILE.csv")
    p.add_argument("--control", required=True, metavar="NAME", help="the control arm")
    p.add_argument(
        "--weights", default=None, metavar="NAME=W,NAME=W", help="configured traffic weights (default equal)"
    )
    p.add_argument(
        "--sequential-tuning",
        type=float,
        default=None,
        metavar="N",
        help="N* of the sequential CIs: the planned total users (default: the users in the file)",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default 0.05)")
    p.add_argument(
        "--winsorize",
        type=float,
        default=None,
        metavar="PCT",
        help="cap per-user counts at this percentile over all arms, e.g. 99.9",
    )
    p.add_argument("--no-cuped", action="store_true", help="ignore the pre-period columns")
    p.add_argument(
        "--correction",
        choices=["holm", "bh", "none"],
        default="holm",
        help="multiple-arm correction for p_value_adjusted (default holm)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_analyze_file)


def cmd_analyze_file(args: argparse.Namespace) -> int:
    import numpy as np
    from abrec.analysis.stats import ArmStats, analyze, winsorize

    from abrec.cli import UsageError

    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must lie in (0, 1), got {args.alpha}")
    n_star = args.sequential_tuning
    if n_star is not None and not (math.isfinite(n_star) and n_star > 0):
        raise UsageError(f"--sequential-tuning must be a positive number of users, got {n_star}")
    if args.winsorize is not None and not 0 < args.winsorize <= 100:
        raise UsageError(f"--winsorize must be a percentile in (0, 100], got {args.winsorize}")

    columns, by_arm = read_table(Path(args.file))
    if len(by_arm) < 2:
        raise UsageError(f"{args.file}: need at least two arms, found {sorted(by_arm)}")
    if args.control not in by_arm:
        raise UsageError(f"control arm {args.control!r} is not in {args.file}; its arms are {sorted(by_arm)}")
    weights = parse_weights(args.weights, set(by_arm)) if args.weights else None

    arms = list(by_arm)
    data = {col: [np.asarray(by_arm[a][col], dtype=float) for a in arms] for col in columns}
    if args.winsorize is not None:
        data = {col: winsorize(values, args.winsorize) for col, values in data.items()}
    use_pre = all(c in columns for c in PRE) and not args.no_cuped
    stats = {}
    for i, arm in enumerate(arms):
        pre = (data["pre_clicks"][i], data["pre_impressions"][i]) if use_pre else (None, None)
        stats[arm] = ArmStats.from_arrays(data["clicks"][i], data["impressions"][i], *pre)
    cuped = use_pre and all(s.has_pre for s in stats.values())
    tuning = n_star or float(sum(s.n for s in stats.values()))
    result = analyze(
        stats,
        args.control,
        weights,
        alpha=args.alpha,
        sequential_tuning=tuning,
        cuped=cuped,
        correction=None if args.correction == "none" else args.correction,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render_table(result, tuning, args.alpha, weights))
    return 0


def read_table(path: Path) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Per-arm columns of numbers from the CSV; raises UsageError naming the first problem."""
    from abrec.cli import UsageError

    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise UsageError(f"{path}: missing column(s) {', '.join(missing)}; found {header or 'no header'}")
        present_pre = [c for c in PRE if c in header]
        if len(present_pre) == 1:
            raise UsageError(f"{path}: give both pre_impressions and pre_clicks, or neither")
        reader.fieldnames = header
        columns = ["impressions", "clicks", *present_pre]
        by_arm: dict[str, dict[str, list[float]]] = {}
        seen: set[str] = set()
        for line, row in enumerate(reader, start=2):
            unit, arm = (row.get("unit_id") or "").strip(), (row.get("arm") or "").strip()
            if not unit or not arm:
                raise UsageError(f"{path}:{line}: empty unit_id or arm")
            if unit in seen:
                raise UsageError(f"{path}:{line}: unit_id {unit!r} appears twice; need one row per user")
            seen.add(unit)
            values = by_arm.setdefault(arm, {c: [] for c in columns})
            for col in columns:
                values[col].append(_count(row.get(col), col, col in PRE, f"{path}:{line}"))
    if not by_arm:
        raise UsageError(f"{path}: no rows")
    return columns, by_arm


def _count(raw: str | None, column: str, optional: bool, where: str) -> float:
    from abrec.cli import UsageError

    text = (raw or "").strip()
    if not text and optional:
        return 0.0  # a user without pre-period activity
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{where}: {column} must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{where}: {column} must be a non-negative count, got {text!r}")
    return value


def parse_weights(text: str, arms: set[str]) -> dict[str, float]:
    from abrec.cli import UsageError

    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not (math.isfinite(weight) and weight > 0):
            raise UsageError(f"--weights: expected NAME=W with W > 0, got {part!r}")
        weights[name] = weight
    if set(weights) != arms:
        raise UsageError(f"--weights names {sorted(weights)} but the file has arms {sorted(arms)}")
    return weights


def render_table(result: Any, tuning: float, alpha: float, weights: dict[str, float] | None) -> str:
    """A plain-text summary for people: one row per arm, then SRM and the diagnostics."""
    level = f"{100 * (1 - alpha):g}%"
    out = result.to_dict()
    rows = [["arm", "users", "impressions", "clicks", "CTR", "rel lift", f"{level} CI", "p"]]
    rows[0].append(f"seq. {level} CI")
    for name, a in out["arms"].items():
        lift = "control" if name == result.control else _pct(a["rel_lift"])
        rows.append(
            [
                name,
                f"{a['users']:,}",
                f"{a['impressions']:,.0f}",
                f"{a['clicks']:,.0f}",
                "n/a" if a["ctr"] is None else f"{100 * a['ctr']:.3f}%",
                lift,
                _ci(a["rel_lift_ci"]),
                "" if name == result.control else _p(a["p_value"]),
                _ci(a["rel_lift_ci_sequential"]),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    # Arm names left-aligned, numbers right-aligned.
    lines = ["  ".join([r[0].ljust(widths[0]), *map(str.rjust, r[1:], widths[1:])]) for r in rows]
    weights_text = ", ".join(f"{k}={v:g}" for k, v in weights.items()) if weights else "equal"
    srm = result.srm
    cuped = any(c.cuped for c in result.comparisons.values())
    lines += [
        "",
        f"SRM: chi2 = {srm.chi2:.2f}, p = {_p(srm.p_value)} against weights {weights_text}"
        + ("  ALERT: sample-ratio mismatch, do not trust the lifts" if srm.alert else ""),
        "CUPED: " + ("on (pre-period clicks and impressions); lifts are adjusted" if cuped else "off"),
        f"Sequential CIs valid at any look, tuned for N* = {tuning:,.0f} users.",
    ]
    if len(result.comparisons) > 1 and result.correction:
        adjusted = ", ".join(f"{k} {_p(v)}" for k, v in result.adjusted_p_values.items())
        lines.append(f"{result.correction.upper()}-adjusted p: {adjusted}")
    naive = ", ".join(f"{k} {_p(float(c.naive_p_value))}" for k, c in result.comparisons.items())
    lines.append(f"Diagnostic only, ignores that clicks cluster by user: per-impression test p: {naive}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}%"


def _ci(ci: list[float | None] | None) -> str:
    if ci is None:
        return ""
    lo, hi = ci
    return f"[{_pct(lo)}, {_pct(hi)}]"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    if p < 1e-16:
        return "<1e-16"  # beyond double precision next to 1
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"
