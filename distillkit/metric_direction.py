"""Which way a metric improves: ``max`` (accuracy, R2) or ``min`` (RMSE, calibration error).

A task declares the direction of each of its metrics in ``Task.metric_directions``; a metric it
does not list is ``max``. The validation losses (``val_loss``, ``val_kd``) are ``min``. Every
place that compares scores (early stopping, ``temperature: auto``, the ``val_score`` policy,
the report's charts) reads the direction from here instead of assuming higher is better.

Also here: the checks of what a task class declares (directions and soft-target kinds), run
when a plugin registers the task, so a typo fails at load with the plugin's name.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

DIRECTIONS = ("max", "min")
#: the early-stopping metrics that are not a task's: lower is better
LOSS_METRICS = {"val_loss": "min", "val_kd": "min"}
#: what a soft-target tensor can be (see ``Task.soft_target_kinds``)
SOFT_TARGET_KINDS = ("distribution", "value", "value_fp16")


def direction(task: Any, metric: str) -> str:
    """``"max"`` or ``"min"``: the direction of ``metric`` of ``task`` (a Task or its class).

    ``task`` may be ``None`` (no task known): then only the loss metrics are ``min``.
    """
    if metric in LOSS_METRICS:
        return LOSS_METRICS[metric]
    declared = getattr(task, "metric_directions", None) or {}
    return declared.get(metric, "max")


def higher_is_better(task: Any, metric: str) -> bool:
    """Whether a larger ``metric`` of ``task`` is better (public API: a plugin's aggregation
    policy or stage ranks with it); ``val_loss``/``val_kd`` and ``min`` metrics are not."""
    return direction(task, metric) == "max"


def oriented(value: float, way: str) -> float:
    """``value`` turned so that larger is better whatever the direction; NaN stays NaN."""
    return value if way == "max" else -value


def improvement(value: float, best: float, way: str) -> float:
    """How much ``value`` beats ``best`` (positive: better) in the metric's direction."""
    return (value - best) if way == "max" else (best - value)


def best_of(scores: Mapping[Any, float], way: str) -> Any:
    """The key of the best finite score (``None`` if none is finite)."""
    finite = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None
    return max(finite, key=lambda k: oriented(finite[k], way))


def check_task_class(name: str, cls: Any, plugin: str) -> None:
    """Refuse a task class whose declared metric directions or soft-target kinds are unknown."""
    from distillkit.errors import DistillkitError

    where = f"task '{name}' ({getattr(cls, '__name__', cls)}) registered by plugin '{plugin}'"
    directions = getattr(cls, "metric_directions", None) or {}
    if not isinstance(directions, Mapping):
        raise DistillkitError(f"{where} declares metric_directions as {type(directions).__name__}; it must be a "
                              "mapping of metric name -> 'max' or 'min'.")
    bad = {m: d for m, d in directions.items() if d not in DIRECTIONS}
    if bad:
        metric, value = next(iter(bad.items()))
        raise DistillkitError(f"{where} declares the direction of metric '{metric}' as {value!r}; a metric's "
                              "direction is 'max' (higher is better) or 'min' (lower is better).")
    kinds = getattr(cls, "soft_target_kinds", None) or {}
    if not isinstance(kinds, Mapping):
        raise DistillkitError(f"{where} declares soft_target_kinds as {type(kinds).__name__}; it must be a "
                              f"mapping of soft-target key -> one of {', '.join(SOFT_TARGET_KINDS)}.")
    bad = {k: v for k, v in kinds.items() if v not in SOFT_TARGET_KINDS}
    if bad:
        key, value = next(iter(bad.items()))
        raise DistillkitError(f"{where} declares soft target '{key}' of kind {value!r}; the kinds are "
                              f"{', '.join(SOFT_TARGET_KINDS)}.")
