"""Metric functions on whole-split tensors, registered for reports and plugins."""

from __future__ import annotations

import torch


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((probs.argmax(-1) == y).float().mean()) if len(y) else float("nan")


def topk_accuracy(probs: torch.Tensor, y: torch.Tensor, k: int = 5) -> float:
    """Fraction of rows whose label is among the k most probable classes."""
    if not len(y):
        return float("nan")
    top = probs.topk(min(k, probs.shape[-1]), dim=-1).indices
    return float((top == y[:, None]).any(-1).float().mean())


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``[true, predicted]`` over all rows."""
    return torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)
