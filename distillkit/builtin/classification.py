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
from distillkit.builtin.metrics import calibration, roc_auc, sensitivity_at_specificity
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
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout probability in the head, before its last layer")
    #: top-k accuracies to report (1 is always reported as "accuracy")
    topk: list[int] = Field(default_factory=lambda: [1])
    #: classes seen fewer times than this in training are folded into "other" (0 keeps all)
    min_count: int = Field(0, ge=0)
    #: labels in val/test that training never saw: "error" stops; "skip" leaves them out of the losses
    #: and scores them as wrong (counted as ``unseen`` in the metrics)
    unknown_labels: str = Field("skip", pattern="^(error|skip)$")
    #: the specificity at which each class's screening sensitivity is reported (``sens_at_spec``)
    screening_specificity: float = Field(0.90, gt=0, lt=1)
    #: per-class weights of the cross-entropy (the supervised loss and the hard-label part of
    #: distillation): ``none``, or ``balanced`` = n / (C * count_c) over the training split's
    #: labeled rows, as scikit-learn's ``class_weight="balanced"``. The KL term is not weighted.
    class_weights: Literal["none", "balanced"] = "none"


class ClassificationTask(Task):
    """Single-label classification over a class list learned from the training split."""

    Params = ClassificationParams
    primary_metric = "accuracy"
    # the rest of the metrics (accuracy, top-k, balanced accuracy, F1, AUC, ...) are "max"
    metric_directions = {"ece": "min", "unseen": "min"}

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
        unseen = torch.zeros(len(labels), dtype=torch.bool)
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
                unseen[i] = True
                continue
            y[i] = j
            present[i] = True
        if unknown:  # no loss for them, but the metrics score them as wrong and count them
            n = len(unknown)
            log.warning("%s%d label%s of task '%s' %s not in the training class list (%d classes) and %s scored "
                        "as wrong (e.g. '%s'); set unknown_labels: error to stop instead.",
                        f"{where}: " if where else "", n, "s" if n > 1 else "", self.name, "are" if n > 1 else "is",
                        len(self.classes), "were" if n > 1 else "was", unknown[0])
        return {"y": y, "present": present, "unseen": unseen}

    def state(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.classes = list(state["classes"])
        self._index = {c: i for i, c in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def topk(self) -> tuple[int, ...]:
        return tuple(self.params.topk)

    def headline_metrics(self) -> list[tuple[str, str]]:
        # Balanced accuracy, the majority-class rate and macro AUC beside accuracy, so an
        # accuracy that merely equals the majority rate shows at a glance.
        return [("accuracy", "accuracy"), ("balanced_accuracy", "bal. acc"), ("majority_rate", "majority"),
                ("macro_auc", "AUC")] + [(f"top{k}", f"top-{k}") for k in self.topk if k > 1]

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
        return ClassificationMetrics(self.num_classes, self.params.topk, self.classes,
                                     self.params.screening_specificity)

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
    """Accuracy, top-k, confusion matrix, per-class and screening metrics over the whole split.

    Probabilities and labels are gathered per batch and scored at :meth:`compute`. Rows whose
    label training never saw (``target["unseen"]``) count as wrong everywhere (see docs/metrics.md).
    """

    def __init__(self, num_classes: int, topk: Sequence[int], classes: Sequence[str],
                 screening_specificity: float = 0.90):
        self.num_classes = num_classes
        self.topk = sorted({k for k in topk if k > 1})
        self.classes = list(classes)
        self.screening_specificity = screening_specificity
        self._probs: list[Tensor] = []
        self._y: list[Tensor] = []

    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
        probs, y, present = prediction["probs"], target["y"], target["present"]
        unseen = target.get("unseen")
        rows = present if unseen is None else present | unseen
        y = torch.where(present, y, torch.full_like(y, -1))  # -1: a label outside the class list
        self._probs.append(probs[rows].detach().float().cpu())
        self._y.append(y[rows].detach().cpu())

    def compute(self) -> dict[str, Any]:
        c = self.num_classes
        probs = torch.cat(self._probs) if self._probs else torch.zeros(0, c)
        y_all = torch.cat(self._y) if self._y else torch.zeros(0, dtype=torch.long)
        seen = y_all >= 0
        n, unseen = len(y_all), int((~seen).sum())
        pred = probs.argmax(-1) if n else torch.zeros(0, dtype=torch.long)
        nan = float("nan")
        cm = torch.bincount(y_all[seen] * c + pred[seen], minlength=c * c).view(c, c)
        tp = cm.diag().double()
        correct = (pred == y_all) & seen
        out: dict[str, Any] = {"n": n, "unseen": unseen, "accuracy": float(correct.sum()) / n if n else nan}
        for k in self.topk:
            top = probs.topk(min(k, c), dim=-1).indices
            out[f"top{k}"] = float(((top == y_all[:, None]).any(-1) & seen).sum()) / n if n else nan
        # predicted counts include unseen rows: predicting class i for them is a false positive of i
        predicted = torch.bincount(pred, minlength=c).double()
        actual = cm.sum(1).double()
        out["precision"] = {cls: (float(tp[i] / predicted[i]) if predicted[i] else None) for i, cls in enumerate(self.classes)}
        recall = {cls: (float(tp[i] / actual[i]) if actual[i] else None) for i, cls in enumerate(self.classes)}
        out["recall"] = recall
        out["sensitivity"] = dict(recall)
        negatives = n - actual
        tn = negatives - (predicted - tp)
        out["specificity"] = {cls: (float(tn[i] / negatives[i]) if negatives[i] else None) for i, cls in enumerate(self.classes)}
        # balanced accuracy: mean recall over the classes present, plus one "unseen" group of recall 0
        groups = [v for v in recall.values() if v is not None] + ([0.0] * (unseen > 0))
        out["balanced_accuracy"] = sum(groups) / len(groups) if groups else nan
        # macro-F1 over the classes that occur as a label or a prediction
        f1 = [float(2 * tp[i] / (actual[i] + predicted[i])) for i in range(c) if actual[i] + predicted[i]]
        out["macro_f1"] = sum(f1) / len(f1) if f1 else nan
        out["majority_rate"] = float(actual.max()) / n if n and c else nan
        auc, sens = {}, {}
        for i, cls in enumerate(self.classes):
            positive = y_all == i
            auc[cls] = roc_auc(probs[:, i], positive)
            sens[cls] = sensitivity_at_specificity(probs[:, i], positive, self.screening_specificity)
        out["auc"] = auc
        known = [v for v in auc.values() if v is not None]
        out["macro_auc"] = sum(known) / len(known) if known else nan
        out["screening_specificity"] = self.screening_specificity
        out["sens_at_spec"] = sens
        confidence = probs.max(-1).values if n else torch.zeros(0)
        out["ece"], out["reliability"] = calibration(confidence, correct)
        out["confusion"] = cm.tolist()
        out["classes"] = list(self.classes)
        return out
