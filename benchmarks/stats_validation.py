"""Large simulations of the analysis statistics: error rates of the methods and of their baselines.

Same data-generating process as tests/test_analysis_simulation.py (analysis.synthetic: users
with clustered clicks and returning visits), with many more experiments so the rates are
precise. The baselines run on the same data: the naive per-impression test against the
user-level delta method, fixed-horizon CIs against the sequential ones under 30 daily looks,
unadjusted against CUPED.

    nice -n 10 .venv/bin/python benchmarks/stats_validation.py [--experiments 100000]

Writes benchmarks/results/stats.json and benchmarks/results/stats_peeking.html.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from abrec.analysis import sequential
from abrec.analysis.decision import MIN_CLICKS_PER_ARM
from abrec.analysis.power import users_needed
from abrec.analysis.stats import ArmStats, compare
from abrec.analysis.synthetic import Population, concat, draw_daily_cumulative, draw_users
from tqdm import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
ALPHA = 0.05
CHUNK = 1000


def arm(rng: np.random.Generator, experiments: int, users: int, pop: Population, lift: float) -> ArmStats:
    chunks = range(0, experiments, CHUNK)
    return concat([draw_users(rng, (min(CHUNK, experiments - i), users), pop, lift).stats() for i in chunks])


def rate(hits: np.ndarray) -> dict[str, float]:
    """A rate with its Monte Carlo standard error."""
    p = float(np.mean(hits))
    return {"rate": p, "se": float(np.sqrt(p * (1 - p) / hits.size))}


def covers(ci, truth: float) -> np.ndarray:
    return (ci[0] < truth) & (truth < ci[1])


def excludes_zero(ci) -> np.ndarray:
    return (ci[0] > 0) | (ci[1] < 0)


def error_rates(rng: np.random.Generator, experiments: int, users: int, pop: Population, lift: float) -> dict:
    """A/A false positives and A/B coverage: delta method, Fieller, CUPED and the naive test."""
    with tqdm(total=3, desc=f"{experiments} experiments x 3 arms x {users} users") as bar:
        control = arm(rng, experiments, users, pop, 0.0)
        bar.update()
        a_a = arm(rng, experiments, users, pop, 0.0)
        bar.update()
        treatment = arm(rng, experiments, users, pop, lift)
        bar.update()
    aa, aa_cuped = compare(control, a_a), compare(control, a_a, cuped=True)
    ab = compare(control, treatment, fieller=True)
    ab_cuped = compare(control, treatment, cuped=True, fieller=True)
    true_abs = pop.ctr * lift
    return {
        "experiments": experiments,
        "users_per_arm": users,
        "population": pop.__dict__,
        "true_rel_lift": lift,
        "rel_lift_se_median": float(np.median(ab.rel_lift_se)),
        "false_positive_rate": {
            "naive_per_impression (baseline)": rate(aa.naive_p_value < ALPHA),
            "delta_abs": rate(aa.abs_p_value < ALPHA),
            "delta_rel": rate(aa.p_value < ALPHA),
            "cuped_rel": rate(aa_cuped.p_value < ALPHA),
        },
        "coverage": {
            "delta_abs": rate(covers(ab.abs_lift_ci, true_abs)),
            "delta_rel": rate(covers(ab.rel_lift_ci, lift)),
            "fieller_rel": rate(covers(ab.rel_lift_ci_fieller, lift)),
            "cuped_abs": rate(covers(ab_cuped.abs_lift_ci, true_abs)),
            "cuped_rel": rate(covers(ab_cuped.rel_lift_ci, lift)),
            "cuped_fieller_rel": rate(covers(ab_cuped.rel_lift_ci_fieller, lift)),
        },
        "cuped": {
            "variance_ratio_observed": float(np.var(ab_cuped.abs_lift) / np.var(ab.abs_lift)),
            "one_minus_rho2": one_minus_rho2(rng, pop),
        },
    }


def one_minus_rho2(rng: np.random.Generator, pop: Population) -> float:
    """1 - rho², rho = correlation of a user's linearised post- and pre-period CTRs (2M users)."""
    u = draw_users(rng, (2_000_000,), pop)
    post = u.clicks - u.clicks.sum() / u.impressions.sum() * u.impressions
    pre = u.pre_clicks - u.pre_clicks.sum() / u.pre_impressions.sum() * u.pre_impressions
    return float(1 - np.corrcoef(post, pre)[0, 1] ** 2)


def peeking(rng: np.random.Generator, experiments: int, users: int, days: int = 30) -> dict:
    """A/A experiments looked at every night: the share ever declared significant, by method."""
    chunk = 100
    parts = []
    for _ in tqdm(range(experiments // chunk), desc=f"{experiments} A/A experiments x {days} days"):
        pair = [draw_daily_cumulative(rng, chunk, users, days) for _ in range(2)]
        parts.append(pair)
    n_star = 2 * users * (1 - (6 / 7) ** days)  # planned total: first visits geometric, mean 7 days
    methods = ("fixed_rel", "fixed_abs", "seq_rel", "seq_abs", "seq_fieller")
    n = experiments // chunk * chunk
    gates = ("every_day", f"from_{MIN_CLICKS_PER_ARM}_clicks")
    out = {gate: {m: np.zeros(n, bool) for m in methods} for gate in gates}
    curves: dict[str, list[float]] = {f"{g}/{m}": [] for g in out for m in methods}
    for day in range(days):
        a, b = concat([p[0][day] for p in parts]), concat([p[1][day] for p in parts])
        r = compare(a, b, sequential_tuning=n_star, fieller=True)
        rejects = {
            "fixed_rel": r.p_value < ALPHA,
            "fixed_abs": r.abs_p_value < ALPHA,
            "seq_rel": excludes_zero(r.rel_lift_ci_sequential),
            "seq_abs": excludes_zero(r.abs_lift_ci_sequential),
            "seq_fieller": excludes_zero(r.rel_lift_ci_sequential_fieller),
        }
        gated = (a.sum_x >= MIN_CLICKS_PER_ARM) & (b.sum_x >= MIN_CLICKS_PER_ARM)
        for gate, looks in (("every_day", True), (f"from_{MIN_CLICKS_PER_ARM}_clicks", gated)):
            for m in methods:
                out[gate][m] |= looks & rejects[m]
                curves[f"{gate}/{m}"].append(float(out[gate][m].mean()))
        if day == days - 1:
            final = {"fixed_rel_single_look": rate(r.p_value < ALPHA)}
            ratio = (r.rel_lift_ci_sequential[1] - r.rel_lift) / (r.rel_lift_ci[1] - r.rel_lift)
            final["seq_over_fixed_halfwidth_median"] = float(np.median(ratio))
    return {
        "experiments": n,
        "users_per_arm": users,
        "days": days,
        "n_star": n_star,
        "ever_significant": {gate: {m: rate(v) for m, v in d.items()} for gate, d in out.items()},
        "final_day": final,
        "curves": curves,
    }


def power_check(rng: np.random.Generator, runs: int, mde: float) -> dict:
    baseline = draw_users(rng, (2_000_000,)).stats(pre=False)
    out = {}
    for seq in (False, True):
        n = users_needed(baseline, mde, sequential_test=seq).users_per_arm
        c = concat([draw_users(rng, (500, n)).stats(pre=False) for _ in range(runs // 500)])
        t = concat([draw_users(rng, (500, n), lift=mde).stats(pre=False) for _ in range(runs // 500)])
        r = compare(c, t, sequential_tuning=2 * n)
        detected = r.rel_lift_ci_sequential[0] > 0 if seq else r.p_value < ALPHA
        key = "sequential" if seq else "fixed"
        out[key] = {"users_per_arm": n, "planned_power": 0.8, "achieved": rate(detected)}
    return out


def plot(peek: dict, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    labels = {
        "fixed_rel": "fixed-horizon CI (relative, delta)",
        "fixed_abs": "fixed-horizon CI (absolute)",
        "seq_rel": "sequential CI (relative, delta)",
        "seq_abs": "sequential CI (absolute)",
        "seq_fieller": "sequential CI (relative, Fieller)",
    }
    days = list(range(1, peek["days"] + 1))
    for key, label in labels.items():
        for gate, dash in (("every_day", "dot"), (f"from_{MIN_CLICKS_PER_ARM}_clicks", "solid")):
            curve = peek["curves"][f"{gate}/{key}"]
            fig.add_trace(go.Scatter(x=days, y=curve, name=f"{label}, {gate}", line={"dash": dash}))
    fig.add_hline(y=ALPHA, line_dash="dash", annotation_text="alpha = 5%")
    fig.update_layout(
        title=f"{peek['experiments']} A/A experiments looked at every night: share ever declared significant",
        xaxis_title="day (look)",
        yaxis_title="cumulative false positive rate",
        yaxis_tickformat=".0%",
        height=550,
    )
    fig.write_html(path, include_plotlyjs="cdn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=100_000, help="A/A and A/B experiments")
    parser.add_argument("--peeking-experiments", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.time()
    results = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "alpha": ALPHA,
        "sequential_multiplier_at_n_star": float(sequential.multiplier(1, 1)),
        "main": error_rates(rng, args.experiments, 1000, Population(), 0.10),
        # A harder case: rarer clicks, fewer impressions -> relative SE about 13 %.
        "small_sample": error_rates(rng, args.experiments // 5, 1000, Population(0.05, 4.0, 3.0), 0.10),
        "peeking": peeking(rng, args.peeking_experiments, 1000),
        "power": power_check(rng, 5000, 0.2),
    }
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stats.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results["peeking"], RESULTS / "stats_peeking.html")
    summary = {k: v for k, v in results.items() if k not in ("peeking",)}
    summary["peeking"] = {k: v for k, v in results["peeking"].items() if k != "curves"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
