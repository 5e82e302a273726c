"""`abrec assign`: output, errors, same answer in every process, and no heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from abrec.assignment import choose_variation, get_bucket_ranges, hash_unit

from abrec.cli import main

# The console script's entry point (running `-m abrec.cli` would make a second copy of UsageError).
ENTRY = "import sys; from abrec.cli import main; sys.exit(main())"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ENTRY, "assign", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


def test_assign_prints_hash_and_arm(capsys):
    assert main(["assign", "--seed", "seed", "--unit", "a"]) == 0
    assert json.loads(capsys.readouterr().out) == {"hash": 0.0505, "arm_index": 0}


def test_assign_outside_coverage_is_minus_one(capsys):
    # hash("seed", "b") = 0.2696: in arm 0 of [0, 0.5) at full coverage, outside [0, 0.1) at 20%.
    assert main(["assign", "--seed", "seed", "--unit", "b", "--coverage", "0.2"]) == 0
    assert json.loads(capsys.readouterr().out)["arm_index"] == -1


def test_assign_is_stable_across_processes():
    units = ["42", "user-7", "ü😀", "x" * 50]
    for unit in units:
        for seed_env in ("0", "12345"):  # Python's own str hash randomisation must not matter
            out = run_cli("--seed", "exp-a", "--unit", unit, "--weights", "0.2,0.3,0.5",
                          env={"PYTHONHASHSEED": seed_env})
            assert out.returncode == 0, out.stderr
            got = json.loads(out.stdout)
            h = hash_unit("exp-a", unit, 2)
            arm = choose_variation(h, get_bucket_ranges(3, 1, [0.2, 0.3, 0.5]))
            assert got == {"hash": h, "arm_index": arm}


def test_assign_hash_version_1():
    out = run_cli("--seed", "", "--unit", "a", "--hash-version", "1")
    assert json.loads(out.stdout)["hash"] == 0.22


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "0.5"], "at least two arms"),
        (["--weights", "0.5,abc"], "comma-separated numbers"),
        (["--weights", "0.5,0.6"], "sum to 1"),
        (["--weights", "1.5,-0.5"], "non-negative"),
        (["--coverage", "0"], "(0, 1]"),
        (["--coverage", "1.2"], "(0, 1]"),
        (["--coverage", "lots"], "(0, 1]"),
        (["--hash-version", "3"], "1 or 2"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message):
    out = run_cli("--seed", "s", "--unit", "u", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_unit_exits_2():
    out = run_cli("--seed", "s")
    assert out.returncode == 2
    assert "--unit" in out.stderr


def test_assign_does_not_import_heavy_modules():
    code = (
        "import sys, io, contextlib\n"
        "from abrec.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['assign', '--seed', 's', '--unit', 'u'])\n"
        "heavy = sorted(m for m in ('torch', 'flask', 'sqlalchemy', 'numpy', 'scipy') if m in sys.modules)\n"
        "print(rc, ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rc, heavy = out.stdout.strip().split(" ", 1) if " " in out.stdout.strip() else (out.stdout.strip(), "")
    assert rc == "0"
    assert heavy == "", f"abrec assign imported {heavy}"
