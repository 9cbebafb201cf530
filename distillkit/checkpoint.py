"""Checkpoints in safetensors: model weights with their metadata, and resumable training state.

A model file carries everything needed to use it alone: the tasks' kinds, params and learned
state (class lists, vocabulary) and the student's params, as JSON in the safetensors header.
Nothing here ever unpickles: safetensors holds tensors and strings only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from distillkit.errors import DistillkitError
from distillkit.io import atomic_write

MODEL_FORMAT = "distillkit.model/1"
STATE_FORMAT = "distillkit.train_state/1"


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Atomically write tensors plus JSON metadata (under the header key ``distillkit``)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata={"distillkit": json.dumps(meta)}))


def load_tensors(path: str | Path, expect_format: str | None = None, where: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a distillkit safetensors file; any other file (pickle, foreign, truncated) is refused."""
    path = Path(path)
    label = where or str(path)
    if not path.is_file():
        raise DistillkitError(f"checkpoint file {path} does not exist.", where=where)
    if path.suffix != ".safetensors":
        raise DistillkitError(
            f"{path} is not a .safetensors file; distillkit loads weights only from safetensors "
            "(pickle-based .pt/.pth/.ckpt files can run arbitrary code and are never opened).", where=where)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DistillkitError(f"{path} is not a readable safetensors file ({exc}).", where=where) from None
    try:
        meta = json.loads(header["distillkit"])
    except (KeyError, json.JSONDecodeError):
        raise DistillkitError(f"{path} is a safetensors file but not a distillkit checkpoint (no distillkit metadata).",
                              where=where) from None
    if expect_format and meta.get("format") != expect_format:
        raise DistillkitError(f"{label} holds '{meta.get('format')}', expected '{expect_format}'.", where=where)
    return tensors, meta


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_model(path: str | Path, model: torch.nn.Module, meta: Mapping[str, Any]) -> None:
    save_tensors(path, model.state_dict(), {"format": MODEL_FORMAT, **meta})


def load_model_state(path: str | Path, where: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_tensors(path, MODEL_FORMAT, where)


# -- resumable training state --------------------------------------------------------------

def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (the rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars,
                     "tensor_pids": sorted({int(k.split(".")[1]) for k in tensors})}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
