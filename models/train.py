"""The training loop: length-bucketed batches (SASRec, TRON) or session-parallel mini-batches
(GRU4Rec+), early stopping on the validation tail, checkpoints and resume.

Only real positions enter the loss. After every epoch the newest `valid_sessions` validation
sessions are scored (Recall@20, MRR@20); the best epoch's weights are kept and written to
`out_dir/model.safetensors`, and `out_dir/resume.pt` lets an interrupted run continue. Epochs are
never chosen on the test set.

Under torchrun (WORLD_SIZE > 1) the SASRec-based presets train with DistributedDataParallel:
every process walks the same shuffled list of batches and takes every WORLD_SIZE-th one, and
draws its own batch-shared and in-batch negatives from its own batch with its own generator, as
one GPU's batch does in the paper. Gradients are averaged; validation runs in every process on
the same weights, so all of them stop together; rank 0 writes the files.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from abrec.models import losses, negatives
from abrec.models.checkpoint import save_checkpoint
from abrec.models.data import Dataset
from abrec.models.evaluate import evaluate
from abrec.models.presets import build_model, resolve_config
from torch import Tensor, nn
from tqdm import tqdm


@dataclass
class TrainResult:
    model: nn.Module  # best epoch's weights, eval mode
    kind: str
    config: dict[str, Any]
    history: list[dict[str, float]]  # one record per epoch
    best: dict[str, float]  # validation metrics of the kept epoch
    epochs: float  # passes over the training data (fractional when stopped mid-epoch)
    sessions_per_s: float
    train_seconds: float  # time in training steps only
    wall_seconds: float  # including validation
    stopped: str  # "early stopping", "max epochs" or "time limit"
    checkpoint: Path | None = None


def make_batches(lengths: list[int] | np.ndarray, batch_size: int, generator: torch.Generator,
                 bucket: bool = True) -> list[Tensor]:
    """Session indices per batch. Bucketed: sessions of similar length together (random order
    within a length), batches in random order; otherwise a plain shuffle."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator)
    if bucket:
        lengths_t = torch.as_tensor(np.asarray(lengths))[perm]
        perm = perm[torch.argsort(lengths_t, stable=True)]
    batches = list(torch.split(perm, batch_size))
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in order]


def collate(sessions: list[list[int]] | list[np.ndarray], max_len: int, pad_to: int | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded (inputs, labels, mask) [B, L]: each session's newest max_len+1 clicks, inputs =
    all but the last click, labels = all but the first. L = longest in the batch, or `pad_to`."""
    cut = [np.asarray(s[-(max_len + 1):], dtype=np.int64) for s in sessions]
    n = np.array([max(len(s) - 1, 0) for s in cut])
    length = pad_to or max(1, int(n.max(initial=0)))
    inputs = np.zeros((len(cut), length), dtype=np.int64)
    labels = np.zeros((len(cut), length), dtype=np.int64)
    if n.sum():
        rows = np.repeat(np.arange(len(cut)), n)
        cols = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + np.repeat(length - n, n)
        inputs[rows, cols] = np.concatenate([s[:-1] for s in cut if len(s) > 1])
        labels[rows, cols] = np.concatenate([s[1:] for s in cut if len(s) > 1])
    labels_t = torch.from_numpy(labels)
    return torch.from_numpy(inputs), labels_t, labels_t != 0


def batch_loss(model: nn.Module, config: dict[str, Any], inputs: Tensor, labels: Tensor, mask: Tensor,
               negs: negatives.Negatives, net: nn.Module | None = None) -> Tensor:
    """Mean loss over the batch's real positions; `net` is the DDP wrapper of `model`, if any."""
    hidden = (net or model)(inputs, mask)
    pos, neg = negatives.scores(model, hidden, mask, labels, negs, topk=config["topk"],
                                activation=config["final_activation"],
                                selection_bf16=config["selection_bf16"])
    return losses.compute(config["loss"], pos, neg, bpr_penalty=config["bpr_penalty"])


def make_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    if config["optimizer"] == "adagrad":
        # Sparse embedding gradients: Adagrad's per-row update is exact for untouched rows.
        return torch.optim.Adagrad(model.parameters(), lr=config["lr"])
    try:
        return torch.optim.Adam(model.parameters(), lr=config["lr"], fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=config["lr"], foreach=True)


def _to(negs: negatives.Negatives, device: torch.device) -> negatives.Negatives:
    return negatives.Negatives(*(None if t is None else t.to(device, non_blocking=True)
                                 for t in (negs.shared, negs.per_session, negs.per_position)))


def _world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Clock:
    """Training-step time, sessions seen and the wall-clock deadline."""

    def __init__(self, time_limit_s: float | None, already: float = 0.0, world: int = 1) -> None:
        self.start = time.perf_counter() - already
        self.deadline = self.start + time_limit_s if time_limit_s else math.inf
        self.train_seconds = 0.0
        self.sessions = 0
        self.world = world

    def over(self) -> bool:
        over = time.perf_counter() >= self.deadline
        if self.world > 1:  # every process must stop after the same batch
            import torch.distributed as dist

            flag = torch.tensor([float(over)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over = bool(flag.item())
        return over

    def wall(self) -> float:
        return time.perf_counter() - self.start


def _sasrec_epoch(model, opt, config, train, num_items, gen, clock, device, bar, hook, net=None,
                  order_gen=None) -> float:
    lengths = [min(len(s), config["max_len"] + 1) for s in train]
    train = [np.asarray(s, dtype=np.int64) for s in train]
    total, count = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = make_batches(lengths, config["batch_size"], order_gen or gen)
    rank, world = _world()
    if world > 1:
        batches = batches[: len(batches) // world * world][rank::world]
    for idx in batches:
        t0 = time.perf_counter()
        inputs, labels, mask = collate([train[i] for i in idx.tolist()], config["max_len"])
        negs = negatives.sample(config, inputs, labels, mask, num_items, gen)
        inputs, labels, mask = inputs.to(device), labels.to(device), mask.to(device)
        with autocast:
            loss = batch_loss(model, config, inputs, labels, mask, _to(negs, device), net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.train_seconds += time.perf_counter() - t0
        clock.sessions += len(idx) * world
        total, count = total + loss.item(), count + 1
        bar.update(len(idx) * world)
        if count % 20 == 0:
            bar.set_postfix(loss=f"{total / count:.4f}", sess_s=f"{clock.sessions / clock.train_seconds:.0f}")
        hook()
        if clock.over():
            break
    return total / max(count, 1)


def _gru_epoch(model, opt, config, train, num_items, gen, clock, device, bar, hook) -> float:
    """Session-parallel mini-batches: each of `batch_size` lanes runs through one session click
    by click; a finished session's lane takes the next session and its state is reset. The
    lanes' targets are each other's in-batch negatives, with the batch-shared uniform ones."""
    sessions = [s for s in train if len(s) >= 2]
    width = min(config["batch_size"], len(sessions))
    flat = torch.as_tensor(np.concatenate([np.asarray(s) for s in sessions]))
    ends = torch.as_tensor(np.cumsum([len(s) for s in sessions]))
    starts = ends - torch.as_tensor([len(s) for s in sessions])
    lane = torch.arange(width)
    cursor = starts[lane].clone()
    next_session = width
    state = model.initial_state(width, device)
    ones = torch.ones(width, 1, dtype=torch.bool, device=device)
    total, count = 0.0, 0
    while True:
        t0 = time.perf_counter()
        inputs, targets = flat[cursor].to(device), flat[cursor + 1].to(device)
        shared = [negatives.uniform(num_items, (config["uniform_negatives"],), gen).to(device)]
        if config["in_batch_negatives"]:
            shared.append(targets)
        out, state = model.step(inputs, state)
        pos, neg = negatives.scores(model, out[:, None], ones, targets[:, None],
                                    negatives.Negatives(shared=torch.cat(shared)),
                                    activation=config["final_activation"])
        loss = losses.compute(config["loss"], pos, neg, bpr_penalty=config["bpr_penalty"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state = state.detach()
        cursor += 1
        done = cursor + 1 >= ends[lane]
        clock.train_seconds += time.perf_counter() - t0
        total, count = total + loss.item(), count + 1
        if done.any():
            n_done = int(done.sum())
            clock.sessions += n_done
            bar.update(n_done)
            if next_session + n_done > len(sessions):
                break
            lane[done] = torch.arange(next_session, next_session + n_done)
            cursor[done] = starts[lane[done]]
            next_session += n_done
            state[:, done.to(device)] = 0.0
        if count % 200 == 0:
            bar.set_postfix(loss=f"{total / count:.4f}", sess_s=f"{clock.sessions / clock.train_seconds:.0f}")
            hook()
        if clock.over():
            break
    return total / max(count, 1)


def train(dataset: Dataset, kind: str, overrides: dict[str, Any] | None = None, *,
          out_dir: str | Path | None = None, resume: bool = False, time_limit_s: float | None = None,
          progress: bool = True, device: str | torch.device | None = None,
          on_epoch: Callable[[dict[str, float]], None] | None = None,
          eval_every_s: float | None = None) -> TrainResult:
    """Train preset `kind` (with `overrides`) on `dataset` until early stopping, `epochs` or the
    wall-clock `time_limit_s`; returns the best validated model.

    With `eval_every_s`, validation also runs within epochs (for learning curves of slow models);
    those snapshots may be kept as best, but patience counts whole epochs only.
    """
    config = resolve_config(kind, overrides)
    rank, world = _init_distributed()
    if world > 1 and config["arch"] != "sasrec":
        raise ValueError("multi-process training is built for the SASRec-based presets only")
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    torch.manual_seed(config["seed"])  # the same initial weights in every process
    gen = torch.Generator().manual_seed(config["seed"] + rank)
    order_gen = torch.Generator().manual_seed(config["seed"]) if world > 1 else None
    num_items = dataset.num_items
    model = build_model(kind, config, num_items).to(device)
    net = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    progress = progress and rank == 0
    if world > 1:
        eval_every_s = None  # mid-epoch validation is timed per process; processes must agree
    if rank != 0:
        out_dir = None
    opt = make_optimizer(model, config)
    valid = dataset.valid[-config["valid_sessions"]:] if config["valid_sessions"] else []
    out_dir = Path(out_dir) if out_dir else None
    resume_path = out_dir / "resume.pt" if out_dir else None

    history: list[dict[str, float]] = []
    best: dict[str, float] = {}
    best_state = copy.deepcopy(model.state_dict())
    start_epoch, bad_epochs, done_seconds, done_sessions, done_train = 0, 0, 0.0, 0, 0.0
    if resume and resume_path and resume_path.exists():
        saved = torch.load(resume_path, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        if order_gen is not None and "order_generator" in saved:
            order_gen.set_state(saved["order_generator"])
        best_state, history, best = saved["best_state"], saved["history"], saved["best"]
        start_epoch, bad_epochs = saved["epoch"], saved["bad_epochs"]
        done_seconds, done_sessions, done_train = saved["wall"], saved["sessions"], saved["train_seconds"]
    clock = _Clock(time_limit_s, already=done_seconds, world=world)
    clock.sessions, clock.train_seconds = done_sessions, done_train
    run_epoch = _gru_epoch if config["arch"] == "gru4rec" else _sasrec_epoch
    stopped = "max epochs"
    epoch = start_epoch
    last_eval = time.perf_counter()

    def validate(epoch_done: float, loss: float | None) -> tuple[dict[str, float], bool]:
        nonlocal best, best_state, last_eval
        record = {"epoch": round(epoch_done, 3), "loss": loss, "train_seconds": clock.train_seconds,
                  "sessions_per_s": clock.sessions / max(clock.train_seconds, 1e-9)}
        if valid:
            metrics = evaluate(model, valid, ks=(20,))
            model.train()
            record |= {"valid_recall@20": metrics["recall@20"], "valid_mrr@20": metrics["mrr@20"]}
        record["wall_seconds"] = clock.wall()
        history.append(record)
        last_eval = time.perf_counter()
        improved = not valid or record["valid_recall@20"] > best.get("valid_recall@20", -1.0)
        if improved:
            best = dict(record)
            best_state = copy.deepcopy(model.state_dict())
        return record, improved

    for epoch in range(start_epoch + 1, config["epochs"] + 1):
        model.train()

        epoch_start = clock.sessions

        def hook(epoch: int = epoch, epoch_start: int = epoch_start) -> None:
            if eval_every_s and valid and time.perf_counter() - last_eval >= eval_every_s:
                validate(epoch - 1 + (clock.sessions - epoch_start) / max(len(dataset.train), 1), None)

        with tqdm(total=len(dataset.train), desc=f"{kind} epoch {epoch}", unit="sess", disable=not progress,
                  mininterval=1, leave=False) as bar:
            extra = {"net": net, "order_gen": order_gen} if world > 1 else {}
            loss = run_epoch(model, opt, config, dataset.train, num_items, gen, clock, device, bar, hook,
                             **extra)
        fraction = min((clock.sessions - epoch_start) / max(len(dataset.train), 1), 1.0)
        # A full pass counts as a whole epoch (session-parallel lanes leave a few sessions over).
        record, improved = validate(epoch if fraction > 0.99 else epoch - 1 + fraction, loss)
        bad_epochs = 0 if improved else bad_epochs + 1
        if progress:
            tqdm.write(f"{kind} epoch {epoch}: loss {loss:.4f}, "
                       + (f"valid R@20 {record['valid_recall@20']:.4f} MRR@20 {record['valid_mrr@20']:.4f}, "
                          if valid else "")
                       + f"{record['sessions_per_s']:.0f} sessions/s, {record['wall_seconds'] / 60:.1f} min")
        if on_epoch:
            on_epoch(record)
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            if improved:
                save_trained(out_dir / "model.safetensors", model, kind, config, dataset, {"valid": best})
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(),
                        **({"order_generator": order_gen.get_state()} if order_gen is not None else {}),
                        "best_state": best_state, "history": history, "best": best, "epoch": epoch,
                        "bad_epochs": bad_epochs, "wall": clock.wall(), "sessions": clock.sessions,
                        "train_seconds": clock.train_seconds}, resume_path)
        if valid and bad_epochs >= config["patience"]:
            stopped = "early stopping"
            break
        if clock.over():
            stopped = "time limit"
            break
    model.load_state_dict(best_state)
    model.eval()
    if out_dir:
        save_trained(out_dir / "model.safetensors", model, kind, config, dataset, {"valid": best})
    return TrainResult(model=model, kind=kind, config=config, history=history, best=best,
                       epochs=history[-1]["epoch"] if history else 0,
                       sessions_per_s=clock.sessions / max(clock.train_seconds, 1e-9),
                       train_seconds=clock.train_seconds, wall_seconds=clock.wall(), stopped=stopped,
                       checkpoint=out_dir / "model.safetensors" if out_dir else None)


def _init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment, if any."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _world()


def save_trained(path: Path, model: nn.Module, kind: str, config: dict, dataset: Dataset,
                 metrics: dict) -> Path:
    """Checkpoint a model trained on `dataset`: its item map, top-100 items and fingerprint."""
    return save_checkpoint(path, model, kind=kind, config=config, item_map=dataset.item_map,
                           metrics=metrics, popular=dataset.popular(100),
                           data_fingerprint=dataset.fingerprint())
