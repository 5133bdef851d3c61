"""The input contract of an image model (manifest.input_shape [C, H, W]): the mobile slice takes
`pixels`, float32 [B, C, H, W] with values in 0..255 (the uint8 range) and normalises inside the
slice. Clients send uint8 or float32, [N, C, H, W] or [N, H, W] for one channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import InvalidInput

PIXELS = "pixels"  # the mobile slice's input
PIXEL_MAX = 255.0


@dataclass(frozen=True)
class ImageInput:
    """Checks a client's image batch against the model's input shape; gives the mobile slice's input."""

    input_shape: tuple[int, int, int]  # C, H, W

    def tensors(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{"pixels": float32 [N, C, H, W] in 0..255}, or InvalidInput naming the problem."""
        c, h, w = self.input_shape
        expected = f"[N, {c}, {h}, {w}]" + (f" or [N, {h}, {w}]" if c == 1 else "")
        if images.dtype not in (np.uint8, np.float32):
            raise InvalidInput(f"images have dtype {images.dtype}; send uint8 or float32 (values 0..255)")
        if images.ndim == 3 and c == 1:
            images = images[:, None]
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise InvalidInput(f"images have shape {list(images.shape)}; this model takes {expected}")
        if len(images) == 0:
            raise InvalidInput("no images: send at least one")
        if images.dtype == np.float32:
            if not np.isfinite(images).all():
                raise InvalidInput("images hold NaN or infinite values")
            low, high = float(images.min()), float(images.max())
            if low < 0 or high > PIXEL_MAX:
                raise InvalidInput(f"float images must hold pixel values in 0..255 (the uint8 range), "
                                   f"got {low:g}..{high:g}")
        return {PIXELS: np.ascontiguousarray(images, dtype=np.float32)}
