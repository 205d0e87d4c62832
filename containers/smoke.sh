#!/usr/bin/env bash
# Smoke-test the step image built by containers/build.sh: every container runs with
# `--network none`, as the image's non-root user, and fails this script on any error.
#
#   containers/smoke.sh [IMAGE]
#
# 1. `mnnpipe --help`, then imports (torch CPU build, MNN, onnx) and that pip cannot install.
# 2. `mnnpipe schema convert` prints a JSON Schema.
# 3. A tiny TorchScript model (1x1x8x8 -> 10, made inside the image, so the host needs no torch)
#    goes through `mnnpipe run convert --spec /work/in/spec.json`, output in /work/out (a temp
#    folder of the host, mounted); model.mnn, manifest.json and a result with cosine >= 0.999
#    must appear there.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=containers/podman-env.sh
. "$here/podman-env.sh"
mnnpipe_podman_setup

image="${1:-${MNNPIPE_IMAGE:-$(mnnpipe_default_image "$repo")}}"
work="$(mktemp -d /var/tmp/mnnpipe-smoke.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/in" "$work/out"
chmod 0777 "$work/in" "$work/out" # the container runs as uid 10001, not as root

run() { podman run --rm --network none "$@"; }
step() { echo "smoke: $*" >&2; }
t0=$(date +%s.%N)

step "--help"
run "$image" --help >/dev/null

step "imports, CPU torch, non-root, pip switched off"
run --entrypoint python "$image" -c '
import os, subprocess, sys
import torch, MNN, onnx, mnnpipe
assert "+cpu" in torch.__version__, torch.__version__
assert os.getuid() != 0, "runs as root"
pip = [sys.executable, "-m", "pip"]
conf = subprocess.run(pip + ["config", "list"], capture_output=True, text=True, check=True).stdout
assert os.environ.get("PIP_NO_INDEX") == "1" and ":env:.no-index" in conf, "PIP_NO_INDEX is not set: " + conf
r = subprocess.run(pip + ["install", "--dry-run", "requests"], capture_output=True, text=True)
assert r.returncode != 0, "pip could install at run time: " + r.stdout
print("torch", torch.__version__, "mnnpipe", mnnpipe.__version__, "uid", os.getuid())
'

step "schema convert"
run "$image" schema convert >"$work/schema.json"
python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); assert s.get("properties"), s' "$work/schema.json"

step "tiny TorchScript model"
run -v "$work/in:/work/in" --entrypoint python "$image" -c '
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)
).eval()
torch.jit.trace(net, torch.randn(1, 1, 8, 8)).save("/work/in/model.pt")
'
cat >"$work/in/spec.json" <<'EOF'
{
  "kind": "convert",
  "output": "/work/out",
  "model": {"uri": "/work/in/model.pt", "format": "torchscript"},
  "inputs": [{"name": "input", "shape": [1, 1, 8, 8]}]
}
EOF

step "run convert"
t1=$(date +%s.%N)
run -v "$work/in:/work/in:ro" -v "$work/out:/work/out" "$image" \
    run convert --spec /work/in/spec.json --result /work/out/result.json >/dev/null
t2=$(date +%s.%N)
python3 - "$work/out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
result = json.loads((out / "result.json").read_text())
assert result["kind"] == "convert", result
mnn = out / "model.mnn"
assert mnn.stat().st_size > 0 and (out / "manifest.json").is_file(), sorted(out.iterdir())
assert result["metrics"]["cosine"] >= 0.999, result["metrics"]
print(f"smoke: model.mnn {mnn.stat().st_size} bytes, cosine {result['metrics']['cosine']:.6f}", file=sys.stderr)
EOF

echo "smoke: ok ($image): convert run $(python3 -c "print(f'{$t2 - $t1:.1f}')") s, all $(python3 -c "print(f'{$t2 - $t0:.1f}')") s" >&2
