"""Hook specifications: everything a distillkit plugin can provide.

A plugin is a module (or object) with functions named like these hooks and decorated
with :data:`distillkit.hookimpl`. It is found through the ``distillkit`` entry-point group
(``[project.entry-points.distillkit]`` in its ``pyproject.toml``). Built-in components are
registered through the same hooks.

Each ``register_*`` hook receives a ``register(name, component)`` callback. ``component`` is
a class (or factory) with a nested pydantic model ``Params``: a config selects it with
``kind: name`` and the other keys are validated against ``Params``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("distillkit")


@hookspec
def register_tasks(register):
    """Register :class:`distillkit.Task` subclasses (a prediction problem: head, losses, metrics).

    :param register: ``register(name, task_class)``.

    Called once, the first time the registries are used (before any config is validated),
    one plugin at a time; like every ``register_*`` hook (docs/plugins.md, "When each hook is
    called").
    """


@hookspec
def register_encoders(register):
    """Register encoders: ``nn.Module`` factories mapping an input batch to a feature vector.

    :param register: ``register(name, encoder_class)``; the class takes its ``Params`` instance
        and exposes ``out_features``.
    """


@hookspec
def register_datasets(register):
    """Register dataset sources: :class:`distillkit.data.DatasetSource` subclasses, built as
    ``cls(params, context)``, whose ``load()`` returns a :class:`distillkit.data.Dataset`
    (inputs, raw labels per field, patient/group ids).

    :param register: ``register(name, dataset_class)``.
    """


@hookspec
def register_augmentations(register):
    """Register random input augmentations, applied to each training batch on the device.

    :param register: ``register(name, augmentation_class)``; the class takes its ``Params``
        instance and is called as ``augmentation(inputs) -> inputs`` (same shape and dtype),
        drawing from torch's global RNG so that runs are reproducible and resumable.

    Teachers see the augmented batch too, so a distillation stage with an augmentation
    needs ``teacher_outputs.mode: online``.
    """


@hookspec
def register_aggregations(register):
    """Register multi-teacher aggregation policies (:class:`distillkit.AggregationPolicy`)
    that decide, per task, how the outputs of the teachers that learned it are combined.

    :param register: ``register(name, policy_class)``.
    """


@hookspec
def register_students(register):
    """Register student architectures (:class:`distillkit.Student` subclasses).

    :param register: ``register(name, student_class)``.
    """


@hookspec
def register_teachers(register):
    """Register teacher sources (where a teacher's weights come from).

    :param register: ``register(name, teacher_source_class)``.
    """


@hookspec
def register_losses(register):
    """Register training objectives (:class:`distillkit.Loss` subclasses) that combine
    per-task hard-label and soft-label terms.

    :param register: ``register(name, loss_class)``.
    """


@hookspec
def register_stages(register):
    """Register stage kinds (train, distill, ensemble, evaluate are built in).

    :param register: ``register(name, stage_class)``.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``distillkit`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(...)``.

    Called when the CLI starts, after plugins are loaded.
    """
