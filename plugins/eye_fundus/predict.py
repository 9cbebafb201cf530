"""Image files as model inputs: what the eye plugin's dataset sources give ``distillkit predict``.

Images are decoded exactly as the training data was (:func:`eye_fundus.image_store.decode_image`:
aspect kept, resized so the long side is S, centred on black), at the source's ``image_size``,
the size the model was trained on (``distillkit predict`` builds the source from the model
file's record of its data, or from its run directory). :func:`image_size_for` finds that size
for tools that have only a checkpoint: the input shape it records, the ``data.image_size`` of
the run directory it lies in, else :data:`DEFAULT_IMAGE_SIZE`.

The predictions themselves are the core's (:mod:`distillkit.prediction`).
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
        return int(size), str(run.layout.config)
    return DEFAULT_IMAGE_SIZE, "the default"


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
