"""Plotly figures of the dashboard, rendered as <div>s that use the app's own copy of plotly.js."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup

# One colour per arm position, control first (grey), so an arm keeps its colour on every chart.
ARM_COLOURS = ["#64748b", "#2563eb", "#e11d48", "#059669", "#d97706", "#7c3aed", "#0891b2"]
# Drag to zoom and double-click to reset still work; the toolbar only hid chart titles.
CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": False}


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
        margin={"l": 60, "r": 20, "t": 48, "b": 70 if x_title else 44},
        # A tiny template and explicit styling: copying a full template costs ~70 ms per figure.
        template="none",
        plot_bgcolor="white",
        paper_bgcolor="white",
        legend={"orientation": "h", "y": -0.3 if x_title else -0.18},
        hovermode="x unified",
        font={"family": "system-ui, sans-serif", "size": 12},
    )
    grid = {"showgrid": True, "gridcolor": "#e5e7eb", "linecolor": "#cbd5e1", "zerolinecolor": "#cbd5e1",
            "automargin": True}
    fig.update_yaxes(title_text=y_title, tickformat=".1%" if percent else None, zeroline=True, **grid)
    fig.update_xaxes(title_text=x_title, **grid)
    return fig


def daily_axis(fig: go.Figure) -> go.Figure:
    """Calendar days on the x axis: one tick a day, no hours (a short experiment would show 06:00...)."""
    fig.update_xaxes(type="date", tickformat="%b %-d", dtick=86_400_000)
    return fig


def render(fig: go.Figure, div_id: str) -> Markup:
    html = pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG)
    return Markup(html)


def warm_up() -> None:
    """Build and render one figure, so that Plotly's lazy imports happen at start, not on a page view."""
    render(layout(go.Figure([go.Scatter(x=[0], y=[0]), go.Bar(x=[0], y=[0])]), "", ""), "warm-up")


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
    xs, ys = [], []
    for a in arms:
        if a.ctr is None or a.version is None:
            continue
        recall = metric(a.version, "recall@20")[0]
        if recall is None:
            continue
        xs.append(recall)
        ys.append(a.ctr)
        fig.add_trace(go.Scatter(
            x=[recall], y=[a.ctr], mode="markers+text", name=f"{a.experiment_key} · {a.arm}",
            text=[a.arm], textposition="top center", cliponaxis=False,
            marker={"size": 13, "color": colour(a.position)},
            hovertemplate=f"{a.experiment_key} · {a.arm} ({a.version.label})<br>"
            "Recall@20 %{x:.3f}<br>CTR %{y:.2%}<extra></extra>",
        ))
    layout(fig, "Offline Recall@20 against online CTR", "online CTR",
           "offline Recall@20 (version now behind the alias)", percent=True, height=320)
    fig.update_layout(hovermode="closest", showlegend=False)
    if xs:  # room around the points for their labels
        pad_x = max(0.1 * (max(xs) - min(xs)), 0.005)
        pad_y = max(0.15 * (max(ys) - min(ys)), 0.001)
        fig.update_xaxes(range=[min(xs) - pad_x, max(xs) + pad_x])
        fig.update_yaxes(range=[min(ys) - pad_y, max(ys) + pad_y])
    return fig


# ---------------------------------------------------------------------------------------------
# Experiment page: one phase over time


def cumulative_lift(views) -> go.Figure:
    """Each treatment's cumulative relative lift with its always-valid 95% band, day by day."""
    fig = go.Figure()
    for position, arm in enumerate(views.arms):
        points = [p for p in views.cumulative_lift if p.arm == arm]
        if not points:
            continue
        x = [p.key for p in points]
        lo = [p.rel_lift_ci_sequential[0] for p in points]
        hi = [p.rel_lift_ci_sequential[1] for p in points]
        band(fig, x, lo, hi, colour(position), arm)
        fig.add_trace(go.Scatter(
            x=x, y=[p.rel_lift for p in points], mode="lines+markers", name=arm, legendgroup=arm,
            line={"color": colour(position), "width": 2.5},
            customdata=[[*p.rel_lift_ci_sequential] for p in points],
            hovertemplate=f"{arm}: %{{y:+.1%}} "
            "[%{customdata[0]:+.1%}, %{customdata[1]:+.1%}]<extra></extra>",
        ))
    fig.add_hline(y=0, line={"color": "#334155", "width": 1})
    fig = layout(fig, f"Cumulative lift over {views.control} (95% always-valid band)", "relative CTR lift",
                 percent=True)
    # The first days' bands are very wide; scale the axis to the later ones so the trend stays readable.
    days = sorted({p.key for p in views.cumulative_lift})
    later = [p for p in views.cumulative_lift if p.key >= days[len(days) // 3]]
    lo = min(0.0, *(p.rel_lift_ci_sequential[0] for p in later), *(p.rel_lift for p in views.cumulative_lift))
    hi = max(0.0, *(p.rel_lift_ci_sequential[1] for p in later), *(p.rel_lift for p in views.cumulative_lift))
    pad = 0.1 * (hi - lo) or 0.05
    fig.update_yaxes(range=[lo - pad, hi + pad])
    return daily_axis(fig)


def daily_ctr(views) -> go.Figure:
    fig = go.Figure()
    for position, arm in enumerate(views.arms):
        points = [d for d in views.daily_ctr if d.arm == arm and d.ctr is not None]
        if points:
            fig.add_trace(go.Scatter(
                x=[d.key for d in points], y=[d.ctr for d in points], mode="lines+markers", name=arm,
                line={"color": colour(position), "width": 2},
                hovertemplate=f"{arm}: %{{y:.2%}}<extra></extra>",
            ))
    return daily_axis(layout(fig, "Daily CTR per arm", "CTR (clicks / impressions)", percent=True))


def novelty(views) -> go.Figure:
    """Lift on the k-th day after a user's first exposure: a fading lift means a novelty effect."""
    fig = go.Figure()
    for position, arm in enumerate(views.arms):
        points = [p for p in views.novelty if p.arm == arm]
        if not points:
            continue
        fig.add_trace(go.Scatter(
            x=[p.key for p in points], y=[p.rel_lift for p in points], mode="lines+markers", name=arm,
            line={"color": colour(position)},
            error_y={"type": "data", "symmetric": False,
                     "array": [p.rel_lift_ci[1] - p.rel_lift for p in points],
                     "arrayminus": [p.rel_lift - p.rel_lift_ci[0] for p in points]},
            hovertemplate=f"{arm}, day %{{x}}: %{{y:+.1%}}<extra></extra>",
        ))
    fig.add_hline(y=0, line={"color": "#334155", "width": 1})
    fig = layout(fig, "Lift by days since first exposure (95% CI)", "relative CTR lift",
                 "days since the user's first exposure", percent=True)
    fig.update_xaxes(dtick=1)
    return fig


def users_vs_expected(views) -> go.Figure:
    arms = views.arms
    fig = go.Figure([
        go.Bar(x=arms, y=[views.users[a] for a in arms], name="users exposed",
               marker_color=[colour(i) for i in range(len(arms))],
               text=[f"{views.users[a]:,.0f}" for a in arms], textposition="inside"),
        go.Scatter(x=arms, y=[views.expected_users[a] for a in arms], mode="markers",
                   name="expected from weights",
                   marker={"symbol": "line-ew", "size": 40, "line": {"width": 3, "color": "#0f172a"}}),
    ])
    p = views.srm_p_value
    verdict = "no data" if p is None else ("MISMATCH" if p < 0.001 else "ok")
    p_text = "" if p is None else f", p = {p:.3g}" if p >= 0.001 else ", p < 0.001"
    fig = layout(fig, f"Users per arm against the weights (SRM {verdict}{p_text})", "users")
    fig.update_layout(hovermode="closest")
    return fig


def power_progress(progress) -> go.Figure:
    """Users so far against users needed to detect the target lift with 80% power."""
    needed = progress.users_needed
    fig = go.Figure(go.Bar(
        y=["needed", "so far"], x=[needed, progress.users_so_far], orientation="h",
        marker_color=["#cbd5e1", "#2563eb"], text=[f"{needed:,.0f}", f"{progress.users_so_far:,.0f}"],
        textposition="auto", hovertemplate="%{y}: %{x:,.0f} users<extra></extra>",
    ))
    share = progress.users_so_far / needed if needed else 0
    fig = layout(fig, f"Sample for a {progress.target_effect:+.0%} lift: {min(share, 1):.0%} reached", "",
                 "users (all arms)", height=220)
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig


def serving_latency(views) -> go.Figure:
    days = sorted(views.health)
    fig = go.Figure()
    for position, arm in enumerate(views.arms):
        rows = [(d, views.health[d][arm]) for d in days if arm in views.health[d]]
        for label, attr, dash in (("p50", "latency_p50_ms", "solid"), ("p99", "latency_p99_ms", "dot")):
            points = [(d, getattr(h, attr)) for d, h in rows if getattr(h, attr) is not None]
            if points:
                fig.add_trace(go.Scatter(
                    x=[d for d, _ in points], y=[v for _, v in points], mode="lines+markers",
                    name=f"{arm} {label}", line={"color": colour(position), "dash": dash},
                    hovertemplate=f"{arm} {label}: %{{y:.1f}} ms<extra></extra>",
                ))
    return daily_axis(layout(fig, "Serving latency per arm (p50 solid, p99 dotted)", "milliseconds"))


def fallback_rate(views) -> go.Figure:
    days = sorted(views.health)
    fig = go.Figure()
    for position, arm in enumerate(views.arms):
        rows = [(d, views.health[d][arm].fallback_rate) for d in days if arm in views.health[d]]
        rows = [(d, r) for d, r in rows if r is not None]
        if rows:
            fig.add_trace(go.Bar(x=[d for d, _ in rows], y=[r for _, r in rows], name=arm,
                                 marker_color=colour(position),
                                 hovertemplate=f"{arm}: %{{y:.2%}}<extra></extra>"))
    fig = layout(fig, "Fallback rate per arm (popular items served instead of the model)",
                 "share of impressions", percent=True)
    fig.update_layout(barmode="group")
    return daily_axis(fig)
