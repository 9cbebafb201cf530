"""Building students and loading trained models from their checkpoints alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from distillkit.checkpoint import file_checksum, load_model_state
from distillkit.config import dump, validate_component
from distillkit.errors import DistillkitError
from distillkit.feature_cache import freeze_encoder
from distillkit.interfaces import InputTransform, Student, Task, Teacher
from distillkit.metric_direction import direction
from distillkit.registry import Registries


def build_student(student_params: Any, tasks: Mapping[str, Task], registries: Registries) -> Student:
    """A student of the config's kind for ``tasks``, with its encoder's ``freeze`` applied."""
    cls = registries.student.get(student_params.kind)
    model = cls.build(student_params, dict(tasks), registries)
    freeze_encoder(model.encoder)
    return model


#: state-dict key prefix of a fitted input transform (a submodule of the encoder)
INPUT_TRANSFORM = "encoder.input_transform."


def attach_input_transform(model: Student, state: Mapping[str, Any] | None, where: str = "fit_input_transform") -> None:
    """Give ``model``'s encoder the run's fitted input transform (nothing when ``state`` is ``None``)."""
    if state is not None:
        model.encoder.input_transform = InputTransform(state, where)


def model_meta(student_params: Any, tasks: Mapping[str, Task], stage: str,
               inputs: torch.Tensor | None = None, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a model file must carry to be usable alone (predict, eval, as a teacher).

    ``inputs`` (a batch or a split's input tensor) records the shape and dtype of one input
    row, e.g. ``[3, 64, 64]`` ``uint8`` for images, so that tools can prepare new inputs alike;
    ``data`` (the run's resolved ``data:`` section) names the dataset source that reads new
    inputs from files (``distillkit predict``).
    """
    meta: dict[str, Any] = {
        "stage": stage,
        "student": dump(student_params),
        "tasks": {name: {"params": dump(task.params), "state": task.state()} for name, task in tasks.items()},
    }
    if inputs is not None:
        meta["inputs"] = {"shape": list(inputs.shape[1:]), "dtype": str(inputs.dtype).replace("torch.", "")}
    if data is not None:
        meta["data"] = dict(data)
    return meta


@dataclass
class LoadedModel:
    model: Student
    tasks: dict[str, Task]
    meta: dict[str, Any]
    checksum: str


def load_model(path: str | Path, registries: Registries, device: torch.device | str = "cpu",
               where: str | None = None) -> LoadedModel:
    """Rebuild a student (tasks, class lists, vocabulary, encoder) from a model file."""
    state, meta = load_model_state(path, where)
    label = where or str(path)
    try:
        # The stored params go through the same validation as a config (nested ones included).
        tasks: dict[str, Task] = {}
        for name, spec in meta["tasks"].items():
            params = validate_component("task", spec["params"], registries, label, f"tasks.{name}")
            task = registries.task.get(params.kind)(name, params)
            task.load_state(spec["state"])
            tasks[name] = task
        student_params = validate_component("student", meta["student"], registries, label, "student")
    except (KeyError, TypeError, ValueError) as exc:
        raise DistillkitError(f"{path} was not written by this version of distillkit or its plugins ({exc}).",
                              where=where) from None
    model = build_student(student_params, tasks, registries)
    if INPUT_TRANSFORM + "shift" in state:  # fitted on its run's training split
        attach_input_transform(model, {k: state[INPUT_TRANSFORM + k] for k in InputTransform.KEYS}, label)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DistillkitError(f"{path} does not match the model it describes (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).", where=where)
    model.to(device).eval()
    return LoadedModel(model, tasks, meta, file_checksum(path))


def init_from(model: Student, path: str | Path, where: str) -> None:
    """Initialise ``model`` from a model file: the encoder must match; heads of shared tasks are copied."""
    state, meta = load_model_state(path, where)
    own = model.state_dict()
    copied = {}
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            copied[key] = value
        elif key.startswith("encoder."):
            raise DistillkitError(f"cannot initialise from {path}: its encoder differs ({key}).", where=where)
    encoder_keys = [k for k in own if k.startswith("encoder.")]
    if not all(k in copied for k in encoder_keys):
        raise DistillkitError(f"cannot initialise from {path}: its encoder differs.", where=where)
    model.load_state_dict(copied, strict=False)


def as_teacher(loaded: LoadedModel, name: str, scores: Mapping[str, float] | None = None) -> Teacher:
    return Teacher(name=name, model=loaded.model, tasks=frozenset(loaded.tasks), scores=dict(scores or {}),
                   checksum=loaded.checksum, task_states={n: t.state() for n, t in loaded.tasks.items()},
                   score_directions={n: direction(t, t.primary_metric) for n, t in loaded.tasks.items()})
