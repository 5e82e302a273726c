"""Jinja filters that format numbers the way product managers read them: %, CIs, p-values, counts."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from flask import Flask

DASH = "—"


def _ok(value: float | None) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def num(value: float | None) -> str:
    """12,345 (counts)."""
    return f"{value:,.0f}" if _ok(value) else DASH


def pct(value: float | None, digits: int = 2) -> str:
    """A rate as a percentage: 0.0321 -> 3.21%."""
    return f"{100 * value:.{digits}f}%" if _ok(value) else DASH


def signed_pct(value: float | None, digits: int = 1) -> str:
    """A lift: 0.043 -> +4.3%."""
    return f"{100 * value:+.{digits}f}%" if _ok(value) else DASH


def ci(bounds: list[float | None] | tuple | None, digits: int = 1) -> str:
    """A CI of a lift: [+1.2%, +7.4%]; unbounded ends print as ∞."""
    if not bounds or len(bounds) != 2:
        return DASH
    lo, hi = bounds
    if lo is None and hi is None:
        return DASH
    left = signed_pct(lo, digits) if _ok(lo) else "−∞"
    right = signed_pct(hi, digits) if _ok(hi) else "+∞"
    return f"[{left}, {right}]"


def pvalue(value: float | None) -> str:
    if not _ok(value):
        return DASH
    if value < 0.001:
        return "< 0.001"
    return f"{value:.3f}"


def when(value: datetime | str | None) -> str:
    """UTC timestamps to the minute."""
    if value is None:
        return DASH
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def ms(value: float | None) -> str:
    return f"{value:,.1f} ms" if _ok(value) else DASH


def change(action: str, details: dict[str, Any]) -> str:
    """An audit row's details in a line: weights as percentages, arms with their aliases."""
    if action == "create" and "arms" in details:
        arms = details["arms"]
        return "arms " + ", ".join(f"{a['name']} {pct(a['weight'], 0)} ({a['model_alias']})" for a in arms)
    if action == "change_weights" and "old" in details:
        new = details.get("new", {})
        moves = ", ".join(f"{k} {pct(v, 0)} → {pct(new.get(k), 0)}" for k, v in details["old"].items())
        phase = details.get("phase")
        return moves + (f"; phase {phase}" + (", users re-randomised" if details.get("reseed") else "")
                        if phase else "")
    parts = []
    for key, value in details.items():
        if value is None or key == "seed":
            continue
        parts.append(f"{key.replace('_', ' ')} {value:.3g}" if isinstance(value, float) else
                     f"{key.replace('_', ' ')} {value}")
    return "; ".join(parts)


def register(app: Flask) -> None:
    for f in (num, pct, signed_pct, ci, pvalue, when, ms, change):
        app.add_template_filter(f)
