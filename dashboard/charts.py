"""Plotly figures of the dashboard, rendered as <div>s that use the app's own copy of plotly.js."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup

# One colour per arm position, control first (grey), so an arm keeps its colour on every chart.
ARM_COLOURS = ["#64748b", "#2563eb", "#e11d48", "#059669", "#d97706", "#7c3aed", "#0891b2"]
CONFIG = {"displaylogo": False, "responsive": True,
          "modeBarButtonsToRemove": ["lasso2d", "select2d", "autoScale2d"]}


def colour(position: int) -> str:
    return ARM_COLOURS[position % len(ARM_COLOURS)]


def _fill(hex_colour: str, alpha: float = 0.15) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def layout(fig: go.Figure, title: str, y_title: str, x_title: str = "", *, percent: bool = False,
           height: int = 340) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 15}},
        height=height,
        margin={"l": 60, "r": 20, "t": 48, "b": 44},
        template="plotly_white",
        legend={"orientation": "h", "y": -0.18},
        hovermode="x unified",
        font={"family": "system-ui, sans-serif", "size": 12},
    )
    fig.update_yaxes(title_text=y_title, tickformat=".1%" if percent else None, zeroline=True)
    fig.update_xaxes(title_text=x_title)
    return fig


def render(fig: go.Figure, div_id: str) -> Markup:
    html = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG)
    return Markup(html)


def band(fig: go.Figure, x: Sequence, lo: Sequence, hi: Sequence, colour_hex: str, name: str) -> None:
    """A shaded CI band: the upper bound, then the lower one filled up to it."""
    fig.add_trace(go.Scatter(x=list(x), y=list(hi), mode="lines", line={"width": 0}, showlegend=False,
                             hoverinfo="skip", legendgroup=name))
    fig.add_trace(go.Scatter(x=list(x), y=list(lo), mode="lines", line={"width": 0}, fill="tonexty",
                             fillcolor=_fill(colour_hex), name=f"{name} 95% CI", legendgroup=name,
                             hoverinfo="skip"))


def offline_metrics(view, metric) -> go.Figure:
    """Recall@20 and MRR@20 of every registered version, grouped by version."""
    labels, recall, mrr = [], [], []
    for versions in view.versions_by_model.values():
        for v in sorted(versions, key=lambda v: v.version):
            labels.append(v.label)
            recall.append(metric(v, "recall@20")[0])
            mrr.append(metric(v, "mrr@20")[0])
    fig = go.Figure([
        go.Bar(name="Recall@20", x=labels, y=recall, marker_color="#2563eb",
               text=[f"{r:.3f}" if r is not None else "" for r in recall], textposition="outside"),
        go.Bar(name="MRR@20", x=labels, y=mrr, marker_color="#059669",
               text=[f"{m:.3f}" if m is not None else "" for m in mrr], textposition="outside"),
    ])
    fig.update_layout(barmode="group")
    layout(fig, "Offline metrics per version (held-out sessions)", "score", height=320)
    fig.update_layout(hovermode="closest")
    return fig


def offline_vs_online(arms) -> go.Figure:
    """Each arm's online CTR against the offline Recall@20 of the version behind it."""
    from abrec.dashboard.data import metric

    fig = go.Figure()
    for a in arms:
        if a.ctr is None or a.version is None:
            continue
        recall = metric(a.version, "recall@20")[0]
        if recall is None:
            continue
        fig.add_trace(go.Scatter(
            x=[recall], y=[a.ctr], mode="markers+text", name=f"{a.experiment_key} · {a.arm}",
            text=[f"{a.arm} ({a.version.label})"], textposition="top center",
            marker={"size": 13, "color": colour(a.position)},
            hovertemplate="Recall@20 %{x:.3f}<br>CTR %{y:.2%}<extra>%{fullData.name}</extra>",
        ))
    layout(fig, "Offline Recall@20 against online CTR", "online CTR",
           "offline Recall@20 (version now behind the alias)", percent=True, height=320)
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig
