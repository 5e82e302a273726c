"""Tables of the live-experiment side: experiments, arms, phases, identities, exposures and the event log.

All timestamps are stored in UTC (`UTCDateTime` hands back aware datetimes on every backend).
The event log is denormalised on purpose: impressions and clicks carry experiment, phase, arm and
user, so that the nightly aggregation groups them without joins over millions of rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from abrec.db import Base, UTCDateTime, utcnow

ROLES = ("viewer", "editor", "admin")
STATUSES = ("draft", "running", "paused", "stopped", "shipped")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # one of ROLES
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiToken(Base):
    """Only the SHA-256 of a token is stored; the token itself is shown once, at creation."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(back_populates="tokens")


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    hypothesis: Mapped[str] = mapped_column(Text, default="")
    primary_metric: Mapped[str] = mapped_column(String(32), default="ctr")
    status: Mapped[str] = mapped_column(String(16), default="draft")  # one of STATUSES
    hash_version: Mapped[int] = mapped_column(Integer, default=2)
    # The seed of the current phase lives on the phase; this is the experiment's base seed.
    seed: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    coverage: Mapped[float] = mapped_column(Float, default=1.0)
    # Mutually exclusive experiments share a namespace and take disjoint ranges of it.
    namespace: Mapped[str | None] = mapped_column(String(100))
    namespace_start: Mapped[float] = mapped_column(Float, default=0.0)
    namespace_end: Mapped[float] = mapped_column(Float, default=1.0)
    shipped_arm: Mapped[str | None] = mapped_column(String(64))
    # Planning inputs for power, sequential tuning and the decision.
    planned_users: Mapped[int | None] = mapped_column(Integer)
    target_effect: Mapped[float | None] = mapped_column(Float)  # minimum detectable relative lift
    min_runtime_days: Mapped[int] = mapped_column(Integer, default=7)
    planned_end_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Nightly report: cron-like "HH:MM" in the experiment's timezone, and where to deliver it.
    report_time: Mapped[str] = mapped_column(String(5), default="02:00")
    webhook_url: Mapped[str | None] = mapped_column(String(500))
    email_to: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    arms: Mapped[list[Arm]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", order_by="Arm.position"
    )
    phases: Mapped[list[Phase]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", order_by="Phase.number"
    )


class Arm(Base):
    """An arm binds to a registry alias such as `tron@champion`; position 0 is the control."""

    __tablename__ = "arms"
    __table_args__ = (UniqueConstraint("experiment_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float)
    model_alias: Mapped[str] = mapped_column(String(200))

    experiment: Mapped[Experiment] = relationship(back_populates="arms")


class Phase(Base):
    """A period with fixed weights and seed. Analysis never pools phases silently."""

    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("experiment_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    seed: Mapped[str] = mapped_column(String(100))
    weights: Mapped[dict[str, float]] = mapped_column(JSON)  # arm name -> weight
    coverage: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(200), default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    experiment: Mapped[Experiment] = relationship(back_populates="phases")


class Pin(Base):
    """QA allow-list: the user always gets this arm, and is left out of exposures and analysis."""

    __tablename__ = "pins"
    __table_args__ = (UniqueConstraint("experiment_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(128))
    arm_name: Mapped[str] = mapped_column(String(64))


class Exposure(Base):
    """A user's first assignment in a phase."""

    __tablename__ = "exposures"
    __table_args__ = (UniqueConstraint("phase_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(128))
    arm_name: Mapped[str] = mapped_column(String(64))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Impression(Base):
    """One slate shown. `items` holds the shop's item ids in slate order (position = index)."""

    __tablename__ = "impressions"
    # The per-user analysis reads (analysis/aggregate.py) are answered from this index alone; its
    # prefix serves every lookup by (experiment, phase, user).
    __table_args__ = (
        Index("ix_impressions_analysis", "experiment_id", "phase_id", "user_id", "created_at", "in_analysis"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex, made by the API
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    phase_id: Mapped[int | None] = mapped_column(ForeignKey("phases.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(128))
    session_id: Mapped[str] = mapped_column(String(128))
    arm_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(200))  # e.g. "tron:3"; "popular" for a fallback
    items: Mapped[list[Any]] = mapped_column(JSON)
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)
    latency_ms: Mapped[float] = mapped_column(Float)
    # False for QA-pinned users and for paused/stopped/shipped serving: shown, never analysed.
    in_analysis: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Click(Base):
    """A click on an item of a slate; the unique key makes a repeated click idempotent."""

    __tablename__ = "clicks"
    __table_args__ = (
        UniqueConstraint("impression_id", "item_id"),
        Index("ix_clicks_analysis", "experiment_id", "phase_id", "user_id", "created_at", "in_analysis"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    impression_id: Mapped[str] = mapped_column(ForeignKey("impressions.id", ondelete="CASCADE"))
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    phase_id: Mapped[int | None] = mapped_column(ForeignKey("phases.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(String(128))
    arm_name: Mapped[str] = mapped_column(String(64))
    item_id: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer)
    in_analysis: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditLog(Base):
    """Every change to experiments, arms, users and aliases: who, when, what."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
