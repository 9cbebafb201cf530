"""Every shipped YAML validates and plans; every registered component runs a tiny CPU forward/loss."""

from __future__ import annotations

import pytest
import yaml
import torch

from distillkit.config import load_config
from distillkit.data import DataContext
from distillkit.interfaces import Teacher
from distillkit.models import build_student
from distillkit.plugins import PluginManager
from distillkit.runner import plan
from tests.conftest import REPO

REGISTRIES = PluginManager().registries
_YAMLS = [*(REPO / "examples").glob("*.yaml"), *(REPO / "plugins" / "eye_fundus").glob("*.yaml"),
          *(REPO / "plugins" / "eye_fundus" / "data").glob("*.yaml")]
SWEEPS = sorted(p for p in _YAMLS if "grid" in (yaml.safe_load(p.read_text()) or {}))
SHIPPED = sorted(p for p in _YAMLS if p not in SWEEPS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_validates_and_plans(path):
    config = load_config(path, REGISTRIES)
    planned = plan(config, REGISTRIES)
    assert planned and all(p.description for p in planned)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_sweep_validates_every_grid_point(path):
    from distillkit.sweep import load_sweep

    spec = load_sweep(path, REGISTRIES)
    assert len(spec.runs) == {"toy_sweep.yaml": 4, "sweep.yaml": 9, "m3_seeds.yaml": 3,
                              "fundus_mix_sweep.yaml": 3}[path.name]
    assert len({r.id for r in spec.runs}) == len(spec.runs)


TASK_LABELS = {
    "classification": (["a", "b", "a", None], ["b", "a", "a", "b"]),
    "regression": (["1.5", "2.0", None, "4.0"], ["2.5", "-1.0", "3.0", None]),
    "caption": (["dot blot haemorrhage", "optic disc cupping", None, "dot haemorrhage"],
                ["optic disc haemorrhage", "dot blot", "cupping", "disc"]),
}


@pytest.mark.parametrize("name", REGISTRIES.task.names())
def test_task_forward_losses_and_self_distillation(name):
    cls = REGISTRIES.task.get(name)
    task = cls(name, cls.Params())
    train_labels, batch_labels = TASK_LABELS[name]
    task.fit(train_labels)
    target = task.encode(batch_labels)
    torch.manual_seed(0)
    head = task.build_head(8)
    features = torch.randn(4, 8)
    logits = task.forward(head, features, target, train=False)
    ce = task.hard_loss(logits, target)
    assert ce.shape == (4,) and torch.isfinite(ce).all() and (ce[target["present"]] > 0).all()
    with torch.no_grad():
        soft = task.soft_target([head], [features], [1.0], target, tau=2.0)
    guided = task.forward(head, features, task.guide_from_soft(soft, target), train=False)
    kl = task.soft_loss(guided, soft, tau=2.0)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-5)  # a model distilled from itself: KL 0
    other = task.build_head(8)
    kl_other = task.soft_loss(task.forward(other, features, task.guide_from_soft(soft, target)), soft, tau=2.0)
    assert (kl_other > 1e-6).all()
    (ce.sum() + kl_other.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in other.parameters())
    metrics = task.metrics()
    metrics.update(task.predict(head, features), target)
    result = metrics.compute()
    if task.metric_directions.get(task.primary_metric, "max") == "max":
        assert 0.0 <= result[task.primary_metric] <= 1.0
    else:  # an error (RMSE): finite, and above 0 for a random head
        assert 0.0 < result[task.primary_metric] < float("inf")


def _encoder_input(name: str) -> torch.Tensor:
    if name == "mlp":
        return torch.randn(2, 8)
    return torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)


@pytest.mark.parametrize("name", REGISTRIES.encoder.names())
def test_encoder_forward_backward(name):
    cls = REGISTRIES.encoder.get(name)
    params = cls.Params.model_validate({"kind": name})
    torch.manual_seed(0)
    encoder = cls(params)
    out = encoder(_encoder_input(name))
    assert out.shape == (2, encoder.out_features)
    out.square().mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", REGISTRIES.aggregation.names())
def test_aggregation_weights_sum_to_one(name):
    cls = REGISTRIES.aggregation.get(name)
    policy = cls(cls.Params())
    model = torch.nn.Linear(1, 1)
    teachers = [Teacher(f"t{i}", model, frozenset({"a"}), scores={"a": s}) for i, s in enumerate([0.2, 0.6])]
    weights = policy.weights("a", teachers)
    assert sum(weights) == pytest.approx(1.0)
    if name == "mean":
        assert weights == [0.5, 0.5]
    if name == "val_score":
        assert weights == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("name", REGISTRIES.dataset.names())
def test_dataset_loads(name, tmp_path):
    cls = REGISTRIES.dataset.get(name)
    if name == "manifest":
        from PIL import Image

        Image.new("RGB", (20, 16), (200, 40, 10)).save(tmp_path / "a.png")
        Image.new("RGB", (16, 16), (0, 90, 10)).save(tmp_path / "b.png")
        (tmp_path / "m.csv").write_text("image,patient_id,broad_label,fine_label,diagnosis_text\n"
                                        "a.png,p1,DR,DR mild,mild retinopathy\nb.png,p2,normal,normal,\n")
        raw = {"kind": name, "path": "m.csv", "image_size": 16}
    elif name == "synthetic_fundus":
        raw = {"kind": name, "num_patients": 4, "num_unlabeled": 2, "image_size": 32}
    else:
        raw = {"kind": name}
    source = cls(cls.Params.model_validate(raw), DataContext(tmp_path / "cache", tmp_path))
    dataset = source.load()
    assert len(dataset) > 0 and len(dataset.inputs) == len(dataset.ids)
    assert len(source.fingerprint()) >= 8
    if name == "manifest":
        assert dataset.labels["broad_label"] == ["DR", "normal"]
        assert dataset.labels["diagnosis_text"] == ["mild retinopathy", None]
        assert tuple(dataset.inputs[1, :, 8, 8].tolist()) == (0, 90, 10)


@pytest.mark.parametrize("name", REGISTRIES.student.names())
def test_student_builds_one_head_per_task(name):
    from distillkit.builtin.classification import ClassificationTask

    cls = REGISTRIES.student.get(name)
    params = cls.Params.model_validate({"kind": name})
    params = params.model_copy(update={"encoder": REGISTRIES.encoder.get("mlp").Params()})
    tasks = {}
    for t in ("a", "b"):
        tasks[t] = ClassificationTask(t, ClassificationTask.Params())
        tasks[t].fit(["x", "y", "z"])
    student = build_student(params, tasks, REGISTRIES)
    assert set(student.heads) == {"a", "b"}
    assert student.heads["a"](student.features(torch.randn(2, 8))).shape == (2, 3)


@pytest.mark.parametrize("name", REGISTRIES.loss.names())
def test_loss_combines_terms(name):
    from distillkit.builtin.classification import ClassificationTask

    cls = REGISTRIES.loss.get(name)
    loss = cls(cls.Params())
    task = ClassificationTask("a", ClassificationTask.Params())
    task.fit(["x", "y"])
    logits = {"a": torch.tensor([[2.0, 0.0]])}
    target = {"a": task.encode(["x"])}
    soft = {"a": {"probs": torch.tensor([[0.5, 0.5]])}}
    ce = torch.log1p(torch.exp(torch.tensor(-2.0)))
    value, _ = loss({"a": task}, logits, target, None, 0.0, {"a": 1.0})
    assert value.item() == pytest.approx(ce.item(), rel=1e-6)
    value, _ = loss({"a": task}, logits, target, soft, 0.5, {"a": 1.0})
    q = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    kl = (0.5 * torch.log(0.5 / q)).sum()
    assert value.item() == pytest.approx((0.5 * ce + 0.5 * kl).item(), rel=1e-5)


@pytest.mark.parametrize("name", REGISTRIES.teacher.names())
def test_teacher_source_loads_a_saved_model(name, tmp_path):
    from distillkit.builtin.classification import ClassificationTask
    from distillkit.checkpoint import save_model
    from distillkit.models import model_meta

    task = ClassificationTask("a", ClassificationTask.Params())
    task.fit(["x", "y"])
    student_params = REGISTRIES.student.get("multitask").Params().model_copy(
        update={"encoder": REGISTRIES.encoder.get("mlp").Params()})
    model = build_student(student_params, {"a": task}, REGISTRIES)
    save_model(tmp_path / "t.safetensors", model, model_meta(student_params, {"a": task}, "ext"))
    cls = REGISTRIES.teacher.get(name)
    teacher = cls(cls.Params(kind=name, path="t.safetensors")).load(REGISTRIES, torch.device("cpu"), tmp_path)
    assert teacher.tasks == frozenset({"a"})
    x = torch.randn(3, 8)
    assert torch.equal(teacher.model.heads["a"](teacher.features(x)), model.eval().heads["a"](model.features(x)))


def _augmentation_input(name: str) -> torch.Tensor:
    if name == "gaussian_noise":
        return torch.randn(4, 8)
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)


@pytest.mark.parametrize("name", REGISTRIES.augmentation.names())
def test_augmentation_is_random_reproducible_and_keeps_the_format(name):
    cls = REGISTRIES.augmentation.get(name)
    augment = cls(cls.Params())
    x = _augmentation_input(name)
    torch.manual_seed(0)
    a = augment(x)
    torch.manual_seed(0)
    b = augment(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert not torch.equal(augment(x), a)  # a new draw per call


def test_fundus_jitter_values():
    from eye_fundus.augment import FundusJitter, FundusJitterParams

    images = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    images[1] = 200
    identity = FundusJitter(FundusJitterParams(brightness=0, contrast=0, shift=0))
    assert torch.equal(identity(images), images)
    brightness = FundusJitter(FundusJitterParams(brightness=0.1, contrast=0, shift=0))
    out = brightness(images).int()
    offset = out - images.int()
    # one offset per image, the same for every pixel, within +-0.1 x 255
    assert all(len(offset[i].unique()) == 1 for i in range(2))
    assert offset.abs().max() <= 26
