"""Delivery of a report: a Slack-compatible webhook and e-mail over SMTP, as configured per experiment.

A failed delivery is logged and reported back, never raised: the report is already stored, and
one unreachable chat server must not stop the other experiments' nightly runs.

SMTP settings are `abrec.config.SmtpSettings` (ABREC_SMTP_HOST, ABREC_SMTP_PORT, ABREC_SMTP_USER,
ABREC_SMTP_PASSWORD, ABREC_SMTP_STARTTLS, ABREC_SMTP_FROM).
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any

import requests
from abrec.analysis.report import summary_text

from abrec.config import SmtpSettings

log = logging.getLogger(__name__)


def webhook_payload(report: Mapping[str, Any]) -> dict[str, Any]:
    """Slack incoming-webhook JSON: `text` for notifications and clients without blocks, plus blocks."""
    text = summary_text(report)
    return {
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": f"```{text}```"}}],
    }


def post_webhook(url: str, report: Mapping[str, Any], timeout_s: float = 10.0) -> None:
    """POST the payload; raises on a network error or a non-2xx answer."""
    response = requests.post(url, json=webhook_payload(report), timeout=timeout_s)
    response.raise_for_status()


def email_message(
    recipients: list[str], report: Mapping[str, Any], sender: str, html: str | None = None
) -> EmailMessage:
    """Plain-text summary, with the standalone HTML report attached when given."""
    exp = report["experiment"]
    msg = EmailMessage()
    msg["Subject"] = f"[abrec] {exp['key']} {report['date']}: {report['decision']['verdict']}"
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg.set_content(summary_text(report) + "\n")
    if html is not None:
        msg.add_attachment(
            html.encode(), maintype="text", subtype="html", filename=f"{exp['key']}-{report['date']}.html"
        )
    return msg


def send_email(
    recipients: list[str],
    report: Mapping[str, Any],
    smtp: SmtpSettings | None = None,
    html: str | None = None,
) -> None:
    """Send over SMTP; raises on failure."""
    smtp = smtp or SmtpSettings()
    msg = email_message(recipients, report, smtp.sender, html)
    with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as server:
        if smtp.starttls:
            server.starttls()
        if smtp.user:
            server.login(smtp.user, smtp.password or "")
        server.send_message(msg)


def parse_recipients(email_to: str | None) -> list[str]:
    """`a@x, b@y` -> ['a@x', 'b@y']; empty entries dropped."""
    return [a.strip() for a in (email_to or "").replace(";", ",").split(",") if a.strip()]


def deliver(
    report: Mapping[str, Any],
    webhook_url: str | None = None,
    email_to: str | None = None,
    smtp: SmtpSettings | None = None,
    html: str | None = None,
) -> dict[str, str]:
    """Send to every configured channel; returns {channel: "sent" | "failed: why"}. Never raises."""
    outcome: dict[str, str] = {}
    key = report["experiment"]["key"]
    if webhook_url:
        try:
            post_webhook(webhook_url, report)
            outcome["webhook"] = "sent"
        except Exception as exc:  # a delivery failure must not end the run
            log.error("report %s %s: webhook delivery failed: %s", key, report["date"], exc)
            outcome["webhook"] = f"failed: {exc}"
    recipients = parse_recipients(email_to)
    if recipients:
        try:
            send_email(recipients, report, smtp, html)
            outcome["email"] = "sent"
        except Exception as exc:
            log.error("report %s %s: e-mail delivery failed: %s", key, report["date"], exc)
            outcome["email"] = f"failed: {exc}"
    return outcome
