"""Model server compute per batch as the live load runs it: what the forward pass and the scoring
precision cost, each against its alternative in the same run.

Both arms (`tron` and `sasrec`, 43,097 items, d=200) are resident and batches alternate between
them, as they do behind a live experiment, so each batch's scoring matrix has evicted the other
model's layers from the cache. One torch thread, CPU time of the computing thread per batch
(`LoadedVersion.run`: forward pass, scoring, shortlist, fp32 re-score, answers), median over the
repetitions; every configuration takes its turn in every round, so the machine's swings fall on
all alike. Configurations:
- forward: `padded` (pad, pack the kept positions, one masked attention per layer; the path for
  large batches) or `ragged` (sessions end to end, one block-diagonal mask; the default for up to
  RAGGED_ROWS clicks on a CPU);
- precision: `fp32`, `bf16` (oneDNN, prepacked) and `int8` (fbgemm) scoring, as the model server
  builds them on this machine; bf16 and int8 re-score a shortlist in fp32.
The baseline is the previous default on this machine (`padded` forward, and bf16 where the CPU
has AVX512-BF16). Batch sizes 1-4 are those of the live load (a 10 ms window at 300/s holds ~1-3
requests per arm); 8 and 16 show the trend. Apart, `product_ms`: the scoring product alone per
precision (what `default_precision` weighs).

Sessions are prefixes of Diginetica test sessions when ../shared/data is present, else random
ones of 1-9 clicks.

    .venv/bin/python benchmarks/compute.py [--reps 100] [--rounds 5] [--precisions fp32,bf16,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import OFFLINE_RUNS, make_checkpoint, request_sessions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (1, 2, 3, 4, 8, 16)


def load_arms(work: Path, precision: str) -> list:
    from abrec.models.checkpoint import load_checkpoint
    from abrec.models.server import LoadedVersion

    arms = []
    for kind in ("tron", "sasrec"):
        trained = OFFLINE_RUNS / kind / "model.safetensors"
        path = trained if trained.exists() else work / f"{kind}.safetensors"
        if not path.exists():
            make_checkpoint(kind, path)
        ckpt = load_checkpoint(path)
        row = SimpleNamespace(label=f"{kind}:1", id=1, sha256="", kind=kind)  # a registry row's fields
        arms.append(LoadedVersion(row, ckpt.model, ckpt.item_map, ckpt.popular, "cpu", precision))
    return arms


def one_batch(arm, sessions: list[list[str]]) -> float:
    """CPU seconds of this thread for one `run` of the batch."""
    batch = []
    for items in sessions:
        future: Future = Future()
        request = arm.prepare(items, 20, True, future)
        if request is not None:
            future.set_running_or_notify_cancel()
            batch.append(request)
    t0 = time.thread_time()
    arm.run(batch)
    return time.thread_time() - t0


def product_costs(arms: dict[str, list], reps: int) -> dict:
    """CPU ms of the scoring product alone (the one `run` takes: `single` for one session), both arms
    alternating, median of `reps` per precision and batch size: what the precision rule weighs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    costs: dict = {}
    for prec, pair in arms.items():
        costs[prec] = {}
        for size in (1, 2, 4):
            times = []
            for rep in range(reps + 4):
                arm = pair[rep % 2]
                hidden = torch.randn(size, arm.weight.shape[1], generator=gen)
                with torch.inference_mode():
                    t0 = time.thread_time()
                    (arm.single if size == 1 else arm.product)(hidden)
                    if rep >= 4:
                        times.append((time.thread_time() - t0) * 1000)
            costs[prec][str(size)] = round(float(np.median(times)), 3)
    return costs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=100, help="batches per configuration, size and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated; e.g. int8 for a long A/B "
                   "of the two forward paths")
    p.add_argument("--out", type=Path, default=RESULTS / "compute.json")
    args = p.parse_args()
    unknown = set(args.precisions.split(",")) - {"fp32", "bf16", "int8"}
    if unknown:
        p.error(f"unknown precision(s) {sorted(unknown)}: choose from fp32, bf16, int8")
    if args.reps < 1 or args.rounds < 1:
        p.error("--reps and --rounds must be at least 1")

    import torch
    from abrec.models import inference
    from abrec.models.server import default_precision, int8_available

    torch.set_num_threads(1)
    precisions = [x for x in args.precisions.split(",") if x != "int8" or int8_available()]
    configs = [(f, prec) for prec in precisions for f in ("padded", "ragged")]
    cpu = torch.cpu
    bf16_before = cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()  # the old rule
    previous = ("padded", "bf16" if bf16_before else default_precision("cpu"))
    current = ("ragged", default_precision("cpu"))
    sessions, source = request_sessions(20_000, seed=1)
    times: dict = {c: {b: [] for b in SIZES} for c in configs}
    with tempfile.TemporaryDirectory(prefix="abrec-compute-") as tmp:
        arms = {prec: load_arms(Path(tmp), prec) for prec in precisions}
        rows = inference.RAGGED_ROWS
        cursor = 0
        with tqdm(total=args.rounds * len(SIZES) * len(configs), desc="compute") as bar:
            for _ in range(args.rounds):
                for size in SIZES:
                    for forward, prec in configs:
                        inference.RAGGED_ROWS = rows if forward == "ragged" else -1
                        for rep in range(args.reps + 4):
                            batch = sessions[cursor:cursor + size]
                            cursor = (cursor + size) % (len(sessions) - 32)
                            seconds = one_batch(arms[prec][rep % 2], batch)
                            if rep >= 4:  # the first batches of a configuration warm its caches
                                times[forward, prec][size].append(seconds * 1000)
                        bar.update()
        inference.RAGGED_ROWS = rows
        products = product_costs(arms, args.reps)

    table = {f"{f}/{prec}": {str(b): round(float(np.median(v)), 3) for b, v in by_size.items()}
             for (f, prec), by_size in times.items()}
    key_prev, key_cur = "/".join(previous), "/".join(current)
    if key_prev not in table:  # a run without the previous default's precision compares paths only
        key_prev = f"padded/{current[1]}"
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "avx512_bf16": cpu._is_avx512_bf16_supported(), "vnni": cpu._is_vnni_supported(),
                    "amx": cpu._is_amx_tile_supported()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sessions": source,
        "unit": "CPU ms per batch (LoadedVersion.run, two arms alternating, one torch thread), median",
        "reps_per_round": args.reps,
        "rounds": args.rounds,
        "baseline": key_prev,  # the previous default, or the padded path where --precisions lacks it
        "current_default": key_cur,
        "ms_per_batch": table,
        "ratio_current_to_baseline": {
            str(b): round(table[key_cur][str(b)] / table[key_prev][str(b)], 3) for b in SIZES},
        "product_ms": products,
        "ragged_to_padded": {
            prec: {str(b): round(table[f"ragged/{prec}"][str(b)] / table[f"padded/{prec}"][str(b)], 3)
                   for b in SIZES} for prec in precisions},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    width = max(map(len, table))
    print(f"{'CPU ms per batch':<{width}}  " + "  ".join(f"B={b:<5}" for b in SIZES))
    for key, row in table.items():
        mark = " <- current" if key == key_cur else " <- baseline" if key == key_prev else ""
        print(f"{key:<{width}}  " + "  ".join(f"{row[str(b)]:<7.3f}" for b in SIZES) + mark)
    print("current / baseline:", results["ratio_current_to_baseline"])
    print("scoring product alone, CPU ms by batch size:", products)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
