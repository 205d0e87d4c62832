"""Recipe search against the single default recipe, on the digits teacher, measured side by side.

    python benchmarks/bench_search.py [--workdir DIR] [--iterations 200] [--out benchmarks/results/search.md]

1. Trains the demo's digits teacher (mnnpipe.demo.train_teacher; cached in DIR).
2. Runs the default recipe (mnnpipe.default_recipe.DEFAULT_RECIPE) once, as the demo does.
3. Runs the demo's recipe search (default_recipe.demo_search(): 3 prune ratios x int8 or fp32,
   smallest model within 1.5 points of the teacher's top-1 and cosine >= 0.95), counting the
   steps served from the cache.
4. Measures the teacher, the default recipe's model and the search's chosen model in ONE
   benchmark step (same process layout, same data, same iterations), so the figures compare.
Printed and written: size, p50/p90 latency, top-1 and the ratios to the default recipe, with the
machine, the load average and the wall time of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mnnpipe.default_recipe import DEFAULT_RECIPE, INPUT, digits, demo_search
from mnnpipe.demo import train_teacher
from mnnpipe.local import run_recipe
from mnnpipe.report import machine_info, markdown_table
from mnnpipe.runner import run_step
from mnnpipe.searching import run_search


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/mnnpipe-bench-search")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/search.md")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    loads = [load_average()]
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    teacher = train_teacher(work / "teacher")
    phases["teacher"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    default = run_recipe(DEFAULT_RECIPE, model_uri=str(teacher), output=str(work / "default"), quiet=True)
    phases["default recipe"] = time.perf_counter() - t0
    loads.append(load_average())

    t0 = time.perf_counter()
    search = run_search(demo_search(), model_uri=str(teacher), output=str(work / "search"), quiet=True)
    phases["search (6 candidates + select)"] = time.perf_counter() - t0
    loads.append(load_average())

    teacher_ref = {"uri": str(teacher), "format": "state-dict", "factory": "mnnpipe.models:digits_cnn"}
    chosen_uri = search.selected.artifacts["model.mnn"].uri
    t0 = time.perf_counter()
    bench = run_step(
        "benchmark",
        {
            "output": str(work / "side-by-side"),
            "models": [
                {"label": "teacher", "model": teacher_ref},
                {"label": "default-recipe", "model": {"uri": default.candidate_uri}},
                {"label": "search-chosen", "model": {"uri": chosen_uri}},
            ],
            "dataset": digits("test"),
            "inputs": [INPUT],
            "threads": [1],
            "warmup": 20,
            "iterations": args.iterations,
            "reference": "teacher",
        },
        use_cache=False,
        quiet=True,
    )
    phases["side-by-side benchmark"] = time.perf_counter() - t0
    loads.append(load_average())

    m = bench.metrics
    rows = []
    for label in ("teacher", "default-recipe", "search-chosen"):
        rows.append(
            {
                "model": label,
                "size B": int(m[f"{label}/size_bytes"]),
                "size / default": round(m[f"{label}/size_bytes"] / m["default-recipe/size_bytes"], 3),
                "p50 ms": m[f"{label}/t1_b1/p50_ms"],
                "p90 ms": m[f"{label}/t1_b1/p90_ms"],
                "p50 / default": round(m[f"{label}/t1_b1/p50_ms"] / m["default-recipe/t1_b1/p50_ms"], 3),
                "top-1 %": round(100 * m[f"{label}/top1"], 2),
                "cosine vs teacher": round(m[f"{label}/cosine"], 4) if f"{label}/cosine" in m else "—",
            }
        )
    candidates = [
        {
            "id": c.id,
            "overrides": ", ".join(f"{k}={'on' if isinstance(v, dict) else ('off' if v is None else json.dumps(v))}" for k, v in c.overrides.items()),
            "size B": c.size_bytes,
            "p50 ms": c.latency_ms_p50,
            "top-1 %": None if c.accuracy is None else round(100 * c.accuracy, 2),
            "feasible": c.id in search.selected.feasible,
            "front": c.id in search.selected.front,
        }
        for c in search.selected.candidates
    ]
    text = "\n".join(
        [
            "# Recipe search vs the default recipe (digits)",
            "",
            f"`python benchmarks/bench_search.py --iterations {args.iterations}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            "Machine: {cpu}, {cores} cores usable, {system}, Python {python}.".format(**machine_info()),
            f"Load average (1/5/15 min) at start, after the default recipe, after the search, after the benchmark: {'; '.join(loads)}.",
            "",
            "Search: `mnnpipe.default_recipe.demo_search()` — prune ratio 0.2/0.4/0.6 x (full int8 | fp32 .mnn), objective",
            "smallest, constraints: top-1 within 1.5 points of the teacher, cosine vs teacher >= 0.95.",
            f"Chosen: **{search.selected.chosen}** — {search.selected.reason}.",
            f"Cache: {search.cache_hits} of {search.steps_run} candidate steps served from the cache (the default recipe's run shares the distilled student).",
            "",
            "## Side by side (one benchmark step, 1 thread, batch 1, "
            f"{args.iterations} timed runs after 20 warm-up, 360 test digits)",
            "",
            markdown_table(rows),
            "",
            "## Every candidate (as the search measured it, 50 timed runs each)",
            "",
            markdown_table(candidates),
            "",
            "## Wall time",
            "",
            markdown_table([{"phase": k, "seconds": round(v, 1)} for k, v in phases.items()]),
            "",
            "MobileNetV2 / ResNet-18: not run — no trained weights exist on this machine (no network), and a",
            "search judged on random weights' accuracy would choose on noise; their size and latency under",
            "each recipe are in convert.md and models.md.",
            "",
        ]
    )
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
