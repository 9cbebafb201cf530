"""Grad-CAM (Selvaraju et al., ICCV 2017) for any task head of a multi-task student.

The map of one image for one task is ``ReLU(sum_c alpha_c A_c)``, where ``A`` is the
encoder's last spatial feature map ``(C, H, W)`` and ``alpha_c`` the spatial mean of the
gradient of the task's score with respect to ``A_c``. All tasks share the encoder, so they
share ``A``; they differ in ``alpha``, i.e. in which channels their score depends on.

The score of a task:

* a task whose prediction holds ``probs`` (classification): the *logit* of the target class
  (the predicted class by default), as in the paper by Selvaraju et al.;
* any other task (e.g. a caption decoder): the log-likelihood of the model's own prediction,
  teacher-forced, i.e. minus the task's :meth:`~distillkit.interfaces.Task.hard_loss` with
  the prediction as the label. For the caption task that is the mean log-probability of the
  greedy-decoded words and EOS; a positive factor per image (mean instead of sum) does not
  change a map once it is normalised;
* a task overrides :meth:`~distillkit.interfaces.Task.gradcam_score` to choose its own (the
  two cases above are its default).

The encoder is not asked for its feature map: forward hooks on all of its submodules keep
the last 4-D output with more than one spatial position (for a ResNet ``layer4``, for the
small CNN its last block), so any convolutional encoder works unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from distillkit.errors import DistillkitError
from distillkit.interfaces import Student, Task

Tensor = torch.Tensor


def gradcam(model: Student, task: Task, images: Tensor, target_index: int | Sequence[int] | Tensor | None = None) -> Tensor:
    """Grad-CAM maps ``(B, H, W)`` in [0, 1] of ``task`` for ``images`` ``(B, C, H, W)``.

    :param model: a student whose ``heads`` hold ``task.name``; its mode, gradients and
        ``requires_grad`` flags are restored afterwards.
    :param task: the task whose score is explained.
    :param images: a batch as the encoder takes it (e.g. uint8 pixels).
    :param target_index: for a classification task the class to explain, one for all images
        or one per image; ``None`` explains the predicted class. Ignored by other tasks.
    """
    if images.dim() != 4:
        raise DistillkitError(f"Grad-CAM needs images (B, C, H, W); got a tensor of shape {tuple(images.shape)}.")
    if task.name not in model.heads:
        raise DistillkitError(f"the model has no head for task '{task.name}' (heads: {', '.join(model.heads)}).")
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    captured: list[Tensor] = []

    def keep_spatial(_module, _inputs, output) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            captured.append(output)

    hooks = [m.register_forward_hook(keep_spatial) for m in model.encoder.modules()]
    model.eval()
    try:
        # A frozen model (a teacher) has no graph to differentiate: switch gradients on for now.
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            features = model.features(images)
            if not captured:
                raise DistillkitError(f"Grad-CAM needs a convolutional encoder; {type(model.encoder).__name__} "
                                      "produces no spatial feature map.")
            activations = captured[-1]
            score = _score(task, model.heads[task.name], features, target_index)
            (grads,) = torch.autograd.grad(score.sum(), activations)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        weights = grads.float().mean(dim=(2, 3), keepdim=True)  # alpha_c per image
        cam = F.relu((weights * activations.detach().float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (cam / peak).clamp(0, 1)


def _score(task: Task, head: torch.nn.Module, features: Tensor, target_index) -> Tensor:
    """One differentiable score per image: :meth:`~distillkit.interfaces.Task.gradcam_score`."""
    return task.gradcam_score(head, features, target_index)
