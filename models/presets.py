"""Training presets that reproduce the TRON paper's rows on Diginetica, and `build_model`.

A preset name is also the checkpoint's `kind`; `config["arch"]` says which network it is.
Every field can be overridden (`abrec train --lr 1e-4 ...`); `CONFIG_FIELDS` lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of `abrec --help` and the light CLI modules that read PRESETS
    from torch import nn

# Fields shared by every preset, with the types the command line parses them as.
CONFIG_FIELDS: dict[str, type] = {
    "arch": str,  # "sasrec" | "gru4rec"
    "hidden": int,
    "layers": int,
    "heads": int,
    "max_len": int,  # most recent clicks a model reads
    "dropout": float,
    "loss": str,  # "bce" | "bpr-max" | "ssm" (sampled softmax)
    "bpr_penalty": float,  # BPR-max regulariser weight (lambda)
    "uniform_negatives": int,
    "sampling": str,  # uniform negatives per "position", per "session" or shared by the "batch"
    "reject_session_items": bool,  # redraw uniform negatives that are in the session ("position" only)
    "in_batch_negatives": int,  # targets of other sessions of the batch (popularity-weighted)
    "topk": int,  # keep the k highest-scoring negatives per position; 0 = keep all
    "selection_bf16": bool,  # score the top-k candidates in bfloat16 (selection only, no gradient)
    "final_activation": str,  # "none" | "elu" (ELU(0.5) on scores, GRU4Rec+)
    "optimizer": str,  # "adam" | "adagrad"
    "lr": float,
    "batch_size": int,
    "epochs": int,  # upper bound; early stopping usually ends training first
    "patience": int,  # epochs without a better validation Recall@20 before stopping
    "valid_sessions": int,  # newest validation sessions scored after each epoch
    "seed": int,
}

_SASREC: dict[str, Any] = {
    "arch": "sasrec", "hidden": 200, "layers": 2, "heads": 1, "max_len": 50, "dropout": 0.05,
    "loss": "bce", "bpr_penalty": 1.0, "uniform_negatives": 1, "sampling": "position",
    "reject_session_items": True, "in_batch_negatives": 0, "topk": 0, "selection_bf16": True,
    "final_activation": "none",
    "optimizer": "adam", "lr": 1e-3, "batch_size": 128, "epochs": 100, "patience": 3,
    "valid_sessions": 5000, "seed": 0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # SASRec as published: BCE with one uniform negative per position.
    "sasrec": dict(_SASREC),
    # SASRec with sampled softmax over 8,192 uniform negatives per session + 127 in-batch.
    "sasrec-ssm": _SASREC | {"loss": "ssm", "uniform_negatives": 8192, "sampling": "session",
                             "reject_session_items": False, "in_batch_negatives": 127, "lr": 5e-4,
                             "dropout": 0.1},
    # TRON L: batch-shared uniform negatives + in-batch, top-100 per position, sampled softmax.
    "tron-l": _SASREC | {"loss": "ssm", "uniform_negatives": 8192, "sampling": "batch",
                         "reject_session_items": False, "in_batch_negatives": 127, "topk": 100,
                         "lr": 5e-4, "dropout": 0.2},
    # TRON XL, the paper's best row on Diginetica.
    "tron": _SASREC | {"loss": "ssm", "uniform_negatives": 16384, "sampling": "batch",
                       "reject_session_items": False, "in_batch_negatives": 127, "topk": 100,
                       "lr": 5e-4, "dropout": 0.2},
    # GRU4Rec+ (Hidasi & Karatzoglou 2018): session-parallel mini-batches, BPR-max, ELU(0.5)
    # scores, output bias; the step's other 31 targets are its in-batch negatives.
    "gru4rec": _SASREC | {"arch": "gru4rec", "hidden": 100, "layers": 1, "heads": 0, "max_len": 200,
                          "dropout": 0.0, "loss": "bpr-max", "bpr_penalty": 0.5,
                          "uniform_negatives": 2048, "sampling": "batch", "reject_session_items": False,
                          "in_batch_negatives": 31, "final_activation": "elu", "optimizer": "adagrad",
                          "lr": 0.2, "batch_size": 32, "epochs": 10},
}


def resolve_config(kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset `kind` with `overrides` applied; unknown kinds need a full config with "arch"."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    if kind in PRESETS:
        config = PRESETS[kind] | overrides
    elif "arch" in overrides:
        config = PRESETS[overrides["arch"]] | overrides
    else:
        raise ValueError(f"unknown preset {kind!r} (choose from {', '.join(PRESETS)})")
    checks = {"arch": ("sasrec", "gru4rec"), "loss": ("bce", "bpr-max", "ssm"),
              "sampling": ("position", "session", "batch"), "final_activation": ("none", "elu"),
              "optimizer": ("adam", "adagrad")}
    for key, allowed in checks.items():
        if config[key] not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {config[key]!r}")
    if config["arch"] == "gru4rec" and config["sampling"] != "batch":
        raise ValueError("gru4rec trains session-parallel: sampling must be 'batch'")
    return config


def build_model(kind: str, config: dict[str, Any], num_items: int) -> nn.Module:
    """A fresh network for `kind` (a preset name) and `config` over items 1..num_items."""
    config = resolve_config(kind, {k: v for k, v in config.items() if k in CONFIG_FIELDS})
    if config["arch"] == "sasrec":
        from abrec.models.sasrec import SASRec

        return SASRec(num_items, hidden=config["hidden"], layers=config["layers"], heads=config["heads"],
                      max_len=config["max_len"], dropout=config["dropout"])
    from abrec.models.gru4rec import GRU4Rec

    return GRU4Rec(num_items, hidden=config["hidden"], layers=config["layers"], dropout=config["dropout"],
                   max_len=config["max_len"])
