"""An early-exit CNN (MobileNet-style depthwise-separable blocks) cut into three slices.

"Layers" of the cost model are blocks: the mobile slice runs pixel normalisation, the stem and
blocks 1..m, the edge m+1..n, the cloud n+1..L; every slice ends in an exit (global average
pooling + linear). The mobile slice takes pixels in 0..255 (shared.data.images' input contract).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from shared.builder.export import MAX_LOGIT_DIFF, ExportMismatch
from shared.contract.images import PIXEL_MAX, PIXELS
from shared.contract.manifest import TIERS, SliceSpec, sha256_file

SLICE_IO = {
    "mobile": ([PIXELS], ["logits", "hidden_out"]),
    "edge": (["hidden"], ["logits", "hidden_out"]),
    "cloud": (["hidden"], ["logits"]),
}
FORWARDS = {"hidden": "hidden_out"}  # ONNX forbids an input and output of one name


def block_plan(num_blocks: int, width: int) -> list[tuple[int, int]]:
    """(channels, stride) per block: stride 2 at the first block and at a third of the depth;
    width channels for the first third, then 2x, then 4x."""
    third = max(1, num_blocks // 3)
    plan = []
    for i in range(num_blocks):
        channels = width * (1 if i < third else 2 if i < 2 * third else 4)
        plan.append((channels, 2 if i in (0, third) else 1))
    return plan


class SeparableBlock(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels_in, channels_in, 3, stride, 1, groups=channels_in, bias=False),
            nn.BatchNorm2d(channels_in), nn.ReLU(inplace=True),
            nn.Conv2d(channels_in, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PoolExit(nn.Module):
    """Global average pooling + linear."""

    def __init__(self, channels: int, num_labels: int) -> None:
        super().__init__()
        self.out = nn.Linear(channels, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden.mean(dim=(2, 3)))


class EarlyExitCNN(nn.Module):
    """Stem conv + separable blocks, an exit after each split point (block indices, 1-based)."""

    def __init__(self, input_shape: tuple[int, int, int], split_points: tuple[int, int, int], num_labels: int,
                 width: int = 32, pixel_mean: float = 0.5, pixel_std: float = 0.25) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.split_points = split_points
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean))
        self.register_buffer("pixel_std", torch.tensor(pixel_std))
        stem = max(8, width // 2)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU(inplace=True))
        plan = block_plan(split_points[-1], width)
        blocks, channels = [], stem
        for out, stride in plan:
            blocks.append(SeparableBlock(channels, out, stride))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(PoolExit(plan[p - 1][0], num_labels) for p in split_points)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stem((pixels / PIXEL_MAX - self.pixel_mean) / self.pixel_std)

    def run_blocks(self, hidden: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Run blocks first..last (1-based, inclusive)."""
        for block in self.blocks[first - 1 : last]:
            hidden = block(hidden)
        return hidden

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order."""
        hidden, logits, first = self.embed(pixels), [], 1
        for head, last in zip(self.heads, self.split_points, strict=True):
            hidden = self.run_blocks(hidden, first, last)
            logits.append(head(hidden))
            first = last + 1
        return logits

    def freeze_encoder(self) -> None:
        """Train the exits only (train.py's freeze_encoder setting)."""
        for module in (self.stem, self.blocks):
            for p in module.parameters():
                p.requires_grad_(False)

    def forwarded_channels(self) -> int:
        return self.heads[0].out.in_features


class CNNSlice(nn.Module):
    """Exit `index`'s share: (pixels or hidden) -> (logits, hidden), or logits for the last slice."""

    def __init__(self, model: EarlyExitCNN, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        m, i = self.model, self.index
        first = 1 if i == 0 else m.split_points[i - 1] + 1
        hidden = m.run_blocks(m.embed(x) if i == 0 else x, first, m.split_points[i])
        logits = m.heads[i](hidden)
        return logits if i == len(m.split_points) - 1 else (logits, hidden)


@torch.no_grad()
def predict_image_logits(model: EarlyExitCNN, images: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Logits of every exit for uint8 [N, C, H, W] images: a list (one per exit) of [N, K]."""
    model.eval()
    outputs: list[list[np.ndarray]] = [[] for _ in model.heads]
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start : start + batch_size].astype(np.float32))
        for store, logits in zip(outputs, model(pixels), strict=True):
            store.append(logits.numpy())
    return [np.concatenate(parts) for parts in outputs]


def export_cnn_slices(model: EarlyExitCNN, folder: Path, opset: int = 17) -> list[SliceSpec]:
    """Write mobile.onnx, edge.onnx, cloud.onnx with a dynamic batch axis."""
    model.eval()
    example: torch.Tensor = torch.zeros(2, *model.input_shape)
    specs, first = [], 1
    for index, tier in enumerate(TIERS):
        inputs, outputs = SLICE_IO[tier]
        path = folder / f"{tier}.onnx"
        module = CNNSlice(model, index).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
                              opset_version=opset, dynamo=False)
            result = module(example)
        example = result[1] if isinstance(result, tuple) else example
        last = model.split_points[index]
        specs.append(SliceSpec(tier=tier, file=path.name, sha256=sha256_file(path), inputs=inputs, outputs=outputs,
                               forwards=FORWARDS if tier != "cloud" else {}, first_layer=first, last_layer=last))
        first = last + 1
    return specs


def check_cnn_chain(model: EarlyExitCNN, folder: Path, images: np.ndarray, batch_size: int = 16) -> float:
    """Max |logit difference| between the chained ONNX slices and PyTorch; ExportMismatch above the bound."""
    sessions = [ort.InferenceSession(str(folder / f"{t}.onnx"), providers=["CPUExecutionProvider"]) for t in TIERS]
    worst = 0.0
    for start in range(0, len(images), batch_size):
        pixels = images[start : start + batch_size].astype(np.float32)
        with torch.no_grad():
            expected = [x.numpy() for x in model(torch.from_numpy(pixels))]
        feed, got = {PIXELS: pixels}, []
        for session in sessions:
            out = session.run(None, feed)
            got.append(out[0])
            feed = {"hidden": out[1]} if len(out) > 1 else feed
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True)))
    if not worst <= MAX_LOGIT_DIFF:
        raise ExportMismatch(f"ONNX slices disagree with PyTorch: max |logit difference| {worst:.2e} "
                             f"> {MAX_LOGIT_DIFF:.0e}")
    return worst
