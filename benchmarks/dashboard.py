"""Benchmark `dashboard`: page response times with 10k impressions in the event log and with 10M.

The dashboard reads nightly snapshots and stored reports, never raw events, so its pages should
cost the same whatever the size of the log. Two SQLite databases get the same running experiment
(the `report` benchmark's synthetic log and loader, reused): one with 10k impressions (about
1k users), one with 10M (about 1M users). The nightly report runs on each, then every main page is requested
through the real app (Flask test client, logged in as a viewer): the first request after start
and the median of the next ones. Baseline in the same run: what a page that counted impressions
and clicks per arm from the raw log (instead of reading the snapshot) would take on each database.

    nice -n 10 .venv/bin/python benchmarks/dashboard.py             # 10M impressions
    .venv/bin/python benchmarks/dashboard.py --impressions 1000000   # quicker

Writes benchmarks/results/dashboard.json. Databases live under /tmp/abrec-bench-dashboard and
are kept between runs (loading 10M rows takes minutes); --fresh reloads them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report as report_bench  # noqa: E402  (the synthetic log and its bulk loader)

RESULTS = ROOT / "benchmarks" / "results"
PAGES = {"overview": "/", "experiment": "/experiments/bench", "registry": "/registry"}
REPEATS = 7
SMALL_LOG = 10_000  # the baseline log (the report needs some users: it has nothing to say about none)


def prepare(path: Path, impressions: int, fresh: bool) -> str:
    """A database with the experiment, `impressions` events, a viewer and the nightly report.

    Each step is skipped when already done, so an interrupted run resumes where it stopped.
    """
    from abrec.analysis import store
    from abrec.analysis.report import run_report
    from abrec.experiments import identity
    from abrec.experiments.service import get_experiment

    from abrec.db import make_engine, session_factory, session_scope

    url = f"sqlite:///{path}"
    if fresh or not path.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        report_bench.load_sqlite(path, impressions)
    engine = make_engine(url)
    with session_scope(session_factory(engine)) as s:
        if identity.get_user(s, "pm") is None:
            identity.create_user(s, "pm", "bench-password", "viewer", actor="bench")
        has_report = store.get_report(s, get_experiment(s, "bench").id) is not None
    if not has_report:
        t = time.perf_counter()
        run_report(engine, "bench", report_bench.LAST_DAY)
        print(f"{path.name}: nightly report in {time.perf_counter() - t:.1f} s", flush=True)
    engine.dispose()
    return url


def page_times(url: str) -> dict[str, dict[str, float]]:
    from abrec.dashboard.app import create_app

    app = create_app(url, secret_key="bench")
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = page.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
    login = client.post("/login", data={"username": "pm", "password": "bench-password", "csrf_token": token})
    assert login.status_code == 302, "login failed"
    out = {}
    for name, path in PAGES.items():
        times = []
        for _ in range(REPEATS + 1):
            t = time.perf_counter()
            response = client.get(path)
            response.get_data()
            times.append(time.perf_counter() - t)
            assert response.status_code == 200, (path, response.status_code)
        out[name] = {"first_s": round(times[0], 4), "median_s": round(statistics.median(times[1:]), 4),
                     "max_s": round(max(times[1:]), 4)}
    app.extensions["abrec_engine"].dispose()
    return out


def raw_count_time(url: str) -> float:
    """Baseline: per-arm impressions and clicks counted from the raw log, as a naive page would."""
    from sqlalchemy import text

    from abrec.db import make_engine

    engine = make_engine(url)
    t = time.perf_counter()
    with engine.connect() as conn:
        for table in ("impressions", "clicks"):
            conn.execute(text(f"SELECT arm_name, count(*) FROM {table} WHERE experiment_id = 1 "
                              "AND in_analysis GROUP BY arm_name")).all()
    engine.dispose()
    return round(time.perf_counter() - t, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=10_000_000)
    parser.add_argument("--workdir", default="/tmp/abrec-bench-dashboard")
    parser.add_argument("--fresh", action="store_true", help="reload the databases")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    label = f"{args.impressions / 1e6:g}m"
    small = prepare(work / "10k.db", SMALL_LOG, args.fresh)
    full = prepare(work / f"{label}.db", args.impressions, args.fresh)
    results = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "impressions": args.impressions,
        "log_10k": {"pages": page_times(small), "raw_count_s": raw_count_time(small)},
        f"log_{label}": {"pages": page_times(full), "raw_count_s": raw_count_time(full)},
    }
    worst = max(p["median_s"] for p in results[f"log_{label}"]["pages"].values())
    results[f"worst_page_median_s_{label}"] = worst
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dashboard.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
