"""The experiment domain: definitions, lifecycle, phases, QA pins, and the per-request arm decision.

Functions here change rows in the caller's session and flush, but never commit: the caller owns
the transaction (`abrec.db.session_scope`), so a change and its audit row commit together.
Each lifecycle change takes a row lock on the experiment (`SELECT ... FOR UPDATE` on PostgreSQL;
SQLite serialises writers anyway), so two admins cannot race one experiment into two phases.

Lifecycle: draft -> running <-> paused -> stopped; running, paused or stopped -> shipped.
A phase is a period with fixed weights, coverage and seed. Starting opens phase 1; changing the
weights opens a new phase with a new seed (users are re-randomised) unless asked to keep it;
changing the coverage opens a new phase with the same seed and weights (nobody changes arm, users
only enter or leave); a registry alias moving under a live experiment opens a new phase with the
same seed. Analysis is per phase: phases are never pooled silently.

`decide(snapshot, user_id)` is pure, so the API can cache an `ExperimentSnapshot` and decide
without touching the database.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from abrec.assignment.hashing import choose_variation, get_bucket_ranges, hash_unit, in_namespace
from abrec.experiments import audit
from abrec.experiments.schema import Arm, Experiment, Phase, Pin, utcnow
from sqlalchemy import select
from sqlalchemy.orm import Session

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
ARM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A registry alias: "<model>@<alias>", e.g. "tron@champion".
ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*@[A-Za-z0-9][A-Za-z0-9_.-]*$")
REPORT_TIME_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_USER_ID = 128

LIVE = ("running", "paused")  # statuses with an open phase
EDITABLE = ("draft", "running", "paused")


class ExperimentError(ValueError):
    """A refused change or an invalid definition; the message says what is wrong."""


class ExperimentNotFound(ExperimentError):
    """No experiment has this key."""


@dataclass(frozen=True)
class ArmSpec:
    """An arm to create: its name, relative weight and the registry alias it serves."""

    name: str
    weight: float
    model_alias: str


@dataclass(frozen=True)
class ArmInfo:
    name: str
    position: int
    weight: float
    model_alias: str


@dataclass(frozen=True)
class ExperimentSnapshot:
    """Everything `decide` needs, as plain data: safe to cache and share between threads."""

    id: int
    key: str
    status: str
    hash_version: int
    seed: str  # the current phase's seed (the experiment's base seed before it starts)
    phase_id: int | None
    phase_number: int | None
    weights: tuple[float, ...]  # per arm, by position
    coverage: float
    namespace: str | None
    namespace_range: tuple[float, float]
    arms: tuple[ArmInfo, ...]  # by position; arms[0] is the control
    pins: Mapping[str, str] = field(default_factory=dict)  # user id -> arm name
    shipped_arm: str | None = None
    timezone: str = "UTC"

    @property
    def control(self) -> ArmInfo:
        return self.arms[0]

    def arm(self, name: str) -> ArmInfo:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)


@dataclass(frozen=True)
class Decision:
    """Which arm serves a request, and whether it counts.

    `in_analysis`: the request belongs to the experiment's analysis population (False for pinned
    users, users outside coverage or namespace, and any non-running experiment).
    `log_exposure`: record the user's exposure in this phase (first one wins; the API ignores repeats).
    """

    arm_name: str
    model_alias: str
    phase_id: int | None
    in_analysis: bool
    log_exposure: bool
    reason: str = (
        ""  # "assigned", "pinned", "outside_coverage", "outside_namespace", "not_running", "shipped"
    )


# ---------------------------------------------------------------------------------------------
# Validation


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ExperimentError(
            f"invalid experiment key {key!r}: use 1-100 lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )


def _check_actor(actor: str) -> None:
    if not isinstance(actor, str) or not actor.strip() or len(actor) > 64:
        raise ExperimentError("actor must be a non-empty name of at most 64 characters")


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or len(alias) > 200:
        raise ExperimentError(f"invalid model alias {alias!r}: expected 'model@alias', e.g. 'tron@champion'")


def _check_weight(name: str, weight: Any) -> float:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise ExperimentError(f"weight of arm {name!r} must be a positive number, got {weight!r}")
    return float(weight)


def _normalise(weights: Sequence[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def _check_coverage(coverage: Any) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, int | float) or not 0 < coverage <= 1:
        raise ExperimentError(f"coverage must be a number in (0, 1], got {coverage!r}")
    return float(coverage)


def _check_timezone(tz: str) -> None:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ExperimentError(
            f"unknown timezone {tz!r}: use an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from None


def _check_user_id(user_id: str) -> None:
    if not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_ID:
        raise ExperimentError(f"user id must be a non-empty string of at most {MAX_USER_ID} characters")


def _check_arms(arms: Sequence[ArmSpec]) -> list[float]:
    if len(arms) < 2:
        raise ExperimentError("an experiment needs at least two arms (the first is the control)")
    seen: set[str] = set()
    weights = []
    for arm in arms:
        if not isinstance(arm.name, str) or not ARM_RE.match(arm.name):
            raise ExperimentError(f"invalid arm name {arm.name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        if arm.name in seen:
            raise ExperimentError(f"arm name {arm.name!r} is used twice")
        seen.add(arm.name)
        _check_alias(arm.model_alias)
        weights.append(_check_weight(arm.name, arm.weight))
    return _normalise(weights)


def _check_optional(
    *,
    hash_version,
    seed,
    namespace,
    namespace_range,
    planned_users,
    target_effect,
    min_runtime_days,
    planned_end_at,
    report_time,
    webhook_url,
    email_to,
    primary_metric,
) -> None:
    if hash_version not in (1, 2):
        raise ExperimentError(f"hash_version must be 1 or 2 (GrowthBook's versions), got {hash_version!r}")
    if seed is not None and (not isinstance(seed, str) or not seed or len(seed) > 100):
        raise ExperimentError("seed must be a non-empty string of at most 100 characters")
    if not isinstance(primary_metric, str) or not METRIC_RE.match(primary_metric):
        raise ExperimentError(f"invalid primary metric {primary_metric!r}")
    if namespace is not None and (not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace)):
        raise ExperimentError(f"invalid namespace {namespace!r}: use letters, digits, '-', '_' or '.'")
    try:
        start, end = (float(x) for x in namespace_range)
    except (TypeError, ValueError):
        raise ExperimentError(f"namespace_range must be two numbers, got {namespace_range!r}") from None
    if not 0 <= start < end <= 1:
        raise ExperimentError(f"namespace_range must satisfy 0 <= start < end <= 1, got {namespace_range!r}")
    if planned_users is not None and (
        isinstance(planned_users, bool) or not isinstance(planned_users, int) or planned_users <= 0
    ):
        raise ExperimentError(f"planned_users must be a positive integer, got {planned_users!r}")
    if target_effect is not None and (
        isinstance(target_effect, bool)
        or not isinstance(target_effect, int | float)
        or not math.isfinite(target_effect)
        or target_effect <= 0
    ):
        raise ExperimentError(
            f"target_effect must be a positive relative lift such as 0.02, got {target_effect!r}"
        )
    if isinstance(min_runtime_days, bool) or not isinstance(min_runtime_days, int) or min_runtime_days < 0:
        raise ExperimentError(f"min_runtime_days must be a non-negative integer, got {min_runtime_days!r}")
    if planned_end_at is not None and (
        not isinstance(planned_end_at, datetime) or planned_end_at.tzinfo is None
    ):
        raise ExperimentError("planned_end_at must be a timezone-aware datetime")
    if not isinstance(report_time, str) or not REPORT_TIME_RE.match(report_time):
        raise ExperimentError(f"report_time must be 'HH:MM' (24-hour), got {report_time!r}")
    if webhook_url is not None and (
        not isinstance(webhook_url, str)
        or not re.match(r"^https?://\S+$", webhook_url)
        or len(webhook_url) > 500
    ):
        raise ExperimentError(f"webhook_url must be an http(s) URL, got {webhook_url!r}")
    if email_to is not None and (
        not isinstance(email_to, str)
        or len(email_to) > 500
        or not all(re.match(r"^[^@\s,]+@[^@\s,]+$", a.strip()) for a in email_to.split(","))
    ):
        raise ExperimentError(f"email_to must be comma-separated e-mail addresses, got {email_to!r}")


# ---------------------------------------------------------------------------------------------
# Queries


def get_experiment(session: Session, key: str, *, lock: bool = False) -> Experiment:
    """The experiment with this key; `lock` takes a row lock for a change. Raises ExperimentNotFound."""
    query = select(Experiment).where(Experiment.key == key)
    if lock:
        # populate_existing: an object already in the session must show the row as locked, not a stale copy.
        query = query.with_for_update().execution_options(populate_existing=True)
    experiment = session.scalars(query).one_or_none()
    if experiment is None:
        raise ExperimentNotFound(f"no experiment with key {key!r}")
    return experiment


def list_experiments(session: Session, status: str | None = None) -> list[Experiment]:
    query = select(Experiment).order_by(Experiment.id)
    if status is not None:
        query = query.where(Experiment.status == status)
    return list(session.scalars(query))


def current_phase(session: Session, experiment: Experiment) -> Phase | None:
    """The newest phase (open while the experiment is running or paused), or None before the start."""
    return session.scalars(
        select(Phase).where(Phase.experiment_id == experiment.id).order_by(Phase.number.desc()).limit(1)
    ).one_or_none()


def pins_of(session: Session, experiment: Experiment) -> dict[str, str]:
    rows = session.scalars(select(Pin).where(Pin.experiment_id == experiment.id).order_by(Pin.id))
    return {pin.user_id: pin.arm_name for pin in rows}


def describe(session: Session, key: str) -> dict[str, Any]:
    """A JSON-ready description of one experiment: definition, arms, phases and pins."""
    exp = get_experiment(session, key)

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": exp.id,
        "key": exp.key,
        "name": exp.name,
        "status": exp.status,
        "hypothesis": exp.hypothesis,
        "primary_metric": exp.primary_metric,
        "hash_version": exp.hash_version,
        "seed": exp.seed,
        "timezone": exp.timezone,
        "coverage": exp.coverage,
        "namespace": exp.namespace,
        "namespace_range": [exp.namespace_start, exp.namespace_end],
        "shipped_arm": exp.shipped_arm,
        "planned_users": exp.planned_users,
        "target_effect": exp.target_effect,
        "min_runtime_days": exp.min_runtime_days,
        "planned_end_at": iso(exp.planned_end_at),
        "report_time": exp.report_time,
        "webhook_url": exp.webhook_url,
        "email_to": exp.email_to,
        "created_at": iso(exp.created_at),
        "started_at": iso(exp.started_at),
        "stopped_at": iso(exp.stopped_at),
        "arms": [
            {"name": a.name, "position": a.position, "weight": a.weight, "model_alias": a.model_alias}
            for a in exp.arms
        ],
        "phases": [
            {
                "id": p.id,
                "number": p.number,
                "seed": p.seed,
                "weights": p.weights,
                "coverage": p.coverage,
                "reason": p.reason,
                "started_at": iso(p.started_at),
                "ended_at": iso(p.ended_at),
            }
            for p in exp.phases
        ],
        "pins": pins_of(session, exp),
    }


# ---------------------------------------------------------------------------------------------
# Definition


def create_experiment(
    session: Session,
    *,
    key: str,
    arms: Sequence[ArmSpec],
    actor: str,
    hypothesis: str = "",
    primary_metric: str = "ctr",
    hash_version: int = 2,
    seed: str | None = None,
    timezone: str = "UTC",
    coverage: float = 1.0,
    namespace: str | None = None,
    namespace_range: tuple[float, float] = (0.0, 1.0),
    planned_users: int | None = None,
    target_effect: float | None = None,
    min_runtime_days: int = 7,
    planned_end_at: datetime | None = None,
    report_time: str = "02:00",
    webhook_url: str | None = None,
    email_to: str | None = None,
    name: str = "",
) -> Experiment:
    """A new experiment in draft. The first arm is the control. Weights are normalised to sum to 1.

    The seed defaults to the key (as in GrowthBook), so a GrowthBook SDK given the same key,
    weights and coverage puts every user in the same arm.
    """
    _check_key(key)
    _check_actor(actor)
    weights = _check_arms(arms)
    coverage = _check_coverage(coverage)
    _check_timezone(timezone)
    _check_optional(
        hash_version=hash_version,
        seed=seed,
        namespace=namespace,
        namespace_range=namespace_range,
        planned_users=planned_users,
        target_effect=target_effect,
        min_runtime_days=min_runtime_days,
        planned_end_at=planned_end_at,
        report_time=report_time,
        webhook_url=webhook_url,
        email_to=email_to,
        primary_metric=primary_metric,
    )
    if not isinstance(hypothesis, str) or not isinstance(name, str) or len(name) > 200:
        raise ExperimentError("hypothesis and name must be strings (name at most 200 characters)")
    if session.scalars(select(Experiment.id).where(Experiment.key == key)).first() is not None:
        raise ExperimentError(f"an experiment with key {key!r} already exists")

    experiment = Experiment(
        key=key,
        name=name,
        hypothesis=hypothesis,
        primary_metric=primary_metric,
        status="draft",
        hash_version=hash_version,
        seed=seed if seed is not None else key,
        timezone=timezone,
        coverage=coverage,
        namespace=namespace,
        namespace_start=float(namespace_range[0]),
        namespace_end=float(namespace_range[1]),
        planned_users=planned_users,
        target_effect=None if target_effect is None else float(target_effect),
        min_runtime_days=min_runtime_days,
        planned_end_at=planned_end_at,
        report_time=report_time,
        webhook_url=webhook_url,
        email_to=email_to,
        arms=[
            Arm(name=a.name, position=i, weight=w, model_alias=a.model_alias)
            for i, (a, w) in enumerate(zip(arms, weights, strict=True))
        ],
    )
    session.add(experiment)
    session.flush()
    audit.record(
        session,
        actor,
        "create",
        "experiment",
        key,
        {
            "arms": [
                {"name": a.name, "weight": w, "model_alias": a.model_alias}
                for a, w in zip(arms, weights, strict=True)
            ],
            "coverage": coverage,
            "hash_version": hash_version,
            "seed": experiment.seed,
            "timezone": timezone,
            "namespace": namespace,
            "namespace_range": list(namespace_range),
            "primary_metric": primary_metric,
        },
    )
    return experiment


# ---------------------------------------------------------------------------------------------
# Lifecycle


def _require(experiment: Experiment, allowed: Sequence[str], action: str) -> None:
    if experiment.status not in allowed:
        raise ExperimentError(
            f"cannot {action} experiment {experiment.key!r}: it is {experiment.status} "
            f"(allowed from: {', '.join(allowed)})"
        )


def _new_seed(experiment: Experiment) -> str:
    return f"{experiment.key[:90]}-{secrets.token_hex(4)}"  # fits the 100-character seed column


def _open_phase(session: Session, experiment: Experiment, reason: str, seed: str) -> Phase:
    """Close the current phase (if any) and open the next one with the arms' weights and the coverage."""
    now = utcnow()
    previous = current_phase(session, experiment)
    if previous is not None and previous.ended_at is None:
        previous.ended_at = now
    phase = Phase(
        experiment_id=experiment.id,
        number=(previous.number + 1) if previous is not None else 1,
        seed=seed,
        weights={arm.name: arm.weight for arm in experiment.arms},
        coverage=experiment.coverage,
        reason=reason[:200],
        started_at=now,
    )
    session.add(phase)
    session.flush()
    return phase


def _close_phase(session: Session, experiment: Experiment) -> None:
    phase = current_phase(session, experiment)
    if phase is not None and phase.ended_at is None:
        phase.ended_at = utcnow()


def start(session: Session, key: str, actor: str) -> Experiment:
    """draft -> running: opens phase 1 with the experiment's seed."""
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    _require(exp, ("draft",), "start")
    exp.status = "running"
    exp.started_at = utcnow()
    phase = _open_phase(session, exp, "start", exp.seed)
    audit.record(session, actor, "start", "experiment", key, {"phase": phase.number, "seed": phase.seed})
    return exp


def pause(session: Session, key: str, actor: str) -> Experiment:
    """running -> paused: the control arm is served, nothing is analysed; the phase stays open."""
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    _require(exp, ("running",), "pause")
    exp.status = "paused"
    audit.record(session, actor, "pause", "experiment", key, {})
    return exp


def resume(session: Session, key: str, actor: str) -> Experiment:
    """paused -> running, in the same phase."""
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    _require(exp, ("paused",), "resume")
    exp.status = "running"
    audit.record(session, actor, "resume", "experiment", key, {})
    return exp


def stop(session: Session, key: str, actor: str) -> Experiment:
    """running or paused -> stopped: closes the phase; the control arm is served from now on."""
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    _require(exp, LIVE, "stop")
    exp.status = "stopped"
    exp.stopped_at = utcnow()
    _close_phase(session, exp)
    audit.record(session, actor, "stop", "experiment", key, {})
    return exp


def ship(session: Session, key: str, arm: str, actor: str) -> Experiment:
    """Serve `arm` to everyone and close the experiment (running, paused or stopped -> shipped)."""
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    _require(exp, ("running", "paused", "stopped"), "ship")
    names = [a.name for a in exp.arms]
    if arm not in names:
        raise ExperimentError(f"experiment {key!r} has no arm {arm!r} (arms: {', '.join(names)})")
    exp.status = "shipped"
    exp.shipped_arm = arm
    if exp.stopped_at is None:
        exp.stopped_at = utcnow()
    _close_phase(session, exp)
    audit.record(session, actor, "ship", "experiment", key, {"arm": arm})
    return exp


def change_weights(
    session: Session, key: str, weights: Mapping[str, float], actor: str, reseed: bool = True
) -> Phase | None:
    """New arm weights (normalised). On a live experiment this opens a new phase, by default with a
    new seed so that every user is re-randomised: keeping the seed would move only the users near
    the old boundaries, and carry their earlier experience into the new split. Returns the new
    phase, or None for a draft (which has no phase yet)."""
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    _require(exp, EDITABLE, "change the weights of")
    names = [a.name for a in exp.arms]
    if set(weights) != set(names):
        raise ExperimentError(
            f"weights must name every arm exactly once: expected {', '.join(names)}, "
            f"got {', '.join(map(str, weights))}"
        )
    new = dict(zip(names, _normalise([_check_weight(n, weights[n]) for n in names]), strict=True))
    old = {a.name: a.weight for a in exp.arms}
    if all(math.isclose(new[n], old[n], abs_tol=1e-12) for n in names):
        raise ExperimentError(
            "the weights are unchanged; use start_new_phase to re-randomise without a change"
        )
    for arm in exp.arms:
        arm.weight = new[arm.name]
    phase = None
    if exp.status in LIVE:
        seed = _new_seed(exp) if reseed else current_phase(session, exp).seed
        phase = _open_phase(session, exp, f"weights changed{'' if reseed else ' (seed kept)'}", seed)
    audit.record(
        session,
        actor,
        "change_weights",
        "experiment",
        key,
        {
            "old": old,
            "new": new,
            "reseed": reseed,
            "phase": phase.number if phase else None,
            "seed": phase.seed if phase else None,
        },
    )
    return phase


def change_coverage(session: Session, key: str, coverage: float, actor: str) -> Phase | None:
    """A new coverage, same seed and weights: users only enter or leave, nobody changes arm.

    On a live experiment this opens a new phase with the same seed, so each phase has one coverage
    (the analysis may pool such phases deliberately, as every user keeps their arm).
    Returns the new phase, or None for a draft.
    """
    _check_actor(actor)
    coverage = _check_coverage(coverage)
    exp = get_experiment(session, key, lock=True)
    _require(exp, EDITABLE, "change the coverage of")
    old = exp.coverage
    if math.isclose(old, coverage, abs_tol=1e-12):
        raise ExperimentError(f"coverage is already {coverage:g}")
    exp.coverage = coverage
    phase = None
    if exp.status in LIVE:
        phase = _open_phase(
            session, exp, f"coverage {old:g} -> {coverage:g}", current_phase(session, exp).seed
        )
    audit.record(
        session,
        actor,
        "change_coverage",
        "experiment",
        key,
        {
            "old": old,
            "new": coverage,
            "phase": phase.number if phase else None,
        },
    )
    return phase


def start_new_phase(
    session: Session, experiment: Experiment | str, reason: str, actor: str, reseed: bool = False
) -> Phase:
    """Open a new phase on a running or paused experiment with the current weights and coverage,
    e.g. because a registry alias moved to another model version under it. `reseed` re-randomises."""
    _check_actor(actor)
    key = experiment if isinstance(experiment, str) else experiment.key
    exp = get_experiment(session, key, lock=True)
    _require(exp, LIVE, "start a new phase of")
    if not isinstance(reason, str) or not reason.strip():
        raise ExperimentError("a new phase needs a reason")
    seed = _new_seed(exp) if reseed else current_phase(session, exp).seed
    phase = _open_phase(session, exp, reason, seed)
    audit.record(
        session,
        actor,
        "new_phase",
        "experiment",
        key,
        {
            "reason": reason,
            "reseed": reseed,
            "phase": phase.number,
            "seed": seed,
        },
    )
    return phase


def on_alias_moved(session: Session, model_alias: str, actor: str) -> list[Phase]:
    """A registry alias now points at another model version: every running or paused experiment
    with an arm on it starts a new phase (same seed), so no phase mixes two model versions."""
    _check_alias(model_alias)
    keys = session.scalars(
        select(Experiment.key)
        .join(Arm)
        .where(Arm.model_alias == model_alias, Experiment.status.in_(LIVE))
        .distinct()
        .order_by(Experiment.key)
    ).all()
    return [start_new_phase(session, key, f"alias {model_alias} moved", actor) for key in keys]


def pin(session: Session, key: str, user_id: str, arm: str, actor: str) -> Pin:
    """Always serve `arm` to `user_id` (QA allow-list); the user is left out of exposures and analysis."""
    _check_actor(actor)
    _check_user_id(user_id)
    exp = get_experiment(session, key, lock=True)
    _require(exp, EDITABLE, "pin users in")
    names = [a.name for a in exp.arms]
    if arm not in names:
        raise ExperimentError(f"experiment {key!r} has no arm {arm!r} (arms: {', '.join(names)})")
    row = session.scalars(
        select(Pin).where(Pin.experiment_id == exp.id, Pin.user_id == user_id)
    ).one_or_none()
    previous = row.arm_name if row is not None else None
    if row is None:
        row = Pin(experiment_id=exp.id, user_id=user_id, arm_name=arm)
        session.add(row)
    else:
        row.arm_name = arm
    session.flush()
    audit.record(
        session, actor, "pin", "experiment", key, {"user_id": user_id, "arm": arm, "previous": previous}
    )
    return row


def unpin(session: Session, key: str, user_id: str, actor: str) -> None:
    _check_actor(actor)
    exp = get_experiment(session, key, lock=True)
    row = session.scalars(
        select(Pin).where(Pin.experiment_id == exp.id, Pin.user_id == user_id)
    ).one_or_none()
    if row is None:
        raise ExperimentError(f"user {user_id!r} is not pinned in experiment {key!r}")
    session.delete(row)
    session.flush()
    audit.record(session, actor, "unpin", "experiment", key, {"user_id": user_id, "arm": row.arm_name})


# ---------------------------------------------------------------------------------------------
# Serving


def load_snapshot(session: Session, key: str) -> ExperimentSnapshot | None:
    """The experiment as `decide` needs it, or None when no experiment has this key.

    Weights and coverage come from the current phase when there is one (what is being served),
    otherwise from the draft definition.
    """
    exp = session.scalars(select(Experiment).where(Experiment.key == key)).one_or_none()
    if exp is None:
        return None
    phase = current_phase(session, exp)
    arms = tuple(ArmInfo(a.name, a.position, a.weight, a.model_alias) for a in exp.arms)
    if phase is not None:
        weights = tuple(float(phase.weights.get(a.name, a.weight)) for a in arms)
        coverage, seed = phase.coverage, phase.seed
    else:
        weights = tuple(a.weight for a in arms)
        coverage, seed = exp.coverage, exp.seed
    return ExperimentSnapshot(
        id=exp.id,
        key=exp.key,
        status=exp.status,
        hash_version=exp.hash_version,
        seed=seed,
        phase_id=phase.id if phase is not None else None,
        phase_number=phase.number if phase is not None else None,
        weights=weights,
        coverage=coverage,
        namespace=exp.namespace,
        namespace_range=(exp.namespace_start, exp.namespace_end),
        arms=arms,
        pins=pins_of(session, exp),
        shipped_arm=exp.shipped_arm,
        timezone=exp.timezone,
    )


def decide(snapshot: ExperimentSnapshot, user_id: str) -> Decision:
    """The arm for one request. Pure: the same snapshot and user always give the same decision."""
    control = snapshot.control
    if snapshot.status == "shipped" and snapshot.shipped_arm is not None:
        arm = snapshot.arm(snapshot.shipped_arm)
        return Decision(arm.name, arm.model_alias, snapshot.phase_id, False, False, "shipped")
    if snapshot.status != "running":
        return Decision(control.name, control.model_alias, snapshot.phase_id, False, False, "not_running")
    pinned = snapshot.pins.get(user_id)
    if pinned is not None:
        arm = snapshot.arm(pinned)
        return Decision(arm.name, arm.model_alias, snapshot.phase_id, False, False, "pinned")
    if snapshot.namespace is not None and not in_namespace(
        user_id, (snapshot.namespace, *snapshot.namespace_range)
    ):
        return Decision(
            control.name, control.model_alias, snapshot.phase_id, False, False, "outside_namespace"
        )
    n = hash_unit(snapshot.seed, user_id, snapshot.hash_version)
    ranges = get_bucket_ranges(len(snapshot.arms), snapshot.coverage, list(snapshot.weights))
    index = choose_variation(n, ranges) if n is not None else -1
    if index < 0:
        return Decision(
            control.name, control.model_alias, snapshot.phase_id, False, False, "outside_coverage"
        )
    arm = snapshot.arms[index]
    return Decision(arm.name, arm.model_alias, snapshot.phase_id, True, True, "assigned")
