"""Experiment definitions, lifecycle, phases, pins and the arm decision, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest
from abrec.assignment import choose_variation, get_bucket_ranges, hash_unit, in_namespace
from abrec.experiments import audit
from abrec.experiments.schema import Phase
from abrec.experiments.service import (
    ArmSpec,
    ExperimentError,
    ExperimentNotFound,
    change_coverage,
    change_weights,
    create_experiment,
    decide,
    describe,
    get_experiment,
    load_snapshot,
    on_alias_moved,
    pause,
    pin,
    resume,
    ship,
    start,
    start_new_phase,
    stop,
    unpin,
)
from sqlalchemy import func, select

from abrec.db import init_db, make_engine, session_factory, session_scope

USERS = [f"user-{i}" for i in range(20_000)]
ARMS = [ArmSpec("control", 1, "tron@champion"), ArmSpec("treatment", 1, "tron@challenger")]


@pytest.fixture
def factory(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def sqlite_factory(sqlite_url):
    engine = make_engine(sqlite_url)
    init_db(engine)
    yield session_factory(engine)
    engine.dispose()


def make(factory, key="home", arms=ARMS, status="draft", **kwargs):
    """Create an experiment and walk it to `status`, each step in its own transaction."""
    with session_scope(factory) as s:
        create_experiment(s, key=key, arms=arms, actor="alice", **kwargs)
    steps = {
        "draft": [],
        "running": [start],
        "paused": [start, pause],
        "stopped": [start, stop],
        "shipped": [start, stop, lambda s, k, a: ship(s, k, "treatment", a)],
    }[status]
    for step in steps:
        with session_scope(factory) as s:
            step(s, key, "alice")
    return key


def snapshot(factory, key="home"):
    with session_scope(factory) as s:
        return load_snapshot(s, key)


def arms_of(snap, users=USERS):
    return [decide(snap, u) for u in users]


# --- definition ---------------------------------------------------------------------------------


def test_create_normalises_weights_and_defaults_seed_to_key(factory):
    make(factory, arms=[ArmSpec("a", 1, "m@x"), ArmSpec("b", 3, "m@y")], timezone="Europe/Berlin")
    with session_scope(factory) as s:
        exp = get_experiment(s, "home")
        assert exp.status == "draft"
        assert exp.seed == "home"
        assert [(a.name, a.position, a.weight) for a in exp.arms] == [("a", 0, 0.25), ("b", 1, 0.75)]
        assert exp.timezone == "Europe/Berlin"
        assert exp.phases == []
        rows = audit.history(s, "experiment", "home")
        assert [r.action for r in rows] == ["create"]
        assert rows[0].actor == "alice"
        assert rows[0].details["arms"][1] == {"name": "b", "weight": 0.75, "model_alias": "m@y"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"key": "Has Space"}, "invalid experiment key"),
        ({"key": ""}, "invalid experiment key"),
        ({"arms": [ArmSpec("a", 1, "m@x")]}, "at least two arms"),
        ({"arms": [ArmSpec("a", 1, "m@x"), ArmSpec("a", 1, "m@y")]}, "used twice"),
        ({"arms": [ArmSpec("a", 0, "m@x"), ArmSpec("b", 1, "m@y")]}, "positive number"),
        ({"arms": [ArmSpec("a", -1, "m@x"), ArmSpec("b", 1, "m@y")]}, "positive number"),
        ({"arms": [ArmSpec("a", float("nan"), "m@x"), ArmSpec("b", 1, "m@y")]}, "positive number"),
        ({"arms": [ArmSpec("a", 1, "no-alias"), ArmSpec("b", 1, "m@y")]}, "model@alias"),
        ({"arms": [ArmSpec("a b", 1, "m@x"), ArmSpec("b", 1, "m@y")]}, "invalid arm name"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"coverage": 0}, r"\(0, 1\]"),
        ({"coverage": 1.5}, r"\(0, 1\]"),
        ({"hash_version": 3}, "1 or 2"),
        ({"namespace": "ns", "namespace_range": (0.6, 0.4)}, "start < end"),
        ({"planned_users": 0}, "positive integer"),
        ({"target_effect": -0.1}, "positive relative lift"),
        ({"report_time": "25:00"}, "HH:MM"),
        ({"webhook_url": "ftp://x"}, "http"),
        ({"email_to": "not-an-address"}, "e-mail"),
        ({"planned_end_at": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"actor": ""}, "actor"),
    ],
)
def test_create_refuses_invalid_definitions(sqlite_factory, kwargs, message):
    args = {"key": "exp", "arms": ARMS, "actor": "alice", **kwargs}
    with pytest.raises(ExperimentError, match=message):
        with session_scope(sqlite_factory) as s:
            create_experiment(s, **args)
    with session_scope(sqlite_factory) as s:
        assert len(audit.history(s)) == 0  # nothing half-written


def test_create_accepts_full_planning_fields(sqlite_factory):
    end = datetime(2030, 1, 1, tzinfo=UTC)
    make(
        sqlite_factory,
        hypothesis="TRON beats SASRec",
        planned_users=10_000,
        target_effect=0.02,
        planned_end_at=end,
        namespace="home-page",
        namespace_range=(0, 0.5),
        webhook_url="https://hooks.example/x",
        email_to="a@example.com, b@example.com",
    )
    with session_scope(sqlite_factory) as s:
        d = describe(s, "home")
    assert d["planned_end_at"] == end.isoformat()
    assert d["namespace_range"] == [0.0, 0.5]
    assert d["target_effect"] == 0.02


def test_duplicate_key_refused(sqlite_factory):
    make(sqlite_factory)
    with pytest.raises(ExperimentError, match="already exists"):
        make(sqlite_factory)


# --- lifecycle ----------------------------------------------------------------------------------


def test_full_lifecycle_writes_phases_and_audit(factory):
    make(factory)
    with session_scope(factory) as s:
        start(s, "home", "alice")
    with session_scope(factory) as s:
        exp = get_experiment(s, "home")
        assert exp.status == "running" and exp.started_at is not None
        assert [(p.number, p.seed, p.ended_at) for p in exp.phases] == [(1, "home", None)]
    for step, status in [(pause, "paused"), (resume, "running"), (stop, "stopped")]:
        with session_scope(factory) as s:
            assert step(s, "home", "bob").status == status
    with session_scope(factory) as s:
        ship(s, "home", "treatment", "carol")
    with session_scope(factory) as s:
        exp = get_experiment(s, "home")
        assert exp.status == "shipped" and exp.shipped_arm == "treatment"
        assert exp.stopped_at is not None
        assert all(p.ended_at is not None for p in exp.phases)
        rows = audit.history(s, "experiment", "home")
        assert [(r.actor, r.action) for r in rows] == [
            ("alice", "create"),
            ("alice", "start"),
            ("bob", "pause"),
            ("bob", "resume"),
            ("bob", "stop"),
            ("carol", "ship"),
        ]
        assert rows[-1].details == {"arm": "treatment"}


REFUSED = [
    ("draft", lambda s: pause(s, "home", "x"), "cannot pause"),
    ("draft", lambda s: resume(s, "home", "x"), "cannot resume"),
    ("draft", lambda s: stop(s, "home", "x"), "cannot stop"),
    ("draft", lambda s: ship(s, "home", "treatment", "x"), "cannot ship"),
    ("draft", lambda s: start_new_phase(s, "home", "why", "x"), "cannot start a new phase"),
    ("running", lambda s: start(s, "home", "x"), "cannot start"),
    ("running", lambda s: resume(s, "home", "x"), "cannot resume"),
    ("running", lambda s: ship(s, "home", "nope", "x"), "has no arm 'nope'"),
    ("running", lambda s: change_weights(s, "home", {"control": 1}, "x"), "every arm"),
    ("running", lambda s: change_weights(s, "home", {"control": 1, "treatment": 1}, "x"), "unchanged"),
    ("running", lambda s: change_weights(s, "home", {"control": 1, "treatment": 0}, "x"), "positive"),
    ("running", lambda s: change_coverage(s, "home", 1.0, "x"), "already"),
    ("running", lambda s: change_coverage(s, "home", 0, "x"), r"\(0, 1\]"),
    ("running", lambda s: pin(s, "home", "u1", "nope", "x"), "has no arm"),
    ("running", lambda s: pin(s, "home", "", "control", "x"), "user id"),
    ("running", lambda s: unpin(s, "home", "u1", "x"), "not pinned"),
    ("paused", lambda s: pause(s, "home", "x"), "cannot pause"),
    ("paused", lambda s: start(s, "home", "x"), "cannot start"),
    ("stopped", lambda s: start(s, "home", "x"), "cannot start"),
    ("stopped", lambda s: resume(s, "home", "x"), "cannot resume"),
    ("stopped", lambda s: change_weights(s, "home", {"control": 1, "treatment": 2}, "x"), "cannot change"),
    ("stopped", lambda s: change_coverage(s, "home", 0.5, "x"), "cannot change"),
    ("stopped", lambda s: pin(s, "home", "u1", "control", "x"), "cannot pin"),
    ("shipped", lambda s: stop(s, "home", "x"), "cannot stop"),
    ("shipped", lambda s: ship(s, "home", "control", "x"), "cannot ship"),
    ("shipped", lambda s: start(s, "home", "x"), "cannot start"),
]


@pytest.mark.parametrize("status,action,message", REFUSED)
def test_invalid_transitions_are_refused(sqlite_factory, status, action, message):
    make(sqlite_factory, status=status)
    with session_scope(sqlite_factory) as s:
        before = (get_experiment(s, "home").status, len(audit.history(s)))
    with pytest.raises(ExperimentError, match=message):
        with session_scope(sqlite_factory) as s:
            action(s)
    with session_scope(sqlite_factory) as s:
        assert (get_experiment(s, "home").status, len(audit.history(s))) == before


def test_refusals_on_postgres_too(factory):
    make(factory, status="stopped")
    with pytest.raises(ExperimentError, match="cannot start"):
        with session_scope(factory) as s:
            start(s, "home", "x")
    with pytest.raises(ExperimentNotFound, match="no experiment"):
        with session_scope(factory) as s:
            pause(s, "missing", "x")


# --- serving decisions --------------------------------------------------------------------------


def test_decide_matches_growthbook_assignment(factory):
    make(
        factory,
        status="running",
        arms=[ArmSpec("a", 2, "m@x"), ArmSpec("b", 3, "m@y"), ArmSpec("c", 5, "m@z")],
    )
    snap = snapshot(factory)
    assert snap.weights == pytest.approx((0.2, 0.3, 0.5))
    ranges = get_bucket_ranges(3, 1.0, [0.2, 0.3, 0.5])
    for user in USERS[:2000]:
        d = decide(snap, user)
        assert d.arm_name == "abc"[choose_variation(hash_unit("home", user, 2), ranges)]
        assert d.in_analysis and d.log_exposure and d.phase_id == snap.phase_id
        assert d.model_alias == {"a": "m@x", "b": "m@y", "c": "m@z"}[d.arm_name]


def test_arm_shares_follow_weights(factory):
    make(factory, status="running", arms=[ArmSpec("control", 1, "m@x"), ArmSpec("treatment", 3, "m@y")])
    counts = Counter(d.arm_name for d in arms_of(snapshot(factory)))
    assert counts["treatment"] / len(USERS) == pytest.approx(0.75, abs=0.015)


@pytest.mark.parametrize("status", ["draft", "paused", "stopped"])
def test_not_running_serves_control_without_exposure(factory, status):
    make(factory, status=status)
    decisions = arms_of(snapshot(factory), USERS[:500])
    assert {d.arm_name for d in decisions} == {"control"}
    assert {d.model_alias for d in decisions} == {"tron@champion"}
    assert not any(d.in_analysis or d.log_exposure for d in decisions)


def test_shipped_serves_the_shipped_arm_to_everyone(factory):
    make(factory, status="shipped")
    decisions = arms_of(snapshot(factory), USERS[:500])
    assert {(d.arm_name, d.model_alias) for d in decisions} == {("treatment", "tron@challenger")}
    assert not any(d.in_analysis or d.log_exposure for d in decisions)


def test_pinned_users_are_served_but_not_analysed(factory):
    make(factory, status="running")
    snap = snapshot(factory)
    # Pick users whose hash would put them in control, and pin them to the treatment.
    natural_control = [u for u in USERS[:200] if decide(snap, u).arm_name == "control"][:5]
    with session_scope(factory) as s:
        for user in natural_control:
            pin(s, "home", user, "treatment", "qa")
    snap = snapshot(factory)
    assert snap.pins == dict.fromkeys(natural_control, "treatment")
    for user in natural_control:
        d = decide(snap, user)
        assert (d.arm_name, d.in_analysis, d.log_exposure, d.reason) == ("treatment", False, False, "pinned")
    # Re-pinning updates the arm; unpinning returns the user to the hash.
    with session_scope(factory) as s:
        pin(s, "home", natural_control[0], "control", "qa")
        unpin(s, "home", natural_control[1], "qa")
    snap = snapshot(factory)
    assert decide(snap, natural_control[0]).arm_name == "control"
    assert not decide(snap, natural_control[0]).in_analysis
    back = decide(snap, natural_control[1])
    assert (back.arm_name, back.in_analysis, back.log_exposure) == ("control", True, True)
    with session_scope(factory) as s:
        actions = [r.action for r in audit.history(s, "experiment", "home")]
    assert actions.count("pin") == 6 and actions.count("unpin") == 1


def test_weights_change_starts_new_phase_and_rerandomises(factory):
    make(factory, status="running")
    before = snapshot(factory)
    with session_scope(factory) as s:
        phase = change_weights(s, "home", {"control": 3, "treatment": 7}, "alice")
        assert phase.number == 2
    after = snapshot(factory)
    assert after.phase_number == 2 and after.phase_id != before.phase_id
    assert after.seed != before.seed
    assert after.weights == pytest.approx((0.3, 0.7))
    old, new = arms_of(before), arms_of(after)
    moved = sum(a.arm_name != b.arm_name for a, b in zip(old, new, strict=True)) / len(USERS)
    # Independent re-randomisation: P(change) = 0.5 * 0.7 + 0.5 * 0.3 = 0.5.
    assert moved == pytest.approx(0.5, abs=0.02)
    # Users move in both directions (a re-draw, not just the boundary shift).
    assert any(a.arm_name == "treatment" and b.arm_name == "control" for a, b in zip(old, new, strict=True))
    with session_scope(factory) as s:
        phases = get_experiment(s, "home").phases
        assert phases[0].ended_at is not None and phases[1].ended_at is None
        assert phases[1].weights == pytest.approx({"control": 0.3, "treatment": 0.7})
        record = audit.history(s, "experiment", "home")[-1]
        assert record.action == "change_weights" and record.details["reseed"] is True


def test_weights_change_keeping_the_seed_moves_only_boundary_users(factory):
    make(factory, status="running")
    before = snapshot(factory)
    with session_scope(factory) as s:
        change_weights(s, "home", {"control": 3, "treatment": 7}, "alice", reseed=False)
    after = snapshot(factory)
    assert after.seed == before.seed and after.phase_number == 2
    pairs = list(zip(arms_of(before), arms_of(after), strict=True))
    moved = sum(a.arm_name != b.arm_name for a, b in pairs) / len(USERS)
    assert moved == pytest.approx(0.2, abs=0.02)  # hashes in [0.3, 0.5)
    assert not any(a.arm_name == "treatment" and b.arm_name == "control" for a, b in pairs)


def test_coverage_change_never_moves_users_between_arms(factory):
    make(factory, status="running", coverage=0.4)
    before = snapshot(factory)
    assert sum(d.in_analysis for d in arms_of(before)) / len(USERS) == pytest.approx(0.4, abs=0.02)
    with session_scope(factory) as s:
        phase = change_coverage(s, "home", 0.9, "alice")
        assert phase.number == 2 and phase.coverage == 0.9 and phase.reason == "coverage 0.4 -> 0.9"
    after = snapshot(factory)
    assert after.seed == before.seed and after.coverage == 0.9
    pairs = list(zip(arms_of(before), arms_of(after), strict=True))
    assert all(b.in_analysis and b.arm_name == a.arm_name for a, b in pairs if a.in_analysis)
    assert sum(b.in_analysis for _, b in pairs) / len(USERS) == pytest.approx(0.9, abs=0.02)
    # Users outside the coverage are served the control, with no exposure.
    outside = [b for _, b in pairs if not b.in_analysis]
    assert outside and {(d.arm_name, d.log_exposure, d.reason) for d in outside} == {
        ("control", False, "outside_coverage")
    }
    # Shrinking again: users only leave.
    with session_scope(factory) as s:
        change_coverage(s, "home", 0.2, "alice")
    shrunk = arms_of(snapshot(factory))
    assert all(a.arm_name == c.arm_name for (a, _), c in zip(pairs, shrunk, strict=True) if c.in_analysis)


def test_draft_changes_do_not_open_phases(sqlite_factory):
    make(sqlite_factory)
    with session_scope(sqlite_factory) as s:
        assert change_weights(s, "home", {"control": 1, "treatment": 4}, "alice") is None
        assert change_coverage(s, "home", 0.5, "alice") is None
    with session_scope(sqlite_factory) as s:
        start(s, "home", "alice")
    snap = snapshot(sqlite_factory)
    assert snap.phase_number == 1 and snap.weights == pytest.approx((0.2, 0.8)) and snap.coverage == 0.5


def test_new_phase_when_an_alias_moves(factory):
    make(factory, key="a", status="running")
    make(factory, key="b", status="paused")
    make(
        factory, key="c", status="running", arms=[ArmSpec("x", 1, "gru@champion"), ArmSpec("y", 1, "gru@new")]
    )
    make(factory, key="d", status="stopped")
    make(factory, key="e")
    with session_scope(factory) as s:
        phases = on_alias_moved(s, "tron@challenger", "registry")
        assert sorted((p.experiment.key, p.number) for p in phases) == [("a", 2), ("b", 2)]
    for key, number in [("a", 2), ("b", 2), ("c", 1), ("d", 1), ("e", None)]:
        snap = snapshot(factory, key)
        assert snap.phase_number == number
        assert snap.seed == key  # an alias move keeps the seed: users keep their arms
    with session_scope(factory) as s:
        phase = start_new_phase(s, get_experiment(s, "c"), "manual re-randomisation", "alice", reseed=True)
        assert phase.seed != "c" and phase.reason == "manual re-randomisation"
        assert audit.history(s, "experiment", "c")[-1].details["reseed"] is True


def test_phase_numbers_are_unique_and_sequential(factory):
    make(factory, status="running")
    for coverage in (0.5, 0.6, 0.7):
        with session_scope(factory) as s:
            change_coverage(s, "home", coverage, "alice")
    with session_scope(factory) as s:
        numbers = s.scalars(select(Phase.number).order_by(Phase.number)).all()
        open_phases = s.scalar(select(func.count()).select_from(Phase).where(Phase.ended_at.is_(None)))
    assert numbers == [1, 2, 3, 4] and open_phases == 1


def test_namespaces_make_experiments_mutually_exclusive(factory):
    make(factory, key="left", status="running", namespace="home", namespace_range=(0, 0.5))
    make(factory, key="right", status="running", namespace="home", namespace_range=(0.5, 1))
    left, right = snapshot(factory, "left"), snapshot(factory, "right")
    in_left = {u for u in USERS if decide(left, u).in_analysis}
    in_right = {u for u in USERS if decide(right, u).in_analysis}
    assert not in_left & in_right
    assert len(in_left) / len(USERS) == pytest.approx(0.5, abs=0.02)
    assert len(in_left | in_right) == len(USERS)
    assert all(in_namespace(u, ("home", 0, 0.5)) for u in list(in_left)[:500])
    outside = decide(left, next(iter(in_right)))
    assert (outside.arm_name, outside.reason, outside.log_exposure) == ("control", "outside_namespace", False)


def test_snapshot_of_unknown_key_is_none(sqlite_factory):
    assert snapshot(sqlite_factory, "nope") is None


def test_snapshot_is_frozen_plain_data(sqlite_factory):
    make(sqlite_factory, status="running")
    snap = snapshot(sqlite_factory)
    with pytest.raises(AttributeError):
        snap.status = "stopped"
    assert [a.name for a in snap.arms] == ["control", "treatment"] and snap.control.position == 0
    assert hash(decide(snap, "u")) == hash(decide(snap, "u"))


def test_longest_key_fits_a_reseeded_phase(factory):
    key = "k" * 100
    make(factory, key=key, status="running")
    with session_scope(factory) as s:
        phase = change_weights(s, key, {"control": 1, "treatment": 2}, "alice")
        assert len(phase.seed) <= 100 and phase.seed != key


def test_concurrent_changes_serialise_on_the_row_lock(pg_url):
    """Two admins change one experiment at once on PostgreSQL: the second waits for the first's
    row lock, then builds on its result (phase 3), instead of colliding on phase 2."""
    import threading
    import time

    from sqlalchemy import text

    engine = make_engine(pg_url)
    init_db(engine)
    factory = session_factory(engine)
    make(factory, status="running")
    errors: list[BaseException] = []

    def second_admin() -> None:
        try:
            with session_scope(factory) as s:
                change_coverage(s, "home", 0.6, "bob")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    first = factory()
    change_coverage(first, "home", 0.3, "alice")  # holds the lock, not committed yet
    thread = threading.Thread(target=second_admin)
    thread.start()
    deadline = time.monotonic() + 20

    def second_is_waiting() -> bool:
        # A fresh transaction per look: pg_stat_activity is a snapshot within one transaction.
        with engine.connect() as watcher:
            return bool(
                watcher.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            )

    while thread.is_alive() and not second_is_waiting():
        assert time.monotonic() < deadline, "the second change never waited for the first"
        time.sleep(0.05)
    first.commit()
    first.close()
    thread.join(timeout=30)
    assert errors == []
    with session_scope(factory) as s:
        exp = get_experiment(s, "home")
        assert [(p.number, p.coverage) for p in exp.phases] == [(1, 1.0), (2, 0.3), (3, 0.6)]
        assert exp.coverage == 0.6
        assert [r.details["old"] for r in audit.history(s, "experiment", "home")[-2:]] == [1.0, 0.3]
    engine.dispose()
