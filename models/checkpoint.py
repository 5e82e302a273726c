"""One-file model checkpoints: safetensors weights with everything needed to serve them (kind,
config, item map, metrics, popular items, data fingerprint) as JSON in the header metadata.

Loading never unpickles anything. Resume state for training (optimiser, epoch, RNG) lives in a
separate `<checkpoint>.resume.pt` written by train.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from abrec.models.data import ItemMap
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "abrec-checkpoint/1"


class CheckpointError(ValueError):
    """The file is missing, truncated, corrupt or not an abrec checkpoint."""


@dataclass
class Checkpoint:
    model: nn.Module  # in eval mode
    kind: str
    config: dict[str, Any]
    item_map: ItemMap
    metrics: dict[str, Any]
    popular: list[int]
    data_fingerprint: str


def save_checkpoint(path: str | Path, model: nn.Module, *, kind: str, config: dict, item_map: ItemMap,
                    metrics: dict, popular: list[int], data_fingerprint: str) -> Path:
    """Write the model and its metadata to one safetensors file (atomically: temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "kind": kind,
        "config": json.dumps(config),
        "item_map": item_map.to_json(),
        "metrics": json.dumps(metrics),
        "popular": json.dumps([int(i) for i in popular]),
        "data_fingerprint": data_fingerprint,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; raises CheckpointError for any bad file."""
    from abrec.models.presets import build_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an abrec checkpoint (metadata format is {meta.get('format')!r})")
    try:
        kind = meta["kind"]
        config = json.loads(meta["config"])
        item_map = ItemMap.from_json(meta["item_map"])
        metrics = json.loads(meta["metrics"])
        popular = [int(i) for i in json.loads(meta["popular"])]
        fingerprint = meta["data_fingerprint"]
        model = build_model(kind, config, len(item_map))
        model.load_state_dict(tensors, strict=True)
    except (KeyError, json.JSONDecodeError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint metadata or weights ({exc})") from None
    model.to(device).eval()
    return Checkpoint(model, kind, config, item_map, metrics, popular, fingerprint)
