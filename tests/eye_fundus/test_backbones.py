"""Encoders: uint8 scaling, ResNet and small-CNN forwards, ImageNet offline, local safetensors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from distillkit.errors import DistillkitError
from eye_fundus.backbones import ResNetEncoder, ResNetParams, SmallCNN, SmallCNNParams, scale_images


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


def test_scale_images_maps_uint8_to_minus_one_one():
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    black = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(scale_images(white), torch.ones(1, 3, 4, 4))
    assert torch.equal(scale_images(black), -torch.ones(1, 3, 4, 4))
    mid = scale_images(torch.tensor([51, 127, 204], dtype=torch.uint8))
    torch.testing.assert_close(mid, torch.tensor([51 / 127.5 - 1, 127 / 127.5 - 1, 204 / 127.5 - 1]))
    assert mid.dtype == torch.float32
    already = torch.tensor([0.25, -0.5])
    assert scale_images(already) is already  # float input is taken as already scaled
    with pytest.raises(TypeError):
        scale_images(torch.tensor([1, 2]))


@pytest.mark.parametrize("make", [
    lambda: ResNetEncoder(ResNetParams(kind="resnet18")),
    lambda: SmallCNN(SmallCNNParams(width=8, depth=3)),
])
def test_first_layer_sees_scaled_pixels(make):
    encoder = make().eval()
    first = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = torch.stack([torch.full((3, 32, 32), 255, dtype=torch.uint8), torch.zeros((3, 32, 32), dtype=torch.uint8)])
    with torch.no_grad():
        encoder(batch)
    handle.remove()
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0][0], torch.ones(3, 32, 32)) and torch.equal(seen[0][1], -torch.ones(3, 32, 32))


def test_resnet18_without_pretraining_runs_on_uint8():
    encoder = ResNetEncoder(ResNetParams(kind="resnet18", pretrained="none")).eval()
    assert encoder.out_features == 512
    with torch.no_grad():
        out = encoder(images())
        same = encoder(images().float() / 127.5 - 1)  # uint8 and pre-scaled floats agree
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    torch.testing.assert_close(out, same)
    assert out.min() >= 0 and out.std() > 0  # pooled ReLU features, not constant


def test_resnet50_width_and_channels_last():
    encoder = ResNetEncoder(ResNetParams(kind="resnet50", channels_last=True)).eval()
    assert encoder.out_features == 2048
    assert encoder.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = encoder(images(batch=1, size=32))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()


def test_small_cnn_shapes_and_values():
    encoder = SmallCNN(SmallCNNParams())
    assert encoder.out_features == 32 * 2**3
    assert sum(isinstance(m, torch.nn.Conv2d) for m in encoder.modules()) == 4
    encoder.eval()
    with torch.no_grad():
        out = encoder(images())
    assert out.shape == (2, 256) and out.min() >= 0 and not torch.equal(out[0], out[1])
    # The whole encoder is trainable end to end.
    encoder.train()
    encoder(images()).sum().backward()
    assert encoder.blocks()[0][1][0].weight.grad.abs().sum() > 0


def test_params_are_strict():
    with pytest.raises(ValueError):
        ResNetParams(kind="resnet101")
    with pytest.raises(ValueError):
        ResNetParams(kind="resnet18", pretrained="")
    with pytest.raises(ValueError):
        SmallCNNParams(widht=8)
    assert ResNetParams().kind == "resnet50" and ResNetParams().pretrained == "none"


def test_imagenet_offline_raises_a_distillkit_error(monkeypatch, tmp_path):
    # An empty hub cache, and a download that fails at once as it would offline: nothing
    # touches the network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DistillkitError) as info:
        ResNetEncoder(ResNetParams(kind="resnet18", pretrained="imagenet"))
    message = str(info.value)
    assert calls == [models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert "not in the torch hub cache" in message and str(tmp_path) in message
    assert ".safetensors" in message and "Temporary failure" in message


def test_local_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    source = ResNetEncoder(ResNetParams(kind="resnet18")).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file(source.net.state_dict(), str(path))
    torch.manual_seed(1)
    loaded = ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(path))).eval()
    fresh = ResNetEncoder(ResNetParams(kind="resnet18")).eval()
    with torch.no_grad():
        expected = source(images())
        assert torch.equal(loaded(images()), expected)
        assert not torch.allclose(fresh(images()), expected)
    # The encoder's own state dict ("net." keys) loads too.
    own = tmp_path / "encoder.safetensors"
    save_file(source.state_dict(), str(own))
    reloaded = ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(own))).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images()), expected)


def test_torchvision_layout_with_classifier_loads(tmp_path):
    # What converting torchvision's ImageNet .pth gives: the full model, fc included (dropped).
    torch.manual_seed(2)
    reference = models.resnet18(weights=None).eval()
    path = tmp_path / "torchvision.safetensors"
    save_file(reference.state_dict(), str(path))
    encoder = ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(path))).eval()
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images()), reference(images().float() / 127.5 - 1))


def test_mismatched_or_bad_files_raise_distillkit_errors(tmp_path):
    resnet18 = tmp_path / "resnet18.safetensors"
    save_file(models.resnet18(weights=None).state_dict(), str(resnet18))
    with pytest.raises(DistillkitError) as info:
        ResNetEncoder(ResNetParams(kind="resnet34", pretrained=str(resnet18)))  # 34 has more blocks
    assert str(resnet18) in str(info.value) and "missing" in str(info.value)
    with pytest.raises(DistillkitError) as info:
        ResNetEncoder(ResNetParams(kind="resnet50", pretrained=str(resnet18)))  # bottlenecks
    assert str(resnet18) in str(info.value)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(DistillkitError, match="unexpected"):
        ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(other)))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(DistillkitError) as info:
        ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(corrupt)))
    assert str(corrupt) in str(info.value)
    pickled = tmp_path / "weights.pth"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(DistillkitError, match="safetensors"):
        ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(pickled)))
    with pytest.raises(DistillkitError, match="not found"):
        ResNetEncoder(ResNetParams(kind="resnet18", pretrained=str(tmp_path / "absent.safetensors")))


@pytest.mark.parametrize("make", [lambda: SmallCNN(SmallCNNParams(width=4, depth=3)),
                                  lambda: SmallCNN(SmallCNNParams(width=4, depth=2, downsample="stride")),
                                  lambda: ResNetEncoder(ResNetParams(kind="resnet18"))])
def test_blocks_compose_to_the_forward_pass_with_unchanged_keys(make):
    torch.manual_seed(0)
    encoder = make().eval()
    x = images(batch=2, size=32)
    with torch.no_grad():
        if isinstance(encoder, ResNetEncoder):  # torchvision's own forward, classifier removed
            reference = encoder.net(scale_images(x))
            assert "net.conv1.weight" in encoder.state_dict() and "net.layer4.1.bn2.bias" in encoder.state_dict()
        else:
            reference = encoder.pool(encoder._modules["blocks"](scale_images(x))).flatten(1)
            assert "blocks.0.weight" in encoder.state_dict() and "blocks.1.running_mean" in encoder.state_dict()
        x_ = encoder.preprocess(x)
        for _, block in encoder.blocks():
            x_ = block(x_)
        torch.testing.assert_close(encoder(x), reference)
        torch.testing.assert_close(x_, reference)
    names = [name for name, _ in encoder.blocks()]
    assert names[-1] == "pool" and len(set(names)) == len(names)
