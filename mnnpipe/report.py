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


#: Size units (decimal: 1 KB = 1000 B), smallest first; the plot picks the largest unit in which
#: the biggest size is at least 1, so a 20 KB model reads 20, not 0.02.
SIZE_UNITS = {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9}
#: Latency units, as multiples of a millisecond.
TIME_UNITS = {"µs": 1e-3, "ms": 1.0, "s": 1e3}
#: Markers given to series without a style, in order of first appearance (and their colours).
_MARKERS = "osD^vP*X"
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
#: Marker area and the highlight ring's, in points^2 (matplotlib's scatter `s`).
_MARKER_SIZE, _RING = 55, 330


def _size_unit(largest_bytes: float, unit: str) -> tuple[str, float]:
    if unit != "auto":
        if unit not in SIZE_UNITS:
            raise ValueError(f"x_unit: expected auto or one of {list(SIZE_UNITS)}, got {unit!r}")
        return unit, SIZE_UNITS[unit]
    name = "B"
    for n, scale in SIZE_UNITS.items():
        if largest_bytes >= scale:
            name = n
    return name, SIZE_UNITS[name]


def _time_unit(largest_ms: float, unit: str) -> tuple[str, float]:
    if unit != "auto":
        if unit not in TIME_UNITS:
            raise ValueError(f"y_unit: expected auto or one of {list(TIME_UNITS)}, got {unit!r}")
        return unit, TIME_UNITS[unit]
    name = "µs" if 0 < largest_ms < 1 else ("s" if largest_ms >= 10_000 else "ms")
    return name, TIME_UNITS[name]


def _size_bytes(p: dict[str, Any]) -> float:
    return float(p["size_bytes"]) if p.get("size_bytes") is not None else float(p["size_mb"]) * 1e6


#: Overlap (in square pixels) below which a label's place counts as free: float noise at touching edges.
_FREE = 1.0


def _overlap(a: Any, b: Any) -> float:
    """Area two display-space boxes share (0 when apart)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(ax: Any, renderer: Any, labelled: list[tuple[int, tuple[float, float], str]], obstacles: list[Any], fontsize: float) -> None:
    """Annotate each (index, xy, text) at the first offset around its marker (obstacles[index]),
    nearest first, where the text overlaps no marker, no label or leader line placed before it,
    its own leader line crosses no other marker or label, and it stays inside the axes. Where no
    offset is free, the first line alone (the point's name) is tried the same way; failing that,
    the offset with the least overlap is taken. A label set away from its marker gets a thin
    leader line to it."""
    from matplotlib.path import Path
    from matplotlib.transforms import Bbox

    inside = ax.bbox
    placed: list[Any] = []
    leaders: list[Any] = []
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)]
    offsets = [(d, dx * d, dy * d) for d in (7, 14, 24, 36) for dx, dy in directions]
    for index, xy, full in labelled:
        others = obstacles[:index] + obstacles[index + 1 :]
        mx, my = ax.transData.transform(xy)
        best: tuple[float, int, float, float, str, str, str, Any, Any] | None = None
        texts = [full] if "\n" not in full else [full, full.split("\n", 1)[0]]
        for text in texts:
            for dist, dx, dy in offsets:
                ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
                va = "bottom" if dy > 0 else ("top" if dy < 0 else "center")
                probe = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                                    multialignment="center" if ha == "center" else "left")
                box = Bbox(probe.get_window_extent(renderer).padded(2).get_points())
                probe.remove()
                outside = box.width * box.height - _overlap(box, inside)
                # Past the axes the label runs into the title, the tick labels or the legend.
                cost = sum(_overlap(box, o) for o in obstacles + placed) + 4 * outside
                cost += sum(400.0 for line in leaders if line.intersects_bbox(box))
                leader = None
                if dist > 7:  # the line from the marker to the nearest point of the label
                    end = (min(max(mx, box.x0), box.x1), min(max(my, box.y0), box.y1))
                    leader = Path([(mx, my), end])
                    cost += sum(400.0 for o in others + placed if leader.intersects_bbox(o))
                if best is None or cost < best[0]:
                    best = (cost, dist, dx, dy, ha, va, text, box, leader)
                if cost < _FREE:
                    break
            if best is not None and best[0] < _FREE:
                break
        assert best is not None
        _, dist, dx, dy, ha, va, text, box, leader = best
        ax.annotate(
            text, xy, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
            multialignment="center" if ha == "center" else "left",
            arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.7, "shrinkA": 1, "shrinkB": 4} if leader is not None else None,
        )
        placed.append(box)
        if leader is not None:
            leaders.append(leader)


def latency_size_plot(
    points: Sequence[dict[str, Any]],
    title: str = "Latency vs size",
    *,
    styles: dict[str, dict[str, Any]] | None = None,
    highlight: str | None = None,
    highlight_label: str = "chosen",
    x_unit: str = "auto",
    y_unit: str = "auto",
    fontsize: float = 9.0,
) -> bytes:
    """PNG bytes: one marker per point {label, size_bytes (or size_mb), latency_ms, series, note}.

    `series` groups markers (e.g. "1 thread(s)"); `note` (e.g. "top-1 0.97") is written under the
    label so accuracy is visible without a third axis. Labels are set around their marker where
    they cover no other marker or label and stay inside the axes (so clear of the title).

    styles: per series name, {"marker": "o", "color": "#1f77b4", "filled": True, "size": 55}
    (filled False: a hollow marker; size: area in points^2); a series
    without one gets the next marker and colour in order of appearance, so a caller that names
    its series' styles gets the same look in every report whatever series are present.
    highlight: the label of a point to ring (legend entry `highlight_label`).
    x_unit: "auto" (B, KB, MB or GB from the largest size) or one of SIZE_UNITS; y_unit: "auto" (µs
    below 1 ms, s from 10 s) or one of TIME_UNITS. fontsize: of labels, ticks and legend (the
    title is 2 pt larger).

    Drawn on a bare Figure with the Agg canvas: importing pyplot (its backend machinery) and
    `tight_layout` (a text-extent solve) cost more than the drawing itself (measured 1.5 s -> see
    benchmarks/results/scaling.md); the margins are measured from the few texts that need them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.transforms import Bbox

    pts = [dict(p, _x=_size_bytes(p), _y=float(p["latency_ms"]), _ring=highlight is not None and p["label"] == highlight) for p in points]
    xname, xscale = _size_unit(max((p["_x"] for p in pts), default=0.0), x_unit)
    yname, yscale = _time_unit(max((p["_y"] for p in pts), default=0.0), y_unit)
    for p in pts:
        p["_x"] /= xscale
        p["_y"] /= yscale

    fig = Figure(figsize=(7.5, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series: dict[str, list[dict[str, Any]]] = {}
    for p in pts:
        series.setdefault(str(p.get("series", "")), []).append(p)
    unstyled = 0
    for name, members in series.items():
        style = (styles or {}).get(name)
        if style is None:
            style = {"marker": _MARKERS[unstyled % len(_MARKERS)], "color": _COLOURS[unstyled % len(_COLOURS)]}
            unstyled += 1
        colour, filled = style.get("color", "#1f77b4"), style.get("filled", True)
        for p in members:
            p["_s"] = style.get("size", _MARKER_SIZE)
        ax.scatter(
            [p["_x"] for p in members], [p["_y"] for p in members], marker=style.get("marker", "o"), s=style.get("size", _MARKER_SIZE),
            facecolors=colour if filled else "white", edgecolors=colour, linewidths=1.6, label=name or None, zorder=3, clip_on=False,
        )
    ringed = [p for p in pts if p["_ring"]]
    if ringed:
        ax.scatter([p["_x"] for p in ringed], [p["_y"] for p in ringed], marker="o", s=_RING, facecolors="none",
                   edgecolors="black", linewidths=1.8, zorder=4, clip_on=False)
    ax.set_xlabel(f"size on disk ({xname})", fontsize=fontsize + 1)
    ax.set_ylabel(f"median latency ({yname})", fontsize=fontsize + 1)
    ax.set_title(title, fontsize=fontsize + 2)
    ax.tick_params(labelsize=fontsize)
    ax.grid(True, alpha=0.3)
    widest = max((p["_x"] for p in pts), default=0.0)
    slowest = max((p["_y"] for p in pts), default=0.0)
    ax.set_xlim(0, widest * 1.2 if widest > 0 else 1)  # headroom for the labels beside the markers
    ax.set_ylim(0, slowest * 1.2 if slowest > 0 else 1)
    handles, labels = ax.get_legend_handles_labels()
    if ringed:
        handles.append(Line2D([], [], marker="o", markersize=13, markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.8, linestyle="none"))
        labels.append(highlight_label)
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=fontsize, frameon=False,
                       handletextpad=0.4, labelspacing=0.9) if labels else None

    # Margins from what sits outside the axes (tick labels, axis labels, title, legend), measured
    # once: the axes then fill the rest, and nothing is cut off at the figure's edge.
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    pad = 8.0
    left = ax.bbox.x0 - ax.yaxis.get_tightbbox(renderer).x0 + pad
    bottom = ax.bbox.y0 - ax.xaxis.get_tightbbox(renderer).y0 + pad
    top = ax.title.get_window_extent(renderer).height + 2 * pad
    right = (legend.get_window_extent(renderer).width + 0.02 * ax.bbox.width + 2 * pad) if legend else 3 * pad
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)

    # Each marker (its ring, when ringed) is an obstacle for the labels: radius in pixels from
    # the marker's area in points^2.
    px = fig.dpi / 72.0
    obstacles = []
    for p in pts:
        x, y = ax.transData.transform((p["_x"], p["_y"]))
        r = ((_RING if p["_ring"] else p["_s"]) ** 0.5 / 2 + 1) * px
        obstacles.append(Bbox([[x - r, y - r], [x + r, y + r]]))
    # The ringed point first, then the most crowded (most markers near it) while room is left.
    near = [sum(abs(a.x0 - b.x0) < 80 and abs(a.y0 - b.y0) < 40 for b in obstacles) for a in obstacles]
    order = sorted(range(len(pts)), key=lambda i: (not pts[i]["_ring"], -near[i]))
    labelled = []
    for i in order:
        p = pts[i]
        text = str(p["label"]) + (f" ({highlight_label})" if p["_ring"] else "")
        labelled.append((i, (p["_x"], p["_y"]), text + (f"\n{p['note']}" if p.get("note") else "")))
    _place_labels(ax, renderer, labelled, obstacles, fontsize)
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
