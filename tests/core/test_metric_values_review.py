"""Hand-computed values of ClassificationMetrics: confusion orientation, top-k, precision/recall."""

from __future__ import annotations

import torch

from distillkit.builtin.classification import ClassificationMetrics


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_confusion_is_true_by_predicted_and_topk_uses_k_classes():
    metrics = ClassificationMetrics(3, topk=[1, 2], classes=["a", "b", "c"])
    # predicted (arg-max), second choice, label
    probs = _probs([[0.7, 0.2, 0.1],   # pred a, 2nd b; y=a  -> top1 hit
                    [0.6, 0.1, 0.3],   # pred a, 2nd c; y=b  -> top2 miss (b is last)
                    [0.1, 0.3, 0.6],   # pred c, 2nd b; y=b  -> top2 hit
                    [0.2, 0.5, 0.3],   # pred b, 2nd c; y=b  -> top1 hit
                    [0.5, 0.4, 0.1]])  # pred a, 2nd b; y=c  -> top2 miss; this row is absent
    y = torch.tensor([0, 1, 1, 1, 2])
    present = torch.tensor([True, True, True, True, False])
    metrics.update({"probs": probs[:2]}, {"y": y[:2], "present": present[:2]})
    metrics.update({"probs": probs[2:]}, {"y": y[2:], "present": present[2:]})
    out = metrics.compute()
    assert out["n"] == 4
    # rows = true class, columns = predicted class
    assert out["confusion"] == [[1, 0, 0],
                                [1, 1, 1],
                                [0, 0, 0]]
    assert out["accuracy"] == 0.5
    assert out["top2"] == 0.75  # top-1 would give 0.5, top-3 1.0
    assert out["precision"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert out["recall"] == {"a": 1.0, "b": 1 / 3, "c": None}
