"""`abrec demo` end to end on a small configuration: the real command, real processes, real HTTP.

It trains the three arms briefly on part of the synthetic shop, replays a slice of the held-out
sessions, must pass its own check (every arm's logged CTR and lift agree with the offline
prediction, and the log holds exactly what the API acknowledged), stores the nightly reports and
serves the dashboard until interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_serves_the_dashboard(tmp_path: Path) -> None:
    cmd = [str(Path(sys.executable).parent / "abrec"), "demo", "--workdir", str(tmp_path / "demo"),
           "--epochs", "1", "--train-sessions", "1500", "--limit", "150", "--days", "3",
           "--dashboard-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + 540
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Dashboard: "):
                url = line.split()[1]
                break
            assert time.monotonic() < deadline, "".join(lines[-30:])
        output = "".join(lines)
        assert url is not None, output[-3000:]
        login = requests.get(url + "login", timeout=10)
        assert login.status_code == 200 and "abrec" in login.text
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    for n in range(1, 9):
        assert f"[{n}/8]" in output
    assert "prediction check passed" in output, output[-3000:]
    assert "MISS" not in output and output.count("  ok") >= 5  # 3 arms and 2 lifts inside their CIs

    engine = create_engine(f"sqlite:///{tmp_path / 'demo' / 'abrec.db'}")
    with engine.connect() as conn:
        reports = conn.execute(text("SELECT report FROM analysis_reports ORDER BY day")).scalars().all()
        versions = conn.execute(text("SELECT name FROM model_versions ORDER BY name")).scalars().all()
    engine.dispose()
    assert versions == ["sasrec", "sasrec-ssm", "tron"]
    assert len(reports) == 3  # one per simulated day
    last = reports[-1] if isinstance(reports[-1], dict) else json.loads(reports[-1])
    assert set(last["arms"]) == {"sasrec", "sasrec-ssm", "tron"}
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000
