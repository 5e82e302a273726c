"""Exact top-k scoring: ExactScorer's methods against the plain fp32 product, in one run.

CPU ms (time.process_time, one thread) of scoring + top-20 for hidden [B, d] over a
43,097-item catalogue (d = 200), B = 1, 4, 16, 64; the forward pass is not included. Methods are
interleaved call by call, so a busy machine slows them alike. Weights are random, scaled like the
trained item embeddings (entries ~N(0, 0.029), row norms spread ~20%); rows of `hidden` are random
(Gaussian scores: the first pass's worst case, many items near the k-th). With --checkpoint, the
same on a trained model's weights and the hidden states of sessions of its popular items.
Every answer is checked against the fp32 product's top 20.

    .venv/bin/python benchmarks/scoring.py [--checkpoint runs/ab-replay-gpu/tron/model.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from abrec.models.scoring import ExactScorer, auto_method

N_ITEMS, DIM, K = 43_097, 200, 20
SIZES = (1, 4, 16, 64)
OUT = Path(__file__).parent / "results" / "scoring.json"


def random_case(seed: int) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    spread = torch.exp(torch.randn(N_ITEMS + 1, 1, generator=gen) * 0.2)
    weight = torch.randn(N_ITEMS + 1, DIM, generator=gen) * 0.029 * spread
    weight[0] = 0
    hidden = {b: [torch.randn(b, DIM, generator=gen) for _ in range(4)] for b in SIZES}
    return weight, hidden


def checkpoint_case(path: str, seed: int) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    from abrec.models.checkpoint import load_checkpoint
    from abrec.models.inference import hidden_last

    ck = load_checkpoint(path)
    gen = torch.Generator().manual_seed(seed)
    popular = torch.tensor(ck.popular)

    def batch(b: int) -> torch.Tensor:
        sessions = [popular[torch.randint(0, len(popular), (int(torch.randint(1, 8, (1,), generator=gen)),),
                                          generator=gen)].tolist() for _ in range(b)]
        with torch.inference_mode():
            return hidden_last(ck.model, sessions).clone()

    return ck.model.output_weight().detach().clone(), {b: [batch(b) for _ in range(4)] for b in SIZES}


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def run_case(weight: torch.Tensor, hidden: dict[int, list[torch.Tensor]], methods: list[str], reps: int
             ) -> dict:
    scorers, memory = {}, {}
    for m in methods:
        before = rss()
        scorers[m] = ExactScorer(weight, m)
        memory[m] = {"nbytes": scorers[m].nbytes, "rss_delta_bytes": rss() - before}
    wt = weight.T.contiguous()
    table: dict[str, dict] = {}
    for b in SIZES:
        times: dict[str, list[float]] = {m: [] for m in methods}
        mismatches = dict.fromkeys(methods, 0)
        for m in methods:
            scorers[m].stats.__init__()
        for rep in range(reps):
            h = hidden[b][rep % len(hidden[b])]
            for m in methods:  # interleaved: contention hits every method alike
                t0 = time.process_time()
                values, ids = scorers[m].topk(h, K)
                times[m].append((time.process_time() - t0) * 1000)
                if rep < len(hidden[b]):
                    ref = h @ wt
                    ref[:, 0] = float("-inf")
                    ref_ids = ref.topk(K, dim=1).indices
                    mismatches[m] += int((ids.sort(1).values != ref_ids.sort(1).values).any(1).sum())
        base = statistics.median(times["fp32"])
        table[str(b)] = {m: {"cpu_ms_median": round(statistics.median(v), 3),
                             "cpu_ms_p10": round(sorted(v)[len(v) // 10], 3),
                             "speedup_vs_fp32": round(base / statistics.median(v), 2),
                             "rows_differing_from_fp32_top20": mismatches[m],
                             "rows_checked_per_item": scorers[m].stats.rows_checked,
                             "rows_full_fp32": scorers[m].stats.rows_full,
                             "rescored_per_row": round(scorers[m].stats.rescored / scorers[m].stats.rows, 1)}
                         for m, v in times.items()}
        row = table[str(b)]
        print(f"B={b:3d} " + "  ".join(f"{m}={row[m]['cpu_ms_median']:.2f}ms(x{row[m]['speedup_vs_fp32']})"
                                        for m in methods), flush=True)
    return {"memory": memory, "by_batch": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40, help="timed calls per method and batch size")
    parser.add_argument("--checkpoint", action="append", default=[], help="also a trained model (repeatable)")
    parser.add_argument("--methods", default="fp32,fp16,int8,bf16")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    if "fp32" not in methods:
        methods.insert(0, "fp32")
    result = {
        "what": "ExactScorer.topk CPU ms (process_time, 1 thread), scoring + top-20 without the forward "
                f"pass, {N_ITEMS} items x {DIM}; methods interleaved in one run; median of --reps calls",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "auto_method": auto_method("cpu"),
                    "load_average_at_start": list(os.getloadavg())},
        "cases": {},
    }
    print("random weights (trained-like scale), random hidden")
    result["cases"]["random"] = run_case(*random_case(0), methods, args.reps)
    for path in args.checkpoint:
        print(f"checkpoint {path}")
        result["cases"][path] = run_case(*checkpoint_case(path, 1), methods, args.reps)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
