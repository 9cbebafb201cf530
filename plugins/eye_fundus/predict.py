"""Predictions of a trained model for image files, from its checkpoint alone (``distillkit predict``).

Images are decoded exactly as the training data was (:func:`eye_fundus.image_store.decode_image`:
aspect kept, resized so the long side is S, centred on black), at the size the model was
trained on. That size is not stored in model files; it is taken, in this order, from a
input shape recorded in the checkpoint's metadata, from the ``data.image_size`` of
the run directory the checkpoint lies in, else :data:`DEFAULT_IMAGE_SIZE`.

The output is generic over the checkpoint's tasks: a task whose prediction holds ``probs``
gives its top-k classes (k: the largest of the task's own ``topk`` setting, so the broad
disease gives 1 and the fine sub-category 5 with the shipped configs); a task that can
``decode_text`` (the caption task) gives its text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from distillkit import DistillkitError

#: the side of the synthetic data and of every shipped CPU config
DEFAULT_IMAGE_SIZE = 64
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}


def image_size_for(checkpoint: Path, meta: dict[str, Any]) -> tuple[int, str]:
    """The image side the model behind ``checkpoint`` was trained on, and where it came from."""
    from distillkit import find_run_dir

    shape = (meta.get("inputs") or {}).get("shape") or []
    size = shape[-1] if len(shape) == 3 else None  # (channels, height, width) of the training images
    if size:
        return int(size), "the checkpoint"
    run = find_run_dir(checkpoint)
    size = (run.config.get("data") or {}).get("image_size") if run is not None else None
    if size:
        return int(size), str(run.path / "config.yaml")
    return DEFAULT_IMAGE_SIZE, "the default"


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to the image files they hold."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DistillkitError(f"the folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).",
                                      where=str(path))
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise DistillkitError("no such file or folder.", where=str(path))
    return out


def decode_images(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    """``(N, 3, S, S)`` uint8, as the training data; an unreadable file stops naming it."""
    from eye_fundus.image_store import _DECODE_ERRORS, _reason, decode_image

    pixels = np.zeros((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            image, _ = decode_image(path, image_size)
        except _DECODE_ERRORS as exc:
            raise DistillkitError(f"cannot read the image: {_reason(exc)}.", where=str(path),
                                  hint="Give image files (JPEG, PNG, TIFF, ...) or folders of them.") from None
        pixels[i] = image.transpose(2, 0, 1)
    return torch.from_numpy(pixels)


def top_k_for(task: Any, top_k: int | None) -> int:
    if top_k is not None:
        return top_k
    return max([1, *task.topk])


@torch.no_grad()
def predict_images(model: Any, tasks: dict[str, Any], images: torch.Tensor, top_k: int | None = None,
                   batch_size: int = 64) -> list[dict[str, Any]]:
    """One dict per image: task name -> its prediction (see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        feats = model.features(images[start:start + batch_size].to(device))
        per_task = {name: task.predict(model.heads[name], feats) for name, task in tasks.items()}
        for row in range(feats.shape[0]):
            result: dict[str, Any] = {}
            for name, task in tasks.items():
                prediction = per_task[name]
                if "probs" in prediction:
                    probs = prediction["probs"][row].float().cpu()
                    classes = task.class_names or [str(i) for i in range(len(probs))]
                    k = min(top_k_for(task, top_k), len(probs))
                    values, indices = probs.topk(k)
                    result[name] = {"kind": "classes",
                                    "top": [{"label": classes[i], "probability": float(p)}
                                            for p, i in zip(values.tolist(), indices.tolist())],
                                    "probabilities": {c: float(p) for c, p in zip(classes, probs.tolist())}}
                elif "tokens" in prediction and (text := task.decode_text(prediction["tokens"][row:row + 1].cpu())):
                    result[name] = {"kind": "text", "text": text[0]}
                else:
                    result[name] = {"kind": "other",
                                    "outputs": {k: list(v[row].shape) for k, v in prediction.items()}}
            out.append(result)
    return out


def format_prediction(image: str, result: dict[str, Any]) -> list[str]:
    """Lines for the terminal."""
    lines = [image]
    width = max(len(name) for name in result) if result else 0
    for name, value in result.items():
        if value["kind"] == "classes":
            top = value["top"]
            shown = [f"{t['probability']:.3f}  {t['label']}" for t in top]
        elif value["kind"] == "text":
            shown = [f'"{value["text"]}"']
        else:
            shown = [", ".join(f"{k} {v}" for k, v in value["outputs"].items())]
        lines.append(f"  {name:<{width}}  {shown[0]}")
        lines += [f"  {'':<{width}}  {line}" for line in shown[1:]]
    return lines
