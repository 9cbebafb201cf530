"""Random photometric and positional jitter of fundus photographs, on the device.

No flips: mirroring a fundus photograph turns a right eye into a left one and moves the
superior and inferior quadrants, which the fine labels and the diagnosis text name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillkit import DistillkitError, Params


class FundusJitterParams(Params):
    kind: str = "fundus_jitter"
    #: exposure: add up to +-brightness x 255 to every pixel of an image
    brightness: float = Field(0.1, ge=0, le=1)
    #: contrast: scale each image around its mean by a factor in [1 - contrast, 1 + contrast]
    contrast: float = Field(0.2, ge=0, lt=1)
    #: framing: shift by up to this fraction of the image side, filling with black
    shift: float = Field(0.05, ge=0, lt=0.5)


class FundusJitter:
    """Per-image brightness, contrast and shift of a ``uint8`` batch ``(B, 3, H, W)``."""

    Params = FundusJitterParams

    def __init__(self, params: FundusJitterParams):
        self.params = params

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DistillkitError(f"fundus_jitter expects uint8 images (B, 3, H, W), got {images.dtype} "
                                  f"{tuple(images.shape)}.", where="training.augment")
        p = self.params
        b = images.shape[0]
        x = images.float()
        draw = torch.rand(b, 4, device=images.device) * 2 - 1  # one uniform(-1, 1) per image and knob
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = (1 + p.contrast * draw[:, 0]).view(b, 1, 1, 1)
        x = (x - mean) * contrast + mean + (p.brightness * 255 * draw[:, 1]).view(b, 1, 1, 1)
        if p.shift > 0:
            theta = torch.zeros(b, 2, 3, device=images.device)
            theta[:, 0, 0] = theta[:, 1, 1] = 1
            theta[:, :, 2] = 2 * p.shift * draw[:, 2:]  # affine_grid works in [-1, 1] coordinates
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8)
