"""`abrec simulate` as users run it: the command against a live API, its calendar and its A/A mode,
and its output read back by `abrec analyze-file`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from api_support import ModelServerThread, seed
from test_e2e_faults import Api

from abrec.cli import main

pytestmark = pytest.mark.slow


def test_simulate_aa_over_simulated_days_then_analyze_file(sqlite_url, tmp_path, make_checkpoint,
                                                            capsys) -> None:
    world = seed(sqlite_url, tmp_path / "store", make_checkpoint)
    rng = np.random.default_rng(0)
    data = tmp_path / "sessions.txt"
    data.write_text("".join(" ".join(f"i{j}" for j in rng.integers(0, 60, size=int(n))) + "\n"
                            for n in rng.integers(2, 8, size=400)))
    checkpoint = make_checkpoint(seed=2)  # the bytes behind sasrec@champion in the seeded world
    models = ModelServerThread(world.url, world.store)
    api = Api(sqlite_url, models.url, tmp_path / "serve.log").start()
    try:
        code = main(["simulate", "--api", api.url, "--experiment", "aa-test", "--aa", "sasrec@champion",
                     "--admin-token", world.tokens["admin"], "--data", str(data), "--days", "3",
                     "--start", "2031-05-01", "--k", "5", "--out", str(tmp_path / "out"),
                     "--predict", f"a={checkpoint}", "--predict", f"b={checkpoint}"])
        clock = requests.get(api.url + "/v1/admin/clock", headers=world.auth("viewer"), timeout=5).json()
        # A client without an admin token cannot move the clock.
        refused = requests.post(api.url + "/v1/admin/clock", json={"offset_s": 0}, timeout=5)
    finally:
        api.kill()
        models.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    assert clock["now"].startswith("2031-05-03")  # the last simulated day
    assert refused.status_code == 401
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["arms"]) == {"a", "b"}
    for arm in summary["arms"].values():
        # The model server served exactly the offline ranking: the expected CTR given the served
        # slates equals the offline prediction for the same sessions (item maps translated).
        assert arm["predicted_ctr_assigned"] == pytest.approx(
            arm["expected_clicks_given_slates"] / arm["impressions"], rel=1e-9)
        assert arm["predicted_ctr"] > 0
    assert sum(a["impressions"] for a in summary["arms"].values()) == sum(
        1 for line in (tmp_path / "out" / "impressions.jsonl").read_text().splitlines()
        if json.loads(line)["impression_id"])

    capsys.readouterr()
    assert main(["analyze-file", str(tmp_path / "out" / "users.csv"), "--control", "a", "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert analysis["arms"]["a"]["impressions"] == summary["arms"]["a"]["impressions"]
    assert analysis["arms"]["b"]["clicks"] == summary["arms"]["b"]["clicks"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--k", "0"], "k must be at least 1"),
    (["--start", "2031-01-01"], "--admin-token"),
    (["--data", "/nonexistent"], "no such file"),
    (["--predict", "tron"], "ARM=CHECKPOINT"),
])
def test_simulate_usage_errors(extra: list[str], message: str, capsys) -> None:
    assert main(["simulate", "--api", "http://127.0.0.1:9", "--experiment", "x", *extra]) == 2
    assert message in capsys.readouterr().err
