"""Offline benchmark: train sasrec, sasrec-ssm, tron and gru4rec on Diginetica on this CPU, each
until early stopping or its wall-clock cap, and record test Recall@20 / MRR@20, throughput and
learning curves (validation Recall@20 / MRR@20 against wall-clock minutes).

    nice -n 10 .venv/bin/python benchmarks/offline.py            # full run (about 55 minutes)
    .venv/bin/python benchmarks/offline.py --caps tron=0.5 --smoke   # seconds, to try the script

Writes benchmarks/results/offline.json (after every model, so a partial run keeps its figures)
and benchmarks/results/offline_curves.html.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "diginetica"
DEFAULT_CAPS = "tron=22,sasrec-ssm=6,sasrec=9,gru4rec=6"


def parse_caps(text: str) -> dict[str, float]:
    caps = {}
    for part in text.split(","):
        name, minutes = part.split("=")
        caps[name.strip()] = float(minutes)
    return caps


def plot(results: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("validation Recall@20", "validation MRR@20"))
    for name, res in results.items():
        hist = [h for h in res["history"] if "valid_recall@20" in h]
        x = [h["wall_seconds"] / 60 for h in hist]
        for col, key in ((1, "valid_recall@20"), (2, "valid_mrr@20")):
            fig.add_trace(go.Scatter(x=x, y=[h[key] for h in hist], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="wall-clock minutes (training + validation)")
    fig.update_layout(title="Diginetica, 2 shared CPU cores: learning curves", height=450)
    fig.write_html(path, include_plotlyjs="cdn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--caps", default=DEFAULT_CAPS, help="minutes per model, run in this order")
    parser.add_argument("--eval-every", type=float, default=5.0, help="minutes between validations")
    parser.add_argument("--valid-sessions", type=int, default=3000, help="newest validation sessions scored")
    # On the shared, overloaded 2-core machine one thread trained TRON twice as fast as two
    # (121 vs 58 sessions/s, measured back to back): two threads spin waiting for each other.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "offline"), help="checkpoints go here")
    parser.add_argument("--smoke", action="store_true", help="caps are in seconds; 300 validation sessions")
    args = parser.parse_args()

    import torch
    from abrec.models.data import load_dataset
    from abrec.models.evaluate import evaluate, popularity_baseline
    from abrec.models.train import train

    torch.set_num_threads(args.threads)
    caps = parse_caps(args.caps)
    unit = 1 if args.smoke else 60
    data = load_dataset(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_pairs = sum(len(s) - 1 for s in data.test)
    print(f"{data.name}: {len(data.train)} train, {len(data.valid)} validation, {len(data.test)} test "
          f"sessions ({test_pairs} targets), {data.num_items} items", flush=True)

    report: dict = {
        "models": {},
        "budget": ", ".join(f"{k} {v:g} {'s' if args.smoke else 'min'}" for k, v in caps.items())
        + " wall-clock cap each (training + validation), early stopping on validation Recall@20"
        f" (patience 3 epochs); validation = newest 5% of train.txt, its {args.valid_sessions} newest"
        f" sessions scored every {args.eval_every:g} {'s' if args.smoke else 'min'} and after each epoch;"
        " models trained one after another on 2 CPU cores shared with other jobs (timings noisy)",
        "dataset": {"name": data.name, "train_sessions": len(data.train), "valid_sessions": len(data.valid),
                    "test_sessions": len(data.test), "test_targets": test_pairs, "items": data.num_items},
        "popularity_baseline": popularity_baseline(data.popular(100), data.test),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    curves = {}
    for kind, cap in caps.items():
        overrides = {"valid_sessions": 300 if args.smoke else args.valid_sessions}
        started = time.perf_counter()
        result = train(data, kind, overrides, out_dir=Path(args.runs) / kind, time_limit_s=cap * unit,
                       eval_every_s=args.eval_every * unit, progress=True)
        test = evaluate(result.model, data.test[:300] if args.smoke else data.test, progress=True)
        report["models"][kind] = {
            "recall@20": test["recall@20"], "mrr@20": test["mrr@20"],
            "sessions_per_s": result.sessions_per_s, "epochs": result.epochs,
            "train_minutes": result.train_seconds / 60, "wall_minutes": result.wall_seconds / 60,
            "cap_minutes": cap * unit / 60, "stopped": result.stopped,
            "best_valid": {k: result.best.get(k) for k in ("epoch", "valid_recall@20", "valid_mrr@20")},
            "test": test, "config": result.config,
        }
        curves[kind] = {"history": result.history}
        print(f"== {kind}: test R@20 {test['recall@20']:.4f} MRR@20 {test['mrr@20']:.4f}, "
              f"{result.sessions_per_s:.0f} sessions/s, {result.epochs} epochs, {result.stopped}, "
              f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
        models = report["models"]
        if "tron" in models:
            tron = models["tron"]
            report["comparison"] = {
                f"tron_vs_{o}": {"throughput_ratio": tron["sessions_per_s"] / models[o]["sessions_per_s"],
                                 "recall@20_relative_gain": tron["recall@20"] / models[o]["recall@20"] - 1,
                                 "mrr@20_relative_gain": tron["mrr@20"] / models[o]["mrr@20"] - 1}
                for o in models if o != "tron" and models[o]["recall@20"] > 0}
        report["curves"] = curves
        (out / "offline.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(curves, out / "offline_curves.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
