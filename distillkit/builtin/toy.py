"""A toy two-task dataset that a small MLP learns in seconds: the core's worked example.

Points in ``dim`` dimensions around ``classes`` random centres. Task ``cluster``: which
centre a point came from (overlapping clusters, so it is not trivial). Task ``quadrant``:
the signs of the first two coordinates (4 classes), which shares structure with ``cluster``.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from distillkit.data import Dataset, DatasetSource
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
        quadrant = (x[:, 0] > 0).astype(int) * 2 + (x[:, 1] > 0).astype(int)
        pool = np.arange(n) >= p.num_labeled
        missing = rng.random(n) < p.missing
        labels = {
            "cluster": [None if pool[i] else f"c{cluster[i]}" for i in range(n)],
            "quadrant": [None if pool[i] or missing[i] else f"q{quadrant[i]}" for i in range(n)],
        }
        groups = [f"g{i // 2}" for i in range(n)]
        return Dataset(inputs=torch.from_numpy(x.astype(np.float32)), labels=labels, groups=groups,
                       ids=[f"toy/{i}" for i in range(n)], pool=pool, source="toy_blobs")
