"""The model registry: immutable, validated model versions, movable aliases and their history.

A version (`tron:3`) is one checkpoint file, copied into the artifact store under a key that holds
its sha256, with its kind, config, training-data fingerprint, offline metrics and the size and hash
of its item-id map recorded here (the map itself stays in the artifact). An alias (`tron@champion`)
points at one version of the same model; every move appends a row to `model_alias_history`, which
is never updated, so "which version did this alias serve at time T" has an exact answer.

This module imports no torch at import time: the API reads aliases and popular items through it.
Only `validate_checkpoint` (registration) loads the checkpoint, and imports torch to do so.
Moving an alias that a running experiment uses is checked one level up, in
`abrec.experiments.models_admin`, since models/ may not import experiments/.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from abrec.models.store import ArtifactStore, sha256_file
from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from abrec.db import Base, UTCDateTime, utcnow

# Same alphabet as the arms' aliases in experiments/service.py; ':' and '@' are the separators.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Popular items kept in the database for the API's fallback (the checkpoint may list more).
POPULAR_KEEP = 200


class RegistryError(ValueError):
    """A registration, lookup or alias move that cannot be done; the message says why."""


class NotFound(RegistryError):
    """No such version or alias."""


class ModelVersion(Base):
    """One registered checkpoint. Rows are never changed after registration."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
        UniqueConstraint("name", "sha256", name="uq_model_versions_name_sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    artifact_key: Mapped[str] = mapped_column(String(300))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    n_items: Mapped[int] = mapped_column(Integer)
    item_map_sha256: Mapped[str] = mapped_column(String(64))
    data_fingerprint: Mapped[str] = mapped_column(String(128))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    popular: Mapped[list[str]] = mapped_column(JSON)  # external ids, most popular first
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.label,
            "name": self.name,
            "number": self.version,
            "kind": self.kind,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "artifact_key": self.artifact_key,
            "config": self.config,
            "n_items": self.n_items,
            "item_map_sha256": self.item_map_sha256,
            "data_fingerprint": self.data_fingerprint,
            "metrics": self.metrics,
            "description": self.description,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
        }


class ModelAlias(Base):
    """The current target of `name@alias`; its past targets are in ModelAliasHistory."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("name", "alias"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    version: Mapped[ModelVersion] = relationship(lazy="joined", innerjoin=True)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"


class ModelAliasHistory(Base):
    """Append-only: one row per alias move (the first assignment has no from_version)."""

    __tablename__ = "model_alias_history"
    __table_args__ = (Index("ix_model_alias_history_name_alias_at", "name", "alias", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    alias: Mapped[str] = mapped_column(String(64))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(500), default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    from_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[from_version_id], lazy="joined")
    to_version: Mapped[ModelVersion] = relationship(foreign_keys=[to_version_id], lazy="joined")

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": f"{self.name}@{self.alias}",
            "from": self.from_version.label if self.from_version else None,
            "to": self.to_version.label,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at.isoformat(),
        }


def _refuse_change(_mapper, _conn, target) -> None:
    raise RegistryError(f"{type(target).__name__} rows are immutable")


# The ORM refuses to update or delete versions and history rows; the audit trail depends on it.
for _table in (ModelVersion, ModelAliasHistory):
    event.listen(_table, "before_update", _refuse_change)
    event.listen(_table, "before_delete", _refuse_change)


# ---------------------------------------------------------------------------------------------
# References: "tron@champion" (an alias) or "tron:3" (a pinned version)


def parse_alias(ref: str) -> tuple[str, str]:
    name, sep, alias = ref.partition("@")
    if not sep or not NAME_RE.match(name) or not NAME_RE.match(alias):
        raise RegistryError(f"{ref!r} is not an alias of the form name@alias (e.g. tron@champion)")
    return name, alias


def parse_version(ref: str) -> tuple[str, int]:
    name, sep, number = ref.partition(":")
    if not sep or not NAME_RE.match(name) or not number.isdigit():
        raise RegistryError(f"{ref!r} is not a version of the form name:number (e.g. tron:3)")
    return name, int(number)


def get_version(session: Session, ref: str) -> ModelVersion:
    name, number = parse_version(ref)
    query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == number)
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"no model version {ref}")
    return row


def resolve(session: Session, ref: str) -> ModelVersion:
    """The version an alias points to now, or the pinned version itself."""
    if "@" not in ref:
        return get_version(session, ref)
    name, alias = parse_alias(ref)
    row = session.scalar(select(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias))
    if row is None:
        raise NotFound(f"no alias {ref}")
    return row.version


def popular_items(session: Session, alias: str) -> list[str]:
    """The most popular items of the training data of the version `alias` points to (external ids)."""
    return list(resolve(session, alias).popular)


def list_versions(session: Session, name: str | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return list(session.scalars(query))


def list_aliases(session: Session, name: str | None = None) -> list[ModelAlias]:
    query = select(ModelAlias).order_by(ModelAlias.name, ModelAlias.alias)
    if name is not None:
        query = query.where(ModelAlias.name == name)
    return list(session.scalars(query))


# ---------------------------------------------------------------------------------------------
# Aliases


@dataclass(frozen=True)
class AliasMove:
    alias: str
    from_version: str | None
    to_version: str
    changed: bool


def set_alias(
    session: Session, alias_ref: str, version_ref: str, *, actor: str, reason: str = ""
) -> AliasMove:
    """Point `name@alias` at `name:N` and append the move to the history (flushes, doesn't commit).

    Pointing an alias at the version it already has records nothing and returns changed=False.
    """
    name, alias = parse_alias(alias_ref)
    target = get_version(session, version_ref)
    if target.name != name:
        raise RegistryError(f"{alias_ref} can only point to a version of {name!r}, not {target.label}")
    # Lock the alias row (PostgreSQL) so two concurrent moves record a consistent from -> to chain.
    query = select(ModelAlias).where(ModelAlias.name == name, ModelAlias.alias == alias)
    row = session.scalar(query.with_for_update(of=ModelAlias))
    previous = row.version if row is not None else None
    if previous is not None and previous.id == target.id:
        return AliasMove(alias_ref, target.label, target.label, changed=False)
    now = utcnow()
    if row is None:
        row_new = ModelAlias(name=name, alias=alias, version_id=target.id, updated_by=actor, updated_at=now)
        session.add(row_new)
    else:
        row.version_id, row.updated_by, row.updated_at = target.id, actor, now
    session.add(
        ModelAliasHistory(
            name=name,
            alias=alias,
            from_version_id=previous.id if previous else None,
            to_version_id=target.id,
            actor=actor,
            reason=reason,
            at=now,
        )
    )
    session.flush()
    if row is not None:
        session.expire(row, ["version"])  # version_id changed; reload the relationship on access
    return AliasMove(alias_ref, previous.label if previous else None, target.label, changed=True)


def alias_history(session: Session, alias_ref: str) -> list[ModelAliasHistory]:
    name, alias = parse_alias(alias_ref)
    return list(
        session.scalars(
            select(ModelAliasHistory)
            .where(ModelAliasHistory.name == name, ModelAliasHistory.alias == alias)
            .order_by(ModelAliasHistory.at, ModelAliasHistory.id)
        )
    )


def alias_at(session: Session, alias_ref: str, when: datetime) -> ModelVersion | None:
    """The version `alias_ref` pointed to at `when` (None if the alias did not exist yet)."""
    if when.tzinfo is None:
        raise RegistryError("alias_at needs an aware datetime (UTC)")
    name, alias = parse_alias(alias_ref)
    move = session.scalar(
        select(ModelAliasHistory)
        .where(ModelAliasHistory.name == name, ModelAliasHistory.alias == alias, ModelAliasHistory.at <= when)
        .order_by(ModelAliasHistory.at.desc(), ModelAliasHistory.id.desc())
        .limit(1)
    )
    return move.to_version if move is not None else None


# ---------------------------------------------------------------------------------------------
# Registration


@dataclass
class CheckpointInfo:
    """What validation learned about a checkpoint file."""

    kind: str
    config: dict[str, Any]
    n_items: int
    item_map_sha256: str
    data_fingerprint: str
    metrics: dict[str, Any]
    popular: list[str] = field(default_factory=list)


def _json_safe(value: Any) -> Any:
    """Metrics go into a JSON column: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def validate_checkpoint(path: str | Path, *, smoke_sessions: int = 8, seed: int = 0) -> CheckpointInfo:
    """Load a checkpoint and prove it can serve, or raise RegistryError saying why not.

    Checks: the file loads (safetensors, never pickle), its kind is a known preset, the item map
    has one row of scores per item (plus padding), and a smoke inference on a few sessions —
    empty, one click, and random longer ones — gives finite scores for every item.
    """
    import torch
    from abrec.models.checkpoint import CheckpointError, load_checkpoint
    from abrec.models.inference import score_batch
    from abrec.models.presets import PRESETS

    try:
        ckpt = load_checkpoint(path, device="cpu")
    except CheckpointError as exc:
        raise RegistryError(f"checkpoint refused: {exc}") from None
    if ckpt.kind not in PRESETS:
        known = ", ".join(PRESETS)
        raise RegistryError(f"checkpoint refused: unknown model kind {ckpt.kind!r} (known: {known})")
    n = len(ckpt.item_map)
    if n < 1:
        raise RegistryError("checkpoint refused: its item map is empty")
    if getattr(ckpt.model, "num_items", n) != n:
        raise RegistryError(
            f"checkpoint refused: item map has {n} items but the model has {ckpt.model.num_items}"
        )
    bad_popular = [i for i in ckpt.popular if not 1 <= i <= n]
    if bad_popular:
        raise RegistryError(f"checkpoint refused: popular items outside 1..{n}: {bad_popular[:5]}")
    gen = torch.Generator().manual_seed(seed)
    sessions: list[list[int]] = [[], [1], [n]]
    for _ in range(max(0, smoke_sessions - len(sessions))):
        length = int(torch.randint(2, 20, (1,), generator=gen))
        sessions.append(torch.randint(1, n + 1, (length,), generator=gen).tolist())
    try:
        scores = score_batch(ckpt.model, sessions)
    except Exception as exc:  # any failure of the network on valid input is a refusal reason
        why = f"{type(exc).__name__}: {exc}"
        raise RegistryError(f"checkpoint refused: smoke inference failed ({why})") from None
    if tuple(scores.shape) != (len(sessions), n + 1):
        raise RegistryError(
            f"checkpoint refused: scores have shape {tuple(scores.shape)}, "
            f"expected ({len(sessions)}, {n + 1}) for its item map"
        )
    if not torch.isfinite(scores[:, 1:]).all():
        raise RegistryError("checkpoint refused: smoke inference gave non-finite scores")
    item_map_json = ckpt.item_map.to_json()
    return CheckpointInfo(
        kind=ckpt.kind,
        config=_json_safe(ckpt.config),
        n_items=n,
        item_map_sha256=hashlib.sha256(item_map_json.encode()).hexdigest(),
        data_fingerprint=str(ckpt.data_fingerprint),
        metrics=_json_safe(ckpt.metrics),
        popular=[ckpt.item_map.to_external(i) for i in ckpt.popular[:POPULAR_KEEP]],
    )


def validate_in_subprocess(path: str | Path, timeout_s: float = 300) -> CheckpointInfo:
    """`validate_checkpoint` in a child Python, for torch-free callers (API processes)."""
    import json
    import subprocess
    import sys

    code = "import sys; from abrec.models.registry import _validate_main; _validate_main(sys.argv[1])"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryError(f"checkpoint refused: validation took longer than {timeout_s:.0f}s") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RegistryError(lines[-1] if lines else f"validation failed (exit {done.returncode})")
    return CheckpointInfo(**json.loads(done.stdout))


def _validate_main(path: str) -> None:
    import dataclasses
    import json
    import sys

    try:
        info = validate_checkpoint(path)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    print(json.dumps(dataclasses.asdict(info)))


def artifact_key(name: str, version: int, sha256: str) -> str:
    return f"{name}/{version}-{sha256}.safetensors"


def register_model(
    session: Session,
    store: ArtifactStore,
    path: str | Path,
    name: str,
    *,
    actor: str,
    description: str = "",
    validate: Callable[[Path], CheckpointInfo] = validate_checkpoint,
) -> ModelVersion:
    """Validate `path`, copy it into `store` and commit it as the next version of `name`.

    Registration is its own transaction (it commits): the artifact and the row appear together,
    and on any failure neither is left behind. Registering content that `name` already has is
    refused (versions are immutable, so a second copy would only be a confusing alias).
    Torch-free callers (API processes) pass `validate=validate_in_subprocess`.
    """
    if not NAME_RE.match(name):
        raise RegistryError(f"model name {name!r} must be letters, digits, '.', '-' or '_'")
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"checkpoint refused: {path} is not a file")
    # Validate a private copy, so that the bytes checked are exactly the bytes stored.
    with tempfile.TemporaryDirectory(prefix="abrec-register-") as tmp:
        local = Path(tmp) / "checkpoint.safetensors"
        shutil.copyfile(path, local)
        digest = sha256_file(local)
        query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.sha256 == digest)
        same = session.scalar(query)
        if same is not None:
            raise RegistryError(f"this checkpoint is already registered as {same.label}")
        info = validate(local)
        latest = session.scalar(select(ModelVersion.version).where(ModelVersion.name == name).order_by(
            ModelVersion.version.desc()).limit(1))
        number = (latest or 0) + 1
        key = artifact_key(name, number, digest)
        store.put(local, key)
        try:
            row = ModelVersion(
                name=name,
                version=number,
                kind=info.kind,
                sha256=digest,
                size_bytes=local.stat().st_size,
                artifact_key=key,
                config=info.config,
                n_items=info.n_items,
                item_map_sha256=info.item_map_sha256,
                data_fingerprint=info.data_fingerprint,
                metrics=info.metrics,
                popular=info.popular,
                description=description,
                created_by=actor,
                created_at=utcnow(),
            )
            session.add(row)
            session.commit()
        except BaseException as exc:
            session.rollback()
            # The key holds the sha256, so a concurrent registration of the same bytes may own it.
            if session.scalar(select(ModelVersion.id).where(ModelVersion.artifact_key == key)) is None:
                store.delete(key)
            if isinstance(exc, IntegrityError):
                raise RegistryError(f"{name}:{number} was registered concurrently; try again") from None
            raise
    return row
