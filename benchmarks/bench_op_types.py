"""op_types before/after: MNN's JSON dump + json.loads (before) against reading the .mnn flatbuffer.

    python benchmarks/bench_op_types.py [--vgg-width 1.0] [--out benchmarks/results/op_types.md]

ResNet-18 (mnnpipe.models) and VGG19 (benchmarks/bench_scaling.py's layout; 143.7 M parameters at
width 1.0), random weights, converted to fp32 .mnn and to full int8 (ResNet-18). Each way runs in
its own process; time and peak memory are of the whole process tree (the converter child of the
JSON way included), sampled every 20 ms (benchmarks/measure.py). Both ways must give the same labels.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import machine, run_tree  # noqa: E402

_CONV = {"Convolution", "ConvolutionDepthwise", "Deconvolution", "DeconvolutionDepthwise"}


def _json_label(op: dict) -> str:
    """mnnpipe's labelling before the flatbuffer reader (engines/mnn.py at d5d9606)."""
    kind = op.get("type", "?")
    main = op.get("main") or {}
    quant = main.get("quanParameter") if isinstance(main, dict) else None
    if kind not in _CONV or not quant:
        return kind
    if main.get("symmetricQuan") or quant.get("scaleIn"):
        return f"{kind}[int8]"
    if quant.get("type") == 3:
        return f"{kind}[fp16-weights]"
    return f"{kind}[int{quant.get('aMaxOrBits', 8)}-weights]"


def old_op_types(path: Path) -> dict[str, int]:
    """Before: load check, converter JSON dump in a child, json.loads of the whole dump."""
    from mnnpipe.engines import mnn as E

    E.import_mnn()
    import MNN.expr as F

    F.load_as_list(str(path))
    with tempfile.TemporaryDirectory(prefix="mnndump-") as tmp:
        dump = Path(tmp) / "model.json"
        E._run_tool("mnnconvert", ["-f", "MNN", "--modelFile", str(path.absolute()), "--JsonFile", str(dump)], output=dump, timeout_s=3600)
        net = json.loads(dump.read_text())
    return dict(collections.Counter(_json_label(op) for op in net.get("oplists", [])))


def _one(way: str, path: str) -> None:
    if way == "old":
        print(json.dumps(old_op_types(Path(path)), sort_keys=True))
    else:
        from mnnpipe.engines.mnn import op_types

        print(json.dumps(op_types(path), sort_keys=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vgg-width", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "op_types.md")
    ap.add_argument("--one", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return _one(*args.one)
    import numpy as np
    import torch
    from PIL import Image

    from bench_scaling import vgg19
    from mnnpipe.engines import mnn as E
    from mnnpipe.models import count_params, resnet18

    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mnnpipe-optypes-") as tmp:
        d = Path(tmp)
        models = {}
        for name, build in (("resnet18", resnet18), (f"vgg19 (width {args.vgg_width})", lambda: vgg19(args.vgg_width))):
            torch.manual_seed(0)
            model = build().eval()
            params = count_params(model)
            key = name.split()[0]
            torch.onnx.export(model, (torch.rand(1, 3, 224, 224),), str(d / f"{key}.onnx"), dynamo=False, input_names=["input"])
            del model
            E.convert_onnx_to_mnn(d / f"{key}.onnx", d / f"{key}.mnn")
            (d / f"{key}.onnx").unlink()
            models[f"{name} fp32"] = (d / f"{key}.mnn", params)
        calib = d / "calib"
        calib.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(calib / f"{i}.png")
        config = {"format": "RGB", "mean": [127.5] * 3, "normal": [1 / 127.5] * 3, "width": 224, "height": 224, "path": str(calib),
                  "used_image_num": 4, "feature_quantize_method": "KL", "weight_quantize_method": "MAX_ABS"}  # fmt: skip
        E.quantize_int8(d / "resnet18.mnn", d / "resnet18-int8.mnn", config)
        models["resnet18 int8 (KL)"] = (d / "resnet18-int8.mnn", models["resnet18 fp32"][1])
        for name, (path, params) in models.items():
            res = {}
            for way in ("old", "new"):
                r = run_tree(["nice", "-n", "5", sys.executable, __file__, "--one", way, str(path)])
                if r["returncode"] != 0:
                    raise SystemExit(f"{way} failed on {name}: {r['output']}")
                res[way] = r
            same = json.loads(res["old"]["output"].strip().splitlines()[-1]) == json.loads(res["new"]["output"].strip().splitlines()[-1])
            rows.append((name, params, path.stat().st_size, res["old"], res["new"], same))
            print(name, res["old"]["seconds"], res["new"]["seconds"], same, flush=True)
    mib = 2**20
    lines = [
        "# op_types: JSON dump (before) vs reading the .mnn flatbuffer (after)",
        "",
        f"Machine: {machine()} (at the end); load average at the start {load_start}.",
        f"Command: `{('python benchmarks/bench_op_types.py ' + ' '.join(sys.argv[1:])).strip()}` ({time.perf_counter() - start:.0f} s).",
        "Each way in its own process (python start-up and imports included); peak = largest RSS sum of the process tree.",
        "",
        "| model | params (M) | .mnn MiB | before s | before peak MiB | after s | after peak MiB | same labels |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, params, size, old, new, same in rows:
        lines.append(
            f"| {name} | {params / 1e6:.1f} | {size / mib:.0f} | {old['seconds']:.2f} | {old['peak_rss_bytes'] / mib:.0f} | "
            f"{new['seconds']:.2f} | {new['peak_rss_bytes'] / mib:.0f} | {'yes' if same else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
