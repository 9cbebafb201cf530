"""The generic regression task: a scalar or vector target, MSE, distillation to the teachers' mean.

The head predicts the target standardised by the training split's mean and standard deviation,
so a house price of 97,000,000 trains like a value of order 1; :meth:`RegressionTask.predict`,
the soft targets and the metrics are in the target's own units. Distillation has no
temperature: the soft target is the routed teachers' weighted mean prediction (``mean``, a plain
value the teacher-output cache stores in fp32), and the soft loss is the squared error to it,
combined with the hard loss by the stage's ``alpha`` as for classification.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from pydantic import Field
from torch import nn

from distillkit.errors import DistillkitError
from distillkit.interfaces import MetricAccumulator, Params, Task

Tensor = torch.Tensor


class RegressionParams(Params):
    kind: str = "regression"
    #: dataset label field (defaults to the task name); a number, a numeric string, or a list of
    #: numbers (or a string of numbers separated by spaces or commas) for a vector target
    field: str | None = None
    #: lambda_t, the task's weight in the loss
    weight: float = Field(1.0, ge=0)
    #: hidden width of the dense-ReLU-dense head; 0 gives a single linear layer
    hidden: int = Field(64, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability in the head, before its last layer")
    #: learn the target in units of the training split's standard deviation around its mean
    #: (the losses are in those units; predictions and metrics in the target's own)
    standardize: bool = True


def parse_target(value: Any) -> list[float] | None:
    """A raw label as a list of floats; ``None`` (or an empty string) is a missing label.

    Raises ``ValueError`` for anything that is not numbers.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        parts = value.replace(",", " ").split()
        if not parts:
            return None
        return [float(p) for p in parts]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    raise ValueError(f"{value!r} is not a number")


class RegressionTask(Task):
    """Predicts one or more real values per row, with MSE loss and RMSE, MAE and R2 metrics."""

    Params = RegressionParams
    primary_metric = "rmse"
    metric_directions = {"rmse": "min", "mae": "min", "mse": "min", "r2": "max"}
    soft_target_kinds = {"mean": "value"}
    uses_temperature = False

    def __init__(self, name: str, params: RegressionParams):
        super().__init__(name, params)
        self.dim = 0
        self.mean: list[float] = []
        self.std: list[float] = []

    # labels -------------------------------------------------------------------------------
    def _parse(self, labels: Sequence[Any], where: str = "") -> tuple[list[list[float] | None], int]:
        rows: list[list[float] | None] = []
        dim = self.dim
        for i, v in enumerate(labels):
            try:
                parsed = parse_target(v)
            except (TypeError, ValueError):
                raise DistillkitError(f"row {i}: label {v!r} of regression task '{self.name}' (field "
                                      f"'{self.field}') is not a number.", where=where or None) from None
            if parsed is not None:
                if not all(math.isfinite(x) for x in parsed):
                    raise DistillkitError(f"row {i}: label {v!r} of regression task '{self.name}' is not finite.",
                                          where=where or None)
                if dim and len(parsed) != dim:
                    raise DistillkitError(f"row {i}: label {v!r} of regression task '{self.name}' has "
                                          f"{len(parsed)} values, the others {dim}.", where=where or None)
                dim = dim or len(parsed)
            rows.append(parsed)
        return rows, dim

    def fit(self, labels: Sequence[str | None]) -> None:
        self.dim = 0
        rows, dim = self._parse(labels, "training split")
        values = torch.tensor([r for r in rows if r is not None], dtype=torch.float64)
        if not len(values):
            raise DistillkitError(f"regression task '{self.name}' has no labeled row (field '{self.field}') in the "
                                  "training split.")
        self.dim = dim
        if self.params.standardize:
            std = values.std(0, unbiased=False) if len(values) > 1 else torch.ones(dim, dtype=torch.float64)
            self.mean = values.mean(0).tolist()
            self.std = [s if s > 0 else 1.0 for s in std.tolist()]
        else:
            self.mean, self.std = [0.0] * dim, [1.0] * dim

    def encode(self, labels: Sequence[str | None], where: str = "") -> dict[str, Tensor]:
        self._require_fit()
        rows, _ = self._parse(labels, where)
        y = torch.zeros(len(rows), self.dim, dtype=torch.float32)
        present = torch.zeros(len(rows), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r is not None:
                y[i] = torch.tensor(r, dtype=torch.float64)
                present[i] = True
        return {"y": y, "present": present}

    def state(self) -> dict[str, Any]:
        return {"dim": self.dim, "mean": list(self.mean), "std": list(self.std)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.dim = int(state["dim"])
        self.mean, self.std = list(state["mean"]), list(state["std"])

    def _require_fit(self) -> None:
        if not self.dim:
            raise RuntimeError(f"task '{self.name}' must be fitted first")

    def _scale(self, like: Tensor) -> tuple[Tensor, Tensor]:
        # float64 where the device has it: a price of 97,000,000 minus a mean of 97,330,000 in
        # float32 loses the last units (its spacing there is 8), which a small std magnifies
        dtype = torch.float32 if like.device.type == "mps" else torch.float64
        mean = torch.tensor(self.mean, dtype=dtype, device=like.device)
        std = torch.tensor(self.std, dtype=dtype, device=like.device)
        return mean, std

    def standardized(self, values: Tensor) -> Tensor:
        """Values in the target's units -> the head's units (float32)."""
        mean, std = self._scale(values)
        return ((values.to(mean.dtype) - mean) / std).float()

    def to_units(self, outputs: Tensor) -> Tensor:
        """The head's outputs -> the target's units (float32)."""
        mean, std = self._scale(outputs)
        return (outputs.to(mean.dtype) * std + mean).float()

    # model --------------------------------------------------------------------------------
    def build_head(self, in_features: int) -> nn.Module:
        self._require_fit()
        p = self.params
        if p.hidden == 0:
            return nn.Linear(in_features, self.dim)
        return nn.Sequential(nn.Linear(in_features, p.hidden), nn.ReLU(inplace=True),
                             nn.Dropout(p.dropout), nn.Linear(p.hidden, self.dim))

    def forward(self, head: nn.Module, features: Tensor, guide=None, train: bool = False) -> Tensor:
        return head(features)

    def predict(self, head: nn.Module, features: Tensor) -> dict[str, Tensor]:
        return {"value": self.to_units(head(features))}

    # losses -------------------------------------------------------------------------------
    def hard_loss(self, logits: Tensor, target: Mapping[str, Tensor]) -> Tensor:
        """Squared error in standardised units, averaged over the target's values, ``(B,)``."""
        return (logits.float() - self.standardized(target["y"])).pow(2).mean(-1)

    def soft_loss(self, logits: Tensor, soft: Mapping[str, Tensor], tau: float) -> Tensor:
        """Squared error to the teachers' weighted mean prediction (no temperature)."""
        return (logits.float() - self.standardized(soft["mean"])).pow(2).mean(-1)

    def soft_target(self, heads, features, weights, target, tau) -> dict[str, Tensor]:
        mean = None
        for head, feats, w in zip(heads, features, weights):
            p = self.to_units(head(feats)) * w
            mean = p if mean is None else mean + p
        return {"mean": mean}

    # metrics ------------------------------------------------------------------------------
    def metrics(self) -> MetricAccumulator:
        return RegressionMetrics()

    def describe(self) -> str:
        what = "a value" if self.dim == 1 else f"{self.dim} values"
        return f"regression of '{self.field}' ({what})"


class RegressionMetrics(MetricAccumulator):
    """RMSE, MAE, MSE and R2 over the whole split, in the target's units.

    Every value of a vector target counts once in RMSE, MAE and MSE; R2 is the mean over the
    target's values of 1 - SS_res / SS_tot (scikit-learn's ``r2_score``, ``uniform_average``: a
    constant column scores 1 if predicted exactly, else 0).
    """

    def __init__(self) -> None:
        self._pred: list[Tensor] = []
        self._y: list[Tensor] = []

    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        present = target["present"]
        self._pred.append(prediction["value"][present].detach().double().cpu())
        self._y.append(target["y"][present].detach().double().cpu())

    def compute(self) -> dict[str, Any]:
        nan = float("nan")
        if not self._y or not sum(len(y) for y in self._y):
            return {"n": 0, "rmse": nan, "mae": nan, "mse": nan, "r2": nan}
        pred, y = torch.cat(self._pred), torch.cat(self._y)
        err = pred - y
        mse = float(err.pow(2).mean())
        ss_res = err.pow(2).sum(0)
        ss_tot = (y - y.mean(0)).pow(2).sum(0)
        r2 = [float(1 - r / t) if t > 0 else (1.0 if r == 0 else 0.0) for r, t in zip(ss_res, ss_tot)]
        return {"n": len(y), "rmse": math.sqrt(mse), "mae": float(err.abs().mean()), "mse": mse,
                "r2": sum(r2) / len(r2)}
