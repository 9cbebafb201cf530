"""Distillation losses: tempered KL, per-row cross-entropy, and the weighted KD objective.

The KL follows Hinton et al.: student log-probabilities against teacher probabilities at the
same temperature, summed over classes and averaged over rows (``batchmean``), and scaled by
tau^2 so that the soft term's gradients keep their size as tau changes (the gradient of the
tempered softmax shrinks as 1/tau^2). ``reduction="mean"`` would also divide by the number
of classes: a silent 1/C error.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from distillkit.distributed import batch_mean, batch_total
from distillkit.interfaces import Loss, Params, Task

Tensor = torch.Tensor


def kl_rows(student_logits: Tensor, teacher_probs: Tensor, tau: float) -> Tensor:
    """KL(teacher || softmax(student_logits / tau)) per row, summed over the last axis.

    ``teacher_probs`` are already tempered. Leading axes are kept: ``(B,)`` for class logits
    ``(B, C)``, ``(B, L)`` for sequence logits ``(B, L, V)``. Terms with p = 0 contribute 0.
    """
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    p = teacher_probs.float()
    # xlogy gives 0 * log 0 = 0 where the teacher puts no mass (top-k storage does that).
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def tempered_probs(logits: Tensor, tau: float) -> Tensor:
    return F.softmax(logits.float() / tau, dim=-1)


class KDLossParams(Params):
    kind: str = "kd"
    #: normalise the hard term by the number of rows that have a label (else by batch size)
    normalize_by_present: bool = True


class KDLoss(Loss):
    """sum_t lambda_t [(1 - alpha) CE_t + alpha tau_t^2 KL_t], the paper's Eq. 1-3.

    * supervised training: ``soft is None`` -> sum_t lambda_t CE_t
    * unlabeled distillation: ``targets is None`` -> sum_t lambda_t tau_t^2 KL_t
    * labeled distillation: both terms; a row without a label for task t contributes its KL only.

    Every mean divides by a total over the batch's rows taken through
    :func:`distillkit.distributed.batch_total`: under torchrun, the global batch's, so each
    rank's loss is its share and the summed gradient is one process's (in a single process
    the totals are the batch's own, unchanged).
    """

    Params = KDLossParams

    def __call__(self, tasks: Mapping[str, Task], logits: Mapping[str, Tensor],
                 targets: Mapping[str, Mapping[str, Tensor]] | None,
                 soft: Mapping[str, Mapping[str, Tensor]] | None,
                 alpha: float, tau: Mapping[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        total = None
        for name, task in tasks.items():
            z = logits[name]
            term = None
            if targets is not None:
                target = targets[name]
                ce = task.hard_loss(z, target)
                present = target["present"]
                w = task.hard_row_weights(target)
                if w is None:
                    denom = (batch_total(present.sum()).clamp_min(1) if self.params.normalize_by_present
                             else batch_total(len(ce)))
                elif self.params.normalize_by_present:
                    # Class-weighted CE: a weighted mean, as F.cross_entropy(weight=w) (ce already holds w[y]).
                    denom = batch_total((w * present).sum()).clamp_min(1e-12)
                else:
                    denom = batch_total(len(ce))
                hard = (ce * present).sum() / denom  # bool * float promotes: no cast needed
                term = hard if soft is None else (1.0 - alpha) * hard
            if soft is not None:
                # a task without a temperature (regression) has no tempered softmax to rescale
                t = float(tau[name]) if task.uses_temperature else 1.0
                kl = batch_mean(task.soft_loss(z, soft[name], t))  # batchmean
                soft_term = (t * t) * kl
                term = soft_term if targets is None else term + alpha * soft_term
            assert term is not None, "a loss needs labels, soft targets or both"
            parts[name] = term.detach()
            weighted = term if task.weight == 1.0 else task.weight * term
            total = weighted if total is None else total + weighted
        return total, parts
