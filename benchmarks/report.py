"""Benchmark `report`: the nightly report over 1M and 10M impressions on SQLite and PostgreSQL.

For each size a synthetic event log (about 10 impressions per user, clicks clustered by user,
a 3 % true lift, 10 % of users with a pre-period in an earlier phase, 14 days in
Europe/Berlin) is bulk-loaded (executemany in large transactions on SQLite, COPY on PostgreSQL;
not timed). Then, each in a fresh subprocess that reports its wall time and peak RSS (VmHWM):
- full: the first night, every day of the phase recomputed and stored (up to the day before);
- nightly: the regular night, the last day on top of the stored ones (the `*_s` figures);
- 1M only: one snapshot in SQL (per-user totals then per-arm sums for the last day, nothing
  else) and the baseline, the same snapshot the naive way (every event row of the phase loaded
  into Python and summed per user there);
- 1M only: what the secondary indexes of impressions and clicks cost the hot write path: rows/s
  of the event log's group commit with those of schema exp0001 (a user index), exp0002 (that
  and the analysis index) and exp0003 (the analysis index alone, now), interleaved,
  INSERT_ROUNDS each.

    nice -n 10 .venv/bin/python benchmarks/report.py                 # 1M and 10M, both databases
    .venv/bin/python benchmarks/report.py --sizes 1m --backends sqlite

Writes benchmarks/results/report.json (keys sqlite_1m_s, sqlite_10m_s, postgres_1m_s,
postgres_10m_s = nightly runs, *_full_s, peak_rss_mb over all report runs, baseline_*,
*_insert_rows_per_s_*) and benchmarks/results/report.html (time vs size). Databases live under
/tmp (SQLite files, PostgreSQL databases abrec_bench_report_*) and are deleted afterwards, unless
--keep-db: then they stay, and a later --keep-db run reuses them instead of loading the log
again (the same size gives the same log; the stored reports are recomputed and upserted; a
run interrupted while loading leaves a partial one: delete it).

    .venv/bin/python benchmarks/report.py --sizes 10m --backends sqlite --keep-db --no-insert"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PG_ADMIN = "postgresql://root@127.0.0.1:5432/test"
TZ = "Europe/Berlin"
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # phase 1 (pre-period), 2 days; then phase 2, 12 days
DAYS = 14
LAST_DAY = date(2026, 3, 15)
SIZES = {"1m": 1_000_000, "10m": 10_000_000}
CHUNK_USERS = 50_000


# ---------------------------------------------------------------------------------------------
# Synthetic log


def setup_experiment(url: str) -> tuple[int, list[int]]:
    """Schema, a running experiment in Europe/Berlin with two phases; returns (id, phase ids)."""
    from abrec.experiments import service
    from abrec.experiments.schema import Phase
    from sqlalchemy import select

    from abrec.db import init_db, make_engine, session_factory, session_scope

    engine = make_engine(url)
    init_db(engine)
    with session_scope(session_factory(engine)) as s:
        exp = service.create_experiment(
            s,
            key="bench",
            arms=[
                service.ArmSpec("sasrec", 1, "sasrec@champion"),
                service.ArmSpec("tron", 1, "tron@champion"),
            ],
            actor="bench",
            timezone=TZ,
            planned_users=2_000_000,
        )
        service.start(s, "bench", "bench")
        service.start_new_phase(s, "bench", "reweigh", "bench", reseed=True)
        phases = list(s.scalars(select(Phase).where(Phase.experiment_id == exp.id).order_by(Phase.number)))
        phases[0].started_at, phases[1].started_at = START, START + timedelta(days=2)
        phases[0].ended_at = phases[1].started_at
        exp.started_at = START
        ids = (exp.id, [p.id for p in phases])
    engine.dispose()
    return ids


def chunks(impressions: int, seed: int = 0):
    """Yield (exposures, impressions, clicks) row lists for chunks of users, sized to `impressions`."""
    rng = np.random.default_rng(seed)
    users = impressions // 10
    t0 = np.datetime64(START.replace(tzinfo=None), "us")
    phase2 = t0 + np.timedelta64(2, "D")
    end = t0 + np.timedelta64(DAYS, "D") - np.timedelta64(3, "h")
    span = (end - phase2) / np.timedelta64(1, "us")
    imp_no = 0
    for first in range(0, users, CHUNK_USERS):
        n = min(CHUNK_USERS, users - first)
        uid = np.array([f"user{first + i}" for i in range(n)], dtype=object)
        arm = rng.integers(0, 2, n)
        # Most users arrive early; activity is heavy-tailed; propensities cluster clicks by user.
        fs = phase2 + (rng.beta(1, 3, n) * span).astype("timedelta64[us]")
        post = 1 + rng.poisson(rng.gamma(1.0, 8.5, n))
        pre = np.where(rng.random(n) < 0.1, rng.poisson(5, n), 0)
        p = 0.5 * rng.beta(0.4, 3.6, n) * np.where(arm == 1, 1.03, 1.0)
        owner = np.repeat(np.arange(n), post)
        left = (end - fs[owner]) / np.timedelta64(1, "us")
        at = fs[owner] + (rng.random(owner.size) * left).astype("timedelta64[us]")
        at[np.r_[0, np.cumsum(post)[:-1]]] = fs  # the first impression comes with the exposure
        pre_owner = np.repeat(np.arange(n), pre)
        pre_at = t0 + (rng.random(pre_owner.size) * 2 * 86400e6).astype("timedelta64[us]")
        rows_owner = np.concatenate([owner, pre_owner])
        rows_at = np.concatenate([at, pre_at])
        rows_phase = np.concatenate([np.full(owner.size, 2), np.full(pre_owner.size, 1)])
        clicked = rng.random(rows_owner.size) < p[rows_owner]
        latency = rng.lognormal(3.0, 0.5, rows_owner.size).round(2)
        fallback = rng.random(rows_owner.size) < 0.005
        ids = [f"{imp_no + i:032x}" for i in range(rows_owner.size)]
        imp_no += rows_owner.size
        at_text = np.datetime_as_string(rows_at, unit="us")
        click_at_text = np.datetime_as_string(rows_at + np.timedelta64(30, "s"), unit="us")
        fs_text = np.datetime_as_string(fs, unit="us")
        exposures = [(str(uid[i]), int(arm[i]), fs_text[i]) for i in range(n)]
        imps = [
            (
                ids[i],
                int(rows_phase[i]),
                str(uid[rows_owner[i]]),
                int(arm[rows_owner[i]]),
                bool(fallback[i]),
                float(latency[i]),
                at_text[i],
            )
            for i in range(rows_owner.size)
        ]
        clicks = [
            (ids[i], int(rows_phase[i]), str(uid[rows_owner[i]]), int(arm[rows_owner[i]]), click_at_text[i])
            for i in np.flatnonzero(clicked)
        ]
        yield exposures, imps, clicks


def load_sqlite(path: Path, impressions: int) -> None:
    import sqlite3

    url = f"sqlite:///{path}"
    exp_id, phases = setup_experiment(url)
    arms = ("sasrec", "tron")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=OFF")  # generation only: no WAL copy of every page
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")

    def ts(text: str) -> str:
        return text.replace("T", " ")

    with tqdm(total=impressions, unit="imp", desc=f"sqlite {path.name}") as bar:
        for exposures, imps, clicks in chunks(impressions):
            conn.executemany(
                "INSERT INTO exposures (experiment_id, phase_id, user_id, arm_name, first_seen_at) "
                "VALUES (?,?,?,?,?)",
                [(exp_id, phases[1], u, arms[a], ts(t)) for u, a, t in exposures],
            )
            conn.executemany(
                "INSERT INTO impressions (id, experiment_id, phase_id, user_id, session_id, arm_name, "
                "model_version, items, fallback, latency_ms, in_analysis, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        i,
                        exp_id,
                        phases[ph - 1],
                        u,
                        u,
                        arms[a],
                        arms[a] + ":1",
                        '["a","b"]',
                        f,
                        lat,
                        ph == 2,
                        ts(t),
                    )
                    for i, ph, u, a, f, lat, t in imps
                ],
            )
            conn.executemany(
                "INSERT INTO clicks (impression_id, experiment_id, phase_id, user_id, arm_name, item_id, "
                "position, in_analysis, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (i, exp_id, phases[ph - 1], u, arms[a], "a", 0, ph == 2, ts(t))
                    for i, ph, u, a, t in clicks
                ],
            )
            conn.commit()
            bar.update(len(imps))
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode=WAL")  # as the application runs it
    conn.close()


def postgres_exists(dbname: str) -> bool:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        return admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone() is not None


def load_postgres(dbname: str, impressions: int) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{dbname}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + dbname
    exp_id, phases = setup_experiment(url)
    arms = ("sasrec", "tron")
    with psycopg.connect(url) as conn, tqdm(total=impressions, unit="imp", desc=f"postgres {dbname}") as bar:
        conn.execute("SET TIME ZONE 'UTC'")
        # Generation only: skip the per-row foreign-key triggers (the rows are consistent by construction).
        conn.execute("SET session_replication_role = replica")
        # And the indexes that back no constraint are built once at the end, not row by row.
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('impressions', 'clicks') "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        for exposures, imps, clicks in chunks(impressions):
            with conn.cursor() as cur:
                with cur.copy(
                    "COPY exposures (experiment_id, phase_id, user_id, arm_name, first_seen_at) FROM STDIN"
                ) as copy:
                    for u, a, t in exposures:
                        copy.write_row((exp_id, phases[1], u, arms[a], t))
                with cur.copy(
                    "COPY impressions (id, experiment_id, phase_id, user_id, session_id, arm_name, "
                    "model_version, items, fallback, latency_ms, in_analysis, created_at) FROM STDIN"
                ) as copy:
                    for i, ph, u, a, f, lat, t in imps:
                        copy.write_row(
                            (
                                i,
                                exp_id,
                                phases[ph - 1],
                                u,
                                u,
                                arms[a],
                                arms[a] + ":1",
                                '["a","b"]',
                                f,
                                lat,
                                ph == 2,
                                t,
                            )
                        )
                with cur.copy(
                    "COPY clicks (impression_id, experiment_id, phase_id, user_id, arm_name, item_id, "
                    "position, in_analysis, created_at) FROM STDIN"
                ) as copy:
                    for i, ph, u, a, t in clicks:
                        copy.write_row((i, exp_id, phases[ph - 1], u, arms[a], "a", 0, ph == 2, t))
            conn.commit()
            bar.update(len(imps))
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _, definition in indexes:
            conn.execute(definition)
        conn.commit()
        conn.execute("ANALYZE")
        conn.commit()


# ---------------------------------------------------------------------------------------------
# Measured runs (each in a fresh subprocess, so that peak RSS is the run's own)


def measure_full(url: str) -> dict:
    """The first night: every day of the phase up to the day before the last, from the log."""
    return _timed_report(url, LAST_DAY - timedelta(days=1), full=True)


def measure_nightly(url: str) -> dict:
    """A regular night: the last day on top of the stored earlier days (run measure_full first)."""
    return _timed_report(url, LAST_DAY, full=False)


def _timed_report(url: str, day: date, full: bool) -> dict:
    from abrec.analysis.aggregate import default_workers
    from abrec.analysis.report import run_report

    from abrec.db import make_engine

    engine = make_engine(url)
    with engine.connect() as conn:
        workers = default_workers(conn)  # connections the first night spreads over
    t = time.perf_counter()
    report = run_report(engine, "bench", day, full=full)
    wall = time.perf_counter() - t
    users = sum(a["users"] for a in report["arms"].values())
    return {"wall_s": wall, "users": users, "verdict": report["decision"]["verdict"], "workers": workers}


def _until() -> datetime:
    from abrec.analysis.aggregate import day_start

    return day_start(LAST_DAY + timedelta(days=1), TZ)


def measure_sql_snapshot(url: str) -> dict:
    """Like for like with the baseline: the last day's sums per arm, per user then per arm in SQL."""
    from abrec.analysis.aggregate import PhaseScope, plan_for, user_rows_query
    from abrec.experiments.schema import Phase
    from sqlalchemy import func, select

    from abrec.db import make_engine

    engine = make_engine(url)
    t = time.perf_counter()
    with engine.connect() as conn:
        phase_id = conn.execute(select(Phase.id).where(Phase.number == 2)).scalar_one()
        scope = PhaseScope.load(conn, 1, phase_id)
        users = user_rows_query(scope, plan_for(conn), _until()).subquery()
        x, y = users.c.clicks, users.c.impressions
        rows = conn.execute(
            select(
                users.c.arm,
                func.count(),
                func.sum(x),
                func.sum(y),
                func.sum(x * x),
                func.sum(y * y),
                func.sum(x * y),
            ).group_by(users.c.arm)
        ).all()
    wall = time.perf_counter() - t
    return {"wall_s": wall, "users": sum(r[1] for r in rows)}


def measure_naive(url: str) -> dict:
    """Baseline: fetch every event row of the phase into Python and sum per user there (last day only)."""
    from abrec.analysis.stats import ArmStats
    from abrec.experiments.schema import Click, Exposure, Impression, Phase
    from sqlalchemy import select

    from abrec.db import make_engine

    engine = make_engine(url)
    until = _until()
    t = time.perf_counter()
    with engine.connect() as conn:
        phase_id = conn.execute(select(Phase.id).where(Phase.number == 2)).scalar_one()
        exposures = {
            u: (a, fs)
            for u, a, fs in conn.execute(
                select(Exposure.user_id, Exposure.arm_name, Exposure.first_seen_at).where(
                    Exposure.phase_id == phase_id, Exposure.first_seen_at < until
                )
            )
        }
        totals: dict[str, list[int]] = {}
        for table, col in ((Impression, 0), (Click, 1)):
            rows = conn.execute(
                select(table.user_id, table.created_at, table.in_analysis).where(table.phase_id == phase_id)
            ).all()
            for user, at, analysed in rows:
                if analysed and user in exposures and exposures[user][1] <= at < until:
                    totals.setdefault(user, [0, 0])[col] += 1
    per_arm: dict[str, list[list[int]]] = {}
    for user, (arm, _) in exposures.items():
        per_arm.setdefault(arm, []).append(totals.get(user, [0, 0]))
    stats = {a: ArmStats.from_arrays(np.array(v)[:, 1], np.array(v)[:, 0]) for a, v in per_arm.items()}
    wall = time.perf_counter() - t
    return {"wall_s": wall, "users": sum(s.n for s in stats.values())}


INSERT_ROUNDS = 2
INSERT_REQUESTS = 20_000  # one impression each, a click with every 20th: the API's write pattern
INSERT_THREADS = 64  # writers at once (the API runs 32 request threads per process)
# The indexes on impressions and clicks besides the primary and unique keys, per schema version:
# exp0001 (a user index), exp0002 (that and the analysis index the report reads), exp0003 (the
# analysis index alone, which serves the user lookups too: the schema now).
INDEX_COLUMNS = {
    "exp_phase_user": "experiment_id, phase_id, user_id",
    "analysis": "experiment_id, phase_id, user_id, created_at, in_analysis",
}
INDEX_SETS = {
    "exp0001_user_index": ("exp_phase_user",),
    "exp0002_both": ("exp_phase_user", "analysis"),
    "exp0003_analysis_index": ("analysis",),
}


def measure_insert(url: str, indexes: str) -> dict:
    """The hot write path with the secondary indexes of one schema version (a key of INDEX_SETS):
    the event log's group commit (up to 500 rows a transaction) of INSERT_REQUESTS requests for
    known users, after the loaded log.

    INSERT_THREADS threads write at once, as the API's request threads do, so batches are as full
    as a busy API process makes them.
    """
    from abrec.experiments.eventlog import EventLog
    from abrec.experiments.schema import Exposure, Phase
    from sqlalchemy import func, select

    from abrec.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        for table in ("impressions", "clicks"):
            for kind, columns in INDEX_COLUMNS.items():
                name = f"ix_{table}_{kind}"
                if kind in INDEX_SETS[indexes]:
                    conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})")
                else:
                    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        phase_id = conn.execute(select(Phase.id).where(Phase.number == 2)).scalar_one()
        query = select(func.count()).select_from(Exposure).where(Exposure.phase_id == phase_id)
        users = conn.execute(query).scalar_one()  # named user0 .. user{users - 1}
    rng = np.random.default_rng(1)
    at = datetime.combine(LAST_DAY + timedelta(days=2), datetime.min.time(), UTC)  # after the report's days
    requests = []
    for i, user in enumerate(rng.integers(0, users, INSERT_REQUESTS)):
        row_id = os.urandom(16).hex()
        created = at + timedelta(milliseconds=i)
        common = {"experiment_id": 1, "phase_id": phase_id, "user_id": f"user{user}", "arm_name": "tron"}
        impression = common | {
            "id": row_id,
            "session_id": "s",
            "model_version": "tron:1",
            "items": ["a", "b"],
            "fallback": False,
            "latency_ms": 20.0,
            "in_analysis": True,
            "created_at": created,
        }
        click = common | {
            "impression_id": row_id,
            "item_id": "a",
            "position": 0,
            "in_analysis": True,
            "created_at": created,
        }
        requests.append({"impressions": [impression], "clicks": [click] if i % 20 == 0 else []})
    log = EventLog(engine).start()
    t = time.perf_counter()
    # As API request threads do: each blocks in write() until its rows are committed, and the writer
    # commits whatever the waiting threads have handed it as one batch.
    with ThreadPoolExecutor(INSERT_THREADS) as pool:
        list(pool.map(lambda r: log.write(**r, timeout_s=600), requests))
    wall = time.perf_counter() - t
    log.close()
    rows = sum(len(r["impressions"]) + len(r["clicks"]) for r in requests)
    return {"wall_s": wall, "rows": rows, "rows_per_s": rows / wall, "batches": log.batches}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over from fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, *args) -> dict:
    call = f"b.measure_{kind}({', '.join(map(repr, args))})"
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import report as b; "
        f"r = {call}; r['peak_rss_mb'] = b.peak_rss_mb(); print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1m,10m")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--workdir", default="/tmp/abrec-bench-report")
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline (1M)")
    parser.add_argument("--no-insert", action="store_true", help="skip the insert-cost runs (1M)")
    parser.add_argument(
        "--keep-db",
        action="store_true",
        help="keep the databases afterwards, and reuse those a former --keep-db run left",
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / "report.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update(
        {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
    )
    runs = results.setdefault("runs", {})
    for backend in args.backends.split(","):
        for size in args.sizes.split(","):
            n = SIZES[size]
            for key in [k for k in runs if k == f"{backend}_{size}" or k.startswith(f"{backend}_{size}_")]:
                del runs[key]  # this run replaces them all
            if backend == "sqlite":
                path = work / f"report_{size}.db"
                if not (args.keep_db and path.exists()):
                    for p in work.glob(f"report_{size}.db*"):
                        p.unlink()
                    load_sqlite(path, n)
                url = f"sqlite:///{path}"
            else:
                dbname = f"abrec_bench_report_{size}"
                if not (args.keep_db and postgres_exists(dbname)):
                    load_postgres(dbname, n)
                url = (
                    PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
                    + "/"
                    + dbname
                )
            try:
                full = run_child("full", url)
                print(f"{backend} {size}: full report (first night) {full}", flush=True)
                results[f"{backend}_{size}_full_s"] = round(full["wall_s"], 2)
                runs[f"{backend}_{size}_full"] = full
                run = run_child("nightly", url)
                print(f"{backend} {size}: nightly report {run}", flush=True)
                results[f"{backend}_{size}_s"] = round(run["wall_s"], 2)
                runs[f"{backend}_{size}"] = run
                if size == "1m" and not args.no_baseline:
                    snapshot = run_child("sql_snapshot", url)
                    print(f"{backend} {size}: one snapshot in SQL {snapshot}", flush=True)
                    runs[f"{backend}_{size}_sql_snapshot"] = snapshot
                    naive = run_child("naive", url)
                    print(f"{backend} {size}: naive {naive}", flush=True)
                    runs[f"{backend}_{size}_naive"] = naive
                    results[f"baseline_naive_{backend}_{size}_s"] = round(naive["wall_s"], 2)
                    results[f"baseline_naive_{backend}_{size}_peak_rss_mb"] = round(naive["peak_rss_mb"], 1)
                if size == "1m" and not args.no_insert:
                    # Last, as it adds rows (after the report's days). Interleaved, as the machine drifts.
                    rates: dict[str, list[float]] = {label: [] for label in INDEX_SETS}
                    for _ in range(INSERT_ROUNDS):
                        for label in INDEX_SETS:
                            rate = run_child("insert", url, label)["rows_per_s"]
                            rates[label].append(round(rate))
                    print(f"{backend} {size}: event log insert rows/s {rates}", flush=True)
                    runs[f"{backend}_{size}_insert_rows_per_s"] = rates
                    for label, values in rates.items():
                        results[f"{backend}_insert_rows_per_s_{label}"] = round(float(np.median(values)))
            finally:
                if args.keep_db:
                    print(f"{backend} {size}: kept {url}", flush=True)
                elif backend == "sqlite":
                    for p in work.glob(f"report_{size}.db*"):
                        p.unlink()
                else:
                    import psycopg

                    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    reports = [
        r for k, r in runs.items() if k.count("_") == 1 or k.endswith("_full")
    ]  # nightly and full runs
    results["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in reports), 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results)
    print(json.dumps(results, indent=2))


def plot(results: dict) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for backend in ("sqlite", "postgres"):
        for suffix, label in (("_s", "nightly report"), ("_full_s", "first night (full)")):
            keys = {n: f"{backend}_{size}{suffix}" for size, n in SIZES.items()}
            xs = [n for n, key in keys.items() if key in results]
            ys = [results[key] for key in keys.values() if key in results]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{backend}: {label}"))
        if f"baseline_naive_{backend}_1m_s" in results:
            fig.add_trace(
                go.Scatter(
                    x=[1_000_000],
                    y=[results[f"baseline_naive_{backend}_1m_s"]],
                    mode="markers",
                    name=f"{backend}: naive (rows into Python)",
                    marker_symbol="x",
                    marker_size=12,
                )
            )
    fig.update_layout(
        title="Nightly report wall time vs impressions",
        xaxis_title="impressions",
        xaxis_type="log",
        yaxis_title="seconds",
        yaxis_type="log",
    )
    fig.write_html(RESULTS / "report.html", include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
