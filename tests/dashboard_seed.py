"""A realistic dashboard database for the dashboard tests: users of every role, registered model
versions with aliases and history, a running three-arm experiment with nightly snapshots and a
stored report, a draft and an experiment whose new arm has no traffic yet.

Everything goes through the owning packages' functions; only the model versions are ORM rows,
since registering real checkpoints would train models.
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import numpy as np
from abrec.analysis import aggregate, report, store
from abrec.experiments import identity, service
from abrec.experiments.schema import Click, Exposure, Impression, utcnow
from abrec.models import registry
from sqlalchemy import insert, select

from abrec.db import init_db, make_engine, session_factory, session_scope

PASSWORDS = {"admin": "admin-pass-1", "editor": "editor-pass-1", "viewer": "viewer-pass-1"}
EXPERIMENT = "tron-vs-sasrec"
DAYS = 6

# name -> [(kind, recall@20, mrr@20) per version]
MODELS = {
    "sasrec": [("sasrec", 0.4871, 0.1822)],
    "sasrec-ssm": [("sasrec", 0.5012, 0.1890)],
    "tron": [("tron", 0.5103, 0.1931), ("tron", 0.5237, 0.1987)],
}


def add_version(session, name: str, number: int, kind: str, recall: float, mrr: float) -> None:
    session.add(registry.ModelVersion(
        name=name, version=number, kind=kind, sha256=f"{name}{number}".ljust(64, "0"), size_bytes=12_345_678,
        artifact_key=f"{name}/{number}.safetensors", config={"d": 200}, n_items=43_097,
        item_map_sha256="0" * 64, data_fingerprint="diginetica-train",
        metrics={"test": {"recall@20": recall, "mrr@20": mrr}}, popular=["1", "2", "3"],
        created_by="editor", created_at=utcnow() - timedelta(days=10 - number),
    ))
    session.flush()


def move_alias(session, ref: str, label: str, at, reason: str = "initial") -> None:
    name, alias = registry.parse_alias(ref)
    target = registry.get_version(session, label)
    row = session.scalar(select(registry.ModelAlias).where(registry.ModelAlias.name == name,
                                                            registry.ModelAlias.alias == alias))
    previous = row.version_id if row else None
    if row is None:
        session.add(registry.ModelAlias(name=name, alias=alias, version_id=target.id, updated_by="editor",
                                        updated_at=at))
    else:
        row.version_id, row.updated_at = target.id, at
    session.add(registry.ModelAliasHistory(name=name, alias=alias, from_version_id=previous,
                                           to_version_id=target.id, actor="editor", reason=reason, at=at))
    session.flush()


def seed(url: str) -> None:
    engine = make_engine(url)
    init_db(engine)
    factory = session_factory(engine)
    with session_scope(factory) as s:
        for role, password in PASSWORDS.items():
            identity.create_user(s, role, password, role, actor="seed")
        now = utcnow()
        for name, versions in MODELS.items():
            for number, (kind, recall, mrr) in enumerate(versions, start=1):
                add_version(s, name, number, kind, recall, mrr)
        # Alias moves in the past (set_alias stamps "now"), so "which version served when" has a story.
        move_alias(s, "sasrec@champion", "sasrec:1", now - timedelta(days=12))
        move_alias(s, "sasrec-ssm@champion", "sasrec-ssm:1", now - timedelta(days=12))
        move_alias(s, "tron@champion", "tron:1", now - timedelta(days=12))
        move_alias(s, "tron@champion", "tron:2", now - timedelta(days=8), reason="retrained on more sessions")
        move_alias(s, "tron@challenger", "tron:1", now - timedelta(days=7))

        service.create_experiment(
            s, key=EXPERIMENT, name="TRON vs SASRec on the product page", actor="editor",
            hypothesis="TRON's recommendations get more clicks than SASRec's",
            arms=[service.ArmSpec("sasrec", 1, "sasrec@champion"),
                  service.ArmSpec("sasrec-ssm", 1, "sasrec-ssm@champion"),
                  service.ArmSpec("tron", 1, "tron@champion")],
            planned_users=8_000, target_effect=0.10,
        )
        service.start(s, EXPERIMENT, actor="editor")
        exp = service.get_experiment(s, EXPERIMENT)
        started = utcnow() - timedelta(days=DAYS, hours=3)
        exp.started_at = started
        exp.phases[0].started_at = started

        service.create_experiment(
            s, key="tron-challenger-ramp", name="TRON challenger ramp-up", actor="editor",
            arms=[service.ArmSpec("control", 0.9, "tron@champion"),
                  service.ArmSpec("challenger", 0.1, "tron@challenger")],
        )
        service.start(s, "tron-challenger-ramp", actor="editor")
        ramp = service.get_experiment(s, "tron-challenger-ramp")
        ramp.started_at = ramp.phases[0].started_at = utcnow() - timedelta(days=2, hours=1)
        service.create_experiment(
            s, key="gru4rec-baseline", actor="editor",
            arms=[service.ArmSpec("sasrec", 1, "sasrec@champion"),
                  service.ArmSpec("tron", 1, "tron@champion")],
        )
    with session_scope(factory) as s:
        # Three arms with a real difference: TRON clicks best.
        simulate(s, EXPERIMENT, {"sasrec": 0.040, "sasrec-ssm": 0.042, "tron": 0.047}, users_per_day=320)
        # The challenger is assigned but not served yet (its users got no impressions).
        simulate(s, "tron-challenger-ramp", {"control": 0.047}, users_per_day=150)
    for key in (EXPERIMENT, "tron-challenger-ramp"):
        analyse(engine, key)
    engine.dispose()


def simulate(session, key: str, ctr: dict[str, float], users_per_day: int, seed: int = 7) -> None:
    """Users arrive every day, return on some later days, see slates and click with their own propensity."""
    rng = np.random.default_rng(seed)
    snapshot = service.load_snapshot(session, key)
    exp = service.get_experiment(session, key)
    phase = exp.phases[-1]
    start = phase.started_at
    now = utcnow()
    days = int((now - start).total_seconds() // 86400) + 1
    exposures, impressions, clicks = [], [], []
    for day in range(days):
        for u in range(users_per_day):
            user = f"{key}-u{day}-{u}"
            arm = service.decide(snapshot, user).arm_name
            first = start + timedelta(days=day, seconds=float(rng.uniform(0, 86400)))
            if first >= now:
                continue
            exposures.append({"experiment_id": exp.id, "phase_id": phase.id, "user_id": user, "arm_name": arm,
                              "first_seen_at": first})
            if arm not in ctr:
                continue
            propensity = rng.gamma(2.0, 0.5)  # users differ: clicks cluster by user
            visit = first
            while visit < now:
                for _ in range(1 + rng.poisson(3)):
                    at = visit + timedelta(seconds=float(rng.uniform(0, 600)))
                    if at >= now:
                        break
                    imp = uuid.uuid4().hex
                    items = [str(i) for i in rng.choice(5000, 10, replace=False)]
                    fallback = bool(rng.random() < 0.004)
                    impressions.append({
                        "id": imp, "experiment_id": exp.id, "phase_id": phase.id, "user_id": user,
                        "session_id": f"{user}-{visit:%j}", "arm_name": arm,
                        "model_version": "popular" if fallback else f"{arm}:1", "items": items,
                        "fallback": fallback, "latency_ms": float(rng.lognormal(2.6 + len(arm) / 50, 0.35)),
                        "in_analysis": True, "created_at": at,
                    })
                    if rng.random() < min(1.0, ctr[arm] * propensity):
                        pos = int(rng.integers(0, 10))
                        clicks.append({
                            "impression_id": imp, "experiment_id": exp.id, "phase_id": phase.id,
                            "user_id": user, "arm_name": arm, "item_id": items[pos], "position": pos,
                            "in_analysis": True,
                            "created_at": at + timedelta(seconds=30),
                        })
                visit += timedelta(days=float(rng.exponential(2.0)))
    session.execute(insert(Exposure), exposures)
    session.execute(insert(Impression), impressions)
    session.execute(insert(Click), clicks)


def analyse(engine, key: str) -> None:
    """What the nightly job does (snapshots, novelty, health and the report), for the last three nights."""
    with session_scope(session_factory(engine)) as s:
        first = service.get_experiment(s, key).started_at.date()
    yesterday = utcnow().date() - timedelta(days=1)
    for back in (2, 1, 0):
        day = yesterday - timedelta(days=back)
        if day < first:
            continue
        try:
            report.run_report(engine, key, day)
        except ZeroDivisionError:
            # analysis.report cannot yet analyse an arm with users but no impressions (the per-impression
            # diagnostic divides by zero); store the night's snapshots as the job does, without a report.
            snapshots_only(engine, key, day)


def snapshots_only(engine, key: str, day: date) -> None:
    with session_scope(session_factory(engine)) as s:
        exp = service.get_experiment(s, key)
        exp_id, phase_id = exp.id, exp.phases[-1].id
    with engine.begin() as conn:
        agg = aggregate.aggregate_phase(conn, exp_id, phase_id, day)
        store.save_snapshots(conn, exp_id, phase_id, agg.snapshots)
        store.save_novelty(conn, exp_id, phase_id, day, agg.novelty)
        for d, health in agg.health.items():
            store.save_health(conn, exp_id, phase_id, d, health)
