"""Run by tests/test_models_distributed.py under torchrun: train a tiny TRON on the synthetic
shop with DistributedDataParallel and write this process's final weights' checksum."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from abrec.models.data import synthetic_shop
from abrec.models.train import train

torch.set_num_threads(1)
out = Path(sys.argv[1])
data = synthetic_shop(seed=5, n_items=80, n_sessions=400)
small = {"hidden": 16, "layers": 1, "max_len": 8, "uniform_negatives": 128, "batch_size": 16, "epochs": 2,
         "valid_sessions": 20}
result = train(data, "tron", small, out_dir=out, progress=False)
rank = dist.get_rank()
weights = torch.cat([p.detach().flatten() for p in result.model.parameters()])
(out / f"rank{rank}.json").write_text(json.dumps({
    "world": dist.get_world_size(), "epochs": result.epochs, "sum": float(weights.sum()),
    "abs": float(weights.abs().sum()), "loss": [h["loss"] for h in result.history]}))
dist.destroy_process_group()
