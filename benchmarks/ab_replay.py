"""A/B replay benchmark: TRON against SASRec (and sasrec-ssm) through the live API on Diginetica.

Every Diginetica test session (15,963) becomes a shopper who clicks through the real HTTP API
(`abrec serve`, SQLite, one process) backed by the real model server, under the click model of
`abrec.experiments.simulate` (slate of 20, rank r looked at with probability r^-0.8, the next click
clicked when looked at, 1% noise clicks), over 7 simulated days. The arms serve the checkpoints
that benchmarks/offline.py trained (runs/offline/<name>/model.safetensors), registered as
<name>@champion. The logged events are analysed from the database as the report does (per-user
delta method) and set beside:
- the CTR each arm's offline ranking predicts under the same click model (the replay must agree),
- the offline Recall@20 ratio of TRON to SASRec on the same sessions,
- the paper's online result: TRON +18.14% CTR over SASRec at OTTO.

A/A: a second experiment whose two arms both serve sasrec@champion is replayed on the same
sessions by new users; its log is then re-split offline into two halves by ~1,000 hash seeds
(GrowthBook hashing, as live assignment): the p-values must be uniform (KS test) and the false
positive rate at alpha 0.05 near 5%.

    nice -n 10 .venv/bin/python benchmarks/ab_replay.py            # full run
    .venv/bin/python benchmarks/ab_replay.py --limit 500 --out /tmp/abr   # a quick try

Writes benchmarks/results/ab-replay.json and ab-replay.html.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "diginetica"
PAPER_LIFT = 0.1814  # TRON vs SASRec, CTR, OTTO's live A/B test (Wilm et al., RecSys 2023)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--checkpoints", default=str(ROOT / "runs" / "offline"),
                        help="directory with <arm>/model.safetensors (benchmarks/offline.py writes them)")
    parser.add_argument("--arms", default="sasrec,tron,sasrec-ssm", help="control first")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N test sessions")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--aa-seeds", type=int, default=1000)
    parser.add_argument("--no-aa", action="store_true", help="skip the live A/A replay")
    parser.add_argument("--aa-only", action="store_true",
                        help="only the A/A replay, on the first arm's model (writes aa-replay.json)")
    parser.add_argument("--aa-json", default=None,
                        help="take the A/A section from an earlier --aa-only run instead of replaying it")
    parser.add_argument("--workdir", default="/tmp/abrec-ab-replay", help="database, store, logs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import numpy as np
    from abrec.analysis.stats import ArmStats, compare, ctr_variance, srm_test
    from abrec.experiments.simulate import (
        ApiClient,
        ClickModel,
        Replay,
        add_predictions,
        create_aa_experiment,
        format_summary,
        predictions_from_checkpoints,
        user_ids,
    )
    from abrec.models.data import load_dataset

    from abrec import demo
    from abrec.config import get_settings
    from abrec.db import init_db, make_engine, session_factory

    t0 = time.monotonic()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    checkpoints = {a: Path(args.checkpoints) / a / "model.safetensors" for a in arms}
    missing = [str(p) for p in checkpoints.values() if not p.is_file()]
    if missing:
        print(f"ab_replay: missing checkpoints {missing}: run benchmarks/offline.py first", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    dataset = load_dataset(args.data)
    sessions = dataset.test[: args.limit] if args.limit else dataset.test
    ext = dataset.item_map.external_ids
    sessions_ext = [[ext[i - 1] for i in s] for s in sessions]
    click_model = ClickModel()
    print(f"{dataset.name}: replaying {len(sessions)} test sessions "
          f"({sum(len(s) - 1 for s in sessions)} impressions) per experiment", flush=True)

    db_url = f"sqlite:///{workdir / 'abrec.db'}"
    from dataclasses import replace

    settings = replace(get_settings(), database_url=db_url, registry_store=workdir / "registry")
    engine = make_engine(db_url)
    init_db(engine)
    sessions_db = session_factory(engine)
    demo.register_arms(sessions_db, settings.registry_store, checkpoints)
    token = demo.create_admin(sessions_db, secrets.token_urlsafe(9))
    if args.aa_only:  # created before the model server starts, so that it loads the model first
        key = demo.create_experiment(sessions_db, "aa-replay", {arm: f"{arms[0]}@champion" for arm in "ab"},
                                     planned_users=len(sessions), hypothesis="A/A")
    else:
        key = demo.create_experiment(sessions_db, "ab-replay", {a: f"{a}@champion" for a in arms},
                                     planned_users=len(sessions), hypothesis="TRON lifts CTR over SASRec")

    print("predicting each arm's CTR from its offline ranking", flush=True)
    predictions = predictions_from_checkpoints(checkpoints, dataset, sessions, click_model, max_items=50)

    start = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=1)
    with ExitStack() as stack:
        api_url = demo.start_services(stack, workdir, db_url, settings)
        client = ApiClient(api_url, pool_size=args.concurrency * 2, admin_token=token, retry_s=120)
        stack.callback(client.close)
        runner = Replay(client, key, click_model, seed=0, concurrency=args.concurrency)
        if not args.aa_only:
            result = runner.run(sessions_ext, user_ids(len(sessions), seed=0), days=args.days, start=start)
            add_predictions(result, predictions)
            print(format_summary(result), flush=True)
        aa_result = None
        if not (args.no_aa or args.aa_json):
            if not args.aa_only:
                create_aa_experiment(client, "aa-replay", f"{arms[0]}@champion")
            aa_runner = Replay(client, "aa-replay", click_model, seed=1, concurrency=args.concurrency)
            aa_users = user_ids(len(sessions), seed=1)
            aa_result = aa_runner.run(sessions_ext, aa_users, days=args.days, start=start)
            add_predictions(aa_result, {"a": predictions[arms[0]], "b": predictions[arms[0]]})
            print(format_summary(aa_result), flush=True)
        until = start + timedelta(days=args.days)
        runner.set_clock(until)
        replay_s = time.monotonic() - t0

    if args.aa_only:
        out = {"aa": aa_analysis(engine, until, args.aa_seeds) | {"model": arms[0]},
               "checkpoint_metrics": {a: checkpoint_metrics(p) for a, p in checkpoints.items()},
               "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "aa-replay.json").write_text(json.dumps(out, indent=2) + "\n")
        print("aa:", json.dumps(out["aa"]))
        return 0

    # ------------------------------------------------------------------ analysis from the database
    tables = demo.user_table(engine, key, until)
    stats = {a: ArmStats.from_arrays(tables[a][1][:, 1], tables[a][1][:, 0]) for a in arms if a in tables}
    control, treatment = arms[0], "tron"
    out: dict = {"ctr": {}, "predicted_ctr": {}, "ctr_ci": {}, "users": {}, "impressions": {}, "clicks": {}}
    for a, s in stats.items():
        se = float(np.sqrt(ctr_variance(s)))
        out["ctr"][a] = float(s.ctr)
        out["ctr_ci"][a] = [float(s.ctr - 1.96 * se), float(s.ctr + 1.96 * se)]
        out["predicted_ctr"][a] = predictions[a].ctr()
        out["users"][a], out["impressions"][a], out["clicks"][a] = int(s.n), int(s.sum_y), int(s.sum_x)
    c = compare(stats[control], stats[treatment])
    predicted_lift = predictions[treatment].ctr() / predictions[control].ctr() - 1
    recall = {a: p.recall() for a, p in predictions.items()}
    out |= {
        "rel_lift": float(c.rel_lift),
        "rel_lift_ci": [float(c.rel_lift_ci[0]), float(c.rel_lift_ci[1])],
        "p_value": float(c.p_value),
        "srm_p_value": float(srm_test({a: s.n for a, s in stats.items()}).p_value),
        "predicted_rel_lift": predicted_lift,
        "prediction_inside": {
            **{a: bool(out["ctr_ci"][a][0] <= out["predicted_ctr"][a] <= out["ctr_ci"][a][1]) for a in stats},
            "rel_lift": bool(c.rel_lift_ci[0] <= predicted_lift <= c.rel_lift_ci[1]),
        },
        "offline_recall@20": recall,
        "offline_recall@20_ratio": recall[treatment] / recall[control],
        "offline_mrr@20": {a: p.mrr() for a, p in predictions.items()},
        "offline_mrr@20_ratio": predictions[treatment].mrr() / predictions[control].mrr(),
        "paper_online_rel_lift": PAPER_LIFT,
        "acknowledged": {a: {"impressions": s.impressions, "clicks": s.clicks, "fallbacks": s.fallbacks,
                             "unlogged": s.unlogged} for a, s in result.arms.items()},
    }
    for a, s in stats.items():
        if a not in (control, treatment):
            other = compare(stats[control], s)
            out.setdefault("other_arms", {})[a] = {
                "rel_lift": float(other.rel_lift), "rel_lift_ci": [float(x) for x in other.rel_lift_ci],
                "p_value": float(other.p_value),
                "predicted_rel_lift": predictions[a].ctr() / predictions[control].ctr() - 1}

    offline_json = ROOT / "benchmarks" / "results" / "offline.json"
    if offline_json.is_file():  # the offline benchmark's own test figures, for reference
        models = json.loads(offline_json.read_text()).get("models", {})
        out["offline_benchmark_recall@20"] = {a: models[a]["recall@20"] for a in arms if a in models}
    if aa_result is not None:
        out["aa"] = aa_analysis(engine, until, args.aa_seeds) | {"model": arms[0]}
    elif args.aa_json:
        out["aa"] = json.loads(Path(args.aa_json).read_text())["aa"] | {"source": args.aa_json}
    engine.dispose()
    out |= {
        "click_model": {"k": click_model.k, "eta": click_model.eta, "noise": click_model.noise},
        "sessions": len(sessions), "days": args.days, "concurrency": args.concurrency,
        "replay_minutes": replay_s / 60,
        "checkpoints": {a: str(p) for a, p in checkpoints.items()},
        "checkpoint_metrics": {a: checkpoint_metrics(p) for a, p in checkpoints.items()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "ab-replay.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, dest / "ab-replay.html")
    print(json.dumps({k: out[k] for k in ("ctr", "predicted_ctr", "rel_lift", "rel_lift_ci", "p_value",
                                          "srm_p_value", "predicted_rel_lift", "offline_recall@20_ratio")},
                     indent=2))
    if "aa" in out:
        print("aa:", json.dumps(out["aa"]))
    print(f"wrote {dest / 'ab-replay.json'} in {(time.monotonic() - t0) / 60:.1f} min")
    return 0


def checkpoint_metrics(path: Path) -> dict:
    """The training record a checkpoint carries (best validation epoch, time), without loading it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("metrics", "{}"))


def aa_analysis(engine, until, n_seeds: int) -> dict:
    """The live A/A result, then its log re-split by `n_seeds` hash seeds (all arms pooled)."""
    import numpy as np
    from abrec.analysis.stats import ArmStats, compare
    from abrec.assignment.vectorised import hash_many
    from scipy import stats as sps

    from abrec import demo

    tables = demo.user_table(engine, "aa-replay", until)
    live = compare(ArmStats.from_arrays(tables["a"][1][:, 1], tables["a"][1][:, 0]),
                   ArmStats.from_arrays(tables["b"][1][:, 1], tables["b"][1][:, 0]))
    units = tables["a"][0] + tables["b"][0]
    y = np.concatenate([tables["a"][1][:, 0], tables["b"][1][:, 0]])
    x = np.concatenate([tables["a"][1][:, 1], tables["b"][1][:, 1]])
    # One row per seed: which users land in the second half under that seed's hash.
    split = np.stack([hash_many(f"aa-resplit-{seed}", units) >= 0.5 for seed in range(n_seeds)])

    def sums(mask: np.ndarray) -> ArmStats:
        m = mask.astype(float)
        return ArmStats(n=m.sum(1), sum_x=m @ x, sum_y=m @ y, sum_x2=m @ (x * x), sum_y2=m @ (y * y),
                        sum_xy=m @ (x * y))

    resplit = compare(sums(~split), sums(split))
    p = np.asarray(resplit.p_value)
    return {
        "rel_lift": float(live.rel_lift),
        "rel_lift_ci": [float(live.rel_lift_ci[0]), float(live.rel_lift_ci[1])],
        "p_value": float(live.p_value),
        "users": {"a": len(tables["a"][0]), "b": len(tables["b"][0])},
        "reseeds": n_seeds,
        "fpr_over_reseeds": float((p < 0.05).mean()),
        "ks_p_value": float(sps.kstest(p, "uniform").pvalue),
        "resplit_p_values_deciles": np.quantile(p, np.linspace(0.1, 0.9, 9)).round(3).tolist(),
    }


def plot(out: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    arms = list(out["ctr"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "CTR per arm: replay (95% CI) vs offline prediction", "A/A re-split p-values (uniform if sound)"))
    ctr = [out["ctr"][a] for a in arms]
    fig.add_trace(go.Bar(x=arms, y=ctr, name="replay CTR", error_y={
        "type": "data", "symmetric": False,
        "array": [out["ctr_ci"][a][1] - out["ctr"][a] for a in arms],
        "arrayminus": [out["ctr"][a] - out["ctr_ci"][a][0] for a in arms]}), row=1, col=1)
    fig.add_trace(go.Scatter(x=arms, y=[out["predicted_ctr"][a] for a in arms], mode="markers",
                             marker={"size": 12, "symbol": "diamond"}, name="predicted"), row=1, col=1)
    if "aa" in out:
        deciles = out["aa"]["resplit_p_values_deciles"]
        fig.add_trace(go.Scatter(x=[0.1 * i for i in range(1, 10)], y=deciles, mode="lines+markers",
                                 name="A/A p-value deciles"), row=1, col=2)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="uniform", line={"dash": "dot"}),
                      row=1, col=2)
    fig.update_layout(title=f"A/B replay on Diginetica: TRON vs SASRec {out['rel_lift']:+.1%} "
                            f"(predicted {out['predicted_rel_lift']:+.1%}, paper +18.14%)", height=450)
    fig.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    sys.exit(main())
