"""The training loop shared by supervised and distillation stages.

One function, :func:`fit`, in the spirit of nanoGPT's ``train.py``: read it top to bottom. Its
named steps follow it: resuming (``_resume``), the finite check of every epoch
(``_check_finite``) and early stopping (``_track_best``, comparing scores in ``_improved``).
Teachers never appear here; a distillation stage passes a ``soft_targets`` callable that
returns each task's soft target for a batch (from the teacher-output cache, or online).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Protocol, Sequence

import torch
from pydantic import Field, field_validator, model_validator

from distillkit.checkpoint import (STATE_FORMAT, load_tensors, optimizer_from_tensors, optimizer_to_tensors,
                                   save_model, save_tensors, load_model_state)
from distillkit import distributed
from distillkit.data import Batch, SplitData, batch_of, hash_seed, iterate_batches
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.interfaces import Loss, Params, Student, Task
from distillkit.io import append_jsonl
from distillkit.metric_direction import higher_is_better
from distillkit.schema import Component

Tensor = torch.Tensor
SoftTargets = Callable[[Batch], Mapping[str, Mapping[str, Tensor]]]


class OptimizerParams(Params):
    kind: Literal["sgd", "adam", "adamw"] = Field("sgd",
                                                  description="the optimizer: SGD (the paper, with Nesterov momentum), "
                                                              "Adam or AdamW")
    lr: float = Field(0.01, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by Adam and AdamW)")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD")
    #: L2 regularisation (the paper: 1e-6)
    weight_decay: float = Field(1e-6, ge=0)


class EarlyStoppingParams(Params):
    #: ``val_loss`` (labels), ``val_kd`` (KL to the teachers on val, no labels), or ``<task>.<metric>``
    metric: str = "val_loss"
    patience: int = Field(5, ge=1,
                          description="epochs without an improvement of at least min_delta before training stops")
    min_delta: float = Field(0.0, ge=0, description="the smallest change of the metric that counts as an improvement")


SAMPLER_KINDS = ("shuffle", "balanced")


class SamplerParams(Params):
    """How a training epoch draws its rows: ``shuffle`` (each row once, the default) or
    ``balanced`` (rows drawn with replacement so that ``task``'s classes come up equally often)."""

    kind: str = Field("shuffle",
                      description="shuffle (each row once per epoch) or balanced (classes of task equally often)")
    #: the classification task whose classes are balanced (``kind: balanced`` only)
    task: Optional[str] = None

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in SAMPLER_KINDS:
            raise ValueError(f"unknown sampler kind '{value}'.{did_you_mean(value, SAMPLER_KINDS)} "
                             f"Valid kinds: {', '.join(SAMPLER_KINDS)}")
        return value

    @model_validator(mode="after")
    def _task_given(self) -> "SamplerParams":
        if self.kind == "balanced" and not self.task:
            raise ValueError("a balanced sampler needs 'task': the classification task whose classes it balances")
        return self


class TrainingParams(Params):
    optimizer: OptimizerParams = Field(OptimizerParams(), description="the optimizer and its hyper-parameters")
    batch_size: int = Field(128, ge=1, description="training rows per step")
    eval_batch_size: int = Field(256, ge=1,
                                 description="rows per batch when evaluating and when computing teacher outputs")
    #: maximum number of epochs (early stopping may end sooner)
    epochs: int = Field(30, ge=1)
    early_stopping: Optional[EarlyStoppingParams] = Field(EarlyStoppingParams(),
                                                          description="stop when a validation metric stops improving "
                                                                      "and keep the best epoch; null trains every "
                                                                      "epoch")
    scheduler: Literal["none", "cosine"] = Field("none",
                                                 description="learning-rate schedule: constant (none) or cosine decay "
                                                             "to 0 over the epochs")
    grad_clip: Optional[float] = Field(None, gt=0,
                                       description="clip the gradient norm to this value; null: no clipping")
    #: autocast of the training step: ``off``, ``bf16`` (CUDA or CPU) or ``fp16`` (CUDA only, with a
    #: gradient scaler); the losses are computed in fp32 either way (see docs/design.md)
    mixed_precision: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = Field(False, description="channels_last memory format for the model and its 4-D image "
                                                   "batches (any device; fastest on GPUs with tensor cores)")
    #: random augmentation of each training batch, e.g. ``{kind: gaussian_noise, std: 0.1}``
    augment: Annotated[Optional[Any], Component("augmentation")] = None
    #: with a frozen encoder part: train on its output computed once per image and stored as
    #: ``fp32`` or ``fp16``, or ``off`` to run it at every step (see docs/feature_cache.md)
    feature_cache: Literal["fp32", "fp16", "off"] = "fp32"
    #: ``{kind: balanced, task: <task>}`` draws class-balanced epochs (see docs/design.md)
    sampler: SamplerParams = SamplerParams()

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _precision_word(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as False: that is the documented `off`. A True (`on`,
        # `true`, the old boolean setting) names no precision, so it is refused with the choices.
        if value is False:
            return "off"
        if value is True:
            raise ValueError("must be off, bf16 or fp16: a boolean names no precision (YAML reads an unquoted "
                             "on, yes or true as true)")
        return value


def autocast_dtype(mode: str, device: torch.device, where: str = "training.mixed_precision") -> torch.dtype | None:
    """The autocast dtype of ``training.mixed_precision`` on ``device``; ``None`` when it is off.

    bf16 runs on CUDA and on CPU; fp16 on CUDA only: CPU kernels in fp16 are slow and no more
    exact than bf16, so fp16 on a CPU is a config error (``where`` names the key) rather than a
    silent fallback. Other devices (``mps``) have no mixed precision here.
    """
    if mode == "off":
        return None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    if device.type == "cuda" or (device.type == "cpu" and dtype == torch.bfloat16
                                 and torch.amp.is_autocast_available("cpu")):
        return dtype
    supported = "bf16 or off" if device.type == "cpu" else "off"
    raise DistillkitError(f"mixed precision '{mode}' is not available on device '{device}': fp16 runs on CUDA "
                          f"only, bf16 on CUDA and CPU. Set {where} to {supported} on this device.", where=where)


class Callbacks(Protocol):
    def on_epoch_start(self, epoch: int, total_epochs: int, steps: int) -> None: ...
    def on_step(self) -> None: ...
    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None: ...


class NullCallbacks:
    def on_epoch_start(self, epoch, total_epochs, steps): pass
    def on_step(self): pass
    def on_epoch_end(self, epoch, record): pass


def sampler_weights(train: SplitData, sampler: SamplerParams) -> Tensor | None:
    """Each training row's draw probability under a balanced sampler, or ``None`` (shuffle).

    Rows labeled for the sampler's task keep their share of the epoch (n_labeled / n), split
    equally among its classes and, within a class, equally among its rows; rows without a label
    for the task (or with a label outside the class list) keep their plain 1/n. A split without
    labels (a stage on the unlabeled pool) is shuffled as usual: there is nothing to balance.
    """
    if sampler.kind != "balanced" or train.targets is None or sampler.task not in train.targets:
        return None
    y, present = train.targets[sampler.task]["y"], train.targets[sampler.task]["present"]
    n = len(y)
    if n == 0 or not bool(present.any()):
        return None
    counts = torch.bincount(y[present])
    classes = int((counts > 0).sum())
    share = float(present.sum()) / n
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    w[present] = share / (classes * counts[y[present]].double())
    return w


def make_optimizer(model: torch.nn.Module, p: OptimizerParams) -> torch.optim.Optimizer:
    params = [q for q in model.parameters() if q.requires_grad]
    if p.kind == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov and p.momentum > 0,
                               weight_decay=p.weight_decay)
    cls = torch.optim.Adam if p.kind == "adam" else torch.optim.AdamW
    return cls(params, lr=p.lr, weight_decay=p.weight_decay)


def forward_tasks(model: Student, tasks: Mapping[str, Task], inputs: Tensor,
                  targets: Mapping[str, Mapping[str, Tensor]] | None,
                  soft: Mapping[str, Mapping[str, Tensor]] | None, train: bool) -> dict[str, Tensor]:
    """Logits of every task from one encoder pass.

    A sequence task is conditioned on the labels (supervised) or, when distilling, on the
    same prefix the teachers saw (``guide_from_soft``), so student and teacher distributions
    are compared position by position.
    """
    feats = model.features(inputs)
    out = {}
    for name, task in tasks.items():
        target = targets[name] if targets is not None else None
        if soft is not None:
            guide = task.guide_from_soft(soft[name], target)
            out[name] = task.forward(model.heads[name], feats, guide, train=False)
        else:
            out[name] = task.forward(model.heads[name], feats, target, train=train)
    return out


@torch.no_grad()
def evaluate(model: Student, tasks: Mapping[str, Task], split: SplitData, batch_size: int, device: torch.device,
             loss_fn: Loss | None = None, soft_targets: SoftTargets | None = None,
             tau: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Metrics of every task over a whole split, plus ``loss`` (labels) and ``kd`` (teachers).

    Under torchrun the ranks share the batches out (:func:`distillkit.distributed.ordered_outputs`)
    and rank 0 accumulates every batch's predictions in order: the split-level metrics
    (confusion matrices, AUC, BLEU) are those of one process; every rank returns them.
    """
    was_training = model.training
    model.eval()
    accumulators = {name: task.metrics() for name, task in tasks.items()}
    loss_sum = torch.zeros((), device=device)
    kd_sum = torch.zeros((), device=device)
    rows = 0

    def batch_outputs(batch: Batch) -> dict[str, Any]:
        feats = model.features(batch.inputs)
        out: dict[str, Any] = {}
        if batch.targets is not None:
            out["pred"] = {name: task.predict(model.heads[name], feats) for name, task in tasks.items()}
        n = len(batch.index)
        if loss_fn is not None and batch.targets is not None:
            logits = {name: task.forward(model.heads[name], feats, batch.targets[name]) for name, task in tasks.items()}
            loss, _ = loss_fn(tasks, logits, batch.targets, None, 0.0, tau or {})
            out["loss"] = loss * n
        if loss_fn is not None and soft_targets is not None:
            soft = soft_targets(batch)
            logits = {name: task.forward(model.heads[name], feats, task.guide_from_soft(soft[name], None))
                      for name, task in tasks.items()}
            kd, _ = loss_fn(tasks, logits, None, soft, 1.0, tau or {})
            out["kd"] = kd * n
        return out

    for batch, out in split_outputs(split, batch_size, device, list(tasks), batch_outputs):
        if "pred" in out:
            for name in tasks:
                accumulators[name].update(out["pred"][name], batch.targets[name])
        if "loss" in out:
            loss_sum += out["loss"]
        if "kd" in out:
            kd_sum += out["kd"]
        rows += len(batch.index)
    result: dict[str, Any] | None = None
    if distributed.is_main():
        result = {name: acc.compute() for name, acc in accumulators.items()} if split.targets is not None else {}
        if loss_fn is not None and split.targets is not None:
            result["loss"] = float(loss_sum) / max(rows, 1)
        if soft_targets is not None:
            result["kd"] = float(kd_sum) / max(rows, 1)
    model.train(was_training)
    return distributed.broadcast_object(result)


def split_outputs(split: SplitData, batch_size: int, device: torch.device, tasks: Sequence[str] | None,
                   compute: Callable[[Batch], Any]):
    """``(batch, compute(batch))`` for the batches of ``split`` in order. In a single process
    that is all; under torchrun each rank computes every ``world``-th batch, and rank 0
    alone receives them all, in order, each computed on exactly the batch a single process
    computes it on (the other ranks receive nothing)."""
    if not distributed.active():
        for batch in iterate_batches(split, batch_size, device=device, tasks=tasks):
            yield batch, compute(batch)
        return
    n = len(split)

    def rows(i: int) -> Tensor:
        return torch.arange(i * batch_size, min(n, (i + 1) * batch_size))

    count = (n + batch_size - 1) // batch_size
    for i, out in distributed.ordered_outputs(count, lambda i: compute(batch_of(split, rows(i), device, tasks)),
                                              device):
        idx = rows(i)
        yield batch_of(split, idx, device, tasks, inputs=False), out


def score_of(metrics: Mapping[str, Any], metric: str,
             tasks: Mapping[str, Task] | None = None) -> tuple[float, bool]:
    """(value, higher_is_better) of an early-stopping metric in a validation result.

    The direction is the task's (``Task.metric_directions``: ``rmse`` is lower-is-better);
    without ``tasks``, a task's metric counts as higher-is-better.

    A metric the result does not hold is a user error: read as NaN, a misspelt name would
    silently keep epoch 0 and stop after ``patience`` epochs.
    """
    if metric in ("val_loss", "val_kd"):
        value, higher = metrics.get("loss" if metric == "val_loss" else "kd"), False
    else:
        task, _, key = metric.partition(".")
        sub = metrics.get(task)
        value = sub.get(key) if isinstance(sub, Mapping) else None
        higher = higher_is_better((tasks or {}).get(task), key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        known = [name for name, key in (("val_loss", "loss"), ("val_kd", "kd")) if key in metrics]
        known += [f"{t}.{k}" for t, sub in metrics.items() if isinstance(sub, Mapping)
                  for k, v in sub.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"]
        raise DistillkitError(f"the early-stopping metric '{metric}' is not among the validation results"
                              f".{did_you_mean(metric, known)} Known: {', '.join(known) or 'none'}.",
                              where="early_stopping.metric")
    return float(value), higher


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, Any] = field(default_factory=dict)


def fit(model: Student, tasks: Mapping[str, Task], loss_fn: Loss, train: SplitData, val: SplitData,
        params: TrainingParams, *, device: torch.device, seed: int, workdir: Path,
        use_labels: bool = True, soft_targets: SoftTargets | None = None, val_soft_targets: SoftTargets | None = None,
        alpha: float = 0.0, tau: Mapping[str, float] | None = None, callbacks: Callbacks | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
        stage: str = "stage", model_meta: Mapping[str, Any] | None = None,
        batch_seed: int | None = None) -> FitResult:
    """Train ``model`` on ``train``; keep the best epoch by the validation metric.

    ``workdir`` receives ``last.safetensors`` (model, optimizer, RNG and loop state, written
    after every epoch) and ``best.safetensors``; if ``last.safetensors`` exists the loop resumes
    from it, so an interrupted stage continues where it stopped and ends with the same weights.
    A distillation stage passes ``soft_targets`` (and ``val_soft_targets`` for ``val_kd``),
    ``alpha`` (the soft term's weight) and ``tau``; an unlabeled one ``use_labels=False``.
    ``params.mixed_precision`` autocasts the training step's forward pass only: the losses,
    validation and the soft targets run in fp32.
    ``batch_seed`` (default ``seed``) orders the batches; when given, the augmentation draws
    from it too rather than from the model's random state, so models that share a
    ``batch_seed`` see the same augmented batches (:func:`fit_together` relies on this).
    """
    callbacks = callbacks or NullCallbacks()
    tau = dict(tau or {})
    es = params.early_stopping
    metric = _monitored_metric(es, tasks, use_labels)
    amp_dtype = autocast_dtype(params.mixed_precision, device)
    optimizer, scheduler = _placed_with_optimizer(model, params, device)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
    # A disabled scaler passes scale/step/update straight through to the plain fp32 step.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if distributed.is_main():  # under torchrun, rank 0 alone writes the stage's files
        workdir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, log_path = workdir / "last.safetensors", workdir / "best.safetensors", workdir / "log.jsonl"
    _seed_rank(hash_seed(seed, stage, "init"))
    state = _resume(last_path, log_path, model, optimizer, scheduler, scaler) or _fresh_state()

    steps = math.ceil(len(train) / params.batch_size)
    row_weights = sampler_weights(train, params.sampler)
    order_seed = seed if batch_seed is None else batch_seed
    # A run that already stopped early stays stopped: resuming it must not train on.
    first_epoch = params.epochs if _stopped(es, state) else state["epoch"]
    for epoch in range(first_epoch, params.epochs):
        model.train()
        callbacks.on_epoch_start(epoch, params.epochs, steps)
        # Each step's loss and per-task parts go into a device buffer (one copy per step, no
        # host synchronisation); the epoch's sums and any NaN step are read once, at its end.
        step_losses = torch.zeros(steps, 1 + len(tasks), device=device)
        step_rows: list[int] = []
        # augmented before the teachers see the batch: they must see the same view
        for step, batch, rows in _epoch_batches(train, params.batch_size, order_seed, epoch, row_weights, device,
                                                list(tasks) if use_labels else None, augment, batch_seed):
            targets = batch.targets if use_labels else None
            soft = soft_targets(batch) if soft_targets is not None else None
            step_losses[step] = _train_step(model, tasks, loss_fn, optimizer, scaler, params, batch.inputs,
                                            targets, soft, alpha, tau, amp_dtype)
            step_rows.append(rows)
            callbacks.on_step()
        record = _end_epoch(model, tasks, loss_fn, val, params, device, optimizer, scheduler, scaler, state, metric,
                            step_losses[:len(step_rows)], step_rows, stage, epoch, workdir, model_meta,
                            val_soft_targets, tau)
        callbacks.on_epoch_end(epoch, record)
        if _stopped(es, state):
            break

    distributed.barrier()  # rank 0 has written best.safetensors
    best_state, _ = load_model_state(best_path)
    model.load_state_dict(best_state)
    return FitResult(best_epoch=state["best_epoch"], epochs_run=state["epoch"], history=state["history"])


@dataclass
class Member:
    """One model trained by :func:`fit_together`: what :func:`fit` takes for it (``seed``,
    ``workdir``, ``val``, ``stage`` as there), and its loop state while it trains."""

    model: Student
    tasks: Mapping[str, Task]
    loss_fn: Loss
    val: SplitData
    seed: int
    workdir: Path
    model_meta: Mapping[str, Any] | None = None
    callbacks: Callbacks | None = None
    state: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    metric: str | None = None
    rng: Any = None
    scaler: Any = None
    step_losses: Tensor | None = None


def fit_together(members: Sequence[Member], train: SplitData, params: TrainingParams, *, device: torch.device,
                 batch_seed: int, stage: str = "stage", augment: Callable[[Tensor], Tensor] | None = None,
                 callbacks: Callbacks | None = None) -> list[FitResult]:
    """Supervised training of several models on one batch stream: the same models as calling
    :func:`fit` on each in turn with this ``batch_seed``, for one pass over the data per epoch.

    Each batch is drawn, augmented and moved to ``device`` once; then every model still
    training takes its step on it, under its own random state (swapped in and out of torch's
    global CPU generator, and the device's on CUDA, as a run of :func:`fit` alone would have
    left them), with its own
    optimizer. Every model keeps its own ``workdir`` files, written as :func:`fit` writes them:
    a killed run resumes each from its ``last.safetensors``, even at different epochs. A model
    that stopped early is skipped for the remaining epochs and keeps its best epoch.
    ``callbacks`` reports progress over the shared stream; each member's own ``callbacks``
    receives its ``on_epoch_end``.
    """
    callbacks = callbacks or NullCallbacks()
    es = params.early_stopping
    amp_dtype = autocast_dtype(params.mixed_precision, device)
    for m in members:
        m.metric = _monitored_metric(es, m.tasks, True)
        m.optimizer, m.scheduler = _placed_with_optimizer(m.model, params, device)
        m.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # one per optimizer
        if distributed.is_main():
            m.workdir.mkdir(parents=True, exist_ok=True)
        _seed_rank(hash_seed(m.seed, stage, "init"))
        m.state = (_resume(m.workdir / "last.safetensors", m.workdir / "log.jsonl", m.model, m.optimizer,
                           m.scheduler, m.scaler) or _fresh_state())
        m.rng = _rng_state(device)
    names = list(dict.fromkeys(t for m in members for t in m.tasks))
    steps = math.ceil(len(train) / params.batch_size)
    row_weights = sampler_weights(train, params.sampler)
    for epoch in range(params.epochs):
        # after a kill between two members' checkpoints, some are an epoch ahead: they wait
        group = [m for m in members if m.state["epoch"] == epoch and not _stopped(es, m.state)]
        if not group:
            continue
        callbacks.on_epoch_start(epoch, params.epochs, steps)
        for m in group:
            m.model.train()
            m.step_losses = torch.zeros(steps, 1 + len(m.tasks), device=device)
        step_rows: list[int] = []
        for step, batch, rows in _epoch_batches(train, params.batch_size, batch_seed, epoch, row_weights, device,
                                                names, augment, batch_seed):
            for m in group:
                _set_rng_state(device, m.rng)
                targets = {t: batch.targets[t] for t in m.tasks}
                m.step_losses[step] = _train_step(m.model, m.tasks, m.loss_fn, m.optimizer, m.scaler, params,
                                                  batch.inputs, targets, None, 0.0, {}, amp_dtype)
                m.rng = _rng_state(device)
            step_rows.append(rows)
            callbacks.on_step()
        for m in group:
            _set_rng_state(device, m.rng)
            record = _end_epoch(m.model, m.tasks, m.loss_fn, m.val, params, device, m.optimizer, m.scheduler,
                                m.scaler, m.state, m.metric, m.step_losses[:len(step_rows)], step_rows, stage, epoch,
                                m.workdir, m.model_meta, None, {})
            m.rng = _rng_state(device)
            m.step_losses = None
            (m.callbacks or NullCallbacks()).on_epoch_end(epoch, record)
    results = []
    distributed.barrier()  # rank 0 has written every best.safetensors
    for m in members:
        best_state, _ = load_model_state(m.workdir / "best.safetensors")
        m.model.load_state_dict(best_state)
        results.append(FitResult(best_epoch=m.state["best_epoch"], epochs_run=m.state["epoch"],
                                 history=m.state["history"]))
    return results


# -- the loop's named steps --------------------------------------------------------------------

def _monitored_metric(es: EarlyStoppingParams | None, tasks: Mapping[str, Task], use_labels: bool) -> str | None:
    """The validation metric that picks the best epoch (``None``: no early stopping, the last epoch)."""
    metric = es.metric if es else None
    if metric is not None and "." in metric and metric.partition(".")[0] not in tasks:
        # a model that does not learn the metric's task (a subset teacher of an ensemble whose
        # run early-stops on another task's metric) stops on its own validation loss
        metric = "val_loss"
    if metric == "val_loss" and not use_labels:
        metric = "val_kd"  # an unlabeled stage never reads labels, not even for early stopping
    return metric


def fp32_logits(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every task's floating-point logits as fp32 (a no-op outside autocast), so that any task's
    loss, including a plugin's that does not cast, runs in fp32."""
    return {name: z.float() if torch.is_tensor(z) and z.is_floating_point() else z for name, z in logits.items()}


def laid_out(inputs: Tensor, channels_last: bool) -> Tensor:
    """``inputs`` in channels_last memory format when asked and they are a 4-D image batch (N, C, H, W);
    anything else (feature vectors, token ids, cached 2-D features) unchanged. The values
    are the same: only the order of the elements in memory changes."""
    if channels_last and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def _placed_with_optimizer(model: Student, params: TrainingParams, device: torch.device):
    """Move ``model`` to ``device`` (its 4-D weights channels-last if asked); its optimizer and scheduler."""
    model.to(device)
    if params.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, params.optimizer)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
                 if params.scheduler == "cosine" else None)
    return optimizer, scheduler


def _fresh_state() -> dict[str, Any]:
    """The loop state before the first epoch (saved in ``last.safetensors`` as it is)."""
    return {"epoch": 0, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "history": []}


def _resume(last_path: Path, log_path: Path, model: Student, optimizer: torch.optim.Optimizer,
            scheduler, scaler: torch.amp.GradScaler) -> dict[str, Any] | None:
    """Restore model, optimizer, scheduler, gradient scaler (fp16) and RNG from ``last.safetensors``
    and return the loop state saved with them; ``None`` when there is nothing to resume."""
    if not last_path.exists():
        return None
    tensors, meta = load_tensors(last_path, STATE_FORMAT)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    if scaler.is_enabled() and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])  # the loss scale it had reached, not the initial 2^16
    # each rank resumes its own random state (its dropout masks); rank 0's is ``rng.torch``
    torch.set_rng_state(tensors.get(f"rng.torch.{distributed.rank()}", tensors["rng.torch"]))
    state = meta["loop"]
    # The checkpoint, not the log, is the record: a crash between writing the two loses
    # or repeats a log line, so the log is rewritten from the checkpoint's history.
    if distributed.is_main():
        log_path.unlink(missing_ok=True)
        for record in state["history"]:
            append_jsonl(log_path, record)
    return state


def _seed_rank(seed: int) -> None:
    """Seed torch's generators for a model's training: with ``seed`` on rank 0 (and in a single
    process), with one derived from it and the rank on the others, so that the ranks draw
    independent dropout masks for their rows."""
    torch.manual_seed(seed if distributed.rank() == 0 else hash_seed(seed, "rank", distributed.rank()))


def _epoch_batches(train: SplitData, batch_size: int, seed: int, epoch: int, row_weights: Tensor | None,
                   device: torch.device, tasks: Sequence[str] | None,
                   augment: Callable[[Tensor], Tensor] | None, batch_seed: int | None):
    """``(step, batch, rows)`` of an epoch: this rank's part of each global batch (all of it in a
    single process), augmented, and the global batch's row count.

    Under torchrun an augmentation runs on the whole global batch before the rank takes its
    part: it draws its randomness for the batch's rows together (noise of the batch's shape),
    so with a ``batch_seed`` every row gets the view it gets in a single process.
    """
    world = distributed.world_size()
    shard = (distributed.rank(), world) if world > 1 and augment is None else None
    for step, batch in enumerate(iterate_batches(train, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                                 row_weights=row_weights, device=device, tasks=tasks,
                                                 shard=shard)):
        rows = min(batch_size, len(train) - step * batch_size)
        if augment is not None:
            batch = _augmented(batch, augment, batch_seed, epoch, step)
            if world > 1:
                lo, hi = distributed.shard_bounds(len(batch.index))
                targets = None if batch.targets is None else {
                    t: {k: v[lo:hi] for k, v in parts.items()} for t, parts in batch.targets.items()}
                batch = Batch(batch.index[lo:hi], batch.inputs[lo:hi], targets)
        yield step, batch, rows


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Torch's global CPU generator state, and the device's on CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _augmented(batch: Batch, augment: Callable[[Tensor], Tensor], batch_seed: int | None, epoch: int,
               step: int) -> Batch:
    """The batch as ``augment`` changes it: drawn from the model's random state, or with a
    ``batch_seed`` from a generator of its own (seeded by it, the epoch and the step)."""
    if batch_seed is None:
        return Batch(batch.index, augment(batch.inputs), batch.targets)
    devices = [batch.inputs.device] if batch.inputs.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(hash_seed(batch_seed, "augment", epoch, step))
        return Batch(batch.index, augment(batch.inputs), batch.targets)


def _train_step(model: Student, tasks: Mapping[str, Task], loss_fn: Loss, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, params: TrainingParams, inputs: Tensor, targets, soft, alpha: float,
                tau: Mapping[str, float], amp_dtype: torch.dtype | None) -> Tensor:
    """One optimizer step on a batch; the step's loss and per-task parts (on the device).

    ``amp_dtype`` (from :func:`autocast_dtype`) autocasts the forward pass only; ``scaler`` is
    the fp16 gradient scaler (disabled otherwise, when it passes the plain step through).
    """
    inputs = laid_out(inputs, params.channels_last)
    # under torchrun, BatchNorm normalises with the global batch's statistics, as one process does
    with torch.autocast(inputs.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None), \
            distributed.global_batch_norm(model):
        logits = forward_tasks(model, tasks, inputs, targets, soft, train=True)
    # The losses run outside the autocast, on fp32 logits: a bf16 log-softmax keeps about
    # three significant digits, and tau^2 * KL at a high temperature magnifies the error.
    # Under torchrun they divide by totals over the global batch: this rank's share of its loss.
    with distributed.global_batch():
        loss, parts = loss_fn(tasks, fp32_logits(logits), targets, soft, alpha, tau)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    distributed.all_reduce_gradients(model.parameters())  # the shares' sum: the global batch's gradient
    if params.grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
    scaler.step(optimizer)  # skipped (and the scale lowered) if an fp16 gradient overflowed
    scaler.update()
    return torch.stack([loss.detach(), *(parts[t] for t in tasks)])


def _end_epoch(model: Student, tasks: Mapping[str, Task], loss_fn: Loss, val: SplitData, params: TrainingParams,
               device: torch.device, optimizer, scheduler, scaler: torch.amp.GradScaler | None,
               state: dict[str, Any], metric: str | None,
               step_losses: Tensor, step_rows: list[int], stage: str, epoch: int, workdir: Path,
               model_meta: Mapping[str, Any] | None, val_soft_targets: SoftTargets | None,
               tau: Mapping[str, float]) -> dict[str, Any]:
    """After an epoch's steps: the finite check, validation, early-stopping bookkeeping and the
    epoch's files (``best``, ``last``, the log line); returns the log record."""
    es = params.early_stopping
    last_path, best_path = workdir / "last.safetensors", workdir / "best.safetensors"
    if scheduler is not None:
        scheduler.step()
    # under torchrun: each rank's step losses are its shares of the global batch's; every rank
    # validates and saves the same model (running statistics averaged: a guard, they are equal)
    step_losses = distributed.all_reduce_sum(step_losses)
    distributed.average_buffers(model)
    losses = _check_finite(model, step_losses, len(step_losses), stage, epoch, last_path, workdir)
    val_metrics = evaluate(model, tasks, val, params.eval_batch_size, device, loss_fn,
                           val_soft_targets, tau) if len(val) else {}
    record = _epoch_record(epoch, losses, step_rows, tasks, optimizer, val_metrics)
    main = distributed.is_main()
    if _track_best(state, metric, val_metrics, tasks, record, es.min_delta if es else 0.0):
        state["best_epoch"] = epoch
        state["bad_epochs"] = 0
        if main:
            save_model(best_path, model, dict(model_meta or {}, epoch=epoch))
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    state["history"].append(record)
    rng_states = distributed.gather_object(torch.get_rng_state())  # every rank's, for an exact resume
    if main:
        _save_state(last_path, model, optimizer, scheduler, state, scaler, rng_states)
        append_jsonl(workdir / "log.jsonl", record)
    return record


def _stopped(es: EarlyStoppingParams | None, state: Mapping[str, Any]) -> bool:
    return es is not None and state["bad_epochs"] >= es.patience


def _check_finite(model: Student, step_losses: Tensor, steps: int, stage: str, epoch: int, last_path: Path,
                  workdir: Path) -> Tensor:
    """The epoch's step losses on the host; an error if a loss or a weight is NaN or infinite.

    A finite loss can still come with an update that overflowed the weights: those must not
    be saved as the "last good checkpoint". (Two synchronisations per epoch.)
    """
    weights_finite = torch.stack([t.isfinite().all() for t in model.state_dict().values()
                                  if t.is_floating_point()]).all()
    losses = step_losses.cpu()
    bad_steps = (~torch.isfinite(losses[:, 0])).nonzero()
    nan_step = int(bad_steps[0]) if len(bad_steps) else -1
    what = "loss"
    if nan_step < 0 and not bool(weights_finite):
        what = "weights"
        nan_step = max(steps - 1, 0)  # only the epoch's last update can have done it
    if nan_step >= 0:
        raise DistillkitError(
            f"the {what} became NaN or infinite in stage '{stage}' at epoch {epoch}, step {nan_step}; "
            f"training stopped and the last good checkpoint ({last_path.name if last_path.exists() else 'none yet'}) "
            "was kept.", where=str(workdir),
            hint="Lower the learning rate, or check the inputs and labels for invalid values.")
    return losses


def _epoch_record(epoch: int, losses: Tensor, step_rows: list[int], tasks: Mapping[str, Task],
                  optimizer: torch.optim.Optimizer, val_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The epoch's log line: row-weighted mean training losses, learning rate, validation scalars."""
    rows = torch.tensor(step_rows, dtype=losses.dtype)
    means = (losses * rows[:, None]).sum(0) / max(float(rows.sum()), 1.0)
    return {"epoch": epoch, "train_loss": float(means[0]),
            "train_parts": {t: float(means[1 + i]) for i, t in enumerate(tasks)},
            "lr": optimizer.param_groups[0]["lr"], "val": _scalars(val_metrics)}


def _track_best(state: dict[str, Any], metric: str | None, val_metrics: Mapping[str, Any],
                tasks: Mapping[str, Task], record: dict[str, Any], min_delta: float) -> bool:
    """Whether this epoch is the best so far (then its score becomes ``state["best_score"]``);
    the monitored value goes into ``record``. Without a metric every epoch is the best; the
    metric's direction is its task's (``Task.metric_directions``)."""
    if metric is None:
        return True
    value, higher = score_of(val_metrics, metric, tasks)
    record["monitor"] = {metric: value}
    if not _improved(value, state["best_score"], higher, min_delta):
        return False
    state["best_score"] = value
    return True


def _improved(new: float, best: float | None, higher: bool, min_delta: float) -> bool:
    """Whether ``new`` beats ``best`` by more than ``min_delta`` in the metric's direction.

    The first score always counts; a NaN never beats a number, and any number beats a NaN best.
    """
    if math.isnan(new):
        return best is None
    if best is None or math.isnan(best):
        return True
    delta = (new - best) if higher else (best - new)
    return delta > min_delta


def _save_state(path: Path, model, optimizer, scheduler, loop_state, scaler: torch.amp.GradScaler | None = None,
                rng_states: Sequence[Tensor] | None = None) -> None:
    tensors, optim_meta = optimizer_to_tensors(optimizer)
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    for r, rng in list(enumerate(rng_states or []))[1:]:  # the other ranks' (torchrun)
        tensors[f"rng.torch.{r}"] = rng
    meta = {"format": STATE_FORMAT, "optimizer": optim_meta, "loop": loop_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    save_tensors(path, tensors, meta)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar part of a metrics dict (drops confusion matrices and per-class tables)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            sub = {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float))}
            if sub:
                out[k] = sub
        elif isinstance(v, (int, float)):
            out[k] = v
    return out
