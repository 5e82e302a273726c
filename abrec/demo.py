"""`abrec demo`: the whole platform in one command, as the TRON paper's live A/B test.

Load sessions (a synthetic shop by default) -> train sasrec, sasrec-ssm and tron -> register them
and point `<name>@champion` at each -> create and start an experiment with the three arms -> start
the model server and the API as real processes -> replay the held-out sessions through the API
over simulated days (`abrec simulate`'s click model) -> check the measured CTR of every arm
against the CTR its offline ranking predicts -> snapshot and report like the nightly job ->
leave the dashboard running at a printed URL (or stop everything with --no-serve).

Light to import (it is a CLI module): everything heavy is imported inside `run_demo`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

ARMS = ("sasrec", "sasrec-ssm", "tron")  # the control first, as the paper's three groups
EXPERIMENT = "tron-vs-sasrec"
HYPOTHESIS = "TRON's sampled-softmax training lifts CTR over SASRec (Wilm et al., RecSys 2023)"
# Small models for the built-in 1,000-item shop, so that the demo trains all three in a few minutes
# on 2 cores. The paper's 8,192 / 16,384 uniform negatives exceed this catalogue; they are scaled
# down keeping their ratio (TRON's batch-shared set twice sasrec-ssm's per-session one).
SYNTHETIC_OVERRIDES: dict[str, dict[str, Any]] = {
    "sasrec": {"hidden": 64, "epochs": 2, "valid_sessions": 500},
    "sasrec-ssm": {"hidden": 64, "epochs": 2, "valid_sessions": 500, "uniform_negatives": 256},
    "tron": {"hidden": 64, "epochs": 2, "valid_sessions": 500, "uniform_negatives": 512},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train, register, A/B test live, report, serve the dashboard",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="synthetic[:SEED] (default) or a dataset path")
    p.add_argument("--db", default=None, help="database URL (default: SQLite in the work directory)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                   help="checkpoints, registry store, SQLite database, logs (default runs/demo)")
    p.add_argument("--no-serve", action="store_true",
                   help="stop after the report instead of serving the dashboard")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per model (default 2 on synthetic)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N test sessions")
    p.add_argument("--train-sessions", type=int, default=None,
                   help="train on the newest N training sessions only (quick runs)")
    p.add_argument("--days", type=int, default=7, help="simulated days of the experiment (default 7)")
    p.add_argument("--concurrency", type=int, default=8, help="shoppers replayed at once (default 8)")
    p.add_argument("--dashboard-port", type=int, default=8050,
                   help="dashboard port (default 8050, else a free one)")
    p.set_defaults(func=run_demo)


def step(number: int, text: str) -> None:
    print(f"\n[{number}/8] {text}", flush=True)


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nobody listens there, else any free loopback port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port")


class Service:
    """One platform process (`python -m abrec.cli ...`) with its log file, stopped on exit."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "abrec.cli", *argv], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)

    def wait_http(self, url: str, timeout_s: float = 120.0) -> None:
        """Until GET url answers 2xx/3xx; the process dying or the timeout raises with the log's tail."""
        import urllib3

        http = urllib3.PoolManager(retries=False, timeout=2.0)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                if http.request("GET", url, redirect=False).status < 400:
                    return
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.3)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.name} did not become ready at {url} (see {self.log}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run_demo(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    from abrec.errors import UsageError

    if args.days < 1 or args.concurrency < 1:
        raise UsageError("--days and --concurrency must be at least 1")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_url = args.db or f"sqlite:///{workdir / 'abrec.db'}"

    step(1, f"loading sessions: {args.data}")
    from abrec.models.data import DataError, load_dataset

    try:
        dataset = load_dataset(args.data)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    print(f"  {len(dataset.train)} training, {len(dataset.valid)} validation, {len(dataset.test)} test "
          f"sessions; {dataset.num_items} items")

    if args.train_sessions:
        dataset.train = dataset.train[-args.train_sessions :]
    step(2, f"training {', '.join(ARMS)} (checkpoints under {workdir / 'models'})")
    checkpoints = train_arms(dataset, workdir, args.epochs, synthetic=dataset.shop is not None)

    step(3, f"registering the models in {db_url} and pointing <name>@champion at each")
    from dataclasses import replace

    from abrec.config import get_settings
    from abrec.db import init_db, make_engine, session_factory

    settings = replace(get_settings(), database_url=db_url, registry_store=workdir / "registry")
    engine = make_engine(db_url)
    init_db(engine)
    sessions = session_factory(engine)
    register_arms(sessions, settings.registry_store, checkpoints)

    step(4, f"creating the admin user and experiment {EXPERIMENT!r} (control {ARMS[0]})")
    password = secrets.token_urlsafe(9)
    token = create_admin(sessions, password)
    key = create_experiment(sessions, EXPERIMENT, {name: f"{name}@champion" for name in ARMS},
                            planned_users=len(dataset.test), hypothesis=HYPOTHESIS)

    step(5, f"starting the model server and the API (logs under {workdir / 'logs'})")
    with ExitStack() as stack:
        api_url = start_services(stack, workdir, db_url, settings)

        n_sessions = len(dataset.test[: args.limit])
        step(6, f"replaying {n_sessions} test sessions as shoppers over {args.days} simulated days")
        result, predictions, until = replay(dataset, checkpoints, api_url, key, token, args)

        step(7, "analysing the logged events: measured CTR and lift against the offline prediction")
        ok = check_against_prediction(engine, key, result, predictions, until)

        step(8, "nightly job: daily snapshots and the report of every simulated day")
        nightly_reports(engine, key, (until - timedelta(days=args.days)).date(), args.days,
                        workdir / "report.html")
        engine.dispose()

        minutes = (time.monotonic() - t_start) / 60
        verdict = "passed" if ok else "FAILED"
        print(f"\nabrec demo: end to end in {minutes:.1f} min; prediction check {verdict}")
        if args.no_serve:
            return 0 if ok else 1
        port = free_port(args.dashboard_port)
        dash = Service("dashboard", ["dashboard", "--db", db_url, "--port", str(port)], workdir / "logs" /
                       "dashboard.log", dict(os.environ))
        stack.callback(dash.stop)
        dash.wait_http(f"http://127.0.0.1:{port}/")
        print(f"\nDashboard: http://127.0.0.1:{port}/  (user admin, password {password})")
        print(f"API: {api_url}  (admin token {token})")
        print("Ctrl-C stops everything.")
        try:
            while dash.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nabrec demo: stopping")
    return 0


def train_arms(dataset, workdir: Path, epochs: int | None, *, synthetic: bool) -> dict[str, Path]:
    from abrec.models.train import train

    out = {}
    for kind in ARMS:
        overrides = dict(SYNTHETIC_OVERRIDES[kind]) if synthetic else {}
        if epochs is not None:
            overrides["epochs"] = epochs
        t0 = time.monotonic()
        result = train(dataset, kind, overrides, out_dir=workdir / "models" / kind, progress=True)
        valid = result.best.get("valid_recall@20")
        print(f"  {kind}: {result.epochs} epochs in {time.monotonic() - t0:.0f} s"
              + (f", validation Recall@20 {valid:.3f}" if valid is not None else ""), flush=True)
        out[kind] = result.checkpoint
    return out


def register_arms(sessions, store_dir: Path, checkpoints: dict[str, Path]) -> None:
    from sqlalchemy import select

    from abrec.models.registry import ModelVersion, register_model, set_alias
    from abrec.models.store import open_store, sha256_file

    store = open_store(store_dir)
    for name, path in checkpoints.items():
        with sessions() as session:
            # A rerun may train byte-identical weights (seeded): versions are immutable, reuse it.
            digest = sha256_file(path)
            same = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.sha256 == digest)
            version = session.scalar(same) or register_model(session, store, path, name, actor="demo",
                                                             description="abrec demo")
            set_alias(session, f"{name}@champion", version.label, actor="demo", reason="abrec demo")
            session.commit()
            print(f"  {version.label} (sha256 {version.sha256[:12]}) -> {name}@champion")


def create_admin(sessions, password: str) -> str:
    """An admin user (created, or its password reset) -> a new API token of it."""
    from abrec.db import session_scope
    from abrec.experiments import identity

    with session_scope(sessions) as session:
        if identity.get_user(session, "admin") is None:
            identity.create_user(session, "admin", password, "admin", actor="demo")
        else:
            identity.set_password(session, "admin", password, actor="demo")
        return identity.create_token(session, "admin", name=f"demo-{secrets.token_hex(3)}", actor="demo")


def create_experiment(sessions, key: str, arms: dict[str, str], *, planned_users: int | None = None,
                      hypothesis: str = "") -> str:
    """Create and start an experiment with equal-weight arms {name: alias}, the first the control.

    A key already taken (a rerun in the same database) gets a suffix, keeping the old one to compare.
    """
    from abrec.db import session_scope
    from abrec.experiments import service

    with session_scope(sessions) as session:
        existing = {e.key for e in service.list_experiments(session)}
        if key in existing:
            key = next(f"{key}-{i}" for i in range(2, 10_000) if f"{key}-{i}" not in existing)
        specs = [service.ArmSpec(name, 1.0 / len(arms), alias) for name, alias in arms.items()]
        service.create_experiment(session, key=key, arms=specs, actor="demo", planned_users=planned_users,
                                  target_effect=0.05, hypothesis=hypothesis)
        service.start(session, key, "demo")
    print(f"  experiment {key!r} running: " + ", ".join(f"{n} -> {a}" for n, a in arms.items()))
    return key


def user_table(engine, key: str, until) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per arm: (unit ids, [users, 2] array of impressions and clicks) of the experiment's current
    phase, read from the database by the analysis aggregation up to `until`."""
    import numpy as np

    from abrec.analysis.aggregate import iter_user_rows
    from abrec.db import session_factory
    from abrec.experiments import service

    with session_factory(engine)() as session:
        experiment = service.get_experiment(session, key)
        exp_id, phase_id = experiment.id, service.current_phase(session, experiment).id
    units: dict[str, list[str]] = {}
    counts: dict[str, list[tuple[int, int]]] = {}
    with engine.connect() as conn:
        for unit, arm, impressions, clicks, _pre_i, _pre_c in iter_user_rows(conn, exp_id, phase_id, until):
            units.setdefault(arm, []).append(unit)
            counts.setdefault(arm, []).append((impressions, clicks))
    return {arm: (units[arm], np.array(counts[arm], dtype=float).reshape(-1, 2)) for arm in units}


def start_services(stack: ExitStack, workdir: Path, db_url: str, settings) -> str:
    """The model server and the API as their own processes; returns the API's URL."""
    env = dict(os.environ)
    env.setdefault("ABREC_SECRET_KEY", secrets.token_hex(16))
    # The replay measures the models, not the latency: a generous deadline keeps a busy 2-core
    # machine from turning slow answers into fallbacks (which the replay counts and reports).
    env.setdefault("ABREC_MODEL_DEADLINE_MS", "2000")
    logs = workdir / "logs"
    model_port, api_port = free_port(8601), free_port(8000)
    models = Service("model server", ["model-server", "--db", db_url, "--store", str(settings.registry_store),
                                      "--port", str(model_port)], logs / "model-server.log", env)
    stack.callback(models.stop)
    models.wait_http(f"http://127.0.0.1:{model_port}/readyz")
    print(f"  model server ready at http://127.0.0.1:{model_port} (pid {models.proc.pid})")
    api = Service("API", ["serve", "--db", db_url, "--port", str(api_port), "--model-server",
                          f"http://127.0.0.1:{model_port}"], logs / "api.log", env)
    stack.callback(api.stop)
    api.wait_http(f"http://127.0.0.1:{api_port}/readyz")
    print(f"  API ready at http://127.0.0.1:{api_port} (pid {api.proc.pid})")
    return f"http://127.0.0.1:{api_port}"


def replay(dataset, checkpoints: dict[str, Path], api_url: str, key: str, token: str,
           args: argparse.Namespace):
    """Replay the test sessions; -> (result, offline predictions per arm, end of the simulated log)."""
    from datetime import UTC, datetime

    from abrec.experiments.simulate import (
        ApiClient,
        ClickModel,
        Replay,
        add_predictions,
        format_summary,
        predictions_from_checkpoints,
        user_ids,
    )

    click_model = ClickModel()
    sessions = dataset.test[: args.limit] if args.limit else dataset.test
    ext = dataset.item_map.external_ids
    sessions_ext = [[ext[i - 1] for i in s] for s in sessions]
    users = user_ids(len(sessions), seed=0)
    print(f"  click model: slate of {click_model.k}, rank r looked at with probability r^-{click_model.eta}, "
          f"the next click clicked when looked at, {click_model.noise:.0%} noise clicks")
    # Day 0 starts tomorrow 09:00 UTC, after the experiment's start: the API's clock runs ahead.
    start = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=1)
    client = ApiClient(api_url, pool_size=args.concurrency * 2, admin_token=token)
    try:
        runner = Replay(client, key, click_model, concurrency=args.concurrency)
        result = runner.run(sessions_ext, users, days=args.days, start=start)
        until = start + timedelta(days=args.days)
        runner.set_clock(until)  # the nightly job runs after the last simulated day
    finally:
        client.close()
    print("  predicting each arm's CTR from its offline ranking of the same sessions")
    predictions = predictions_from_checkpoints(checkpoints, dataset, sessions, click_model, max_items=50)
    add_predictions(result, predictions)
    print(format_summary(result))
    return result, predictions, until


def check_against_prediction(engine, key: str, result, predictions, until) -> bool:
    """The strongest end-to-end check: the logged CTR of each arm (delta-method CI over users, from
    the database) and each lift CI contain what the arms' offline rankings predict; and the log
    holds exactly what the API acknowledged."""
    import numpy as np

    from abrec.analysis.stats import ArmStats, compare, ctr_variance

    tables = user_table(engine, key, until)
    order = [a for a in predictions if a in tables] + [a for a in tables if a not in predictions]
    stats = {arm: ArmStats.from_arrays(tables[arm][1][:, 1], tables[arm][1][:, 0]) for arm in order}
    ok = True
    # 95% intervals are shown; the pass/fail check uses 99.9% ones, so that five checks at once
    # fail by chance with probability below 0.5% instead of about 20%.
    z95, z999 = 1.96, 3.29
    print(f"  {'arm':<12}{'impressions':>12}{'(acked)':>9}{'clicks':>8}{'(acked)':>9}{'CTR':>8}"
          f"{'95% CI':>18}{'predicted':>11}  check")
    for arm, s in stats.items():
        acked = result.arms.get(arm)
        se = float(np.sqrt(ctr_variance(s)))
        pred = predictions[arm].ctr()
        inside = abs(s.ctr - pred) <= z999 * se
        same = acked is not None and acked.impressions == s.sum_y and acked.clicks == s.sum_x
        ok &= bool(inside and same)
        ci = f"[{s.ctr - z95 * se:.4f}, {s.ctr + z95 * se:.4f}]"
        print(f"  {arm:<12}{int(s.sum_y):>12}{acked.impressions if acked else 0:>9}{int(s.sum_x):>8}"
              f"{acked.clicks if acked else 0:>9}{s.ctr:>8.4f}{ci:>18}{pred:>11.4f}  "
              f"{'ok' if inside else 'MISS'}{'' if same else ' (log != acknowledged)'}")
    control = next(iter(predictions))
    for arm in stats:
        if arm == control or control not in stats:
            continue
        c = compare(stats[control], stats[arm])
        predicted = predictions[arm].ctr() / predictions[control].ctr() - 1
        inside = abs(c.rel_lift - predicted) <= z999 * c.rel_lift_se
        ok &= bool(inside)
        lo, hi = c.rel_lift_ci
        print(f"  lift {arm} vs {control}: {c.rel_lift:+.1%} [{lo:+.1%}, {hi:+.1%}]"
              f" (p {c.p_value:.2g}); predicted {predicted:+.1%}  {'ok' if inside else 'MISS'}")
    print("  offline Recall@20 on the same sessions: "
          + ", ".join(f"{arm} {p.recall():.4f}" for arm, p in predictions.items()))
    return ok


def nightly_reports(engine, key: str, first_day, days: int, html_path: Path) -> dict[str, Any]:
    """What `abrec scheduler` does each night, for every simulated day: snapshot the day and store
    its report (so the dashboard's time views have one point per day); the last one is printed
    and written as standalone HTML. -> the last report."""
    from abrec.analysis.report import render_html, run_report, summary_text

    report: dict[str, Any] = {}
    for d in range(days):
        report = run_report(engine, key, first_day + timedelta(days=d))
    print("  " + summary_text(report).replace("\n", "\n  "))
    html_path.write_text(render_html(report))
    print(f"  stored {days} nightly reports; the last one also as {html_path}")
    return report
