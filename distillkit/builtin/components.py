"""Generic built-in components: MLP encoder, multi-task student, aggregation policies, teacher sources."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Sequence

import torch
from pydantic import Field
from torch import nn

from distillkit.errors import DistillkitError
from distillkit.interfaces import AggregationPolicy, Encoder, EncoderParams, Params, Student, Teacher
from distillkit.schema import Component


class MLPParams(EncoderParams):
    kind: str = "mlp"
    #: size of one flattened input row
    in_features: int = Field(8, ge=1)
    hidden: int = Field(64, ge=1, description="width of every hidden layer (and of the features)")
    depth: int = Field(2, ge=1, description="number of Linear-ReLU-Dropout blocks")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability after every block")


class MLPEncoder(Encoder):
    """A multilayer perceptron over flattened inputs (tabular data, tests).

    Blocks ``layer1`` .. ``layer<depth>``, each Linear-ReLU-Dropout.
    """

    Params = MLPParams

    def __init__(self, params: MLPParams):
        super().__init__()
        self.params = params
        layers: list[nn.Module] = []
        width = params.in_features
        for _ in range(params.depth):
            layers += [nn.Linear(width, params.hidden), nn.ReLU(inplace=True), nn.Dropout(params.dropout)]
            width = params.hidden
        self.net = nn.Sequential(*layers)
        self.out_features = params.hidden

    def preprocess(self, inputs: torch.Tensor) -> torch.Tensor:
        # the layers' dtype: float32, or float64 for a model made double (exactness tests)
        return inputs.flatten(1).to(self.net[0].weight.dtype)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        # Slices of ``net`` (the same modules), so state-dict keys stay ``net.<i>.*``.
        return [(f"layer{i + 1}", self.net[3 * i:3 * i + 3]) for i in range(self.params.depth)]


class MultiTaskParams(Params):
    kind: str = "multitask"
    #: the shared encoder (kind: mlp, resnet18, ...)
    encoder: Annotated[Any, Component("encoder")] = Field(default_factory=lambda: {"kind": "mlp"})


class MultiTaskStudent(Student):
    """Hard parameter sharing: one encoder, one head per task (the paper's MTL model)."""

    Params = MultiTaskParams


class MeanParams(Params):
    kind: str = "mean"


class MeanPolicy(AggregationPolicy):
    """Equal weights: distilling to the mean of the teachers' tempered distributions is, in
    gradient, distilling from each teacher and summing the KL terms (up to the factor K)."""

    Params = MeanParams

    def weights(self, task: str, teachers: Sequence[Teacher]) -> list[float]:
        return [1.0 / len(teachers)] * len(teachers)


class ValScoreParams(Params):
    kind: str = "val_score"
    #: weights proportional to score ** power (score: the teacher's validation primary metric;
    #: for a lower-is-better metric such as RMSE, (1 / score) ** power)
    power: float = Field(1.0, ge=0)
    #: floor so that a teacher with score 0 keeps a little weight (for a lower-is-better
    #: metric: the smallest error counted, so a perfect teacher's weight stays finite)
    floor: float = Field(1e-3, ge=0)


class ValScorePolicy(AggregationPolicy):
    """Weights each teacher by its validation score on the task (better teachers count more).

    The score's direction comes from the teacher (``Teacher.score_directions``): a higher
    accuracy or a lower RMSE gives more weight. A teacher without a score gets the floor
    (higher is better) or no weight (lower is better); teachers that all lack one share equally.
    """

    Params = ValScoreParams

    def weights(self, task: str, teachers: Sequence[Teacher]) -> list[float]:
        floor, power = self.params.floor, self.params.power
        raw = []
        for t in teachers:
            s = t.scores.get(task, math.nan)
            known = s is not None and math.isfinite(float(s))
            if t.score_directions.get(task, "max") == "min":
                # an error: weight (1 / error) ** power; without a score, no weight (set below if all lack one)
                error = max(float(s), floor) if known else math.inf
                raw.append(0.0 if math.isinf(error) else
                           1.0 if power == 0 else math.inf if error <= 0 else (1.0 / error) ** power)
            else:
                s = max(float(s), 0.0) if known else 0.0
                raw.append(max(s, floor) ** power)
        if any(math.isinf(w) for w in raw):  # a perfect teacher (error 0, no floor) takes all the weight
            raw = [1.0 if math.isinf(w) else 0.0 for w in raw]
        if sum(raw) <= 0:
            raw = [1.0] * len(raw)
        total = sum(raw)
        return [w / total for w in raw]


class CheckpointTeacherParams(Params):
    kind: str = "checkpoint"
    path: str = Field(description="a distillkit model file (.safetensors); relative to the config's folder")
    name: str | None = Field(None, description="the teacher's label in logs and tables (default: the file name)")


class CheckpointTeacher:
    """A teacher loaded from a distillkit model file (safetensors) outside the run."""

    Params = CheckpointTeacherParams

    def __init__(self, params: CheckpointTeacherParams):
        self.params = params

    def load(self, registries: Any, device: torch.device, base_dir: Path) -> Teacher:
        from distillkit.models import as_teacher, load_model

        path = Path(self.params.path)
        if not path.is_absolute():
            path = base_dir / path
        loaded = load_model(path, registries, device, where=f"teacher {self.params.path}")
        return as_teacher(loaded, self.params.name or path.stem)


class GaussianNoiseParams(Params):
    kind: str = "gaussian_noise"
    #: standard deviation of the noise added to every input value
    std: float = Field(0.1, gt=0)


class GaussianNoise:
    """Adds Gaussian noise to floating-point inputs (tabular features, embeddings)."""

    Params = GaussianNoiseParams

    def __init__(self, params: GaussianNoiseParams):
        self.params = params

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not inputs.is_floating_point():
            raise DistillkitError("gaussian_noise needs floating-point inputs; images stored as uint8 "
                                  "need an image augmentation.", where="training.augment")
        return inputs + torch.randn_like(inputs) * self.params.std
