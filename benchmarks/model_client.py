"""CPU per call of the API's model client (`HttpModelClient`) against the stdlib's http.client.

The model server here is a minimal asyncio server that answers every request with the same
20-item slate at once, so that what is measured is the caller's side: the CPU time of the calling
thread per recommend() call, the work an API request thread does for it. Both clients reuse one
keep-alive connection. Rounds alternate between the two so that drift hits both alike. Our call
also encodes the request and builds the Recommendation; the stdlib's body is encoded once, outside
the timing: the comparison favours the stdlib.

    .venv/bin/python benchmarks/model_client.py [--calls 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from abrec.models.client import HttpModelClient

RESULTS = Path(__file__).resolve().parent / "results"
ANSWER = orjson.dumps({"items": [f"i{i}" for i in range(20)], "version": "tron:1", "unknown": 0})
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(ANSWER), ANSWER)


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:  # one request per packet on loopback
        self.transport.write(RESPONSE)


def serve() -> int:
    """Start the answering server on a thread; -> its port."""
    ready: list[int] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(loop.create_server(_Answer, "127.0.0.1", 0))
        ready.append(server.sockets[0].getsockname()[1])
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    while not ready:
        time.sleep(0.01)
    return ready[0]


def stdlib_call(conn: http.client.HTTPConnection, body: bytes) -> None:
    conn.request("POST", "/v1/recommend", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    orjson.loads(resp.read())


def cpu_us_per_call(call, calls: int) -> float:
    for _ in range(200):
        call()
    t0 = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - t0) / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "model-client.json")
    args = p.parse_args()
    port = serve()
    items = [str(i) for i in range(5)]
    client = HttpModelClient(f"http://127.0.0.1:{port}")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    body = orjson.dumps({"model": "tron@champion", "items": items, "k": 20, "exclude_seen": False,
                         "timeout_ms": 50.0})
    ours, stdlib = [], []
    for r in range(args.rounds):
        ours.append(cpu_us_per_call(lambda: client.recommend("tron@champion", items, 20), args.calls))
        stdlib.append(cpu_us_per_call(lambda: stdlib_call(conn, body), args.calls))
        print(f"round {r + 1}: HttpModelClient {ours[-1]:.1f} us, http.client {stdlib[-1]:.1f} us")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "calls_per_round": args.calls,
        "rounds": args.rounds,
        "http_model_client_cpu_us_per_call": round(statistics.median(ours), 1),
        "stdlib_http_client_cpu_us_per_call": round(statistics.median(stdlib), 1),
        "ratio": round(statistics.median(stdlib) / statistics.median(ours), 2),
        "per_round_us": {"http_model_client": [round(x, 1) for x in ours],
                         "stdlib_http_client": [round(x, 1) for x in stdlib]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median: HttpModelClient {result['http_model_client_cpu_us_per_call']} us per call, http.client "
          f"{result['stdlib_http_client_cpu_us_per_call']} us ({result['ratio']}x); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
