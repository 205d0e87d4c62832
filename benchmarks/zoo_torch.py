"""Small torch models of the kinds issue 16 names, as factories a state-dict + `factory` spec can name
(`zoo_torch:unet`; bench_models.py puts benchmarks/ on the import path). Seeded, default torch init."""

from __future__ import annotations

import torch
from torch import nn


class TinyUNet(nn.Module):
    """Two-level U-Net: a dense [1, 2, H, W] map out, skip connection through a concat."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

        self.enc1, self.enc2 = block(3, ch), block(ch, 2 * ch)
        self.mid = block(2 * ch, 4 * ch)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * ch, 2 * ch, 2, stride=2), block(4 * ch, 2 * ch)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2), block(2 * ch, ch)
        self.head = nn.Conv2d(ch, 2, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class RecurrentClassifier(nn.Module):
    """A 2-layer GRU or LSTM over [1, T, F] features, logits from the last step."""

    def __init__(self, cell: str, features: int = 16, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(features, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TwoInTwoOut(nn.Module):
    """An image and a feature vector in; logits and an embedding out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.meta = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.logits = nn.Linear(32, 10)
        self.embed = nn.Linear(32, 16)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.conv(image), self.meta(meta)], 1)
        return self.logits(h), self.embed(h)


class TransformerBlock(nn.Module):
    """One nn.TransformerEncoderLayer (eval mode takes PyTorch's attention fast path) and a mean pool."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).mean(1)


def unet() -> nn.Module:
    return TinyUNet()


def gru() -> nn.Module:
    return RecurrentClassifier("gru")


def lstm() -> nn.Module:
    return RecurrentClassifier("lstm")


def two_in_two_out() -> nn.Module:
    return TwoInTwoOut()


def transformer_block() -> nn.Module:
    return TransformerBlock()


# name -> (factory, its kwargs, inputs), in the spec's terms
MODELS = {
    "U-Net (torch)": ("zoo_torch:unet", {}, [{"name": "x", "shape": [1, 3, 64, 64]}]),
    "GRU, 2 layers (torch)": ("zoo_torch:gru", {}, [{"name": "x", "shape": [1, 20, 16], "range": [-1, 1]}]),
    "LSTM, 2 layers (torch)": ("zoo_torch:lstm", {}, [{"name": "x", "shape": [1, 20, 16], "range": [-1, 1]}]),
    "two-input / two-output (torch)": (
        "zoo_torch:two_in_two_out",
        {},
        [{"name": "image", "shape": [1, 3, 32, 32]}, {"name": "meta", "shape": [1, 8], "range": [-1, 1]}],
    ),
    "MobileNet-like (mnnpipe.models:mobilenet_v2 w0.35, torch)": (
        "mnnpipe.models:mobilenet_v2",
        {"num_classes": 10, "width": 0.35},
        [{"name": "input", "shape": [1, 3, 96, 96]}],
    ),
    "transformer block (nn.TransformerEncoderLayer, torch)": ("zoo_torch:transformer_block", {}, [{"name": "x", "shape": [1, 32, 64], "range": [-1, 1]}]),
}
