"""Report delivery to real servers on loopback: a webhook (http.server) and SMTP (aiosmtpd)."""

from __future__ import annotations

import json
import socket
import threading
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from abrec.analysis import delivery, report
from abrec.experiments.schema import Experiment
from aiosmtpd.controller import Controller
from analysis_eventlog import build_log
from sqlalchemy import update

from abrec.cli import main
from abrec.db import session_factory, session_scope

REPORT = {
    "experiment": {"key": "home", "control": "control"},
    "phase": {"number": 1},
    "date": "2026-03-31",
    "decision": {"verdict": "keep running", "arm": None, "reasons": []},
    "arms": {
        "control": {"users": 100, "ctr": 0.05, "rel_lift": None},
        "treatment": {"users": 101, "ctr": 0.055, "rel_lift": 0.1, "rel_lift_ci_sequential": [-0.2, 0.4]},
    },
    "warnings": ["Too little data"],
}


@pytest.fixture
def webhook():
    """A local HTTP server that records the JSON bodies POSTed to it; answers `status`."""
    received: list[dict] = []
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(
                {"path": self.path, "type": self.headers["Content-Type"], "json": json.loads(body)}
            )
            self.send_response(state["status"])
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/abc", received, state
    server.shutdown()
    server.server_close()


@pytest.fixture
def smtp():
    """A real SMTP server (aiosmtpd) on loopback that keeps the messages it receives."""
    messages: list = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
            messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield delivery.SmtpSettings(host="127.0.0.1", port=port, sender="abrec@test"), messages
    controller.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webhook_gets_slack_compatible_json(webhook):
    url, received, _ = webhook
    assert delivery.deliver(REPORT, webhook_url=url) == {"webhook": "sent"}
    (hit,) = received
    assert hit["path"] == "/hooks/abc" and hit["type"] == "application/json"
    assert set(hit["json"]) == {"text", "blocks"}
    assert hit["json"]["text"].startswith("home 2026-03-31 (phase 1): KEEP RUNNING")
    assert "treatment: 101 users" in hit["json"]["text"] and "Too little data" in hit["json"]["text"]
    assert hit["json"]["blocks"][0]["text"]["type"] == "mrkdwn"


def test_email_over_smtp_with_the_html_attached(smtp):
    settings, messages = smtp
    outcome = delivery.deliver(
        REPORT, email_to="pm@example.com; ds@example.com", smtp=settings, html="<p>x</p>"
    )
    assert outcome == {"email": "sent"}
    ((rcpt, msg),) = messages
    assert rcpt == ["pm@example.com", "ds@example.com"]
    assert msg["Subject"] == "[abrec] home 2026-03-31: keep running" and msg["From"] == "abrec@test"
    parts = list(msg.walk())
    assert any(p.get_filename() == "home-2026-03-31.html" for p in parts)
    body = next(p for p in parts if p.get_content_type() == "text/plain").get_payload(decode=True).decode()
    assert "KEEP RUNNING" in body


def test_failures_are_reported_not_raised(webhook, caplog):
    url, _, state = webhook
    state["status"] = 500
    dead_smtp = delivery.SmtpSettings(host="127.0.0.1", port=closed_port(), timeout_s=2)
    outcome = delivery.deliver(REPORT, webhook_url=url, email_to="pm@example.com", smtp=dead_smtp)
    assert outcome["webhook"].startswith("failed: 500") and outcome["email"].startswith("failed:")
    assert "webhook delivery failed" in caplog.text and "e-mail delivery failed" in caplog.text
    outcome = delivery.deliver(REPORT, webhook_url=f"http://127.0.0.1:{closed_port()}/x")
    assert outcome["webhook"].startswith("failed:")


def test_cli_report_deliver_uses_the_experiment_settings(sqlite_url, webhook, smtp, monkeypatch, capsys):
    url, received, _ = webhook
    settings, messages = smtp
    log = build_log(sqlite_url)
    with session_scope(session_factory(log.engine)) as s:
        s.execute(
            update(Experiment)
            .where(Experiment.key == "home")
            .values(webhook_url=url, email_to="pm@example.com")
        )
    monkeypatch.setenv("ABREC_SMTP_HOST", settings.host)
    monkeypatch.setenv("ABREC_SMTP_PORT", str(settings.port))
    assert main(["report", "home", "--date", "2026-03-31", "--db", sqlite_url, "--deliver"]) == 0
    assert "webhook: sent" in capsys.readouterr().err
    assert received[0]["json"]["text"].startswith("home 2026-03-31 (phase 3)")
    ((_, msg),) = messages
    html = next(p for p in msg.walk() if p.get_filename()).get_payload(decode=True).decode()
    assert html.startswith("<!doctype html>")
    log.engine.dispose()


def test_summary_text_handles_missing_figures():
    text = report.summary_text(REPORT | {"arms": {"control": {"users": 0, "ctr": None, "rel_lift": None}}})
    assert "control: 0 users, CTR n/a (control)" in text
