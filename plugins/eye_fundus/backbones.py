"""Image encoders for fundus photographs: torchvision ResNets (the paper's ResNet-50) and a
small CNN for fast CPU runs.

Every encoder takes the dataset's images as stored, ``uint8`` ``(B, 3, H, W)``, and scales
them to [-1, 1] itself (the paper's normalisation, :func:`scale_images`), so the data pipeline
ships compact uint8 tensors and never a float copy. Float inputs are taken as already scaled.

Pretrained weights load from the torch hub cache (``pretrained: imagenet``) or from a local
``.safetensors`` file; never from a pickle a user points at.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping

import torch
from pydantic import Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torchvision import models

from distillkit.errors import DistillkitError
from distillkit.interfaces import Encoder, EncoderParams

Tensor = torch.Tensor

#: seconds an ImageNet download may stall before we call the machine offline
DOWNLOAD_TIMEOUT_S = 30


def scale_images(images: Tensor) -> Tensor:
    """uint8 pixels [0, 255] -> float32 [-1, 1] as ``x / 127.5 - 1``; float input passes unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1.0
    if images.is_floating_point():
        return images
    raise TypeError(f"images must be uint8 or floating point, not {images.dtype}")


# -- ResNet ------------------------------------------------------------------------------------
_RESNETS: dict[str, tuple[Callable[..., models.ResNet], models.WeightsEnum, int]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, 2048),
}


class ResNetParams(EncoderParams):
    kind: Literal["resnet18", "resnet34", "resnet50"] = "resnet50"
    #: "none" (random init), "imagenet" (torchvision's IMAGENET1K_V1, from the torch hub cache
    #: or downloaded), or the path of a local .safetensors file holding the weights
    pretrained: str = Field("none", min_length=1)
    #: NHWC memory layout: faster convolutions on GPUs with tensor cores
    channels_last: bool = False

    @field_validator("pretrained")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give 'none', 'imagenet' or the path of a .safetensors file")
        return value


class ResNetEncoder(Encoder):
    """A torchvision ResNet-18/34/50 without its classifier: pooled features of 512 or 2048.

    ImageNet weights were trained on mean/std-normalised inputs; like the paper we feed
    [-1, 1] instead and let fine-tuning absorb the difference.
    """

    Params = ResNetParams

    def __init__(self, params: ResNetParams):
        super().__init__()
        self.params = params
        build, weights, width = _RESNETS[params.kind]
        net = build(weights=None)
        net.fc = nn.Identity()  # the tasks bring their own heads
        self.net = net
        self.out_features = width
        if params.pretrained == "imagenet":
            load_weights(self.net, _imagenet_state(params.kind, weights), source=f"torchvision {weights}")
        elif params.pretrained != "none":
            path = Path(params.pretrained).expanduser()
            load_weights(self.net, read_safetensors(path), source=str(path))
        if params.channels_last:
            self.to(memory_format=torch.channels_last)

    def preprocess(self, images: Tensor) -> Tensor:
        x = scale_images(images)
        if self.params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``stem``, ``layer1`` .. ``layer4``, ``pool``: views of ``net`` (keys stay ``net.*``)."""
        net = self.net
        return [("stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)),
                ("layer1", net.layer1), ("layer2", net.layer2), ("layer3", net.layer3), ("layer4", net.layer4),
                ("pool", nn.Sequential(net.avgpool, nn.Flatten(1)))]


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub opens its URL without a timeout: on a firewalled machine that can hang for
    # minutes instead of failing. The default timeout is process-wide, so restore it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _imagenet_state(kind: str, weights: models.WeightsEnum) -> dict[str, Tensor]:
    """torchvision's ImageNet weights from the torch hub cache, downloading them if absent."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            # weights_only: the restricted unpickler (tensors only), even for the hub cache.
            return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=False,
                                                      check_hash=True, weights_only=True)
    except Exception as exc:  # offline, proxy, truncated or corrupt cache file: all the user's to fix
        raise DistillkitError(
            f"ImageNet weights for {kind} are not in the torch hub cache ({cached}) and could not be "
            f"downloaded from {weights.url} ({type(exc).__name__}: {exc}).",
            where="pretrained",
            hint=(f"On an offline machine, either copy that file to {cached}, or convert it once with "
                  "`python -c \"import torch, safetensors.torch as st; "
                  f"st.save_file(torch.load('{os.path.basename(weights.url)}', weights_only=True), "
                  f"'{kind}.safetensors')\"` and set `pretrained: /path/to/{kind}.safetensors`; "
                  "or use `pretrained: none`."),
        ) from exc


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a local .safetensors file (never a pickle), or a DistillkitError naming it."""
    if not path.is_file():
        raise DistillkitError("pretrained weights file not found.", where=str(path),
                              hint="Give 'none', 'imagenet' or the path of a .safetensors file.")
    if path.suffix != ".safetensors":
        raise DistillkitError("pretrained weights must be a .safetensors file (pickled .pt/.pth files are "
                              "never loaded).", where=str(path),
                              hint="Convert it once: safetensors.torch.save_file(torch.load(f, weights_only=True), out).")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DistillkitError(f"not a readable safetensors file ({exc}).", where=str(path)) from exc


def load_weights(net: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load a torchvision-layout state dict (its ``fc.*`` classifier is dropped) or an
    encoder's own (``net.*`` keys) into ``net``; any other mismatch is a DistillkitError."""
    state = {k.removeprefix("net."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or reshaped:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
            if keys:
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                problems.append(f"{len(keys)} {label} ({shown})")
        raise DistillkitError(
            f"the weights do not fit a {type(net).__name__} of this size: keys " + "; ".join(problems) + ".",
            where=source, hint="Check that the file was saved from the same architecture (e.g. resnet50).")
    net.load_state_dict(state)


# -- a small CNN -------------------------------------------------------------------------------
class SmallCNNParams(EncoderParams):
    kind: Literal["small_cnn"] = "small_cnn"
    #: channels of the first block; each further block doubles them
    width: int = Field(32, ge=1)
    #: conv-BN-ReLU blocks, each halving the resolution
    depth: int = Field(4, ge=1, le=8)
    #: how a block halves the resolution: a 2x2 max-pool after a stride-1 conv keeps
    #: one-pixel lesions (microaneurysms, drusen) that a stride-2 conv can step over
    downsample: Literal["pool", "stride"] = "pool"


class SmallCNN(Encoder):
    """conv3x3-BN-ReLU-maxpool blocks doubling the channels, then global average pooling.

    With width 16 (the shipped CPU configs) a 64 px image becomes 128 features for about
    30 MFLOPs: for tests, the synthetic dataset and CPU experiments, not the paper's numbers.
    """

    Params = SmallCNNParams

    def __init__(self, params: SmallCNNParams):
        super().__init__()
        self.params = params
        layers: list[nn.Module] = []
        channels = 3
        pool = params.downsample == "pool"
        for i in range(params.depth):
            out = params.width * 2**i
            layers += [nn.Conv2d(channels, out, 3, stride=1 if pool else 2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = out
        # Registered as "blocks" (state-dict keys ``blocks.<i>.*``), which the method
        # :meth:`blocks` shadows as an attribute: reach it through ``_modules``.
        self._modules["blocks"] = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = channels

    def preprocess(self, images: Tensor) -> Tensor:
        return scale_images(images)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``block1`` .. ``block<depth>`` (conv-BN-ReLU[-pool]), then ``pool``."""
        layers = self._modules["blocks"]
        size = 4 if self.params.downsample == "pool" else 3
        return [(f"block{i + 1}", layers[size * i:size * (i + 1)]) for i in range(self.params.depth)] + [
            ("pool", nn.Sequential(self.pool, nn.Flatten(1)))]
