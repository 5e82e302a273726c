"""Parts of an fp16 checkpoint (pack.py) -> an fp32 abrec checkpoint that load_checkpoint reads."""
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

parts, dest = sys.argv[1], Path(sys.argv[2])
files = sorted(Path(parts).parent.glob(Path(parts).name + ".part*"), key=lambda p: int(p.suffix[5:]))
tmp = dest.with_suffix(".fp16")
dest.parent.mkdir(parents=True, exist_ok=True)
tmp.write_bytes(b"".join(p.read_bytes() for p in files))
with safe_open(str(tmp), framework="pt") as f:
    meta = dict(f.metadata())
    tensors = {k: f.get_tensor(k) for k in f.keys()}
tensors = {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
save_file(tensors, str(dest), metadata=meta)
tmp.unlink()
print(dest, [p.name for p in files])
