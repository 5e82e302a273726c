"""Serving benchmark: the model server with dynamic batching against one request at a time.

Both `tron` and `sasrec` (Diginetica-sized catalogue of 43,097 items, d=200) are registered and
resident in one `abrec model-server` process; callers alternate between the two models. For each
mode it measures
throughput and p50/p99 latency with 1, 8, 32 and 128 closed-loop callers, and one open-loop point
(Poisson arrivals at a fixed rate, latency counted from each request's scheduled arrival, so
queueing shows). Both servers run side by side and the two modes take turns at every point over
several rounds, so the background load of a shared machine falls on both alike; each figure is
the round of median throughput (all rounds are kept in the JSON). Modes:
- batched: the server's defaults (--max-batch 64 --max-delay-ms 0; on this 2-core CPU with one
  torch thread, two batches of different models may compute at once);
- one_at_a_time: --max-batch 1 --concurrent-batches 1, literally one request at a time: the
  baseline of `speedup_at_32`;
- unbatched_parallel: --max-batch 1 with the default concurrent batches (two single requests of
  different models at once), so the gain of batching alone is on record too.
The load
generator is one asyncio process speaking raw keep-alive HTTP/1.1 with pre-encoded requests, so it
takes little of the CPU it measures. Both servers get the same settings but batching: the model
server's default precision and thread count, or `--precision` / `--threads` for all.

Checkpoints: `--tron` / `--sasrec`, by default the offline benchmark's (runs/offline/KIND/) when
present, else untrained models of the same size (serving cost does not depend on the weights).
Request sessions are prefixes of Diginetica test sessions when ../shared/data is present, else
random ones of similar length.

    .venv/bin/python benchmarks/serving.py [--duration 3] [--rounds 5] [--precision fp32|bf16]
        [--threads N] [--tron PATH --sasrec PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DIGINETICA = ROOT.parent / "shared" / "data" / "diginetica"
OFFLINE_RUNS = ROOT / "runs" / "offline"  # where benchmarks/offline.py leaves its checkpoints
N_ITEMS = 43_097
CALLERS = (1, 8, 32, 128)
MODELS = ("tron@champion", "sasrec@champion")


def make_checkpoint(kind: str, path: Path) -> Path:
    """An untrained model of the served size, with Diginetica's ids (1..43,097) as its item map."""
    import torch
    from abrec.models.checkpoint import save_checkpoint
    from abrec.models.data import ItemMap
    from abrec.models.presets import build_model, resolve_config

    torch.manual_seed(0)
    config = resolve_config(kind)
    model = build_model(kind, config, N_ITEMS)
    item_map = ItemMap([str(i) for i in range(1, N_ITEMS + 1)])
    return save_checkpoint(path, model, kind=kind, config=config, item_map=item_map, metrics={},
                           popular=list(range(1, 101)), data_fingerprint="untrained")


def build_registry(work: Path, checkpoints: dict[str, Path | None]) -> tuple[str, Path, dict[str, str]]:
    from abrec.models import registry
    from abrec.models.store import DirectoryStore

    from abrec.db import init_db, make_engine, session_factory

    url = f"sqlite:///{work / 'registry.db'}"
    engine = make_engine(url)
    init_db(engine)
    store = DirectoryStore(work / "store")
    sources = {}
    with session_factory(engine)() as session:
        for name, path in checkpoints.items():
            if path is None:
                path = make_checkpoint(name, work / f"{name}.safetensors")
                sources[name] = "untrained (random weights), served size"
            else:
                sources[name] = str(path)
            row = registry.register_model(session, store, path, name, actor="benchmark")
            registry.set_alias(session, f"{name}@champion", row.label, actor="benchmark")
            session.commit()
    engine.dispose()
    return url, store.root, sources


def request_sessions(count: int, seed: int = 0) -> tuple[list[list[str]], str]:
    rng = random.Random(seed)
    test = DIGINETICA / "test.txt"
    if test.exists():
        lines = [line.split() for line in test.read_text().splitlines() if line.strip()]
        picks = [rng.choice(lines) for _ in range(count)]
        return [s[: rng.randint(1, len(s))] for s in picks], "prefixes of Diginetica test sessions"
    return ([[str(rng.randint(1, N_ITEMS)) for _ in range(rng.randint(1, 9))] for _ in range(count)],
            "random sessions of 1-9 clicks (Diginetica absent)")


def forward_costs(store: Path, db_url: str, sessions: list[list[str]], precision: str, threads: int,
                  device: str = "cpu", reps: int = 15) -> dict:
    """Milliseconds of one batch through the server's own compute path (`LoadedVersion.run`:
    forward pass, scoring, top-20, answers) per model and batch size, in process, with the
    server's precision and thread count: median and fastest of `reps`. On a CPU, CPU time (which,
    unlike wall time, barely changes when other jobs share the cores); on a GPU, wall time."""
    from concurrent.futures import Future

    import torch
    from abrec.models import registry
    from abrec.models.checkpoint import load_checkpoint
    from abrec.models.server import LoadedVersion
    from abrec.models.store import DirectoryStore

    from abrec.db import make_engine, session_factory

    torch.set_num_threads(threads)
    clock = time.process_time if device == "cpu" else time.perf_counter
    engine = make_engine(db_url)
    costs: dict = {}
    with session_factory(engine)() as session:
        for ref in MODELS:
            row = registry.resolve(session, ref)
            ckpt = load_checkpoint(DirectoryStore(store).fetch(row.artifact_key))
            lv = LoadedVersion(row, ckpt.model, ckpt.item_map, ckpt.popular, device, precision)
            costs[row.label] = {}
            for size in (1, 8, 16, 32, 64):
                times = []
                for r in range(reps + 2):
                    batch = []
                    for items in sessions[r * size % len(sessions):][:size]:
                        future: Future = Future()
                        request = lv.prepare(items or ["?"], 20, False, future)
                        if request is not None:
                            future.set_running_or_notify_cancel()
                            batch.append(request)
                    t0 = clock()
                    lv.run(batch)  # answers are host lists, so a GPU run has synchronised
                    times.append(clock() - t0)
                costs[row.label][str(size)] = {"median": round(float(np.median(times[2:])) * 1000, 2),
                                               "min": round(min(times[2:]) * 1000, 2)}
    engine.dispose()
    return costs


def encode(model: str, items: list[str], k: int = 20) -> bytes:
    body = json.dumps({"model": model, "items": items, "k": k}, separators=(",", ":")).encode()
    head = (f"POST /v1/recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


class Conn:
    """One keep-alive connection; `call` sends a pre-encoded request and reads one answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def call(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return int(head[9:12])

    def close(self) -> None:
        self.writer.close()


def summarise(latencies: list[float], errors: int, seconds: float) -> dict:
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "latencies_s": latencies,
        "seconds": seconds,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "mean_ms": round(float(lat.mean()), 2),
    }


def combine(runs: list[dict]) -> dict:
    """One point from several rounds: the round of median throughput, so that a round that other
    jobs starved of CPU does not decide the figure; every round is kept alongside. CPU time per
    request (which contention hardly changes) is pooled over all rounds."""
    median = sorted(runs, key=lambda r: r["throughput_rps"])[len(runs) // 2]
    point = {k: v for k, v in median.items() if k not in ("latencies_s", "seconds", "server_cpu_s",
                                                           "loadgen_cpu_s")}
    requests = max(1, sum(r["requests"] for r in runs))
    point["server_cpu_ms_per_request"] = round(sum(r["server_cpu_s"] for r in runs) * 1000 / requests, 3)
    point["loadgen_cpu_ms_per_request"] = round(sum(r["loadgen_cpu_s"] for r in runs) * 1000 / requests, 3)
    point["rounds"] = [{k: r[k] for k in ("throughput_rps", "p50_ms", "p99_ms", "errors")} for r in runs]
    point["errors"] = sum(r["errors"] for r in runs)
    return point


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads together (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(
    port: int, pid: int, callers: int, requests: list[bytes], warmup: float, duration: float
) -> dict:
    """`callers` each send a request, wait for its answer, and send the next one."""
    conns = [await Conn.open(port) for _ in range(callers)]
    start = time.perf_counter()
    measure_from, measure_to = start + warmup, start + warmup + duration
    latencies: list[float] = []
    errors = 0
    cpu: dict[str, float] = {}

    async def meter() -> None:
        # The server's and this process's CPU time over the measured window.
        await asyncio.sleep(measure_from - time.perf_counter())
        cpu["server"], cpu["loadgen"] = cpu_seconds(pid), time.process_time()
        await asyncio.sleep(measure_to - time.perf_counter())
        cpu["server"], cpu["loadgen"] = cpu_seconds(pid) - cpu["server"], time.process_time() - cpu["loadgen"]

    async def caller(n: int) -> None:
        nonlocal errors
        i = n
        while (t0 := time.perf_counter()) < measure_to:
            status = await conns[n].call(requests[i % len(requests)])
            t1 = time.perf_counter()
            if t0 >= measure_from:
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
            i += callers

    await asyncio.gather(meter(), *(caller(n) for n in range(callers)))
    for c in conns:
        c.close()
    used = {"server_cpu_s": cpu["server"], "loadgen_cpu_s": cpu["loadgen"]}
    return summarise(latencies, errors, duration) | used


async def open_loop(port: int, rate: float, requests: list[bytes], duration: float, timeout: float) -> dict:
    """Poisson arrivals at `rate`/s; a request waits for no one, so latency includes queueing."""
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * duration * 1.2) + 10))
    arrivals = arrivals[arrivals < duration]
    idle: list[Conn] = [await Conn.open(port) for _ in range(64)]
    latencies: list[float] = []
    errors = timeouts = 0
    start = time.perf_counter()

    async def one(i: int, at: float) -> None:
        nonlocal errors, timeouts
        conn = idle.pop() if idle else await Conn.open(port)
        try:
            status = await asyncio.wait_for(conn.call(requests[i % len(requests)]), timeout)
        except TimeoutError:
            timeouts += 1
            conn.close()
            return
        latencies.append(time.perf_counter() - (start + at))
        errors += status != 200
        idle.append(conn)

    tasks = []
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, float(at))))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    result = summarise(latencies, errors, duration)
    del result["latencies_s"], result["seconds"]
    return result | {"offered_rps": rate, "timeouts": timeouts, "timeout_s": timeout}


def gpu_name(device: str) -> str | None:
    if device == "cpu":
        return None
    import torch

    return torch.cuda.get_device_name(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_url: str, store: Path, port: int, max_batch: int, max_delay: float,
                 extra: list[str]) -> subprocess.Popen:
    import urllib.request

    cmd = [sys.executable, "-m", "abrec.cli", "model-server", "--db", db_url, "--store", str(store), "--port",
           str(port), "--aliases", ",".join(MODELS), "--no-discover", "--max-batch", str(max_batch),
           "--max-delay-ms", str(max_delay), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"model server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("model server not ready after 300 s")


def server_status(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
        return json.loads(resp.read())


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def plot(results: dict, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Throughput (requests/s)", "p99 latency (ms)"))
    for mode, colour in (("batched", "#1f77b4"), ("one_at_a_time", "#d62728"),
                         ("unbatched_parallel", "#ff7f0e")):
        points = results["modes"][mode]["closed_loop"]
        x = [int(c) for c in points]
        fig.add_trace(go.Scatter(x=x, y=[p["throughput_rps"] for p in points.values()], name=mode,
                                 line={"color": colour}), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[p["p99_ms"] for p in points.values()], name=f"{mode} p99",
                                 line={"color": colour, "dash": "dot"}, showlegend=False), row=1, col=2)
    fig.add_hline(y=50, line_dash="dash", annotation_text="50 ms deadline", row=1, col=2)
    fig.update_xaxes(type="log", title_text="concurrent callers")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="Model server: dynamic batching vs one request at a time (tron + sasrec, 43,097 "
                      "items, d=200)", height=450)
    fig.write_html(path, include_plotlyjs="cdn")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for kind in ("tron", "sasrec"):
        trained = OFFLINE_RUNS / kind / "model.safetensors"
        parser.add_argument(f"--{kind}", type=Path, default=trained if trained.exists() else None,
                            help=f"{kind} checkpoint (default: the offline benchmark's, else untrained)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per point and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of the sweep")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    parser.add_argument("--open-rate", type=float, default=200.0,
                        help="open-loop Poisson arrivals per second (both modes get the same)")
    parser.add_argument("--max-delay-ms", type=float, default=0.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                        help="scoring precision of both servers (default: the model server's)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of both servers (default: the model server's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    parser.add_argument("--note", default="", help="conditions of the run, recorded in the JSON")
    args = parser.parse_args()

    load_before = os.getloadavg()
    sessions, session_source = request_sessions(4000)
    requests = [encode(MODELS[i % 2], s) for i, s in enumerate(sessions)]
    # mode -> (max batch, max delay ms, extra model-server flags)
    modes = {"batched": (args.max_batch, args.max_delay_ms, []),
             "one_at_a_time": (1, 0.0, ["--concurrent-batches", "1"]),
             "unbatched_parallel": (1, 0.0, [])}
    results: dict = {"modes": {m: {"max_batch": b, "max_delay_ms": d} for m, (b, d, _) in modes.items()}}
    with tempfile.TemporaryDirectory(prefix="abrec-serving-") as tmp:
        db_url, store, sources = build_registry(Path(tmp), {"tron": args.tron, "sasrec": args.sasrec})
        ports = {mode: free_port() for mode in modes}
        procs = {}
        try:
            # Both modes get the same settings but batching.
            extra = [*(["--precision", args.precision] if args.precision else []),
                     *(["--threads", str(args.threads)] if args.threads else [])]
            for mode, (max_batch, delay, own) in modes.items():
                procs[mode] = start_server(db_url, store, ports[mode], max_batch, delay, [*extra, *own])
            # Both servers stay up and the modes take turns at every point, in several rounds, so
            # that the background load of this shared machine falls on both alike.
            raw: dict = {(m, c): [] for m in modes for c in CALLERS}
            steps = [(r, c, m) for r in range(args.rounds) for c in CALLERS for m in modes]
            for _, callers, mode in tqdm(steps, desc="closed loop"):
                raw[mode, callers].append(
                    asyncio.run(closed_loop(ports[mode], procs[mode].pid, callers, requests, args.warmup,
                                            args.duration)))
            rate = args.open_rate
            for mode in modes:
                tqdm.write(f"{mode}: open loop at {rate}/s")
                results["modes"][mode]["open_loop"] = asyncio.run(
                    open_loop(ports[mode], rate, requests, args.duration * 2, timeout=5.0))
                status = server_status(ports[mode])
                results["modes"][mode]["memory_bytes"] = {
                    label: info["memory_bytes"] for label, info in status["loaded"].items()}
                results["modes"][mode] |= {"precision": status["precision"], "device": status["device"],
                                           "torch_threads": status["torch_threads"],
                                           "concurrent_batches": status["concurrent_batches"]}
        finally:
            for proc in procs.values():
                stop_server(proc)
        # After the servers are gone, so that it does not compete with them.
        batched = results["modes"]["batched"]
        device = batched["device"]
        key = "forward_cpu_ms_by_batch_size" if device == "cpu" else "forward_wall_ms_by_batch_size"
        results[key] = forward_costs(store, db_url, sessions, batched["precision"], batched["torch_threads"],
                                     device)
    for label, by_size in results[key].items():
        tqdm.write(f"  forward + top-20 {device}, {label}: " + ", ".join(
            f"B={b} {t['median']} ms (min {t['min']})" for b, t in by_size.items()))
    for mode in modes:
        points = {str(c): combine(raw[mode, c]) for c in CALLERS}
        results["modes"][mode]["closed_loop"] = points
        for callers, p in points.items():
            tqdm.write(f"  {mode:18s} {callers:>4} callers: {p['throughput_rps']:8.1f} req/s  "
                       f"p50 {p['p50_ms']:7.2f} ms  p99 {p['p99_ms']:7.2f} ms  errors {p['errors']}  "
                       f"server CPU {p['server_cpu_ms_per_request']} ms/req  "
                       f"rounds {[r['throughput_rps'] for r in p['rounds']]}")
        o = results["modes"][mode]["open_loop"]
        tqdm.write(f"  {mode:18s} open loop {o['offered_rps']}/s: p50 {o['p50_ms']} ms p99 {o['p99_ms']} ms "
                   f"timeouts {o['timeouts']}")
    batched = results["modes"]["batched"]["closed_loop"]
    single = results["modes"]["one_at_a_time"]["closed_loop"]
    parallel = results["modes"]["unbatched_parallel"]["closed_loop"]
    results |= {
        "speedup_at_32": round(batched["32"]["throughput_rps"] / single["32"]["throughput_rps"], 2),
        "p99_ms_at_32": batched["32"]["p99_ms"],
        "speedup_at_32_vs_unbatched_parallel": round(
            batched["32"]["throughput_rps"] / parallel["32"]["throughput_rps"], 2),
        "speedup_at_128": round(batched["128"]["throughput_rps"] / single["128"]["throughput_rps"], 2),
        "p99_ms_at_128": batched["128"]["p99_ms"],
        # CPU time per answer does not depend on how much of the CPU others leave to the server.
        "cpu_speedup_at_32": round(single["32"]["server_cpu_ms_per_request"]
                                   / batched["32"]["server_cpu_ms_per_request"], 2),
        "server_cpu_ms_per_request_at_32": {"batched": batched["32"]["server_cpu_ms_per_request"],
                                            "one_at_a_time": single["32"]["server_cpu_ms_per_request"]},
        "goal": ">= 8x one-at-a-time throughput at 32 callers with p99 <= 50 ms",
        "checkpoints": sources,
        "catalogue_items": N_ITEMS,
        "request_sessions": session_source,
        "k": 20,
        "traffic": "callers alternate between tron@champion and sasrec@champion (both resident)",
        "device": device,
        "gpu": gpu_name(device),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "conditions": {"loadavg_before": [round(x, 2) for x in load_before],
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "note": args.note},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "duration_s_per_point": args.duration * args.rounds,
        "rounds": args.rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".html"))
    print(f"speedup at 32 callers: {results['speedup_at_32']}x, batched p99 {results['p99_ms_at_32']} ms "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
