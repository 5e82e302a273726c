"""`abrec dashboard`: light to import, clear usage errors, and a real server answering on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from abrec.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_module_is_light():
    code = ("import sys, abrec.dashboard.cli; "
            "print(sorted({'flask', 'plotly', 'sqlalchemy', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_usage_errors(capsys, tmp_path):
    assert main(["dashboard", "--port", "0"]) == 2
    assert "--port must be 1-65535" in capsys.readouterr().err
    assert main(["dashboard", "--db", "postgresql://nobody@127.0.0.1:1/none", "--port", "8999"]) == 2
    assert "cannot open database" in capsys.readouterr().err


def test_dashboard_serves_on_loopback(sqlite_url):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "abrec.cli", "dashboard", "--db", sqlite_url, "--port", str(port)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/login", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the dashboard did not start within 60 s"
                time.sleep(0.3)
        assert response.status_code == 200 and "Log in" in response.text
        assert requests.get(f"http://127.0.0.1:{port}/", allow_redirects=False, timeout=5).status_code == 302
        assert requests.get(f"http://127.0.0.1:{port}/assets/plotly.min.js", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
