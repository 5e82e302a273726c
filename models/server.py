"""The model server: every served model on one device, dynamic micro-batching, hot swap.

One `ModelServer` per device. It resolves aliases (`tron@champion`) to registry versions itself,
polling the database every `poll_s` seconds (a plain query that works the same on SQLite and
PostgreSQL; LISTEN/NOTIFY would only shave that second off). Each version in use is loaded once and
gets its own `Batcher`, which groups concurrent requests into one forward pass as Triton's dynamic
batcher does: a batch closes when it holds `max_batch` requests or `max_delay_s` after its first
request arrived, whichever is first. A batch never mixes versions, and every answer names the
version that computed it.

Hot swap: when an alias moves, the new version loads and warms up in the background while the old
one keeps serving; the alias is then switched in one assignment. Requests already queued on the old
version finish there, after which the old version is unloaded. A failed load keeps the old version
serving and is reported by `/readyz` and `/status`.

Which aliases to serve: those named on the command line, plus (with `discover`) every alias bound to
an arm that currently serves traffic — all arms of running experiments, the control arm of paused
and stopped ones, the shipped arm of shipped ones. models/ may not import experiments/, so that is
one plain SQL query against the `arms` and `experiments` tables (skipped if they don't exist).

`server_http.HttpServer` puts a ModelServer on HTTP.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from abrec.models.checkpoint import load_checkpoint
from abrec.models.data import ItemMap
from abrec.models.inference import TOPK_CHUNK, hidden_last, pad_left, top_k, top_within
from abrec.models.registry import ModelAlias, ModelVersion, parse_alias, parse_version
from abrec.models.store import ArtifactStore
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("abrec.model_server")

PRECISIONS = ("fp32", "bf16", "int8")

# Aliases of arms that serve traffic now (see the module docstring); plain SQL on purpose.
DISCOVER_SQL = text(
    """
    SELECT DISTINCT a.model_alias FROM arms a JOIN experiments e ON e.id = a.experiment_id
    WHERE e.status = 'running'
       OR (e.status IN ('paused', 'stopped') AND a.position = 0)
       OR (e.status = 'shipped' AND a.name = e.shipped_arm)
    """
)


class NotServed(LookupError):
    """The requested model is not one this server serves (or not loaded yet)."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed while the request waited: it was dropped, not computed."""


@dataclass(frozen=True)
class Result:
    items: list[str]
    scores: list[float]  # empty when answered from the version's popular items (no known item)
    version: str
    unknown: int


@dataclass
class _Request:
    session: list[int]
    k: int
    exclude_seen: bool
    unknown: int
    future: Future
    t0: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # perf_counter time after which the caller no longer waits


_STOP = object()


class Batcher:
    """Dynamic batching for one model version: a queue and one worker thread.

    The worker takes the first waiting request, then keeps taking requests until the batch holds
    `max_batch` or `max_delay_s` has passed since that first request arrived. It then waits for a
    device slot (shared by every batcher of the server: see `ModelServer`'s `concurrent_batches`),
    tops the batch up with whatever arrived meanwhile, and runs it.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[_Request]], None],
        *,
        max_batch: int,
        max_delay_s: float,
        device_slots: threading.Semaphore,
        observe_batch: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.name = name
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._device_slots = device_slots
        self._observe_batch = observe_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: _Request) -> None:
        with self._close_lock:
            if self._closed:
                raise NotServed(f"{self.name} is being unloaded")
            self._queue.put(request)

    def depth(self) -> int:
        return self._queue.qsize()

    def close(self, wait: bool = False) -> None:
        """Stop taking requests; those already queued still run. Idempotent."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if wait:
            self._thread.join()

    def _take(self, timeout: float) -> Any:
        """The next queued item, waiting at most `timeout` seconds; None when there is none."""
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _fill(self, batch: list[_Request], close_at: float) -> bool:
        """Add queued requests until the batch is full or `close_at` passes; True on the stop mark."""
        while len(batch) < self.max_batch:
            item = self._take(close_at - time.perf_counter())
            if item is None:
                return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            stopping = self._fill(batch, first.t0 + self.max_delay_s)
            with self._device_slots:
                if not stopping:  # take what arrived while other models held the device
                    stopping = self._fill(batch, 0.0)
                # A caller that gave up cancelled its future, or its deadline passed: computing its
                # answer would only delay the live requests behind it (overload feeds on itself).
                now = time.perf_counter()
                live = []
                for r in batch:
                    if not r.future.set_running_or_notify_cancel():
                        continue
                    if now > r.deadline:
                        r.future.set_exception(DeadlineExceeded("the deadline passed before the model ran"))
                        continue
                    live.append(r)
                if not live:
                    continue
                self._observe_batch(len(live))
                try:
                    self._run(live)
                except Exception as exc:  # a model fault fails this batch, never the worker
                    log.exception("batch of %d on %s failed", len(live), self.name)
                    for r in live:
                        if not r.future.done():
                            r.future.set_exception(exc)


class Bf16Product:
    """h [B, d] -> h @ W.T [B, N] in bf16, for a fixed W [N, d], with a proven error bound.

    On a CPU, W is packed once into oneDNN's blocked layout, as inductor's CPU weight prepacking
    does (the same private ops); a plain bf16 matmul repacks W at every call, which costs more
    than the product itself. Where they are missing (GPU, other builds): the plain matmul.
    `__call__` also returns `slack` [B]: |scores - h . w| <= slack for every item. With
    h . w - h^ . w^ = h . (w - w^) + (h - h^) . w^ (Cauchy-Schwarz on each), plus fp32 accumulation
    (gamma_d times |h^||w^|, and as much again for the fp32 re-score it is compared with) and the
    rounding of the output to bf16 (half an ulp: 2^-9 of the largest |score|; 2^-8 is used).
    """

    def __init__(self, weight: torch.Tensor, batch_hint: int = 16) -> None:
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.weight_t, self.packed = w.T, None
        exact = weight.detach().float()
        self.w_norm = float(exact.norm(dim=1).max())
        self.wq_norm = float(w.float().norm(dim=1).max())
        self.err_norm = float((exact - w.float()).norm(dim=1).max())
        d = w.shape[1]
        self.gamma = (d + 4) * 2.0**-24 / (1 - (d + 4) * 2.0**-24)
        if w.device.type == "cuda":
            # Split-K partial sums in bf16 would break the bound: fp32 accumulation only. This
            # process owns the GPU, so the setting is its own.
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        if w.device.type == "cpu":
            try:
                self.weight_t, self.packed = None, torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
            except (AttributeError, RuntimeError) as exc:
                log.warning("no prepacked bf16 product (%s); plain bf16 matmul", exc)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores [B, N] fp32, slack [B])."""
        x = hidden.to(torch.bfloat16)
        if self.packed is None:
            scores = (x @ self.weight_t).float()
        else:
            scores = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [None], "").float()
        h_norm, xf = hidden.norm(dim=1), x.float()
        slack = (h_norm * self.err_norm + (hidden - xf).norm(dim=1) * self.wq_norm
                 + self.gamma * (xf.norm(dim=1) * self.wq_norm + h_norm * self.w_norm)
                 + 2.0**-8 * scores.abs().amax(1))
        return scores, slack * 1.001


class Int8Product:
    """h [B, d] -> row-scaled scores of every item from int8 weights, with a proven error bound.

    fbgemm's int8 GEMM costs ~3.8 ms CPU for 16 sessions where MKL's fp32 takes ~13 ms on AVX2
    without native bf16 (43,097 items, d=200). Each row is scaled to max |x| = 63/64 and rounded
    to multiples of 1/64 here, so fbgemm's 7-bit activations (its int16 pair sums never saturate)
    hold it exactly and the rounding residual r is known: `__call__` gives x^ . w^ for every item,
    and x . w is within `slack` of it (Cauchy-Schwarz on the two residuals, plus float rounding).
    Only the order within a row matters for a shortlist, so the row scaling is never undone.
    """

    STEP = 1 / 64  # a power of two: x / STEP and back are exact in float

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        # Zero rows up to a whole number of top-k chunks, so that the chunks of a score row are a
        # contiguous view (the caller sets those columns to -inf).
        w = torch.cat([w, w.new_zeros(-len(w) % TOPK_CHUNK, w.shape[1])])
        self.columns = len(w)
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        with warnings.catch_warnings():  # quantized tensors are deprecated; the prepacked op is not
            warnings.simplefilter("ignore")
            zero = torch.zeros_like(amax, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.w_norm = float(w.norm(dim=1).max())
        self.err_norm = float((w - q.float() * scale[:, None]).norm(dim=1).max())
        self.abs_max = float(amax.max())
        self.nbytes = q.numel()
        self._op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores [B, N], slack [B]): |scores - x . W.T| <= slack, x = hidden scaled per row."""
        x = hidden * ((63 / 64) / hidden.abs().amax(1, keepdim=True).clamp_min(1e-30))
        xq = torch.round(x * 64) * self.STEP
        scores = self._op(xq, self.STEP, 64, self.packed)  # 64 + x / STEP lies in 1..127
        rest = (x - xq).norm(dim=1)
        slack = (rest * self.w_norm + xq.norm(dim=1) * self.err_norm) * 1.001
        return scores, slack + 1e-5 * xq.abs().sum(1) * self.abs_max


class Fp32Product:
    """h [B, d] -> (h @ W.T [B, N], None): exact, so no slack and no shortlist.

    On a CPU over a contiguous transposed [d, N] copy: MKL runs `h @ W.T` over the transposed view
    ~3x slower for one session (1.4 vs 4.7 ms CPU). GPUs need no copy.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        on_cpu = weight.device.type == "cpu"
        self.scoring = weight.T.contiguous() if on_cpu else weight.T
        self.nbytes = weight.numel() * 4 if on_cpu else 0

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return hidden @ self.scoring, None


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")


class LoadedVersion:
    """One registry version resident on the device, with its id map and its batcher."""

    def __init__(
        self, row: ModelVersion, model: torch.nn.Module, item_map: ItemMap, popular: list[int], device: str,
        precision: str = "fp32",
    ) -> None:
        self.label = row.label
        self.version_id = row.id
        self.sha256 = row.sha256
        self.kind = row.kind
        self.model = model
        self.device = torch.device(device)
        self.n_items = len(item_map)
        # External ids indexed by internal id (index 0, the padding, is never returned).
        self.external = np.array([""] + item_map.external_ids, dtype=object)
        self.internal: dict[str, int] = {e: i for i, e in enumerate(item_map.external_ids, start=1)}
        self.popular = popular
        self.weight = model.output_weight().detach()  # [N+1, d], fp32: exact scores
        tensors = [*model.parameters(), *model.buffers()]
        # A product gives (scores [B, N], slack [B]): rough scores within slack of the exact ones
        # only shortlist, and the fp32 rows re-score the shortlist; slack None means exact.
        self.product: Bf16Product | Int8Product | Fp32Product
        self.single: Bf16Product | Int8Product | Fp32Product  # for batches of one session
        if precision == "bf16":
            # bf16 scores every item (oneDNN on AMX with a prepacked matrix: ~0.9 ms CPU for one
            # session and ~1.2 ms for 16 where fp32 takes 1.4 and 6 ms, 43,097 items, d=200).
            self.product = Bf16Product(self.weight)
            extra = self.weight.numel() * 2
        elif precision == "int8":
            self.product = Int8Product(self.weight)
            # One session alone, without VNNI: MKL's fp32 matrix-vector product is ~10 % cheaper
            # than int8 with its shortlist (fbgemm gains from two sessions on), and exact. With
            # VNNI, int8 costs about a third (0.45 vs 1.23 ms on a Zen 4 core, benchmarks/compute.py).
            vnni = torch.cpu._is_vnni_supported()
            self.single = self.product if vnni else Fp32Product(self.weight)
            extra = self.product.nbytes + (0 if vnni else self.single.nbytes)
            # The padding columns' ids and rows (never returned: their scores are -inf).
            pad = self.product.columns - len(self.external)
            self.external = np.concatenate([self.external, np.full(pad, "", dtype=object)])
            self.weight = torch.cat([self.weight, self.weight.new_zeros(pad, self.weight.shape[1])])
        else:
            self.product = Fp32Product(self.weight)
            extra = self.product.nbytes
        if precision != "int8":
            self.single = self.product
        self.memory_bytes = sum(t.numel() * t.element_size() for t in tensors) + extra
        self.loaded_at = time.time()
        self.load_seconds = 0.0
        self.batcher: Batcher | None = None

    def prepare(self, items: list[str], k: int, exclude_seen: bool, future: Future,
                deadline: float = float("inf")) -> _Request | None:
        """Map the shop's ids to internal ones; answer at once (None) when none is known."""
        internal = self.internal
        session = [i for item in items if (i := internal.get(item)) is not None]
        unknown = len(items) - len(session)
        if not session:
            # No known click: the version's most popular training items are its best guess.
            top = [int(i) for i in self.popular[:k]]
            future.set_result(Result(self.external[top].tolist(), [], self.label, unknown))
            return None
        return _Request(session, k, exclude_seen, unknown, future, deadline=deadline)

    def run(self, batch: list[_Request]) -> None:
        """One forward pass for the whole batch, then per-request exclusion and top-k."""
        with torch.inference_mode():
            hidden = hidden_last(self.model, [r.session for r in batch])
            scores, slack = (self.single if len(batch) == 1 else self.product)(hidden)
            scores[:, self.n_items + 1:] = float("-inf")  # the int8 product's padding columns, if any
            scores[:, 0] = float("-inf")
            if any(r.exclude_seen for r in batch):
                # Rows that exclude nothing scatter onto column 0, which is -inf already.
                seen, _ = pad_left([r.session if r.exclude_seen else [] for r in batch],
                                   max(len(r.session) for r in batch), scores.device)
                scores.scatter_(1, seen, float("-inf"))
            k = min(max(r.k for r in batch), self.n_items)
            if slack is not None:
                # Every item whose rough score is within twice the bound of the k-th best: an item
                # of the exact top k scores at least the k-th best exact score, itself at least the
                # k-th best rough score less the bound, and its rough score is at most the bound
                # above that.
                values, ids = self._rescore(hidden, scores, top_within(scores, k, 2 * slack), k)
            else:
                values, ids = top_k(scores, k)
            values = values.cpu().numpy()
            finite = np.isfinite(values).sum(1).tolist()
            names = self.external[ids.cpu().numpy()].tolist()
            values = values.tolist()
        # Whole-batch conversions above, list slices here: per-request numpy calls cost more.
        for r, n, row_names, row_values in zip(batch, finite, names, values, strict=True):
            n = min(n, r.k)  # excluded items sort last, with -inf
            r.future.set_result(Result(row_names[:n], row_values[:n], self.label, r.unknown))

    def _rescore(self, hidden: torch.Tensor, rough: torch.Tensor, shortlist: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, ...]:
        """Top-k by fp32 scores among a shortlist [B, M] of item ids."""
        # A dot product per (row, item): ~4x cheaper than bmm's batched matrix-vector products.
        exact = torch.linalg.vecdot(F.embedding(shortlist, self.weight), hidden[:, None, :])
        exact[rough.gather(1, shortlist) == float("-inf")] = float("-inf")  # padding and excluded items
        values, order = exact.topk(k, dim=1)
        return values, shortlist.gather(1, order)

    def warm_up(self, max_batch: int) -> None:
        """Run the sizes the batcher will use once, so first requests don't pay for allocation."""
        gen = torch.Generator().manual_seed(0)
        for size in sorted({1, max(1, max_batch // 2), max_batch}):
            batch = []
            for _ in range(size):
                length = int(torch.randint(1, 10, (1,), generator=gen))
                session = torch.randint(1, self.n_items + 1, (length,), generator=gen).tolist()
                fut: Future = Future()
                fut.set_running_or_notify_cancel()
                batch.append(_Request(session, 20, True, 0, fut))
            self.run(batch)
            for r in batch:
                scores = r.future.result().scores
                if not all(np.isfinite(scores)):
                    raise RuntimeError("warm-up gave non-finite scores")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device: str) -> str:
    """bf16 scoring where the hardware multiplies bf16 matrices natively (AMX, CUDA); else, on a
    CPU, int8 (fbgemm), which answers as fp32 does at about a third of its cost; else fp32.

    AVX512-BF16 alone is not enough: on a Zen 4 core oneDNN's bf16 product of one session with
    43,097 items costs 1.16 ms where fbgemm's int8 (VNNI) costs 0.45 (benchmarks/compute.py)."""
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if torch.cpu._is_amx_tile_supported():
        return "bf16"
    return "int8" if int8_available() else "fp32"


class ModelServer:
    """Loads, batches and hot-swaps every served model; thread-safe. `HttpServer` puts it on HTTP."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        *,
        aliases: Iterable[str] = (),
        discover: bool = True,
        device: str | None = None,
        max_batch: int = 64,
        max_delay_s: float = 0.0,
        poll_s: float = 1.0,
        precision: str | None = None,
        concurrent_batches: int | None = None,
    ) -> None:
        """`concurrent_batches`: how many batches (of different versions) may compute at once. By
        default one on a GPU, and on a CPU as many as its cores hold torch's thread count: on 2
        cores with one torch thread, two models' batches overlapping served ~40 % more requests at
        32 callers than taking turns."""
        for ref in aliases:  # fail fast on a typo
            if "@" in ref:
                parse_alias(ref)
            else:
                parse_version(ref)
        if max_batch < 1 or max_delay_s < 0 or (concurrent_batches is not None and concurrent_batches < 1):
            raise ValueError("max_batch and concurrent_batches must be >= 1 and max_delay_s >= 0")
        if precision not in (None, *PRECISIONS):
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.device = device or default_device()
        on_cpu = torch.device(self.device).type == "cpu"
        if precision == "int8" and not (on_cpu and int8_available()):
            raise ValueError("int8 scoring needs a CPU with fbgemm")
        self.sessions = sessions
        self.store = store
        self.explicit = list(dict.fromkeys(aliases))
        self.discover = discover
        self.precision = precision or default_precision(self.device)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.poll_s = poll_s
        self._lock = threading.Lock()
        if concurrent_batches is None:
            concurrent_batches = max(1, (os.cpu_count() or 1) // torch.get_num_threads()) if on_cpu else 1
        self.concurrent_batches = concurrent_batches
        self._device_slots = threading.BoundedSemaphore(concurrent_batches)
        self._routes: dict[str, LoadedVersion] = {}  # alias or pinned version -> what serves it
        self._loaded: dict[int, LoadedVersion] = {}  # version id -> resident version
        self._refs: list[str] = []  # every ref this server should serve now
        self._wanted: dict[str, int] = {}  # served ref -> version id it should serve
        self._loading: set[int] = set()
        self._failed: dict[int, str] = {}  # version id -> why its load failed (not retried)
        self._errors: dict[str, str] = {}  # served ref -> last problem, shown by /readyz
        self._db_error: str | None = None
        self._refreshed = False
        self._changed = threading.Condition(self._lock)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._init_metrics()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> ModelServer:
        """Resolve and start loading every served model, then keep polling for alias moves."""
        self.refresh()
        self._poller = threading.Thread(target=self._poll_loop, name="alias-poller", daemon=True)
        self._poller.start()
        return self

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        self._loader.shutdown(wait=True)
        with self._lock:
            versions = list(self._loaded.values())
            self._routes.clear()
            self._loaded.clear()
        for lv in versions:
            if lv.batcher is not None:
                lv.batcher.close(wait=True)

    def wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._changed:
            while not self._is_ready_locked():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    # ---------------------------------------------------------------- alias resolution and swaps

    def _wanted_refs(self) -> list[str]:
        refs = list(self.explicit)
        if self.discover:
            try:
                with self.sessions() as session:
                    refs += [r for (r,) in session.execute(DISCOVER_SQL) if r]
            except Exception as exc:  # no experiments tables (a models-only database): nothing to add
                log.debug("arm discovery skipped: %s", exc)
        return list(dict.fromkeys(refs))

    def _targets(self, session: Session, refs: list[str]) -> tuple[dict[str, ModelVersion], dict[str, str]]:
        """ref -> the version it should serve now, and ref -> why it can't be resolved."""
        targets: dict[str, ModelVersion] = {}
        errors: dict[str, str] = {}
        aliases = {r: parse_alias(r) for r in refs if "@" in r and _valid(parse_alias, r)}
        names = {name for name, _ in aliases.values()}
        rows = session.scalars(select(ModelAlias).where(ModelAlias.name.in_(names))) if names else []
        current = {row.ref: row.version for row in rows}
        for ref in refs:
            if "@" in ref:
                if ref not in aliases:
                    errors[ref] = f"{ref!r} is not a valid alias"
                elif ref in current:
                    targets[ref] = current[ref]
                else:
                    errors[ref] = f"no alias {ref} in the registry"
            elif not _valid(parse_version, ref):
                errors[ref] = f"{ref!r} is not a valid model reference"
            else:
                name, number = parse_version(ref)
                row = session.scalar(
                    select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == number)
                )
                if row is None:
                    errors[ref] = f"no model version {ref}"
                else:
                    targets[ref] = row
        return targets, errors

    def refresh(self) -> None:
        """One poll: find what each served ref should point to, start loads, switch what is ready."""
        try:
            refs = self._wanted_refs()
            with self.sessions() as session:
                targets, errors = self._targets(session, refs)
        except Exception as exc:  # the database is down: keep serving what is loaded
            with self._changed:
                self._db_error = f"{type(exc).__name__}: {exc}"
                self._changed.notify_all()
            log.warning("alias poll failed: %s", exc)
            return
        to_load: list[ModelVersion] = []
        with self._changed:
            self._db_error = None
            self._refs = refs
            self._wanted = {ref: row.id for ref, row in targets.items()}
            self._errors = {ref: why for ref, why in self._errors.items() if ref in refs} | errors
            for ref, row in targets.items():
                if row.id in self._failed:
                    self._errors[ref] = self._failed[row.id]
                elif row.id not in self._loaded and row.id not in self._loading:
                    self._loading.add(row.id)
                    to_load.append(row)
            self._apply_routes_locked()
            self._refreshed = True
            self._changed.notify_all()
        for row in to_load:
            self._loader.submit(self._load, row)

    def _apply_routes_locked(self) -> None:
        """Point every served ref at its wanted version where that is resident; retire the unused."""
        for ref in list(self._routes):
            if ref not in self._refs:
                del self._routes[ref]
        for ref, vid in self._wanted.items():
            lv = self._loaded.get(vid)
            if lv is not None:
                if self._routes.get(ref) is not lv:
                    log.info("%s now served by %s", ref, lv.label)
                self._routes[ref] = lv  # the swap: one assignment under the lock
                self._errors.pop(ref, None)
        keep = {lv.version_id for lv in self._routes.values()} | set(self._wanted.values())
        for vid, lv in list(self._loaded.items()):
            if vid not in keep:
                del self._loaded[vid]
                log.info("unloading %s", lv.label)
                if lv.batcher is not None:
                    lv.batcher.close()  # queued requests finish on it first

    def _load(self, row: ModelVersion) -> None:
        t0 = time.perf_counter()
        try:
            path = self.store.fetch(row.artifact_key, row.sha256)
            ckpt = load_checkpoint(path, device=self.device)
            lv = LoadedVersion(row, ckpt.model, ckpt.item_map, ckpt.popular, self.device, self.precision)
            lv.warm_up(self.max_batch)
            lv.batcher = Batcher(
                lv.label,
                lv.run,
                max_batch=self.max_batch,
                max_delay_s=self.max_delay_s,
                device_slots=self._device_slots,
                observe_batch=self._m_batch.labels(lv.label).observe,
            )
            lv.load_seconds = time.perf_counter() - t0
        except Exception as exc:
            why = f"loading {row.label} failed: {type(exc).__name__}: {exc}"
            log.error(why)
            with self._changed:
                self._loading.discard(row.id)
                self._failed[row.id] = why
                for ref, vid in self._wanted.items():
                    if vid == row.id:
                        self._errors[ref] = why
                self._changed.notify_all()
            return
        log.info("loaded %s on %s in %.2fs (%.1f MiB)", lv.label, self.device, lv.load_seconds,
                 lv.memory_bytes / 2**20)
        with self._changed:
            self._loading.discard(row.id)
            self._loaded[row.id] = lv
            self._apply_routes_locked()
            self._changed.notify_all()

    # ---------------------------------------------------------------- serving

    def submit(self, ref: str, items: list[str], k: int, *, exclude_seen: bool = False,
               timeout_s: float | None = None) -> Future:
        """Queue one recommendation; the future resolves to a Result (or the model's exception).

        With `timeout_s`, a request still queued that long after now is dropped uncomputed and its
        future fails with DeadlineExceeded (the remote caller has given up by then).
        """
        future: Future = Future()
        deadline = time.perf_counter() + timeout_s if timeout_s is not None else float("inf")
        for _ in range(3):  # a swap can retire the version between lookup and submit: look again
            lv = self._routes.get(ref)
            if lv is None:
                raise NotServed(self._not_served_reason(ref))
            request = lv.prepare(items, k, exclude_seen, future, deadline)
            if request is None:
                return future
            try:
                lv.batcher.submit(request)
            except NotServed:
                continue
            return future
        raise NotServed(f"{ref} is being swapped; try again")

    def recommend(
        self, ref: str, items: list[str], k: int, *, exclude_seen: bool = False, timeout: float | None = None
    ) -> Result:
        """Blocking form of `submit` for in-process callers."""
        future = self.submit(ref, items, k, exclude_seen=exclude_seen)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _not_served_reason(self, ref: str) -> str:
        with self._lock:
            if ref in self._errors:
                return f"{ref} is not available: {self._errors[ref]}"
            if ref in self._wanted:
                return f"{ref} is still loading"
        return f"{ref} is not served here (serving: {', '.join(sorted(self._routes)) or 'nothing'})"

    # ---------------------------------------------------------------- state for /readyz, /status

    def _is_ready_locked(self) -> bool:
        return self._refreshed and all(self._routes.get(ref) for ref in self._refs)

    def is_ready(self) -> bool:
        with self._lock:
            return self._is_ready_locked()

    def readiness(self) -> dict[str, Any]:
        with self._lock:
            refs = sorted(self._refs)
            models = {}
            for ref in refs:
                lv = self._routes.get(ref)
                models[ref] = {"ready": lv is not None, "version": lv.label if lv else None}
                if ref in self._errors:
                    models[ref]["error"] = self._errors[ref]
            return {"ready": self._is_ready_locked(), "models": models, "db_error": self._db_error}

    def status(self) -> dict[str, Any]:
        state = self.readiness()
        with self._lock:
            loaded = list(self._loaded.values())
            loading = sorted(self._loading)
        state |= {
            "device": self.device,
            "precision": self.precision,
            "torch_threads": torch.get_num_threads(),
            "max_batch": self.max_batch,
            "max_delay_ms": self.max_delay_s * 1000,
            "concurrent_batches": self.concurrent_batches,
            "loaded": {
                lv.label: {
                    "kind": lv.kind,
                    "sha256": lv.sha256,
                    "items": lv.n_items,
                    "memory_bytes": lv.memory_bytes,
                    "load_seconds": round(lv.load_seconds, 3),
                    "queue_depth": lv.batcher.depth() if lv.batcher else 0,
                }
                for lv in loaded
            },
            "loading_version_ids": loading,
        }
        return state

    # ---------------------------------------------------------------- metrics

    def _init_metrics(self) -> None:
        self.metrics = CollectorRegistry()
        self._m_requests = Counter("abrec_model_requests", "Recommendations answered", ["version", "outcome"],
                                   registry=self.metrics)
        self._m_unknown = Counter("abrec_model_unknown_items", "Request item ids missing from the id map",
                                  ["version"], registry=self.metrics)
        self._m_latency = Histogram("abrec_model_request_seconds", "Queue + compute time in the server",
                                    ["version"], registry=self.metrics,
                                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0))
        self._m_batch = Histogram("abrec_model_batch_size", "Requests per forward pass", ["version"],
                                  registry=self.metrics, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.metrics.register(_StateCollector(self))
        # version -> its labelled (ok count, latency, unknown items): `labels()` is a locked lookup
        # that costs more than the update itself, on every answer.
        self._m_by_version: dict[str, tuple[Any, Any, Any]] = {}

    def observe(self, result: Result | None, seconds: float, version: str | None, outcome: str = "error"
                ) -> None:
        if result is None:
            self._m_requests.labels(version or "none", outcome).inc()
            return
        children = self._m_by_version.get(result.version)
        if children is None:
            v = result.version
            children = self._m_requests.labels(v, "ok"), self._m_latency.labels(v), self._m_unknown.labels(v)
            self._m_by_version[v] = children
        ok, latency, unknown = children
        ok.inc()
        latency.observe(seconds)
        if result.unknown:
            unknown.inc(result.unknown)


class _StateCollector:
    """Gauges read at scrape time: memory per model, queue depth, readiness."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def collect(self):
        status = self.server.status()
        memory = GaugeMetricFamily("abrec_model_memory_bytes", "Parameter and buffer bytes per model",
                                   labels=["version", "device"])
        depth = GaugeMetricFamily("abrec_model_queue_depth", "Requests waiting per model", labels=["version"])
        for label, info in status["loaded"].items():
            memory.add_metric([label, status["device"]], info["memory_bytes"])
            depth.add_metric([label], info["queue_depth"])
        ready = GaugeMetricFamily("abrec_model_server_ready", "1 when every served model is ready")
        ready.add_metric([], 1.0 if status["ready"] else 0.0)
        return [memory, depth, ready]


def _valid(parse: Callable[[str], Any], ref: str) -> bool:
    try:
        parse(ref)
    except ValueError:
        return False
    return True
