"""Image encoders for fundus photographs: torchvision ResNets (the paper's ResNet-50) and a
small CNN for fast CPU runs (EfficientNet-Lite0 lives in :mod:`eye_fundus.efficientnet`).

Every encoder takes the dataset's images as stored, ``uint8`` ``(B, 3, H, W)``, and scales
them to [-1, 1] itself in :meth:`preprocess` (the paper's normalisation, :func:`scale_images`),
so the data pipeline ships compact uint8 tensors and never a float copy. Float inputs are taken
as already scaled.

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

from distillkit import DistillkitError, Encoder, EncoderParams

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

    Blocks: ``stem`` (conv1, bn1, relu, maxpool), ``layer1`` ... ``layer4``, ``pool``.

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
            state, source = _imagenet_state(params.kind, weights), f"torchvision {weights}"
        elif params.pretrained != "none":
            path = Path(params.pretrained).expanduser()
            state, source = read_safetensors(path), str(path)
        if params.pretrained != "none":
            load_weights(self.net, _torchvision_layout(state), source=source,
                         hint="Check that the file was saved from the same architecture (e.g. resnet50).")
        if params.channels_last:
            self.to(memory_format=torch.channels_last)

    def preprocess(self, inputs: Tensor) -> Tensor:
        x = scale_images(inputs)
        if self.params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def blocks(self) -> list[tuple[str, nn.Module]]:
        # Views over self.net's own modules, built per call: state-dict keys stay torchvision's
        # (``net.conv1.weight``), so existing checkpoints and converted weights keep loading.
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
                  f"`distillkit convert-weights {os.path.basename(weights.url)} {kind}.safetensors` and set "
                  f"`pretrained: /path/to/{kind}.safetensors`; or use `pretrained: none` (or the "
                  "efficientnet_lite0 encoder, whose ImageNet weights install with the package)."),
        ) from exc


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a local .safetensors file (never a pickle), or a DistillkitError naming it."""
    if not path.is_file():
        raise DistillkitError("pretrained weights file not found.", where=str(path),
                              hint="Give 'none', 'imagenet' or the path of a .safetensors file.")
    if path.suffix != ".safetensors":
        raise DistillkitError("pretrained weights must be a .safetensors file (pickled .pt/.pth files are "
                              "never loaded).", where=str(path),
                              hint=f"Convert it once: distillkit convert-weights {path.name} {path.stem}.safetensors")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DistillkitError(f"not a readable safetensors file ({exc}).", where=str(path)) from exc


def _torchvision_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ResNet's keys from its own state dict (the ``fc.*`` classifier dropped)
    or from a ResNetEncoder's (``net.*`` keys)."""
    state = {k.removeprefix("net."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_weights(net: nn.Module, state: Mapping[str, Tensor], source: str, hint: str) -> None:
    """Load ``state`` into ``net`` when its keys and shapes fit exactly; otherwise a
    DistillkitError naming ``source`` and the first missing, unexpected and reshaped keys."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or reshaped:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
            if keys:
                if label == "of another shape":  # say which shapes: a transposed or wider layer shows
                    keys = [f"{k}: {_shape(state[k])} in the file vs {_shape(expected[k])} here" for k in keys]
                shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
                problems.append(f"{len(keys)} {label} ({shown})")
        raise DistillkitError(
            f"the weights do not fit a {type(net).__name__} of this size: keys " + "; ".join(problems) + ".",
            where=source, hint=hint)
    net.load_state_dict(state)


def _shape(tensor: Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


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

    Blocks: ``block1`` ... ``block<depth>``, ``pool``.

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
        # Registered under the name "blocks" so that checkpoints keep their ``blocks.<i>.*``
        # keys; that name is the blocks() method's, so it goes into _modules directly
        # (add_module refuses a name the class already has) and is read through `layers`.
        self._modules["blocks"] = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = channels

    @property
    def layers(self) -> nn.Sequential:
        """Every conv, BN, ReLU (and max-pool) layer in order: the module behind ``blocks.<i>.*`` keys."""
        return self._modules["blocks"]

    def preprocess(self, inputs: Tensor) -> Tensor:
        return scale_images(inputs)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        per_block = 4 if self.params.downsample == "pool" else 3
        layers = list(self.layers)
        chain = [(f"block{i + 1}", nn.Sequential(*layers[i * per_block:(i + 1) * per_block]))
                 for i in range(self.params.depth)]
        return chain + [("pool", nn.Sequential(self.pool, nn.Flatten(1)))]
