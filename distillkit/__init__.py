"""distillkit: modular, plugin-based knowledge distillation.

The public API for plugins and users is exported here; it is imported lazily so that
``import distillkit`` (and ``distillkit --help``) stays fast and does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "hookimpl": "distillkit.plugins",
    "PluginManager": "distillkit.plugins",
    "get_plugin_manager": "distillkit.plugins",
    "DistillkitError": "distillkit.errors",
    "did_you_mean": "distillkit.errors",
    "Registry": "distillkit.registry",
    "Params": "distillkit.interfaces",
    "Task": "distillkit.interfaces",
    "Encoder": "distillkit.interfaces",
    "Student": "distillkit.interfaces",
    "Teacher": "distillkit.interfaces",
    "Loss": "distillkit.interfaces",
    "AggregationPolicy": "distillkit.interfaces",
    "MetricAccumulator": "distillkit.interfaces",
    "Dataset": "distillkit.data",
    "DatasetSource": "distillkit.data",
    "DataContext": "distillkit.data",
    "kl_rows": "distillkit.losses",
    "tempered_probs": "distillkit.losses",
    "atomic_write": "distillkit.io",
    "write_json": "distillkit.io",
    "file_digests": "distillkit.io",
    "save_tensors": "distillkit.checkpoint",
    "load_tensors": "distillkit.checkpoint",
    "load_model": "distillkit.models",
    "load_config": "distillkit.config",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distillkit' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
