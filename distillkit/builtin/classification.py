"""The generic classification task: dense-ReLU-dense head, CE, tempered KL, top-k metrics."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from distillkit.errors import DistillkitError, did_you_mean
from distillkit.interfaces import MetricAccumulator, Params, Task
from distillkit.losses import kl_rows, tempered_probs

Tensor = torch.Tensor
log = logging.getLogger(__name__)


class ClassificationParams(Params):
    kind: str = "classification"
    #: dataset label field (defaults to the task name)
    field: str | None = None
    #: lambda_t, the task's weight in the loss
    weight: float = Field(1.0, ge=0)
    #: hidden width of the dense-ReLU-dense head; 0 gives a single linear layer
    hidden: int = Field(256, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    #: top-k accuracies to report (1 is always reported as "accuracy")
    topk: list[int] = Field(default_factory=lambda: [1])
    #: classes seen fewer times than this in training are folded into "other" (0 keeps all)
    min_count: int = Field(0, ge=0)
    #: labels in val/test that training never saw: "error" stops, "skip" treats them as missing
    unknown_labels: str = Field("skip", pattern="^(error|skip)$")
    #: per-class weights of the cross-entropy (the supervised loss and the hard-label part of
    #: distillation): ``none``, or ``balanced`` = n / (C * count_c) over the training split's
    #: labeled rows, as scikit-learn's ``class_weight="balanced"``. The KL term is not weighted.
    class_weights: Literal["none", "balanced"] = "none"


class ClassificationTask(Task):
    """Single-label classification over a class list learned from the training split."""

    Params = ClassificationParams
    primary_metric = "accuracy"

    def __init__(self, name: str, params: ClassificationParams):
        super().__init__(name, params)
        self.classes: list[str] = []
        self._index: dict[str, int] = {}
        #: ``(C,)`` CE weight of each class, or ``None`` (unweighted); set by :meth:`fit`
        self.class_weights: Tensor | None = None

    # labels -------------------------------------------------------------------------------
    def fit(self, labels: Sequence[str | None]) -> None:
        counts = Counter(v for v in labels if v is not None)
        keep = sorted(c for c, n in counts.items() if n >= self.params.min_count)
        self.classes = keep
        self._index = {c: i for i, c in enumerate(keep)}
        self.class_weights = None
        if self.params.class_weights == "balanced":
            self.class_weights = balanced_weights([counts[c] for c in keep])

    def encode(self, labels: Sequence[str | None], where: str = "") -> dict[str, Tensor]:
        y = torch.zeros(len(labels), dtype=torch.long)
        present = torch.zeros(len(labels), dtype=torch.bool)
        unknown: list[str] = []
        for i, v in enumerate(labels):
            if v is None:
                continue
            j = self._index.get(v)
            if j is None:
                if self.params.unknown_labels == "error":
                    raise DistillkitError(
                        f"row {i}: label '{v}' of task '{self.name}' is not in the training class list."
                        f"{did_you_mean(v, self.classes)}", where=where or None)
                unknown.append(v)
                continue
            y[i] = j
            present[i] = True
        if unknown:  # skipped, but never silently: the split's metrics count fewer rows
            n = len(unknown)
            log.warning("%s%d label%s of task '%s' %s not in the training class list (%d classes) and %s counted "
                        "as missing (e.g. '%s'); set unknown_labels: error to stop instead.",
                        f"{where}: " if where else "", n, "s" if n > 1 else "", self.name, "are" if n > 1 else "is",
                        len(self.classes), "were" if n > 1 else "was", unknown[0])
        return {"y": y, "present": present}

    def state(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.classes = list(state["classes"])
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # model --------------------------------------------------------------------------------
    def build_head(self, in_features: int) -> nn.Module:
        if not self.classes:
            raise RuntimeError(f"task '{self.name}' must be fitted before building its head")
        p = self.params
        if p.hidden == 0:
            return nn.Linear(in_features, self.num_classes)
        return nn.Sequential(nn.Linear(in_features, p.hidden), nn.ReLU(inplace=True),
                             nn.Dropout(p.dropout), nn.Linear(p.hidden, self.num_classes))

    def forward(self, head: nn.Module, features: Tensor, guide=None, train: bool = False) -> Tensor:
        return head(features)

    def predict(self, head: nn.Module, features: Tensor) -> dict[str, Tensor]:
        return {"probs": F.softmax(head(features).float(), dim=-1)}

    # losses -------------------------------------------------------------------------------
    def hard_loss(self, logits: Tensor, target: Mapping[str, Tensor]) -> Tensor:
        w = self.class_weights
        if w is not None:
            w = w.to(logits.device)
        return F.cross_entropy(logits.float(), target["y"], weight=w, reduction="none")

    def hard_row_weights(self, target: Mapping[str, Tensor]) -> Tensor | None:
        if self.class_weights is None:
            return None
        return self.class_weights.to(target["y"].device)[target["y"]]

    def soft_loss(self, logits: Tensor, soft: Mapping[str, Tensor], tau: float) -> Tensor:
        return kl_rows(logits, soft["probs"], tau)

    def soft_target(self, heads, features, weights, target, tau) -> dict[str, Tensor]:
        probs = None
        for head, feats, w in zip(heads, features, weights):
            p = tempered_probs(head(feats), tau) * w
            probs = p if probs is None else probs + p
        return {"probs": probs}

    # metrics ------------------------------------------------------------------------------
    def metrics(self) -> MetricAccumulator:
        return ClassificationMetrics(self.num_classes, self.params.topk, self.classes)

    def describe(self) -> str:
        return f"classification of '{self.field}' over {self.num_classes} classes"


def balanced_weights(counts: Sequence[int]) -> Tensor:
    """scikit-learn's ``balanced`` class weights, n / (C * count_c), for the training counts.

    Every class of a fitted task has count >= 1 (the class list is learned from the same
    training rows), so no weight is infinite; a class-frequency-weighted mean of them is 1.
    """
    c = torch.tensor(counts, dtype=torch.float64)
    if len(c) == 0 or bool((c <= 0).any()):
        raise ValueError(f"balanced class weights need a positive count for every class (got {list(counts)})")
    return (c.sum() / (len(c) * c)).float()


class ClassificationMetrics(MetricAccumulator):
    """Accuracy, top-k, confusion matrix, per-class precision and recall over the whole split."""

    def __init__(self, num_classes: int, topk: Sequence[int], classes: Sequence[str]):
        self.num_classes = num_classes
        self.topk = sorted({k for k in topk if k > 1})
        self.classes = list(classes)
        self.confusion: Tensor | None = None
        self.topk_hits: dict[int, Tensor] = {}

    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        probs, y, present = prediction["probs"], target["y"], target["present"]
        probs, y = probs[present], y[present]
        c = self.num_classes
        if self.confusion is None:
            self.confusion = torch.zeros(c * c, dtype=torch.long, device=probs.device)
            self.topk_hits = {k: torch.zeros((), dtype=torch.long, device=probs.device) for k in self.topk}
        pred = probs.argmax(-1)
        self.confusion += torch.bincount(y * c + pred, minlength=c * c)
        for k in self.topk:
            top = probs.topk(min(k, c), dim=-1).indices
            self.topk_hits[k] += (top == y[:, None]).any(-1).sum()

    def compute(self) -> dict[str, Any]:
        c = self.num_classes
        cm = (self.confusion if self.confusion is not None else torch.zeros(c * c, dtype=torch.long)).view(c, c).cpu()
        n = int(cm.sum())
        tp = cm.diag().double()
        out: dict[str, Any] = {"n": n, "accuracy": float(tp.sum() / n) if n else float("nan")}
        for k in self.topk:
            out[f"top{k}"] = float(self.topk_hits[k]) / n if n else float("nan")
        predicted, actual = cm.sum(0).double(), cm.sum(1).double()
        out["precision"] = {cls: (float(tp[i] / predicted[i]) if predicted[i] else None) for i, cls in enumerate(self.classes)}
        out["recall"] = {cls: (float(tp[i] / actual[i]) if actual[i] else None) for i, cls in enumerate(self.classes)}
        out["confusion"] = cm.tolist()
        out["classes"] = list(self.classes)
        return out
