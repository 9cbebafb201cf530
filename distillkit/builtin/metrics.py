"""Metric functions on whole-split tensors, used by the classification task's accumulator."""

from __future__ import annotations

import torch

ECE_BINS = 15
#: specificities are compared with this slack, so 1 - 1/10 counts as 0.90
SPEC_EPS = 1e-9


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for the boolean ``positive``; ``None`` without both kinds.

    Equals the Mann-Whitney probability that a random positive outscores a random negative,
    ties counting one half (average ranks).
    """
    n_pos, n = int(positive.sum()), len(positive)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = scores.double()
    order = torch.argsort(s)
    sorted_s = s[order]
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(1, n + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # average rank of each run of ties
    ranks[order] = mean_rank[inverse]
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def sensitivity_at_specificity(scores: torch.Tensor, positive: torch.Tensor, specificity: float) -> float | None:
    """Highest sensitivity of a rule ``score >= t`` whose specificity is at least ``specificity``.

    Thresholds run over the distinct scores (and +inf, sensitivity 0). ``None`` without both
    positives and negatives.
    """
    n_pos, n = int(positive.sum()), len(positive)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = scores.double()
    order = torch.argsort(s, descending=True)
    s, pos = s[order], positive[order]
    tp, fp = torch.cumsum(pos.long(), 0), torch.cumsum((~pos).long(), 0)
    last = torch.ones(n, dtype=torch.bool)  # the last row of each run of equal scores is a threshold
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    ok = (1 - fp.double() / n_neg) >= specificity - SPEC_EPS
    return float(tp[ok].max()) / n_pos if bool(ok.any()) else 0.0


def calibration(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over ``bins`` equal-width bins of confidence, and the bins.

    Bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]`` (bin 0 also holds 0). ECE is
    ``sum_b n_b / N * |accuracy_b - mean confidence_b|``; ``nan`` without rows.
    """
    n = len(confidence)
    idx = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        rows = idx == b
        count = int(rows.sum())
        conf = float(confidence[rows].double().mean()) if count else None
        acc = float(correct[rows].double().mean()) if count else None
        if count:
            ece += count / n * abs(acc - conf)
        table.append({"lower": b / bins, "upper": (b + 1) / bins, "count": count, "confidence": conf, "accuracy": acc})
    return (ece if n else float("nan")), table
