"""Grad-CAM values on models whose answer is known, and on the eye plugin's multi-task model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPEncoder, MLPParams
from distillkit.errors import DistillkitError
from distillkit.gradcam import gradcam
from distillkit.interfaces import Encoder, Student

SIZE = 16


class HalfMask(nn.Module):
    """Keeps channel 0 on the left half of the map and channel 1 on the right half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x)
        half = x.shape[-1] // 2
        mask[:, 0, :, :half] = 1
        mask[:, 1, :, half:] = 1
        return x * mask


class HalvesEncoder(Encoder):
    """A stride-2 conv (both channels: the mean colour of a 2x2 patch), then channel 0 only
    sees the left half and channel 1 only the right half; global average pooling."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 2, kernel_size=2, stride=2, bias=False)
        nn.init.constant_(conv.weight, 1 / 12)
        self.body = nn.Sequential(conv, HalfMask())
        self.pool = nn.AdaptiveAvgPool2d(1)  # a 1x1 "map": must not be taken as the feature map
        self.out_features = 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(images.float() / 255)).flatten(1)


def _task(name: str) -> ClassificationTask:
    """A linear head over two classes (its weights are set by the fixture)."""
    task = ClassificationTask(name, ClassificationParams(hidden=0))
    task.fit(["a", "b"])
    return task


@pytest.fixture
def halves_model():
    tasks = {"left": _task("left"), "right": _task("right")}
    model = Student(HalvesEncoder(), tasks)
    with torch.no_grad():  # the logit of class 0 is one feature; that of class 1 is always 0
        for name, feature in (("left", 0), ("right", 1)):
            head = model.heads[name]
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, feature] = 1.0
    return model, tasks


def _images(n: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(20, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8)


def test_map_follows_the_half_the_score_depends_on(halves_model):
    model, tasks = halves_model
    images = _images()
    left = gradcam(model, tasks["left"], images, target_index=0)
    right = gradcam(model, tasks["right"], images, target_index=0)
    assert left.shape == right.shape == (3, SIZE, SIZE)
    for cam in (left, right):
        assert cam.min() >= 0 and cam.max() <= 1
        assert torch.allclose(cam.flatten(1).amax(1), torch.ones(3))
    half = SIZE // 2
    # the score of 'left' reads only the left half: its map lies there (bilinear upsampling
    # blurs one column of the 8x8 map across the border, hence not exactly 0 on the right)
    assert (left[..., :half].sum((1, 2)) > 5 * left[..., half:].sum((1, 2))).all()
    assert (right[..., half:].sum((1, 2)) > 5 * right[..., :half].sum((1, 2))).all()
    assert left[..., half + 1:].max() == 0 and right[..., : half - 1].max() == 0
    assert not torch.allclose(left, right)


def test_map_equals_the_hand_computed_grad_cam(halves_model):
    model, tasks = halves_model
    images = _images()
    cam = gradcam(model, tasks["left"], images, target_index=0)
    # By hand: the score is the mean of channel 0 over the 8x8 map, so alpha = (1/64, 0) and
    # the map is ReLU(A_0 / 64), upsampled and divided by its maximum.
    activations = model.encoder.body(images.float() / 255)
    expected = F.interpolate(F.relu(activations[:, :1] / 64), size=(SIZE, SIZE), mode="bilinear",
                             align_corners=False)[:, 0]
    expected = expected / expected.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(cam, expected, atol=1e-6)


def test_predicted_class_by_default_and_a_zero_gradient_gives_a_zero_map(halves_model):
    model, tasks = halves_model
    images = _images()
    assert torch.equal(gradcam(model, tasks["left"], images), gradcam(model, tasks["left"], images, 0))
    # class 1's logit is constant: no gradient, no evidence anywhere
    assert torch.equal(gradcam(model, tasks["left"], images, target_index=[1, 1, 1]), torch.zeros(3, SIZE, SIZE))


def test_frozen_model_state_is_restored(halves_model):
    model, tasks = halves_model
    model.train()
    model.requires_grad_(False)  # as a Teacher leaves it
    cam = gradcam(model, tasks["right"], _images())
    assert cam.max() == 1
    assert model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_encoder_without_spatial_map_is_a_user_error():
    task = _task("t")
    model = Student(MLPEncoder(MLPParams(in_features=3 * 4 * 4, hidden=8)), {"t": task})
    with pytest.raises(DistillkitError, match="spatial feature map"):
        gradcam(model, task, torch.rand(2, 3, 4, 4))


def test_every_task_of_the_eye_model_including_the_caption():
    pytest.importorskip("eye_fundus")
    from eye_fundus.backbones import SmallCNN, SmallCNNParams
    from eye_fundus.caption import CaptionParams, CaptionTask

    # An untrained model can have only negative evidence for a class (Grad-CAM is then 0
    # everywhere, correctly): try a few initialisations until both tasks show some.
    for seed in range(5):
        torch.manual_seed(seed)
        broad = ClassificationTask("broad", ClassificationParams(hidden=8))
        broad.fit(["AMD", "DR", "normal"])
        text = CaptionTask("text", CaptionParams(vocab_size=20, max_length=6, embedding_dim=8, hidden_dim=16))
        text.fit(["dot blot haemorrhage", "optic disc cupping", "drusen at the macula"])
        tasks = {"broad": broad, "text": text}
        model = Student(SmallCNN(SmallCNNParams(width=8, depth=3)), tasks).eval()
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        maps = {name: gradcam(model, task, images) for name, task in tasks.items()}
        for cam in maps.values():
            assert cam.shape == (4, 32, 32) and torch.isfinite(cam).all()
            assert cam.min() >= 0 and cam.max() <= 1
        if all(cam.max() > 0 for cam in maps.values()):
            assert not torch.allclose(maps["broad"], maps["text"])
            break
    else:
        pytest.fail("no initialisation gave a non-zero map for both tasks")
