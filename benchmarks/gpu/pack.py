"""Checkpoint -> fp16 weights split in parts under 15 MB (the device tool brings back files under 16 MB)."""
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
with safe_open(str(src), framework="pt") as f:
    meta = dict(f.metadata())
    tensors = {k: f.get_tensor(k) for k in f.keys()}
tensors = {k: t.half() if t.is_floating_point() else t for k, t in tensors.items()}
meta["transfer"] = "trained on the device GPU in fp32/bf16 autocast; weights rounded to fp16 for transfer"
tmp = dest.with_suffix(".fp16")
save_file(tensors, str(tmp), metadata=meta)
data = tmp.read_bytes()
part = 15 * 2**20
for i in range(0, len(data), part):
    Path(f"{dest}.part{i // part}").write_bytes(data[i:i + part])
tmp.unlink()
print(src, len(data), "bytes ->", -(-len(data) // part), "parts")
