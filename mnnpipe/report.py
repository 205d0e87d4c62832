"""Reports people look at: Markdown tables, and an HTML page with a latency-vs-size plot.

Plain functions over plain rows (lists of dicts), so the benchmark step and the benchmark
scripts under benchmarks/ share them. The plot is drawn with matplotlib's Agg backend (no
display) and embedded in the HTML as a base64 PNG, so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import os
import platform
from typing import Any, Sequence

__all__ = ["format_value", "html_report", "latency_size_plot", "machine_info", "markdown_table"]


def machine_info() -> dict[str, Any]:
    """CPU model name (as lscpu prints it, from /proc/cpuinfo) and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version()}


def format_value(v: Any) -> str:
    """Numbers with sensible precision; None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; columns default to the first row's keys, in order."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_value(r.get(c)).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def latency_size_plot(points: Sequence[dict[str, Any]], title: str = "Latency vs size") -> bytes:
    """PNG bytes: one marker per point {label, size_mb, latency_ms, series, note}.

    `series` groups markers (e.g. "1 thread"); `note` (e.g. "top-1 0.97") is written next to
    the marker so accuracy is visible without a third axis.

    Drawn on a bare Figure with the Agg canvas: importing pyplot (its backend machinery) and
    `tight_layout` (a text-extent solve) cost more than the drawing itself (measured 1.5 s -> see
    benchmarks/results/scaling.md); fixed margins and a small figure keep it cheap.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=90)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    ax = fig.add_subplot()
    series: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        series.setdefault(str(p.get("series", "")), []).append(p)
    markers = "osD^vP*X"
    for i, (name, pts) in enumerate(series.items()):
        ax.scatter([p["size_mb"] for p in pts], [p["latency_ms"] for p in pts], marker=markers[i % len(markers)], s=50, label=name or None)
        for p in pts:
            text = p["label"] + (f"\n{p['note']}" if p.get("note") else "")
            ax.annotate(text, (p["size_mb"], p["latency_ms"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    widest = max((p["size_mb"] for p in points), default=0)
    ax.set_xlim(0, widest * 1.2 if widest > 0 else None)  # room for the labels right of the markers
    ax.set_ylim(bottom=0)
    if any(series):
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(
    title: str,
    tables: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    png: bytes | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A self-contained HTML page: the plot (embedded base64 PNG) first, then the tables."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    if png:
        parts.append(f"<img alt='latency vs size' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    for heading, rows in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_html_table(rows)}")
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
