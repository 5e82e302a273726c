"""A small, messy event log with its truth computed in plain Python, for the analysis tests.

Three phases of one experiment in Europe/Berlin around the spring DST switch (2026-03-29):
phase 1 (its own seed), phase 2 (new seed) and phase 3 (phase 2's seed, so users kept their arm).
Users have events in every phase, some not analysed (in_analysis false), some before their first
exposure in phase 3, some in a second experiment; some phase-3 users are never exposed.
`truth_*` recompute every figure from the Python lists with zoneinfo, independently of the SQL.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from abrec.analysis.stats import ArmStats
from abrec.experiments import service
from abrec.experiments.schema import Click, Experiment, Exposure, Impression, Phase
from sqlalchemy import Engine, insert, select

from abrec.db import init_db, make_engine, session_factory, session_scope

TZ = "Europe/Berlin"
T0 = datetime(2026, 3, 25, 12, 0, tzinfo=UTC)
PHASE_STARTS = [T0, T0 + timedelta(days=1), T0 + timedelta(days=2)]  # phase 3: 2026-03-27 12:00 UTC
END = datetime(2026, 3, 31, 21, 30, tzinfo=UTC)  # 23:30 in Berlin (UTC+2 after the switch)
ARMS = ("control", "treatment")


@dataclass
class Event:
    user_id: str
    phase: int  # 1, 2, 3
    in_analysis: bool
    at: datetime
    is_click: bool
    fallback: bool = False
    latency_ms: float = 10.0


@dataclass
class Log:
    engine: Engine
    experiment_id: int
    phase_ids: list[int]
    exposures: dict[str, tuple[str, datetime]]  # phase-3 user -> (arm, first_seen_at)
    events: list[Event]  # of the analysed experiment only
    key: str = "home"

    @property
    def phase_id(self) -> int:
        return self.phase_ids[2]


def make_experiment(engine: Engine, key: str, timezone: str = TZ, **kwargs) -> int:
    """A running experiment with two arms; returns its id."""
    factory = session_factory(engine)
    with session_scope(factory) as s:
        exp = service.create_experiment(
            s,
            key=key,
            arms=[
                service.ArmSpec("control", 1, "sasrec@champion"),
                service.ArmSpec("treatment", 1, "tron@champion"),
            ],
            actor="test",
            timezone=timezone,
            **kwargs,
        )
        service.start(s, key, "test")
        return exp.id


def build_log(url: str, seed: int = 0, users: int = 120) -> Log:
    engine = make_engine(url)
    init_db(engine)
    rng = random.Random(seed)
    exp_id = make_experiment(engine, "home", planned_users=200)
    other_id = make_experiment(engine, "other")
    factory = session_factory(engine)
    with session_scope(factory) as s:
        service.start_new_phase(s, "home", "reweigh", "test", reseed=True)
        service.start_new_phase(s, "home", "alias moved", "test", reseed=False)
        phases = list(s.scalars(select(Phase).where(Phase.experiment_id == exp_id).order_by(Phase.number)))
        for phase, start in zip(phases, PHASE_STARTS, strict=True):
            phase.started_at = start
        exp = s.get(Experiment, exp_id)
        exp.started_at = T0
        phase_ids = [p.id for p in phases]
        other_phase = s.scalars(select(Phase.id).where(Phase.experiment_id == other_id)).one()

    def phase_of(t: datetime) -> int:
        return 3 if t >= PHASE_STARTS[2] else 2 if t >= PHASE_STARTS[1] else 1

    def uniform(lo: datetime, hi: datetime) -> datetime:
        return lo + timedelta(seconds=rng.uniform(0, (hi - lo).total_seconds()))

    exposures: dict[str, tuple[str, datetime]] = {}
    events: list[Event] = []
    for u in range(users):
        uid = f"u{u}"
        exposed = rng.random() < 0.85
        fs = uniform(PHASE_STARTS[2], END)
        if exposed:
            exposures[uid] = (rng.choice(ARMS), fs)
        propensity = rng.choice([0.05, 0.2, 0.5])
        for _ in range(rng.randint(0, 14)):
            t = uniform(T0, END)
            ph = phase_of(t)
            analysed = rng.random() < 0.8 if ph < 3 else (exposed and t >= fs and rng.random() < 0.9)
            latency = rng.randint(20, 900) / 10
            imp = Event(uid, ph, analysed, t, False, fallback=rng.random() < 0.05, latency_ms=latency)
            events.append(imp)
            if rng.random() < propensity:
                # Some clicks land after midnight or after the switch: the click's own time counts.
                events.append(Event(uid, ph, analysed, t + timedelta(minutes=rng.uniform(0, 40)), True))
        # Events exactly on local midnights around the DST switch.
        for boundary in (datetime(2026, 3, 28, 23, 0, tzinfo=UTC), datetime(2026, 3, 29, 22, 0, tzinfo=UTC)):
            if exposed and fs <= boundary and rng.random() < 0.5:
                events.append(Event(uid, 3, True, boundary, False, latency_ms=12.0))

    _insert(engine, exp_id, phase_ids, exposures, events)
    # A second experiment with the same users must never leak in.
    noise = [Event(f"u{u}", 1, True, uniform(PHASE_STARTS[2], END), False) for u in range(users)]
    _insert(
        engine,
        other_id,
        [other_phase],
        {f"u{u}": ("control", PHASE_STARTS[2]) for u in range(users)},
        noise,
        phase_override=other_phase,
    )
    return Log(engine, exp_id, phase_ids, exposures, events)


def _insert(engine, exp_id, phase_ids, exposures, events, phase_override=None) -> None:
    arm_of = {u: a for u, (a, _) in exposures.items()}
    imp_rows, click_rows = [], []
    last_imp: dict[tuple[str, int, bool], str] = {}
    for e in sorted(events, key=lambda e: (e.is_click, e.at)):
        phase_id = phase_override or phase_ids[e.phase - 1]
        common = dict(
            experiment_id=exp_id,
            phase_id=phase_id,
            user_id=e.user_id,
            arm_name=arm_of.get(e.user_id, "control"),
            in_analysis=e.in_analysis,
            created_at=e.at,
        )
        if not e.is_click:
            iid = uuid.uuid4().hex
            last_imp[(e.user_id, e.phase, e.in_analysis)] = iid
            imp_rows.append(
                common
                | dict(
                    id=iid,
                    session_id="s",
                    model_version="m:1",
                    items=["a", "b"],
                    fallback=e.fallback,
                    latency_ms=e.latency_ms,
                )
            )
        else:
            iid = last_imp.get((e.user_id, e.phase, e.in_analysis)) or imp_rows[-1]["id"]
            click_rows.append(common | dict(impression_id=iid, item_id=uuid.uuid4().hex[:8], position=0))
    with engine.begin() as conn:
        conn.execute(
            insert(Exposure),
            [
                dict(
                    experiment_id=exp_id,
                    phase_id=phase_override or phase_ids[2],
                    user_id=u,
                    arm_name=a,
                    first_seen_at=fs,
                )
                for u, (a, fs) in exposures.items()
            ],
        )
        conn.execute(insert(Impression), imp_rows)
        if click_rows:
            conn.execute(insert(Click), click_rows)


# ---------------------------------------------------------------------------------------------
# The truth, in plain Python


def local(t: datetime) -> date:
    return t.astimezone(ZoneInfo(TZ)).date()


def truth_users(log: Log, last_day: date | None = None) -> dict[str, tuple[str, int, int, int, int]]:
    """user -> (arm, impressions, clicks, pre_impressions, pre_clicks) as of the end of last_day."""
    out = {}
    for uid, (arm, fs) in log.exposures.items():
        if last_day is not None and local(fs) > last_day:
            continue
        y = x = py = px = 0
        for e in log.events:
            if e.user_id != uid:
                continue
            in_time = last_day is None or local(e.at) <= last_day
            if e.phase == 3 and e.in_analysis and e.at >= fs and in_time:
                x, y = x + e.is_click, y + (not e.is_click)
            elif e.at < fs and not (e.in_analysis and e.phase in (2, 3)):
                px, py = px + e.is_click, py + (not e.is_click)
        out[uid] = (arm, y, x, py, px)
    return out


def truth_arm_stats(log: Log, last_day: date) -> dict[str, ArmStats]:
    users = truth_users(log, last_day)
    out = {}
    for arm in ARMS:
        rows = np.array([v[1:] for v in users.values() if v[0] == arm], dtype=float).reshape(-1, 4)
        out[arm] = ArmStats.from_arrays(rows[:, 1], rows[:, 0], rows[:, 3], rows[:, 2])
    return out


def truth_novelty(log: Log, last_day: date) -> dict[int, dict[str, ArmStats]]:
    """k -> arm -> sums over users (whose day k has begun) of their day-k clicks and impressions."""
    out: dict[int, dict[str, ArmStats]] = {}
    for k in range((last_day - local(PHASE_STARTS[2])).days + 1):
        for arm in ARMS:
            xs, ys = [], []
            for uid, (a, fs) in log.exposures.items():
                if a != arm or (local(fs) + timedelta(days=k)) > last_day:
                    continue
                day = local(fs) + timedelta(days=k)
                mine = [
                    e
                    for e in log.events
                    if e.user_id == uid
                    and e.phase == 3
                    and e.in_analysis
                    and e.at >= fs
                    and local(e.at) == day
                ]
                xs.append(sum(e.is_click for e in mine))
                ys.append(sum(not e.is_click for e in mine))
            if xs:
                out.setdefault(k, {})[arm] = ArmStats.from_arrays(np.array(xs), np.array(ys))
    return out
