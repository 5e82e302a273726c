"""GPU correctness of the model server's compute path (issue 4's 'done when', on CUDA).

Batched scores equal one-at-a-time scores (rtol = atol = 1e-4, TF32 off) with identical top-20,
and the bf16 shortlist path answers exactly what fp32 does, for a Diginetica-sized TRON-shaped
SASRec (43,097 items, d=200) with random weights, 512 random sessions."""
import json
import random
import sys
from concurrent.futures import Future
from types import SimpleNamespace

import torch
from abrec.models.data import ItemMap
from abrec.models.inference import hidden_last, top_k
from abrec.models.presets import build_model, resolve_config
from abrec.models.server import LoadedVersion

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
N = 43097
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
model = build_model("tron", resolve_config("tron"), N).to(dev).eval()
rng = random.Random(0)
sessions = [[rng.randint(1, N) for _ in range(rng.randint(1, 30))] for _ in range(512)]
gpu = torch.cuda.get_device_name(0) if dev == "cuda" else None
out = {"device": dev, "gpu": gpu, "torch": torch.__version__}
with torch.inference_mode():
    w = model.output_weight()
    batched = hidden_last(model, sessions) @ w.T
    single = torch.cat([hidden_last(model, [s]) @ w.T for s in sessions])
    batched[:, 0] = single[:, 0] = float("-inf")
    fin = torch.isfinite(single)
    out["batched_vs_single_max_abs_diff"] = float((batched[fin] - single[fin]).abs().max())
    close = torch.allclose(batched[fin], single[fin], rtol=1e-4, atol=1e-4)
    out["batched_vs_single_allclose_1e-4"] = bool(close)
    tb, ts = top_k(batched, 20)[1], top_k(single, 20)[1]
    same = (tb.sort(1).values == ts.sort(1).values).all(1)
    out["batched_vs_single_top20_identical_sessions"] = int(same.sum())
item_map = ItemMap([str(i) for i in range(1, N + 1)])
answers = {}
for precision in ("fp32", "bf16"):
    row = SimpleNamespace(label=f"tron@{precision}", id=1, sha256="x", kind="tron")
    lv = LoadedVersion(row, model, item_map, list(range(1, 21)), dev, precision)
    futures = []
    batch = []
    for s in sessions:
        f: Future = Future()
        r = lv.prepare([str(i) for i in s], 20, False, f)
        f.set_running_or_notify_cancel()
        batch.append(r)
        futures.append(f)
    for i in range(0, len(batch), 32):
        lv.run(batch[i:i + 32])
    answers[precision] = [f.result() for f in futures]
pairs = list(zip(answers["fp32"], answers["bf16"], strict=True))
out["bf16_vs_fp32_identical_top20_answers"] = sum(a.items == b.items for a, b in pairs)


def tie_swaps_only(a, b) -> bool:
    """Same items, and where the order differs the fp32 scores tie to 1e-5 (two products that sum in
    another order may round a near-tie either way)."""
    if sorted(a.items) != sorted(b.items):
        return False
    return all(abs(a.scores[r] - b.scores[r]) < 1e-5 for r in range(len(a.items)) if a.items[r] != b.items[r])


out["bf16_vs_fp32_same_up_to_ties"] = sum(tie_swaps_only(a, b) for a, b in pairs)
out["sessions"] = len(sessions)
print(json.dumps(out, indent=1))
ok = (out["batched_vs_single_allclose_1e-4"]
      and out["batched_vs_single_top20_identical_sessions"] == len(sessions)
      and out["bf16_vs_fp32_same_up_to_ties"] == len(sessions))
sys.exit(0 if ok else 1)
