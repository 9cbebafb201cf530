"""The interfaces every component implements: Task, Student, Teacher, Loss, AggregationPolicy.

Vocabulary used throughout:

* **features**: what a student's shared encoder produces for a batch, ``(B, D)``.
* **target**: a task's encoded labels for a batch, a dict of tensors that always holds
  ``"present"`` (``(B,)`` bool: the row has a label for this task).
* **soft target**: a task's aggregated teacher output for a batch (at temperature ``tau`` for
  a task that has one), a dict of tensors. A task declares its keys in
  :attr:`Task.soft_target_kinds`: a classification task returns ``"probs"`` (a distribution
  over the last axis), a regression task ``"mean"`` (plain values); it may hold more, e.g. the
  token prefix a sequence task decoded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from distillkit.errors import DistillkitError
from distillkit.schema import NestedComponents

Tensor = torch.Tensor


class Params(BaseModel):
    """Base for every component's parameters: strict, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricAccumulator(ABC):
    """Accumulates predictions over a whole split; ``compute`` is called once at the end.

    Accumulate on the device (no ``.item()`` per batch) so evaluation does not synchronise.
    """

    @abstractmethod
    def update(self, prediction: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """Scalar metrics (floats) plus optional structured ones (lists, e.g. a confusion matrix)."""


class Task(ABC):
    """A prediction problem learned on top of shared features.

    A task reads one label field of a dataset, learns its class list or vocabulary from the
    training split (:meth:`fit`), encodes labels into tensors, builds its head, and defines
    its supervised loss, its distillation loss and its metrics.
    """

    Params: ClassVar[type[Params]]
    #: the metric (a key of :meth:`MetricAccumulator.compute`) used to rank models and teachers
    primary_metric: ClassVar[str] = "accuracy"
    #: which way each metric improves: ``"max"`` (higher is better) or ``"min"`` (lower is
    #: better, e.g. ``{"rmse": "min"}``); a metric not listed is ``"max"``. Early stopping,
    #: ``temperature: auto``, the ``val_score`` policy and the report follow it.
    metric_directions: ClassVar[dict[str, str]] = {}
    #: what each tensor :meth:`soft_target` returns is, for the teacher-output cache:
    #: ``"distribution"`` (probabilities over the last axis: stored as the stage's
    #: ``teacher_outputs.storage`` says, renormalised after fp16 or top-k), ``"value"`` (plain
    #: numbers, stored exactly in fp32) or ``"value_fp16"`` (plain numbers the task allows to be
    #: rounded to fp16 when the storage is fp16 or topk). Every declared key must be returned;
    #: other keys (e.g. integer tokens) are stored as they are.
    soft_target_kinds: ClassVar[dict[str, str]] = {"probs": "distribution"}
    #: the task's soft targets are tempered: ``temperature`` applies to it and the KD loss
    #: scales its soft term by tau^2. A task without one (regression) refuses a temperature.
    uses_temperature: ClassVar[bool] = True

    def __init__(self, name: str, params: Params):
        self.name = name
        self.params = params

    @property
    def field(self) -> str:
        """The dataset label field this task reads (defaults to the task's name)."""
        return getattr(self.params, "field", None) or self.name

    @property
    def weight(self) -> float:
        """lambda_t: the task's weight in the summed loss."""
        return float(getattr(self.params, "weight", 1.0))

    # -- labels ---------------------------------------------------------------------------
    @abstractmethod
    def fit(self, labels: Sequence[str | None]) -> None:
        """Learn the class list / vocabulary from the training split's raw labels."""

    @abstractmethod
    def encode(self, labels: Sequence[str | None], where: str = "") -> dict[str, Tensor]:
        """Encode raw labels (``None`` = missing) into target tensors with a ``"present"`` mask."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state learned by :meth:`fit` (travels with checkpoints)."""

    @abstractmethod
    def load_state(self, state: Mapping[str, Any]) -> None: ...

    # -- model ----------------------------------------------------------------------------
    @abstractmethod
    def build_head(self, in_features: int) -> nn.Module: ...

    @abstractmethod
    def forward(self, head: nn.Module, features: Tensor, guide: Mapping[str, Tensor] | None = None,
                train: bool = False) -> Tensor:
        """Logits for a batch. ``guide`` is what conditions a sequence task's decoder (the
        target or soft target holding a token prefix); classification ignores it."""

    @abstractmethod
    def predict(self, head: nn.Module, features: Tensor) -> dict[str, Tensor]:
        """Inference-time predictions (e.g. probabilities, decoded tokens)."""

    # -- losses ---------------------------------------------------------------------------
    @abstractmethod
    def hard_loss(self, logits: Tensor, target: Mapping[str, Tensor]) -> Tensor:
        """Per-row cross-entropy to the labels, ``(B,)``; rows without a label give 0."""

    def hard_row_weights(self, target: Mapping[str, Tensor]) -> Tensor | None:
        """Each row's weight in the hard loss's weighted mean, ``(B,)``, or ``None`` (all 1).

        A task whose :meth:`hard_loss` weights rows (class weights) returns the same weights
        here, so the loss divides by their sum, as ``F.cross_entropy(weight=...)`` does."""
        return None

    @abstractmethod
    def soft_loss(self, logits: Tensor, soft: Mapping[str, Tensor], tau: float) -> Tensor:
        """Per-row KL(teacher_tau || student_tau), ``(B,)``, *not* yet scaled by tau^2 (a task
        without a temperature returns its own distance, e.g. squared error, and gets tau = 1)."""

    @abstractmethod
    def soft_target(self, heads: Sequence[nn.Module], features: Sequence[Tensor], weights: Sequence[float],
                    target: Mapping[str, Tensor] | None, tau: float) -> dict[str, Tensor]:
        """Aggregate several teachers' tempered outputs into one soft target per row.

        ``weights`` (summing to 1) come from the aggregation policy; ``target`` is the
        batch's labels when available (a sequence task teacher-forces on them) or ``None``.
        """

    def guide_from_soft(self, soft: Mapping[str, Tensor], target: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
        """What the student is conditioned on when distilling (a sequence task: the teacher's prefix)."""
        return target

    # -- evaluation -----------------------------------------------------------------------
    @abstractmethod
    def metrics(self) -> MetricAccumulator: ...

    def describe(self) -> str:
        """One line for plans and tables, e.g. ``classification over 5 classes``."""
        return type(self).__name__

    @property
    def class_names(self) -> list[str] | None:
        """The class list learned by :meth:`fit`: entry ``i`` names column ``i`` of the
        prediction's ``probs``. ``None`` (the default) for a task without classes (text,
        regression); per-group evaluation, reports and predictions need a class list."""
        return None

    @property
    def topk(self) -> tuple[int, ...]:
        """The ``k`` of the top-k accuracies the task reports (metric ``top<k>``); predictions
        show ``max(topk)`` classes. Default ``()``: the task reports no top-k accuracy."""
        return ()

    def headline_metrics(self) -> list[tuple[str, str]]:
        """``(metric key, column title)`` of the task's columns in summary tables.

        Default: the primary metric, then ``top<k>`` for every ``k > 1`` of :attr:`topk`."""
        return [(self.primary_metric, self.primary_metric)] + [(f"top{k}", f"top-{k}") for k in self.topk if k > 1]

    def decode_text(self, tokens: Tensor | Sequence[Sequence[int]]) -> list[str] | None:
        """Token rows (a prediction's ``tokens``) -> one string per row, for a task that
        generates text. Default ``None``: the task produces no text."""
        return None

    def gradcam_score(self, head: nn.Module, features: Tensor, target_index: Any = None) -> Tensor:
        """One differentiable score per row, ``(B,)``, that Grad-CAM explains
        (:func:`distillkit.gradcam.gradcam`).

        Default: when the prediction holds ``probs``, the logit of ``target_index`` (one
        class for all rows or one per row; ``None``: the predicted class); otherwise the
        log-likelihood of the model's own prediction, teacher-forced, i.e. minus
        :meth:`hard_loss` with the prediction as the label."""
        with torch.no_grad():
            prediction = self.predict(head, features.detach())
        if "probs" in prediction:
            logits = self.forward(head, features)
            if target_index is None:
                index = prediction["probs"].argmax(-1)
            else:
                index = torch.as_tensor(target_index, device=logits.device).long().expand(logits.shape[0])
            return logits.gather(-1, index[:, None])[:, 0]
        target = dict(prediction)
        target["present"] = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        logits = self.forward(head, features, target, train=False)
        return -self.hard_loss(logits, target)


class FreezeUntil(Params):
    """Freeze the encoder's blocks up to and including ``until`` (a name from :meth:`Encoder.blocks`)."""

    until: str = Field(description="the last frozen block (a name from the encoder's blocks)")


class EncoderParams(Params):
    """Base of every encoder's parameters."""

    kind: str
    #: blocks whose weights stay fixed (BatchNorm in eval mode): ``none``, ``all`` or
    #: ``{until: <block>}``; a frozen part runs once per image and its output is cached
    freeze: Union[Literal["none", "all"], FreezeUntil] = "none"


class Encoder(nn.Module):
    """Maps an input batch (as stored by the dataset: e.g. uint8 images) to ``(B, out_features)``.

    An encoder is a chain of named blocks: ``forward(x)`` equals applying :meth:`blocks` in
    order to :meth:`preprocess` ``(x)``. The chain is what lets a run freeze a prefix of the
    encoder and cache its output (``freeze`` in :class:`EncoderParams`).
    """

    Params: ClassVar[type[Params]]
    params: Params
    out_features: int
    #: how many of :meth:`blocks` are frozen (set from ``params.freeze`` when a student is
    #: built, :func:`distillkit.feature_cache.freeze_encoder`); they and :meth:`preprocess`
    #: get no gradient and stay in eval mode
    frozen_blocks: int = 0
    #: True while the encoder is fed the cached output of its frozen part instead of raw
    #: inputs (:func:`distillkit.feature_cache.reading_features`)
    reads_features: bool = False

    def preprocess(self, inputs: Tensor) -> Tensor:
        """Stored inputs -> what the first block takes (e.g. uint8 pixels -> normalised floats)."""
        return inputs

    def transform_inputs(self, inputs: Tensor) -> Tensor:
        """Raw inputs through the run's fitted :class:`InputTransform`, if the encoder holds one
        (as its ``input_transform`` submodule, saved with its weights); runs before :meth:`preprocess`."""
        transform = self._modules.get("input_transform")
        return inputs if transform is None else transform(inputs)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The encoder's blocks in order, each with a name a ``freeze: {until: ...}`` can give."""
        raise NotImplementedError(f"{type(self).__name__} does not list its blocks")

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.preprocess(self.transform_inputs(inputs))
        for _, block in self.blocks():
            x = block(x)
        return x

    def forward_frozen(self, inputs: Tensor) -> Tensor:
        """Raw inputs -> the output of the frozen part (what the feature cache stores)."""
        x = self.preprocess(self.transform_inputs(inputs))
        for _, block in self.blocks()[:self.frozen_blocks]:
            x = block(x)
        return x

    def forward_trainable(self, features: Tensor) -> Tensor:
        """The output of the frozen part -> the encoder's output (the blocks above it)."""
        x = features.float() if features.dtype == torch.float16 else features  # fp16 cache storage
        for _, block in self.blocks()[self.frozen_blocks:]:
            x = block(x)
        return x

    def train(self, mode: bool = True) -> "Encoder":
        # A frozen part keeps its BatchNorm statistics and runs without dropout even while
        # the rest trains: its cached output must be what it computes at every step.
        super().train(mode)
        if mode and self.frozen_blocks:
            trainable = {id(m) for _, block in self.blocks()[self.frozen_blocks:] for m in block.modules()}
            for module in self.modules():
                if module is not self and id(module) not in trainable:
                    module.training = False
        return self


class InputTransform(nn.Module):
    """``(x - shift) / scale`` on raw inputs, with tensors fitted on the training split only
    (:meth:`distillkit.data.DatasetSource.fit_input_transform`, e.g. every feature's mean and
    standard deviation). ``shift`` and ``scale`` broadcast against one input row; they are
    buffers of the encoder, so they travel in every model file and apply wherever the model
    reads raw inputs: training, evaluation, teachers, ``distillkit eval`` and ``predict``."""

    KEYS = ("shift", "scale")

    def __init__(self, state: Mapping[str, Any], where: str = "fit_input_transform"):
        super().__init__()
        if not isinstance(state, Mapping) or set(state) != set(self.KEYS):
            raise DistillkitError(f"an input transform is a dict with exactly the tensors 'shift' and 'scale', "
                                  f"not {sorted(state) if isinstance(state, Mapping) else type(state).__name__}.",
                                  where=where)
        shift = torch.as_tensor(state["shift"], dtype=torch.float32).detach().clone()
        scale = torch.as_tensor(state["scale"], dtype=torch.float32).detach().clone()
        if not (bool(torch.isfinite(shift).all()) and bool(torch.isfinite(scale).all()) and bool((scale != 0).all())):
            raise DistillkitError("the input transform's 'shift' and 'scale' must be finite and 'scale' nonzero "
                                  "(a constant feature has standard deviation 0: use 1 for it).", where=where)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, inputs: Tensor) -> Tensor:
        return (inputs.float() - self.shift) / self.scale

    def state(self) -> dict[str, Tensor]:
        return {"shift": self.shift, "scale": self.scale}


class Student(nn.Module):
    """A shared encoder with one head per task, for any subset of tasks."""

    Params: ClassVar[type[Params]]
    #: ``{field: registry kind}`` of the fields of :attr:`Params` that hold nested components,
    #: read from their annotations (``encoder: Annotated[Any, Component("encoder")]``; the
    #: config validates each with that kind's own Params); read-only
    nested: ClassVar[dict[str, str]] = NestedComponents()  # type: ignore[assignment]

    def __init__(self, encoder: Encoder, tasks: Mapping[str, Task]):
        super().__init__()
        self.encoder = encoder
        self.task_names = tuple(tasks)
        self.heads = nn.ModuleDict({name: task.build_head(encoder.out_features) for name, task in tasks.items()})

    @classmethod
    def build(cls, params: Params, tasks: Mapping[str, Task], registries: Any) -> "Student":
        """A student of this class for ``tasks`` (fitted) from its validated ``params``.

        Default: the encoder that ``params.encoder`` names (a nested component:
        ``Annotated[Any, Component("encoder")]``) and one head per task. Override it for another architecture."""
        encoder_params = params.encoder  # type: ignore[attr-defined]
        return cls(registries.encoder.get(encoder_params.kind)(encoder_params), tasks)

    def features(self, inputs: Tensor) -> Tensor:
        """Encoder output for raw inputs, or for cached frozen features while ``reads_features``."""
        if self.encoder.reads_features:
            return self.encoder.forward_trainable(inputs)
        return self.encoder(inputs)


@dataclass
class Teacher:
    """A trained, frozen model and the tasks it learned.

    Its outputs come online (:meth:`features` under ``no_grad``) or from the
    teacher-output cache. ``scores`` holds its validation score per task, for policies that
    weight teachers by quality.
    """

    name: str
    model: Student
    tasks: frozenset[str]
    scores: dict[str, float] = field(default_factory=dict)
    checksum: str = ""
    #: what each task learned from its training labels (:meth:`Task.state`: class list,
    #: vocabulary); a teacher's outputs line up with a student's only when these match
    task_states: dict[str, Any] = field(default_factory=dict)
    #: per task, the direction of its score (``"max"`` or ``"min"``, see
    #: :mod:`distillkit.metric_direction`); a task not listed is ``"max"``
    score_directions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Eval mode fixes BatchNorm statistics and dropout; no parameter ever gets a gradient.
        self.model.eval()
        self.model.requires_grad_(False)

    # no_grad rather than inference_mode: soft targets are saved for the student's backward
    # pass, which inference tensors cannot be.
    @torch.no_grad()
    def features(self, inputs: Tensor) -> Tensor:
        if self.model.training:  # somebody called .train() on the student that shares it
            self.model.eval()
        return self.model.features(inputs)


class AggregationPolicy(ABC):
    """Decides how the teachers that learned a task are weighted for that task.

    Routing is done by the core: a policy only ever sees teachers that learned ``task``.
    """

    Params: ClassVar[type[Params]]

    def __init__(self, params: Params):
        self.params = params

    @abstractmethod
    def weights(self, task: str, teachers: Sequence[Teacher]) -> list[float]:
        """Non-negative weights summing to 1, one per teacher."""


class Loss(ABC):
    """Combines per-task hard-label and soft-label terms into the training objective."""

    Params: ClassVar[type[Params]]

    def __init__(self, params: Params):
        self.params = params

    @abstractmethod
    def __call__(self, tasks: Mapping[str, Task], logits: Mapping[str, Tensor],
                 targets: Mapping[str, Mapping[str, Tensor]] | None,
                 soft: Mapping[str, Mapping[str, Tensor]] | None,
                 alpha: float, tau: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss and its per-task parts (device tensors, not floats)."""
