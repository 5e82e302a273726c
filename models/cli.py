"""`abrec train` and `abrec evaluate`: train a preset on a dataset, evaluate a checkpoint.

Kept light to import: torch and the models are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    from abrec.models.presets import CONFIG_FIELDS, PRESETS

    p = subparsers.add_parser("train", help="train a recommender preset on session data",
                              description="Train SASRec / TRON / GRU4Rec+ with early stopping on the "
                              "chronological validation tail; writes OUT/model.safetensors.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="model preset (= checkpoint kind)")
    p.add_argument("--data", required=True,
                   help="'synthetic', a directory with train.txt/test.txt, or a session file "
                   "(plain text, OTTO .jsonl, Diginetica item-views .csv, Yoochoose clicks .dat)")
    p.add_argument("--out", default=None, help="output directory (default runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume.pt")
    p.add_argument("--time-limit", type=float, default=None, help="wall-clock minutes at most")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    overrides = p.add_argument_group("preset overrides (default: the preset's value)")
    for name, kind in CONFIG_FIELDS.items():
        overrides.add_argument(f"--{name.replace('_', '-')}", dest=f"set_{name}", default=None,
                               type=_bool if kind is bool else kind, metavar=kind.__name__.upper())
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("evaluate", help="evaluate a checkpoint on a dataset's test sessions",
                              description="Recall and MRR @5/10/20 over every next click, full "
                              "catalogue, pessimistic ties; prints a table and writes JSON.")
    e.add_argument("checkpoint", help="a model.safetensors written by abrec train")
    e.add_argument("--data", required=True, help="as for abrec train")
    e.add_argument("--split", choices=("test", "valid"), default="test")
    e.add_argument("--json", default=None, help="output file (default CHECKPOINT.SPLIT.json next to it)")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=cmd_evaluate)


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from abrec.models.data import DataError, load_dataset
    from abrec.models.evaluate import evaluate
    from abrec.models.presets import resolve_config
    from abrec.models.train import save_trained, train

    from abrec.cli import UsageError

    torch.set_num_threads(args.threads)
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    try:
        resolve_config(args.preset, overrides)
        dataset = load_dataset(args.data)
    except (DataError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if len(dataset.train) == 0:
        raise UsageError(f"{args.data}: no training sessions")
    out = Path(args.out or f"runs/{args.preset}")
    result = train(dataset, args.preset, overrides, out_dir=out, resume=args.resume,
                   time_limit_s=args.time_limit * 60 if args.time_limit else None,
                   progress=not args.no_progress, device=args.device)
    test = evaluate(result.model, dataset.test) if dataset.test else {}
    metrics = {"valid": result.best, "test": test, "epochs": result.epochs,
               "sessions_per_s": result.sessions_per_s, "train_minutes": result.train_seconds / 60,
               "stopped": result.stopped}
    save_trained(out / "model.safetensors", result.model, args.preset, result.config, dataset, metrics)
    print(f"{args.preset}: {result.epochs:g} epochs ({result.stopped}), "
          f"{result.sessions_per_s:.0f} sessions/s")
    if test:
        print(f"test Recall@20 {test['recall@20']:.4f}  MRR@20 {test['mrr@20']:.4f}  "
              f"({test['targets']} targets)")
    print(f"checkpoint: {out / 'model.safetensors'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch
    from abrec.models.checkpoint import CheckpointError, load_checkpoint
    from abrec.models.data import DataError, load_dataset
    from abrec.models.evaluate import evaluate

    from abrec.cli import UsageError

    torch.set_num_threads(args.threads)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        dataset = load_dataset(args.data)
    except (CheckpointError, DataError) as exc:
        raise UsageError(str(exc)) from None
    sessions = dataset.test if args.split == "test" else dataset.valid
    if dataset.item_map != ckpt.item_map:
        sessions = dataset.remap(sessions, ckpt.item_map)
    sessions = [s for s in sessions if len(s) >= 2]
    if not sessions:
        raise UsageError(f"{args.data}: no {args.split} session with 2 or more known items")
    metrics = evaluate(ckpt.model, sessions)
    print(f"{ckpt.kind} on {dataset.name} ({args.split}, {metrics['targets']} targets)")
    print(f"{'k':>4} {'Recall':>8} {'MRR':>8} {'Recall excl. seen':>18} {'MRR excl. seen':>15}")
    for k in (5, 10, 20):
        print(f"{k:>4} {metrics[f'recall@{k}']:>8.4f} {metrics[f'mrr@{k}']:>8.4f} "
              f"{metrics[f'recall@{k}_excl']:>18.4f} {metrics[f'mrr@{k}_excl']:>15.4f}")
    path = Path(args.json or f"{args.checkpoint}.{args.split}.json")
    report = {"checkpoint": str(args.checkpoint), "kind": ckpt.kind, "data": str(args.data),
              "split": args.split,
              "data_fingerprint_matches": ckpt.data_fingerprint == dataset.fingerprint(), "metrics": metrics}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {path}")
    return 0
