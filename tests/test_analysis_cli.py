"""`abrec analyze-file`: the JSON the issue specifies, the same numbers as the library, clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from abrec.analysis.stats import ArmStats, compare, winsorize
from abrec.analysis.synthetic import draw_users
from scipy import stats as sps

from abrec.cli import main

ARM_KEYS = {
    "users",
    "impressions",
    "clicks",
    "ctr",
    "abs_lift",
    "abs_lift_ci",
    "abs_p_value",
    "rel_lift",
    "rel_lift_ci",
    "p_value",
    "rel_lift_ci_sequential",
    "p_value_adjusted",
}


def write_table(path: Path, arms: dict[str, tuple[int, float]], pre: bool = True, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    data = {arm: draw_users(rng, (n,), lift=lift) for arm, (n, lift) in arms.items()}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        header = ["unit_id", "arm", "impressions", "clicks"]
        w.writerow(header + (["pre_impressions", "pre_clicks"] if pre else []))
        for arm, u in data.items():
            for i in range(u.clicks.size):
                extra = [u.pre_impressions[i], u.pre_clicks[i]] if pre else []
                w.writerow([f"{arm}-{i}", arm, u.impressions[i], u.clicks[i], *extra])
    return data


def run_json(capsys, *args: str) -> dict:
    assert main(["analyze-file", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_has_the_issue_shape_and_the_library_numbers(tmp_path: Path, capsys) -> None:
    path = tmp_path / "users.csv"
    data = write_table(path, {"sasrec": (3000, 0.0), "tron": (3100, 0.15)}, pre=False)
    out = run_json(capsys, str(path), "--control", "sasrec")
    assert set(out) == {"srm_p_value", "arms"}
    assert set(out["arms"]) == {"sasrec", "tron"}
    for arm in out["arms"].values():
        assert set(arm) == ARM_KEYS
    control = out["arms"]["sasrec"]
    assert control["users"] == 3000 and control["clicks"] == data["sasrec"].clicks.sum()
    assert all(control[k] is None for k in ARM_KEYS - {"users", "impressions", "clicks", "ctr"})

    c, t = data["sasrec"].stats(pre=False), data["tron"].stats(pre=False)
    expected = compare(c, t, sequential_tuning=6100)
    tron = out["arms"]["tron"]
    assert tron["ctr"] == pytest.approx(t.sum_x / t.sum_y)
    assert tron["rel_lift"] == pytest.approx(t.ctr / c.ctr - 1)  # no pre-period -> no CUPED
    assert tron["rel_lift_ci"] == pytest.approx(list(expected.rel_lift_ci))
    assert tron["abs_lift_ci"] == pytest.approx(list(expected.abs_lift_ci))
    assert tron["p_value"] == pytest.approx(expected.p_value)
    assert tron["abs_p_value"] == pytest.approx(expected.abs_p_value)
    assert tron["rel_lift_ci_sequential"] == pytest.approx(list(expected.rel_lift_ci_sequential))
    assert out["srm_p_value"] == pytest.approx(sps.chisquare([3000, 3100]).pvalue)


def test_weights_tuning_and_cuped_reach_the_statistics(tmp_path: Path, capsys) -> None:
    path = tmp_path / "users.csv"
    data = write_table(path, {"a": (4000, 0.0), "b": (2000, 0.1)})
    out = run_json(capsys, str(path), "--control", "a", "--weights", "a=2,b=1", "--sequential-tuning", "2e4")
    assert out["srm_p_value"] == pytest.approx(sps.chisquare([4000, 2000], [4000, 2000]).pvalue)
    expected = compare(data["a"].stats(), data["b"].stats(), sequential_tuning=20000, cuped=True)
    assert out["arms"]["b"]["rel_lift"] == pytest.approx(expected.rel_lift)
    assert out["arms"]["b"]["rel_lift_ci_sequential"] == pytest.approx(list(expected.rel_lift_ci_sequential))
    plain = run_json(capsys, str(path), "--control", "a", "--no-cuped")
    assert plain["arms"]["b"]["rel_lift"] == pytest.approx(data["b"].stats().ctr / data["a"].stats().ctr - 1)


def test_winsorize_caps_at_the_percentile_over_all_arms(tmp_path: Path, capsys) -> None:
    path = tmp_path / "users.csv"
    data = write_table(path, {"a": (1000, 0.0), "b": (1000, 0.0)}, pre=False)
    with path.open("a", newline="") as f:
        csv.writer(f).writerow(["bot", "b", 50_000, 20_000])  # a bot in the treatment arm
    out = run_json(capsys, str(path), "--control", "a", "--winsorize", "99")
    clicks = winsorize([data["a"].clicks, np.r_[data["b"].clicks, 20_000]], 99)
    impressions = winsorize([data["a"].impressions, np.r_[data["b"].impressions, 50_000]], 99)
    c = ArmStats.from_arrays(clicks[0], impressions[0])
    t = ArmStats.from_arrays(clicks[1], impressions[1])
    assert out["arms"]["b"]["rel_lift"] == pytest.approx(t.ctr / c.ctr - 1)
    assert out["arms"]["b"]["clicks"] < 20_000


def test_multiple_arms_get_holm_adjusted_p_values_and_a_readable_table(tmp_path: Path, capsys) -> None:
    path = tmp_path / "users.csv"
    write_table(path, {"sasrec": (2000, 0.0), "tron": (2000, 0.2), "gru": (2000, 0.0)})
    out = run_json(capsys, str(path), "--control", "sasrec")
    raw = sorted([out["arms"][a]["p_value"] for a in ("tron", "gru")])
    adjusted = sorted([out["arms"][a]["p_value_adjusted"] for a in ("tron", "gru")])
    assert adjusted == pytest.approx([min(1, 2 * raw[0]), max(min(1, 2 * raw[0]), raw[1])])
    assert main(["analyze-file", str(path), "--control", "sasrec"]) == 0
    table = capsys.readouterr().out
    assert "tron" in table and "gru" in table and "SRM" in table and "CUPED: on" in table
    assert "Diagnostic only" in table


TWO_ARMS = "unit_id,arm,impressions,clicks\nu1,a,3,1\nu2,b,2,0\n"


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "cannot read"),
        ("unit_id,arm,clicks\nu1,a,1\n", [], "missing column(s) impressions"),
        ("unit_id,arm,impressions,clicks\nu1,a,3,1\nu2,b,2,x\n", [], ":3: clicks must be a number"),
        ("unit_id,arm,impressions,clicks\nu1,a,3,1\nu2,b,-2,0\n", [], "non-negative"),
        ("unit_id,arm,impressions,clicks\nu1,a,3,1\nu1,b,2,0\n", [], "appears twice"),
        ("unit_id,arm,impressions,clicks\nu1,a,3,1\nu2,a,2,0\n", [], "at least two arms"),
        ("unit_id,arm,impressions,clicks,pre_clicks\nu1,a,3,1,0\nu2,b,2,0,1\n", [], "both pre_impressions"),
        ("unit_id,arm,impressions,clicks\nu1,b,3,1\nu2,c,2,0\n", [], "control arm 'a' is not in"),
        (TWO_ARMS, ["--weights", "a=1,b"], "expected NAME=W"),
        (TWO_ARMS, ["--weights", "a=1,b=0"], "W > 0"),
        (TWO_ARMS, ["--weights", "a=1,c=1"], "the file has arms"),
        (TWO_ARMS, ["--sequential-tuning", "-5"], "positive"),
        (TWO_ARMS, ["--winsorize", "0"], "percentile"),
    ],
)
def test_bad_input_is_a_clear_usage_error(tmp_path: Path, capsys, content, args, message) -> None:
    path = tmp_path / "users.csv"
    if content is not None:
        path.write_text(content)
    assert main(["analyze-file", str(path), "--control", "a", *args]) == 2
    err = capsys.readouterr().err
    assert "abrec analyze-file: error:" in err and message in err


def test_the_command_module_is_light_and_the_command_runs_end_to_end(tmp_path: Path) -> None:
    probe = "import sys, abrec.analysis.cli; print(sorted({'numpy', 'scipy'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded == "[]\n"
    path = tmp_path / "users.csv"
    write_table(path, {"a": (300, 0.0), "b": (300, 0.0)})
    abrec = str(Path(sys.executable).parent / "abrec")
    command = [abrec, "analyze-file", str(path), "--control", "a", "--json"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["arms"]["a"]["users"] == 300
    missing = subprocess.run(
        [abrec, "analyze-file", str(tmp_path / "nope.csv"), "--control", "a"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
