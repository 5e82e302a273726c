"""The audit log: one row per change to experiments, arms, users and aliases (who, when, what)."""

from __future__ import annotations

from typing import Any

from abrec.experiments.schema import AuditLog
from sqlalchemy import select
from sqlalchemy.orm import Session


def record(
    session: Session,
    actor: str,
    action: str,
    entity: str,
    entity_id: str | int,
    details: dict[str, Any] | None = None,
) -> AuditLog:
    """Add an audit row to the caller's transaction, so the change and its record commit together."""
    row = AuditLog(actor=actor, action=action, entity=entity, entity_id=str(entity_id), details=details or {})
    session.add(row)
    return row


def history(
    session: Session, entity: str | None = None, entity_id: str | int | None = None
) -> list[AuditLog]:
    """Audit rows, oldest first, optionally for one entity."""
    query = select(AuditLog).order_by(AuditLog.id)
    if entity is not None:
        query = query.where(AuditLog.entity == entity)
    if entity_id is not None:
        query = query.where(AuditLog.entity_id == str(entity_id))
    return list(session.scalars(query))
