"""A toy two-task dataset that a small MLP learns in seconds: the core's worked example.

Points in ``dim`` dimensions around ``classes`` random centres. Task ``cluster``: which
centre a point came from (overlapping clusters, so it is not trivial). Task ``quadrant``:
the signs of the first two coordinates (4 classes), which shares structure with ``cluster``.

``toy_regression``: the same idea for a real-valued target (the regression worked example).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import Field

from distillkit.data import Dataset, DatasetSource
from distillkit.errors import DistillkitError
from distillkit.interfaces import Params


class ToyBlobsParams(Params):
    kind: str = "toy_blobs"
    num_labeled: int = Field(600, ge=10, description="labeled points")
    num_unlabeled: int = Field(600, ge=0, description="points of the unlabeled pool (no labels)")
    dim: int = Field(8, ge=2, description="dimensions of every point (the encoder's in_features)")
    classes: int = Field(4, ge=2, description="number of clusters (classes of 'cluster')")
    #: standard deviation of the points around their centre (larger = harder)
    noise: float = Field(1.0, gt=0)
    #: fraction of labeled rows whose 'quadrant' label is missing
    missing: float = Field(0.1, ge=0, lt=1)
    seed: int = Field(0, description="seed of the generator")
    #: added to every coordinate (raw inputs far from 0, as tabular data often are)
    offset: float = 0.0
    #: standardise the inputs by the training split's mean and standard deviation per
    #: coordinate; the transform is stored with every model and applied by it
    standardize: bool = False


class ToyBlobs(DatasetSource):
    """Gaussian blobs with two label fields, ``cluster`` and ``quadrant``; pairs of rows share a group."""

    Params = ToyBlobsParams

    def load(self) -> Dataset:
        p = self.params
        rng = np.random.default_rng(p.seed)
        centres = rng.normal(0.0, 2.0, size=(p.classes, p.dim))
        n = p.num_labeled + p.num_unlabeled
        cluster = rng.integers(0, p.classes, size=n)
        x = centres[cluster] + rng.normal(0.0, p.noise, size=(n, p.dim))
        quadrant_of = x.copy()
        x = x + p.offset
        quadrant = (quadrant_of[:, 0] > 0).astype(int) * 2 + (quadrant_of[:, 1] > 0).astype(int)
        pool = np.arange(n) >= p.num_labeled
        missing = rng.random(n) < p.missing
        labels = {
            "cluster": [None if pool[i] else f"c{cluster[i]}" for i in range(n)],
            "quadrant": [None if pool[i] or missing[i] else f"q{quadrant[i]}" for i in range(n)],
        }
        groups = [f"g{i // 2}" for i in range(n)]
        return Dataset(inputs=torch.from_numpy(x.astype(np.float32)), labels=labels, groups=groups,
                       ids=[f"toy/{i}" for i in range(n)], pool=pool, source="toy_blobs")

    def fit_input_transform(self, train_inputs: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not self.params.standardize:
            return None
        std = train_inputs.double().std(0, unbiased=False)
        return {"shift": train_inputs.double().mean(0).float(),
                "scale": torch.where(std > 0, std, torch.ones_like(std)).float()}

    def load_inputs(self, paths: Sequence[Path]) -> torch.Tensor:
        """One point per file: ``dim`` numbers separated by commas or white space."""
        return read_points(paths, self.params.dim)


def read_points(paths: Sequence[Path], dim: int) -> torch.Tensor:
    """``(len(paths), dim)`` float32: one point per file, its numbers separated by commas or white space."""
    rows = []
    for path in paths:
        try:
            values = [float(v) for v in Path(path).read_text(encoding="utf-8").replace(",", " ").split()]
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DistillkitError(f"cannot read a point from the file ({exc}).", where=str(path)) from None
        if len(values) != dim:
            raise DistillkitError(f"the file holds {len(values)} numbers; a point has {dim}.", where=str(path))
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), dim)


class ToyRegressionParams(Params):
    kind: str = "toy_regression"
    num_labeled: int = Field(600, ge=10, description="labeled points")
    num_unlabeled: int = Field(300, ge=0, description="points of the unlabeled pool (no labels)")
    dim: int = Field(8, ge=3, description="dimensions of every point (the encoder's in_features)")
    #: standard deviation of the noise on the target, before ``scale`` (larger = harder)
    noise: float = Field(0.3, ge=0)
    #: the target is ``offset + scale * (signal + noise)``: e.g. prices around 97,000,000
    scale: float = Field(1.0, gt=0)
    #: added to the scaled target (see ``scale``)
    offset: float = 0.0
    seed: int = Field(0, description="seed of the generator")


class ToyRegression(DatasetSource):
    """Points in ``dim`` dimensions with a real-valued target ``price`` and its tercile ``band``.

    ``price`` is a linear function of the point plus an interaction of its first two
    coordinates (so a hidden layer helps), plus noise, scaled and offset; ``band`` (``low``,
    ``mid``, ``high``) is the tercile of the noise-free signal, a classification task beside the
    regression. Labels are written as text (``repr`` of the float), as a CSV would hold them.
    """

    Params = ToyRegressionParams

    def load(self) -> Dataset:
        p = self.params
        rng = np.random.default_rng(p.seed)
        n = p.num_labeled + p.num_unlabeled
        x = rng.normal(0.0, 1.0, size=(n, p.dim))
        w = rng.normal(0.0, 1.0, size=p.dim)
        signal = x @ w / np.sqrt(p.dim) + 0.8 * x[:, 0] * x[:, 1]
        price = p.offset + p.scale * (signal + rng.normal(0.0, p.noise, size=n))
        cuts = np.quantile(signal, [1 / 3, 2 / 3])
        band = np.array(["low", "mid", "high"])[np.searchsorted(cuts, signal)]
        pool = np.arange(n) >= p.num_labeled
        labels = {
            "price": [None if pool[i] else repr(float(price[i])) for i in range(n)],
            "band": [None if pool[i] else str(band[i]) for i in range(n)],
        }
        groups = [f"g{i // 2}" for i in range(n)]
        return Dataset(inputs=torch.from_numpy(x.astype(np.float32)), labels=labels, groups=groups,
                       ids=[f"toy_regression/{i}" for i in range(n)], pool=pool, source="toy_regression")

    def load_inputs(self, paths: Sequence[Path]) -> torch.Tensor:
        """One point per file, as for ``toy_blobs``: ``dim`` numbers (``distillkit predict``)."""
        return read_points(paths, self.params.dim)
