"""GrowthBook's `run` cases end to end: define, start, snapshot and decide give the SDK's variation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from abrec.experiments.service import ArmSpec, create_experiment, decide, load_snapshot, start

from abrec.db import init_db, make_engine, session_factory, session_scope

CASES = json.loads((Path(__file__).parent / "data" / "growthbook_cases.json").read_text())["run"]


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('gb') / 'abrec.db'}")
    init_db(engine)
    yield session_factory(engine)
    engine.dispose()


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_run_case(factory, index):
    name, context, experiment, variation, in_experiment, _ = CASES[index]
    n = len(experiment["variations"])
    weights = experiment.get("weights", [1 / n] * n)
    key = f"case-{index}"  # GrowthBook keys repeat across cases; the seed carries the case's key
    namespace = experiment.get("namespace")
    with session_scope(factory) as s:
        create_experiment(
            s,
            key=key,
            arms=[ArmSpec(f"v{i}", w, f"model@v{i}") for i, w in enumerate(weights)],
            actor="test",
            seed=experiment.get("seed", experiment["key"]),
            hash_version=experiment.get("hashVersion", 1),  # GrowthBook's run() defaults to version 1
            coverage=experiment.get("coverage", 1.0),
            namespace=namespace[0] if namespace else None,
            namespace_range=tuple(namespace[1:]) if namespace else (0, 1),
        )
        start(s, key, "test")
    with session_scope(factory) as s:
        decision = decide(load_snapshot(s, key), context["attributes"]["id"])
    # Outside the experiment GrowthBook serves variation 0, as abrec serves the control.
    assert decision.arm_name == f"v{variation}"
    assert decision.in_analysis is in_experiment
    assert decision.log_exposure is in_experiment
