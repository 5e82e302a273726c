"""A realistic dashboard database for the dashboard tests: users of every role, registered model
versions with aliases and history, a running three-arm experiment with nightly snapshots and a
stored report, a draft and an experiment whose new arm has no traffic yet.

Everything goes through the owning packages' functions; only the model versions are ORM rows,
since registering real checkpoints would train models.
"""

from __future__ import annotations

from datetime import timedelta

from abrec.experiments import identity, service
from abrec.experiments.schema import utcnow
from abrec.models import registry
from sqlalchemy import select

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
            planned_users=60_000, target_effect=0.05,
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
        service.create_experiment(
            s, key="gru4rec-baseline", actor="editor",
            arms=[service.ArmSpec("sasrec", 1, "sasrec@champion"),
                  service.ArmSpec("tron", 1, "tron@champion")],
        )
    engine.dispose()
