"""training.mixed_precision and training.channels_last: what runs in which precision and layout,
that the losses stay fp32, that results stay close to fp32, and that bad settings are config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPParams, MultiTaskParams, MultiTaskStudent
from distillkit.checkpoint import STATE_FORMAT, load_tensors
from distillkit.cli import cli
from distillkit.config import validate_config
from distillkit.data import SplitData
from distillkit.errors import DistillkitError
from distillkit.interfaces import Encoder, Student
from distillkit.losses import KDLoss, KDLossParams, kl_rows
from distillkit.plugins import PluginManager
from distillkit.runner import plan
from distillkit.training import (OptimizerParams, TrainingParams, _placed_with_optimizer, _resume, _save_state,
                                 _train_step, autocast_dtype, evaluate, fit, laid_out)
from tests.conftest import toy_config, write_config

IN = 6
CPU = torch.device("cpu")


@pytest.fixture
def registries():
    return PluginManager(autoload=False).registries


def _tasks():
    a = ClassificationTask("a", ClassificationParams(hidden=16))
    a.fit(["a0", "a1", "a2"])
    b = ClassificationTask("b", ClassificationParams(hidden=0))
    b.fit(["b0", "b1"])
    return {"a": a, "b": b}


def _split(tasks, x, name):
    """Labels a learnable function of the inputs: a = argmax of three input sums, b = sign of another."""
    flat = x.flatten(1)
    a = torch.stack([flat[:, 0::3].sum(1), flat[:, 1::3].sum(1), flat[:, 2::3].sum(1)], 1).argmax(1)
    b = (flat[:, :4].sum(1) > 0).long()
    targets = {"a": tasks["a"].encode([f"a{i}" for i in a.tolist()]),
               "b": tasks["b"].encode([f"b{i}" for i in b.tolist()])}
    return SplitData(name, np.arange(len(x)), x, targets)


def _vectors(tasks, n, seed, name):
    g = torch.Generator().manual_seed(seed)
    return _split(tasks, torch.randn(n, IN, generator=g), name)


def _mlp(tasks, registries, seed=0):
    torch.manual_seed(seed)
    return MultiTaskStudent.build(MultiTaskParams(encoder=MLPParams(in_features=IN, hidden=32, depth=2)), tasks,
                                  registries)


def _params(**kw):
    defaults = dict(optimizer=OptimizerParams(kind="adam", lr=0.01, weight_decay=0.0), batch_size=16,
                    eval_batch_size=64, epochs=8, early_stopping=None)
    return TrainingParams(**{**defaults, **kw})


class _RecordingLoss(KDLoss):
    """KDLoss that notes the dtypes of the logits it is given and of the loss it returns."""

    def __init__(self):
        super().__init__(KDLossParams())
        self.logit_dtypes: set[torch.dtype] = set()
        self.loss_dtypes: set[torch.dtype] = set()

    def __call__(self, tasks, logits, targets, soft, alpha, tau):
        self.logit_dtypes |= {z.dtype for z in logits.values()}
        loss, parts = super().__call__(tasks, logits, targets, soft, alpha, tau)
        self.loss_dtypes.add(loss.dtype)
        return loss, parts


def _output_dtypes(module: nn.Module) -> list[torch.dtype]:
    """The dtypes ``module`` produces in training mode (the autocast region), recorded by a hook."""
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda m, i, out: seen.append(out.dtype) if m.training else None)
    return seen


# -- precision ---------------------------------------------------------------------------------

def test_bf16_training_on_cpu_runs_in_bf16_and_ends_close_to_fp32(registries, tmp_path):
    tasks = _tasks()
    train, val = _vectors(tasks, 256, 0, "train"), _vectors(tasks, 128, 1, "val")
    results, models = {}, {}
    for mode in ("off", "bf16"):
        model = _mlp(tasks, registries)
        first_linear = next(m for m in model.encoder.modules() if isinstance(m, nn.Linear))
        dtypes = _output_dtypes(first_linear)
        loss_fn = _RecordingLoss()
        # a moderate rate: at lr 0.01 the fp32 run's own val loss swings by 0.2 between seeds,
        # which would hide the precision's effect in the optimiser's noise
        fit(model, tasks, loss_fn, train, val,
            _params(mixed_precision=mode, optimizer=OptimizerParams(kind="adam", lr=0.003, weight_decay=0.0)),
            device=CPU, seed=3, workdir=tmp_path / mode, stage="m1")
        # the training forward ran in the asked precision; the losses saw fp32 logits whatever it was
        assert set(dtypes) == {torch.bfloat16 if mode == "bf16" else torch.float32}
        assert loss_fn.logit_dtypes == {torch.float32} and loss_fn.loss_dtypes == {torch.float32}
        results[mode] = evaluate(model, tasks, val, 64, CPU, KDLoss(KDLossParams()))
        models[mode] = model
    off, bf16 = results["off"], results["bf16"]
    assert off["a"]["accuracy"] > 0.85 and off["b"]["accuracy"] > 0.85  # it learned: the comparison means something
    # bf16 really changed the arithmetic (the weights are not those of the fp32 run) ...
    assert not torch.equal(models["off"].encoder.state_dict()["net.0.weight"],
                           models["bf16"].encoder.state_dict()["net.0.weight"])
    # ... but not the result. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per
    # product, accumulated in fp32); over 128 Adam steps the two runs drift apart a little but
    # land on the same solution. Measured on two seeds: |delta val loss| <= 0.003 (of ~0.25) and at
    # most 1 of 128 rows flips. The bounds (0.02, 3 rows) leave room for other CPUs' bf16
    # kernels and are far below what a broken run gives (an untrained model: loss ~1.8).
    assert abs(off["loss"] - bf16["loss"]) <= 0.02
    for task in ("a", "b"):
        assert abs(off[task]["accuracy"] - bf16[task]["accuracy"]) <= 3 / 128


def test_losses_upcast_bf16_logits_and_equal_the_fp32_computation():
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(5, 7, generator=g) * 3).to(torch.bfloat16)
    teacher = torch.softmax(torch.randn(5, 7, generator=g) / 2.0, -1)
    tau = 2.0
    kl = kl_rows(z, teacher, tau)
    assert kl.dtype == torch.float32
    # by hand, in float64, from the same (bf16-rounded) logits
    zd, pd = z.double(), teacher.double()
    log_q = zd / tau - torch.logsumexp(zd / tau, -1, keepdim=True)
    expected_kl = (pd * (pd.log() - log_q)).sum(-1)
    torch.testing.assert_close(kl.double(), expected_kl, atol=1e-6, rtol=1e-6)
    assert torch.equal(kl, kl_rows(z.float(), teacher, tau))

    tasks = {"a": ClassificationTask("a", ClassificationParams())}
    tasks["a"].fit([f"c{i}" for i in range(7)])
    y = torch.tensor([0, 3, 6, 2, 1])
    target = {"y": y, "present": torch.tensor([True, True, True, False, True])}
    ce = tasks["a"].hard_loss(z, target)
    assert ce.dtype == torch.float32
    expected_ce = -(zd - torch.logsumexp(zd, -1, keepdim=True))[torch.arange(5), y]
    torch.testing.assert_close(ce.double(), expected_ce, atol=1e-6, rtol=1e-6)

    # the whole objective: (1 - alpha) CE over labeled rows + alpha tau^2 KL over all rows
    alpha = 0.7
    loss, parts = KDLoss(KDLossParams())(tasks, {"a": z}, {"a": target}, {"a": {"probs": teacher}}, alpha,
                                         {"a": tau})
    present = target["present"].double()
    expected = (1 - alpha) * (expected_ce * present).sum() / present.sum() + alpha * tau ** 2 * expected_kl.mean()
    assert loss.dtype == torch.float32
    assert math.isclose(float(loss), float(expected), rel_tol=1e-6)
    upcast, _ = KDLoss(KDLossParams())(tasks, {"a": z.float()}, {"a": target}, {"a": {"probs": teacher}}, alpha,
                                       {"a": tau})
    assert torch.equal(loss, upcast)


class _NoCastTask(ClassificationTask):
    """A plugin's task whose loss does not cast: under bf16 it would compute a bf16 cross-entropy."""

    def hard_loss(self, logits, target):
        self.seen = logits.dtype
        return torch.nn.functional.cross_entropy(logits, target["y"], reduction="none")


def test_the_training_step_hands_fp32_logits_to_a_task_that_does_not_cast(registries, tmp_path):
    task = _NoCastTask("a", ClassificationParams(hidden=0))
    task.fit(["a0", "a1", "a2"])
    tasks = {"a": task}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, IN, generator=g)
    train = SplitData("train", np.arange(32), x, {"a": task.encode([f"a{i}" for i in (x[:, 0] > 0).long()])})
    model = _mlp(tasks, registries)
    head_out = _output_dtypes(model.heads["a"])
    fit(model, tasks, KDLoss(KDLossParams()), train, train, _params(mixed_precision="bf16", epochs=1), device=CPU,
        seed=0, workdir=tmp_path, stage="m1")
    assert set(head_out) == {torch.bfloat16}  # the head itself ran in bf16 ...
    assert task.seen == torch.float32  # ... its logits reached the loss as fp32


def test_an_interrupted_bf16_fit_resumes_to_identical_weights(registries, tmp_path):
    tasks = _tasks()
    train, val = _vectors(tasks, 64, 0, "train"), _vectors(tasks, 32, 1, "val")
    loss_fn = KDLoss(KDLossParams())
    straight = _mlp(tasks, registries)
    full = fit(straight, tasks, loss_fn, train, val, _params(mixed_precision="bf16", epochs=4), device=CPU, seed=3,
               workdir=tmp_path / "straight", stage="m1")
    first = _mlp(tasks, registries)
    fit(first, tasks, loss_fn, train, val, _params(mixed_precision="bf16", epochs=2), device=CPU, seed=3,
        workdir=tmp_path / "resumed", stage="m1")
    second = _mlp(tasks, registries, seed=9)  # another init: the checkpoint must overwrite it
    resumed = fit(second, tasks, loss_fn, train, val, _params(mixed_precision="bf16", epochs=4), device=CPU, seed=3,
                  workdir=tmp_path / "resumed", stage="m1")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_fp16_on_cpu_is_refused_naming_the_key(registries, tmp_path):
    with pytest.raises(DistillkitError) as info:
        autocast_dtype("fp16", CPU, where="stages.m1.training.mixed_precision")
    assert info.value.where == "stages.m1.training.mixed_precision"
    assert "fp16" in info.value.message and "CUDA" in info.value.message
    assert autocast_dtype("off", CPU) is None and autocast_dtype("bf16", CPU) == torch.bfloat16
    tasks = _tasks()
    split = _vectors(tasks, 16, 0, "train")
    with pytest.raises(DistillkitError, match="training.mixed_precision"):
        fit(_mlp(tasks, registries), tasks, KDLoss(KDLossParams()), split, split, _params(mixed_precision="fp16"),
            device=CPU, seed=0, workdir=tmp_path, stage="m1")
    assert not (tmp_path / "last.safetensors").exists()


def test_grad_scaler_state_is_saved_with_the_optimizer_and_restored(registries, tmp_path):
    tasks = _tasks()
    model = _mlp(tasks, registries)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    reached = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
               "_growth_tracker": 7}
    scaler.load_state_dict(reached)
    state = {"epoch": 2, "best_score": None, "best_epoch": 1, "bad_epochs": 0, "history": []}
    _save_state(tmp_path / "last.safetensors", model, optimizer, None, state, scaler)
    _, meta = load_tensors(tmp_path / "last.safetensors", STATE_FORMAT)
    assert meta["grad_scaler"] == reached

    fresh = torch.amp.GradScaler("cpu", enabled=True)
    assert fresh.state_dict()["scale"] == 2.0 ** 16
    loop = _resume(tmp_path / "last.safetensors", tmp_path / "log.jsonl", _mlp(tasks, registries, seed=1),
                   torch.optim.Adam(_mlp(tasks, registries).parameters()), None, fresh)
    assert loop["epoch"] == 2
    assert fresh.state_dict() == reached

    # without fp16 the checkpoint holds no scaler
    _save_state(tmp_path / "plain.safetensors", model, optimizer, None, state,
                torch.amp.GradScaler("cpu", enabled=False))
    assert load_tensors(tmp_path / "plain.safetensors", STATE_FORMAT)[1]["grad_scaler"] is None


# -- layout ------------------------------------------------------------------------------------

class _ConvEncoder(Encoder):
    def __init__(self):
        super().__init__()
        self.out_features = 8
        self.conv1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def blocks(self):
        return [("conv1", self.conv1), ("conv2", self.conv2), ("pool", self.pool)]


def _conv_student(tasks, seed=0):
    torch.manual_seed(seed)
    return Student(_ConvEncoder(), tasks)


def test_channels_last_trains_the_same_model_as_contiguous(tmp_path):
    tasks = _tasks()
    g = torch.Generator().manual_seed(0)
    train = _split(tasks, torch.randn(64, 3, 8, 8, generator=g), "train")
    val = _split(tasks, torch.randn(32, 3, 8, 8, generator=g), "val")
    models, layouts = {}, {}
    for channels_last in (False, True):
        model = _conv_student(tasks)
        seen: list[bool] = []
        model.encoder.conv1.register_forward_hook(
            lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)) if m.training else None)
        fit(model, tasks, KDLoss(KDLossParams()), train, val,
            _params(channels_last=channels_last, epochs=3, optimizer=OptimizerParams(kind="sgd", lr=0.05)),
            device=CPU, seed=5, workdir=tmp_path / str(channels_last), stage="m1")
        models[channels_last] = model
        layouts[channels_last] = (set(seen), model.encoder.conv1[0].weight.is_contiguous(
            memory_format=torch.channels_last))
    # the layout was applied to the batches and the weights only when asked
    assert layouts[True] == ({True}, True)
    assert layouts[False] == ({False}, False)
    # ... and changed nothing but the order of elements in memory: same weights, same outputs
    a, b = models[False].state_dict(), models[True].state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    with torch.no_grad():
        out_a = models[False].features(val.inputs)
        out_b = models[True].features(laid_out(val.inputs, True))
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=0)
    assert float(out_a.abs().max()) > 0.01  # not a trivially zero output


def test_channels_last_touches_only_4d_batches():
    flat = torch.randn(4, 6)
    assert laid_out(flat, True) is flat
    image = torch.randn(2, 3, 5, 5)
    assert laid_out(image, False) is image
    converted = laid_out(image, True)
    assert converted.is_contiguous(memory_format=torch.channels_last) and torch.equal(converted, image)


# -- config ------------------------------------------------------------------------------------

@pytest.fixture
def cli_runner(fresh_plugin_manager):
    return CliRunner()


@pytest.mark.parametrize("value, shown", [("fp8", "fp8"), ("true", "true"), ("16", "16")])
def test_bad_values_are_exit_2_errors_naming_the_key(cli_runner, tmp_path, value, shown):
    path = write_config(tmp_path, toy_config())
    path.write_text(path.read_text().replace("training:\n", f"training:\n  mixed_precision: {value}\n", 1))
    result = cli_runner.invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "training.mixed_precision" in result.output and shown in result.output
    assert "Traceback" not in result.output


def test_yaml_off_is_the_off_setting(registries):
    config = toy_config(training={**toy_config()["training"], "mixed_precision": False})  # what YAML reads `off` as
    assert validate_config(config, registries).training.mixed_precision == "off"


@pytest.mark.parametrize("where", ["training", "stages.m1.training"])
def test_fp16_on_a_cpu_run_is_an_exit_2_error_before_any_stage(cli_runner, tmp_path, where):
    config = toy_config(device="cpu")
    if where == "training":
        config["training"]["mixed_precision"] = "fp16"
    else:
        config["stages"]["m1"]["training"] = {"mixed_precision": "fp16"}
    out = tmp_path / "run"
    result = cli_runner.invoke(cli, ["run", str(write_config(tmp_path, config)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"{where}.mixed_precision" in result.output and "CUDA" in result.output
    assert "Traceback" not in result.output
    assert not (out / "config.yaml").exists() and not any(p.name == "stages" for p in out.iterdir())


def test_validate_refuses_fp16_for_an_explicit_cpu_device_only(cli_runner, tmp_path):
    config = toy_config(device="cpu")
    config["training"]["mixed_precision"] = "fp16"
    result = cli_runner.invoke(cli, ["validate", str(write_config(tmp_path, config))])
    assert result.exit_code == 2 and "training.mixed_precision" in result.output, result.output
    config["device"] = "auto"  # the run may go to a GPU machine: nothing to say yet
    result = cli_runner.invoke(cli, ["validate", str(write_config(tmp_path, config, "auto.yaml"))])
    assert result.exit_code == 0, result.output


def test_precision_and_layout_are_part_of_the_stage_keys(registries):
    def keys(**training):
        config = toy_config()
        config["training"].update(training)
        return {s.name: s.key for s in plan(validate_config(config, registries), registries)}

    base = keys()
    assert keys(mixed_precision="off") == base  # the default, spelt out
    for change in ({"mixed_precision": "bf16"}, {"mixed_precision": "fp16"}, {"channels_last": True}):
        changed = keys(**change)
        for stage in ("teachers", "m1", "m2", "m3"):
            assert changed[stage] != base[stage], (change, stage)


# -- CUDA --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a gradient scaler needs CUDA")
def test_fp16_with_grad_scaler_on_cuda_trains_and_resumes_exactly(registries, tmp_path):
    cuda = torch.device("cuda")
    tasks = _tasks()
    train, val = _vectors(tasks, 128, 0, "train"), _vectors(tasks, 64, 1, "val")
    straight = _mlp(tasks, registries)
    dtypes = _output_dtypes(straight.heads["b"])
    loss_fn = _RecordingLoss()
    fit(straight, tasks, loss_fn, train, val, _params(mixed_precision="fp16", epochs=4), device=cuda, seed=3,
        workdir=tmp_path / "straight", stage="m1")
    assert set(dtypes) == {torch.float16}
    assert loss_fn.logit_dtypes == {torch.float32} and loss_fn.loss_dtypes == {torch.float32}
    _, meta = load_tensors(tmp_path / "straight" / "last.safetensors", STATE_FORMAT)
    assert meta["grad_scaler"] is not None and meta["grad_scaler"]["scale"] > 0

    first = _mlp(tasks, registries)
    fit(first, tasks, KDLoss(KDLossParams()), train, val, _params(mixed_precision="fp16", epochs=2), device=cuda,
        seed=3, workdir=tmp_path / "resumed", stage="m1")
    second = _mlp(tasks, registries, seed=9)
    fit(second, tasks, KDLoss(KDLossParams()), train, val, _params(mixed_precision="fp16", epochs=4), device=cuda,
        seed=3, workdir=tmp_path / "resumed", stage="m1")
    _, resumed_meta = load_tensors(tmp_path / "resumed" / "last.safetensors", STATE_FORMAT)
    assert resumed_meta["grad_scaler"] == meta["grad_scaler"]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    fp32 = evaluate(straight, tasks, val, 64, cuda, KDLoss(KDLossParams()))
    assert fp32["b"]["accuracy"] > 0.8


def _step_losses(device: torch.device, mode: str, channels_last: bool, steps: int = 40):
    """The loss of each of ``steps`` training steps (fit's own step) on one batch of 16 px images,
    from the same initial weights; the scaler and the conv layer's (input layout, output dtype)."""
    tasks = _tasks()
    g = torch.Generator().manual_seed(0)
    split = _split(tasks, torch.randn(32, 3, 16, 16, generator=g), "train")
    model = _conv_student(tasks)
    seen: list[tuple[bool, torch.dtype]] = []
    model.encoder.conv1[0].register_forward_hook(
        lambda m, i, o: seen.append((i[0].is_contiguous(memory_format=torch.channels_last), o.dtype)))
    params = _params(mixed_precision=mode, channels_last=channels_last)
    amp_dtype = autocast_dtype(mode, device)
    optimizer, _ = _placed_with_optimizer(model, params, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    inputs = split.inputs.to(device)
    targets = {t: {k: v.to(device) for k, v in parts.items()} for t, parts in split.targets.items()}
    model.train()
    losses = [float(_train_step(model, tasks, KDLoss(KDLossParams()), optimizer, scaler, params, inputs, targets,
                                None, 0.0, {}, amp_dtype)[0]) for _ in range(steps)]
    return losses, scaler, set(seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a gradient scaler needs CUDA")
def test_fp16_channels_last_step_on_cuda_matches_fp32_loss():
    cuda = torch.device("cuda")
    fp32, _, fp32_seen = _step_losses(cuda, "off", False)
    fp16, scaler, fp16_seen = _step_losses(cuda, "fp16", True)
    assert fp32_seen == {(False, torch.float32)}
    assert fp16_seen == {(True, torch.float16)}  # the conv read channels_last input and ran in fp16
    assert scaler.is_enabled() and scaler.get_scale() > 0
    # Same weights, same batch: the first loss differs only by fp16 rounding in the forward pass
    # (10-bit mantissa, relative 2^-11 per product, accumulated in fp32). On the CPU the same
    # comparison with bf16 (7 bits) differs by 7e-5 at the first step and by at most 0.004 over
    # 40 Adam steps, while the loss falls from 1.84 to 1.10; the bounds below also allow for a
    # step the scaler skips after an fp16 overflow (the trajectory then lags by one step).
    assert abs(fp16[0] - fp32[0]) <= 2e-3
    assert max(abs(a - b) for a, b in zip(fp16, fp32)) <= 0.05
    assert fp32[-1] < fp32[0] - 0.4 and fp16[-1] < fp16[0] - 0.4  # both learned: the comparison means something


def test_the_cuda_comparison_holds_for_bf16_channels_last_on_the_cpu():
    """The CPU counterpart of the CUDA test above (bf16, the CPU's mixed precision): it runs here
    and keeps that test's bounds honest."""
    fp32, _, fp32_seen = _step_losses(CPU, "off", False)
    bf16, scaler, bf16_seen = _step_losses(CPU, "bf16", True)
    assert fp32_seen == {(False, torch.float32)} and bf16_seen == {(True, torch.bfloat16)}
    assert not scaler.is_enabled()  # bf16 needs no loss scaling
    assert abs(bf16[0] - fp32[0]) <= 2e-3
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) <= 0.05
    assert fp32[-1] < fp32[0] - 0.4 and bf16[-1] < bf16[0] - 0.4
