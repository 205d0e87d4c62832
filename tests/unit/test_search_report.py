"""The search report: the HTML page (plot + tables), the Markdown summary and metrics.json."""

from __future__ import annotations

import base64
import json
import re

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
]
SEL = select(CANDS, Constraints(max_accuracy_drop=2.0), Objective(kind="smallest"))


def test_selection_under_test_is_as_expected():
    assert SEL.chosen == "c01" and SEL.front == ["c00", "c01", "c03"] and SEL.feasible == ["c00", "c01", "c02"]


def test_plot_points_put_each_candidate_in_its_series_legend_order():
    points = plot_points(CANDS, SEL)
    assert [(p["label"], p["series"]) for p in points] == [
        ("c01", "chosen"), ("c00", "Pareto front"), ("c02", "off front"), ("c03", "infeasible")
    ]
    assert points[0]["size_mb"] == 0.04 and points[0]["latency_ms"] == 0.2 and points[0]["note"] == "top-1 96.0% -1.0 pp"


def test_html_has_every_id_the_legend_the_image_and_the_reason():
    page = render_html(CANDS, SEL, title="digits search")
    for cid in ("c00", "c01", "c02", "c03", "c04"):
        assert f"<td>{cid}" in page
    assert "<td>c01 (chosen)</td>" in page
    assert "Markers: chosen, Pareto front, off front, infeasible." in page
    assert "Not plotted (no size or latency measured): c04." in page
    assert "failed: convert: unsupported &lt;op&gt;" in page  # escaped
    assert "accuracy drop 17.00 pp &gt; max 2 pp" in page
    assert SEL.reason.split(";")[0] in page
    png = base64.b64decode(re.search(r"src='data:image/png;base64,([^']+)'", page).group(1))
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "<script" not in page and "http" not in page  # self-contained


def test_html_draws_the_series_it_lists(monkeypatch):
    drawn = {}

    def fake_plot(points, title):
        drawn["points"], drawn["title"] = points, title
        return b"\x89PNG fake"

    monkeypatch.setattr(report, "latency_size_plot", fake_plot)
    render_html(CANDS, SEL, title="t")
    assert {p["series"] for p in drawn["points"]} == {"chosen", "Pareto front", "off front", "infeasible"}
    assert drawn["title"] == "t: median latency vs size"


def test_markdown_is_short_and_names_the_choice():
    md = render_markdown(CANDS, SEL)
    assert md.startswith("**Chosen:** c01: smallest feasible: c01 at 40,000 B")
    lines = md.strip().splitlines()
    assert lines[2].startswith("| id | overrides | size B | p50 ms |")
    assert len(lines) == 3 + 1 + len(CANDS)  # chosen, blank, header, rule, rows
    assert 'quantize.mode="int8"' in md


def test_metrics_json_is_json_and_flat_metrics_name_the_candidates():
    doc = json.loads(json.dumps(metrics_json(CANDS, SEL)))
    assert doc["chosen"] == "c01" and doc["front"] == SEL.front and doc["reason"] == SEL.reason
    assert [c["id"] for c in doc["candidates"]] == ["c00", "c01", "c02", "c03", "c04"]
    assert doc["candidates"][3]["feasible"] is False and doc["candidates"][3]["on_front"] is True
    assert doc["candidates"][4]["violations"] == ["failed: convert: unsupported <op>"]
    m = doc["metrics"]
    assert m["c01/size_bytes"] == 40_000 and m["c01/p50_ms"] == 0.2 and m["c01/accuracy"] == 0.96
    assert m["chosen/size_bytes"] == 40_000 and m["chosen/drop_pp"] == m["c01/drop_pp"]
    assert "c04/size_bytes" not in m and m["candidates"] == 5 and m["feasible"] == 3
    assert all(isinstance(v, float) for v in m.values())


def test_no_choice_still_renders():
    sel = select(CANDS, Constraints(max_size_bytes=1000), Objective())
    assert sel.chosen is None and sel.closest
    page = render_html(CANDS, sel, title="nothing fits")
    assert "Closest to feasible" in page and "<td>none</td>" in page
    assert "chosen" not in [p["series"] for p in plot_points(CANDS, sel)]
    assert metrics_json(CANDS, sel)["closest"][0]["id"] == sel.closest[0].id
    assert render_markdown(CANDS, sel).startswith("**Chosen:** none: no candidate meets the constraints")
