"""Registers the core's own components, through the same hooks third-party plugins use."""

from __future__ import annotations

from distillkit.plugins import hookimpl


@hookimpl
def register_tasks(register):
    from distillkit.builtin.classification import ClassificationTask
    from distillkit.builtin.regression import RegressionTask

    register("classification", ClassificationTask)
    register("regression", RegressionTask)


@hookimpl
def register_encoders(register):
    from distillkit.builtin.components import MLPEncoder

    register("mlp", MLPEncoder)


@hookimpl
def register_students(register):
    from distillkit.builtin.components import MultiTaskStudent

    register("multitask", MultiTaskStudent)


@hookimpl
def register_teachers(register):
    from distillkit.builtin.components import CheckpointTeacher

    register("checkpoint", CheckpointTeacher)


@hookimpl
def register_losses(register):
    from distillkit.losses import KDLoss

    register("kd", KDLoss)


@hookimpl
def register_aggregations(register):
    from distillkit.builtin.components import MeanPolicy, ValScorePolicy

    register("mean", MeanPolicy)
    register("val_score", ValScorePolicy)


@hookimpl
def register_datasets(register):
    from distillkit.builtin.toy import ToyBlobs, ToyRegression

    register("toy_blobs", ToyBlobs)
    register("toy_regression", ToyRegression)


@hookimpl
def register_augmentations(register):
    from distillkit.builtin.components import GaussianNoise

    register("gaussian_noise", GaussianNoise)


@hookimpl
def register_stages(register):
    from distillkit.stages import DistillStage, EnsembleStage, EvaluateStage, TrainStage

    register("train", TrainStage)
    register("ensemble", EnsembleStage)
    register("distill", DistillStage)
    register("evaluate", EvaluateStage)
