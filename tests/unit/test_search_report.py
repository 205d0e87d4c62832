"""The search report: the HTML page (plot + tables), the Markdown summary and metrics.json."""

from __future__ import annotations

import base64
import json
import re

import pytest

from mnnpipe import report as plots
from mnnpipe.search import report
from mnnpipe.search.report import metrics_json, plot_points, render_html, render_markdown
from mnnpipe.search.select import CandidateMetrics, select
from mnnpipe.search.spec import Constraints, Objective

CANDS = [
    CandidateMetrics(id="c00", overrides={"quantize.mode": "fp16"}, size_bytes=90_000, latency_ms_p50=0.4, latency_ms_p90=0.5,
                     accuracy=0.97, reference_accuracy=0.97, fidelity=0.9999),
    CandidateMetrics(id="c01", overrides={"quantize.mode": "int8"}, size_bytes=40_000, latency_ms_p50=0.2, accuracy=0.96, reference_accuracy=0.97),
    CandidateMetrics(id="c02", overrides={"prune.target.ratio": 0.5}, size_bytes=45_000, latency_ms_p50=0.25, accuracy=0.955, reference_accuracy=0.97),
    CandidateMetrics(id="c03", overrides={"prune.target.ratio": 0.9}, size_bytes=20_000, latency_ms_p50=0.3, accuracy=0.80, reference_accuracy=0.97),
    CandidateMetrics(id="c04", overrides={"prune": None}, status="failed", error="convert: unsupported <op>"),
    CandidateMetrics(id="c05", overrides={"quantize": {"mode": "full-int8", "calibration": {"format": "sklearn-digits"}}},
                     size_bytes=60_000, latency_ms_p50=0.5, accuracy=0.90, reference_accuracy=0.97),
]
SEL = select(CANDS, Constraints(max_accuracy_drop=2.0), Objective(kind="smallest"))


def test_selection_under_test_is_as_expected():
    assert SEL.chosen == "c01" and SEL.front == ["c00", "c01", "c03"] and SEL.feasible == ["c00", "c01", "c02"]
    assert "c05" not in SEL.front and "c05" not in SEL.feasible  # c02 dominates it, and it is too inaccurate


def test_plot_points_put_each_candidate_in_its_series_legend_order():
    points = plot_points(CANDS, SEL)
    assert [(p["label"], p["series"]) for p in points] == [
        ("c00", "feasible, on front"), ("c01", "feasible, on front"), ("c02", "feasible, off front"),
        ("c03", "infeasible, on front"), ("c05", "infeasible, off front"),
    ]
    c01 = points[1]
    assert c01["size_bytes"] == 40_000 and c01["latency_ms"] == 0.2 and c01["note"] == "top-1 96.0% -1.0 pp"
    assert points[0]["note"] == "top-1 97.0% +0.0 pp"  # no drop is +0.0, not -0.0


def test_every_series_has_a_fixed_style_and_feasibility_and_the_front_look_different():
    assert set(report.STYLES) == set(report.SERIES)
    looks = {(s["marker"], s["color"], s["filled"]) for s in report.STYLES.values()}
    assert len(looks) == 4
    st = report.STYLES
    # colour and shape: feasible or not; fill: on the front or off it
    assert st["feasible, on front"]["filled"] and not st["feasible, off front"]["filled"]
    assert st["infeasible, on front"]["filled"] and not st["infeasible, off front"]["filled"]
    assert st["feasible, off front"]["color"] != st["infeasible, off front"]["color"]
    assert st["feasible, off front"]["marker"] != st["infeasible, off front"]["marker"]


def test_html_has_every_id_the_legend_the_image_and_the_reason():
    page = render_html(CANDS, SEL, title="digits search")
    for cid in ("c00", "c01", "c02", "c03", "c04", "c05"):
        assert f"<td>{cid}" in page
    assert "<td>c01 (chosen)</td>" in page
    assert report.LEGEND_NOTE in page
    assert "<td>quantize=on</td>" in page and "<td>prune=off</td>" in page and "calibration" not in page
    assert "Not plotted (no size or latency measured): c04." in page
    assert "failed: convert: unsupported &lt;op&gt;" in page  # escaped
    assert "accuracy drop 17.00 pp &gt; max 2 pp" in page
    assert SEL.reason.split(";")[0] in page
    png = base64.b64decode(re.search(r"src='data:image/png;base64,([^']+)'", page).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "<script" not in page and "http" not in page  # self-contained


def test_html_draws_the_series_with_their_styles_and_rings_the_chosen(monkeypatch):
    drawn = {}

    def fake_plot(points, title, **kw):
        drawn.update(points=points, title=title, **kw)
        return b"\x89PNG fake"

    monkeypatch.setattr(report, "latency_size_plot", fake_plot)
    render_html(CANDS, SEL, title="t")
    assert {p["series"] for p in drawn["points"]} == set(report.SERIES)
    assert drawn["title"] == "t: median latency vs size"
    assert drawn["styles"] == report.STYLES and drawn["highlight"] == "c01" and drawn["highlight_label"] == "chosen"


def test_markdown_is_short_and_names_the_choice():
    md = render_markdown(CANDS, SEL)
    assert md.startswith("**Chosen:** c01: smallest feasible: c01 at 40,000 B")
    lines = md.strip().splitlines()
    assert lines[2].startswith("| id | overrides | size B | p50 ms |")
    assert len(lines) == 3 + 1 + len(CANDS)  # chosen, blank, header, rule, rows
    assert '| c01 (chosen) | quantize.mode="int8" |' in md
    assert "| c05 | quantize=on |" in md and "| c04 | prune=off |" in md  # a whole section: on/off, not its settings


def test_metrics_json_is_json_and_flat_metrics_name_the_candidates():
    doc = json.loads(json.dumps(metrics_json(CANDS, SEL)))
    assert doc["chosen"] == "c01" and doc["front"] == SEL.front and doc["reason"] == SEL.reason
    assert [c["id"] for c in doc["candidates"]] == ["c00", "c01", "c02", "c03", "c04", "c05"]
    assert doc["candidates"][5]["overrides"]["quantize"]["mode"] == "full-int8"  # the record keeps the whole section
    assert doc["candidates"][3]["feasible"] is False and doc["candidates"][3]["on_front"] is True
    assert doc["candidates"][4]["violations"] == ["failed: convert: unsupported <op>"]
    m = doc["metrics"]
    assert m["c01/size_bytes"] == 40_000 and m["c01/p50_ms"] == 0.2 and m["c01/accuracy"] == 0.96
    assert m["chosen/size_bytes"] == 40_000 and m["chosen/drop_pp"] == m["c01/drop_pp"]
    assert "c04/size_bytes" not in m and m["candidates"] == 6 and m["feasible"] == 3
    assert all(isinstance(v, float) for v in m.values())


def test_no_choice_still_renders():
    sel = select(CANDS, Constraints(max_size_bytes=1000), Objective())
    assert sel.chosen is None and sel.closest
    page = render_html(CANDS, sel, title="nothing fits")
    assert "Closest to feasible" in page and "<td>none</td>" in page
    assert {p["series"] for p in plot_points(CANDS, sel)} <= {"infeasible, on front", "infeasible, off front"}
    assert metrics_json(CANDS, sel)["closest"][0]["id"] == sel.closest[0].id
    assert render_markdown(CANDS, sel).startswith("**Chosen:** none: no candidate meets the constraints")


# The demo's 6-candidate search (sizes 12-100 KB, latencies 8-16 µs), whose labels used to collide.
DEMO = [
    ("c00", 31_000, 0.0158, "feasible, on front"), ("c01", 99_852, 0.0112, "feasible, on front"),
    ("c02", 20_660, 0.0153, "feasible, on front"), ("c03", 59_100, 0.0095, "feasible, on front"),
    ("c04", 12_672, 0.0108, "infeasible, on front"), ("c05", 27_808, 0.0082, "infeasible, on front"),
]


def drawn_figure(monkeypatch, points, **kw):
    """Draw `points` and return the Figure latency_size_plot saved."""
    from matplotlib.figure import Figure

    saved = {}
    real = Figure.savefig

    def savefig(fig, *a, **k):
        saved["fig"] = fig
        return real(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    png = plots.latency_size_plot(points, **kw)
    assert png.startswith(b"\x89PNG")
    return saved["fig"]


def test_plot_labels_overlap_nothing_and_stay_inside_the_axes(monkeypatch):
    points = [{"label": i, "size_bytes": b, "latency_ms": ms, "series": s, "note": "top-1 97.2% -0.8 pp"} for i, b, ms, s in DEMO]
    fig = drawn_figure(monkeypatch, points, title="recipe search 4a5989038c55f0f (6 candidates): median latency vs size",
                       styles=report.STYLES, highlight="c02")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    texts = {t.get_text().split("\n")[0]: t for t in ax.texts}
    assert sorted(texts) == ["c00", "c01", "c02 (chosen)", "c03", "c04", "c05"]  # every label whole, the chosen named
    from matplotlib.text import Text

    boxes = {k: Text.get_window_extent(t, renderer) for k, t in texts.items()}  # the text, without its leader line
    inside = ax.bbox
    for k, b in boxes.items():
        assert inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1, k
        assert not b.overlaps(ax.title.get_window_extent(renderer)), k
        for other, c in boxes.items():
            assert k == other or not b.overlaps(c), (k, other)
        for i, size, ms, _ in DEMO:  # no label covers a marker
            x, y = ax.transData.transform((size / 1e3, ms * 1e3))
            assert not b.contains(x, y), (k, i)
    assert ax.get_xlabel() == "size on disk (KB)" and ax.get_ylabel() == "median latency (µs)"
    # nothing cut off at the figure's edges: the y label, the tick labels and the legend fit
    for artist in (ax.yaxis.label, ax.xaxis.label, ax.get_legend()):
        b = artist.get_window_extent(renderer)
        assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= fig.bbox.x1 and b.y1 <= fig.bbox.y1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["feasible, on front", "infeasible, on front", "chosen"]


def test_plot_styles_are_by_series_name_not_by_order(monkeypatch):
    def looks(points):
        fig = drawn_figure(monkeypatch, points, styles=report.STYLES)
        ax = fig.axes[0]
        return {c.get_label(): (tuple(c.get_edgecolor()[0]), tuple(c.get_facecolor()[0])) for c in ax.collections}

    front = {"label": "a", "size_bytes": 1000, "latency_ms": 1.0, "series": "feasible, on front"}
    off = {"label": "b", "size_bytes": 2000, "latency_ms": 2.0, "series": "infeasible, off front"}
    both, alone = looks([front, off]), looks([off])
    assert both["infeasible, off front"] == alone["infeasible, off front"]
    edge, face = alone["infeasible, off front"]
    assert face == (1.0, 1.0, 1.0, 1.0) and edge != face  # hollow: white inside, coloured edge
    assert both["feasible, on front"][0] == both["feasible, on front"][1]  # filled


@pytest.mark.parametrize(
    "largest, unit, scaled",
    [(512, "B", 512), (20_660, "KB", 20.66), (99_852, "KB", 99.852), (3_500_000, "MB", 3.5), (2_000_000_000, "GB", 2.0)],
)
def test_plot_size_unit_follows_the_data(monkeypatch, largest, unit, scaled):
    fig = drawn_figure(monkeypatch, [{"label": "m", "size_bytes": largest, "latency_ms": 2.0}])
    ax = fig.axes[0]
    assert ax.get_xlabel() == f"size on disk ({unit})"
    assert ax.collections[0].get_offsets()[0][0] == pytest.approx(scaled)


def test_plot_keeps_the_benchmark_arguments_and_fixed_units(monkeypatch):
    # The benchmark step's points: size_mb, several thread series sharing labels, no styles.
    points = [{"label": m, "size_mb": mb, "latency_ms": ms / t, "series": f"{t} thread(s)", "note": "top-1 0.972"}
              for m, mb, ms in (("torch", 0.42, 1.9), ("mnn", 0.40, 0.21)) for t in (1, 2)]
    fig = drawn_figure(monkeypatch, points, title="Median latency vs size (batch 1)")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "size on disk (KB)" and ax.get_ylabel() == "median latency (ms)"
    markers = {c.get_label(): c.get_paths()[0].vertices.shape for c in ax.collections}
    assert list(markers) == ["1 thread(s)", "2 thread(s)"] and len(set(markers.values())) == 2  # a marker per series
    fig = drawn_figure(monkeypatch, points, x_unit="MB", y_unit="µs", fontsize=11)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "size on disk (MB)" and ax.get_ylabel() == "median latency (µs)"
    assert ax.texts[0].get_fontsize() == 11
    with pytest.raises(ValueError, match="x_unit"):
        plots.latency_size_plot(points, x_unit="KiB")
