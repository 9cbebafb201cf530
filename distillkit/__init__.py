"""distillkit: modular, plugin-based knowledge distillation.

The public API for plugins and users is exported here (``from distillkit import Task``); the
modules behind it are internal and may change. It is imported lazily so that ``import
distillkit`` (and ``distillkit --help``) stays fast and does not load torch. docs/plugins.md,
"Public API", lists the names.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # plugins and registries
    "hookimpl": "distillkit.plugins",
    "PluginManager": "distillkit.plugins",
    "get_plugin_manager": "distillkit.plugins",
    "Registry": "distillkit.registry",
    # errors
    "DistillkitError": "distillkit.errors",
    "did_you_mean": "distillkit.errors",
    # component interfaces
    "Params": "distillkit.interfaces",
    "Task": "distillkit.interfaces",
    "Encoder": "distillkit.interfaces",
    "EncoderParams": "distillkit.interfaces",
    "Student": "distillkit.interfaces",
    "Teacher": "distillkit.interfaces",
    "Loss": "distillkit.interfaces",
    "AggregationPolicy": "distillkit.interfaces",
    "MetricAccumulator": "distillkit.interfaces",
    "InputTransform": "distillkit.interfaces",
    "kl_rows": "distillkit.losses",
    "tempered_probs": "distillkit.losses",
    "batch_total": "distillkit.distributed",
    "batch_mean": "distillkit.distributed",
    "higher_is_better": "distillkit.metric_direction",
    # stages
    "Stage": "distillkit.stages",
    "StageContext": "distillkit.stages",
    "StageResult": "distillkit.stages",
    "ModelRecord": "distillkit.stages",
    "PlanView": "distillkit.stages",
    # data
    "Dataset": "distillkit.data",
    "DatasetSource": "distillkit.data",
    "DataContext": "distillkit.data",
    "SplitData": "distillkit.data",
    "check_fixed_splits": "distillkit.data",
    "DataSpec": "distillkit.data_spec",
    "LoadedData": "distillkit.data_spec",
    # config
    "load_config": "distillkit.config",
    "apply_overrides": "distillkit.config",
    "Component": "distillkit.schema",
    "StageTraining": "distillkit.schema",
    "config_schema": "distillkit.schema",
    # runs, models and evaluation
    "RunDirectory": "distillkit.rundir",
    "RunLayout": "distillkit.rundir",
    "find_run_dir": "distillkit.rundir",
    "resolve_device": "distillkit.runner",
    "load_model": "distillkit.models",
    "save_tensors": "distillkit.checkpoint",
    "load_tensors": "distillkit.checkpoint",
    "evaluate_models": "distillkit.evaluation",
    "run_eval": "distillkit.evaluation",
    "EvalReport": "distillkit.evaluation",
    # files (every write atomic: temporary file, flush, rename)
    "atomic_write": "distillkit.io",
    "atomic_write_text": "distillkit.io",
    "atomic_write_bytes": "distillkit.io",
    "write_json": "distillkit.io",
    "read_json": "distillkit.io",
    "file_digests": "distillkit.io",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distillkit' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
