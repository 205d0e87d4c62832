"""The `compress` pipeline with the default recipe (mnnpipe.default_recipe: digits sizes; pass
your own recipe to `mnnpipe.kfp.pipeline.build_pipeline` for your model).

    python pipelines/compress.py            # compile -> pipelines/compress.yaml (same as generate)
    python -m mnnpipe.kfp.generate          # regenerate every component.yaml and compress.yaml

The step image is one setting: `compress_pipeline(image=...)`, else $MNNPIPE_IMAGE, else the
package's tag; the compiled description says how a release pins it (tag and digest).

Step order comes from the step catalog: [distill] -> [prune] -> convert -> [quantize] ->
[benchmark] -> gate. Convert runs before quantize because MNN's int8 quantizer needs the fp32
.mnn the converter makes.
"""

from __future__ import annotations

import sys

from mnnpipe.default_recipe import DEFAULT_RECIPE  # noqa: F401  (the recipe this file compiles)
from mnnpipe.kfp.pipeline import PIPELINE_DEFAULTS, compile_pipeline, compress_pipeline  # noqa: F401

if __name__ == "__main__":
    compile_pipeline(compress_pipeline(), sys.argv[1] if len(sys.argv) > 1 else "pipelines/compress.yaml")
