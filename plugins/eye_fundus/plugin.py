"""The eye_fundus plugin's registrations (entry point ``eye_fundus = "eye_fundus.plugin"``).

Everything is imported inside the hooks so that loading the plugin (which the CLI does to
collect commands) stays cheap; only the public ``distillkit`` API is used.
"""

from __future__ import annotations

from distillkit import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_tasks(register):
    from eye_fundus.caption import CaptionTask

    register("caption", CaptionTask)


@hookimpl
def register_encoders(register):
    from eye_fundus.backbones import ResNetEncoder, SmallCNN
    from eye_fundus.efficientnet import EfficientNetLite0

    for name in ("resnet18", "resnet34", "resnet50"):
        register(name, ResNetEncoder)
    register("efficientnet_lite0", EfficientNetLite0)
    register("small_cnn", SmallCNN)


@hookimpl
def register_datasets(register):
    from eye_fundus.datasets import ManifestSource, SyntheticFundusSource

    register("synthetic_fundus", SyntheticFundusSource)
    register("manifest", ManifestSource)


@hookimpl
def register_augmentations(register):
    from eye_fundus.augment import FundusJitter

    register("fundus_jitter", FundusJitter)


@hookimpl
def register_commands(cli):
    from eye_fundus.commands import add_commands

    add_commands(cli)
