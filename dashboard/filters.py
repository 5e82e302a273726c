"""Jinja filters that format numbers the way product managers read them: %, CIs, p-values, counts."""

from __future__ import annotations

import math
from datetime import datetime

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


def register(app: Flask) -> None:
    for f in (num, pct, signed_pct, ci, pvalue, when, ms):
        app.add_template_filter(f)
