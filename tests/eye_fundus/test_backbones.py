"""Encoders: uint8 scaling, ResNet and small-CNN forwards, ImageNet offline, local safetensors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from distillkit.errors import DistillkitError
from distillkit.interfaces import EncoderParams
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
    assert encoder.layers[0].weight.grad.abs().sum() > 0


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


# -- the encoder contract: preprocess, then the named blocks in order ---------------------------
def _chain(encoder, inputs):
    x = encoder.preprocess(inputs)
    for _, block in encoder.blocks():
        x = block(x)
    return x


@pytest.mark.parametrize("kind", ["resnet18", "resnet50"])
def test_resnet_blocks_compose_to_the_torchvision_forward(kind):
    torch.manual_seed(0)
    encoder = ResNetEncoder(ResNetParams(kind=kind)).eval()
    assert [name for name, _ in encoder.blocks()] == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    # The blocks hold the network's own modules: no parameter outside them, none twice.
    in_blocks = [p for _, block in encoder.blocks() for p in block.parameters()]
    assert len(in_blocks) == len({id(p) for p in in_blocks}) == len(list(encoder.parameters()))
    x = images(size=32)
    with torch.no_grad():
        expected = encoder.net(x.float() / 127.5 - 1)  # torchvision's own forward (fc is Identity)
        torch.testing.assert_close(_chain(encoder, x), expected, rtol=0, atol=0)
        torch.testing.assert_close(encoder(x), expected, rtol=0, atol=0)
    assert isinstance(encoder.params, EncoderParams) and encoder.params.freeze == "none"


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_small_cnn_blocks_compose_to_forward(downsample):
    torch.manual_seed(0)
    encoder = SmallCNN(SmallCNNParams(width=8, depth=3, downsample=downsample)).eval()
    assert [name for name, _ in encoder.blocks()] == ["block1", "block2", "block3", "pool"]
    blocks = dict(encoder.blocks())
    per_block = [[type(m).__name__ for m in blocks[f"block{i}"]] for i in (1, 2, 3)]
    layer_types = ["Conv2d", "BatchNorm2d", "ReLU"] + (["MaxPool2d"] if downsample == "pool" else [])
    assert per_block == [layer_types] * 3
    in_blocks = [p for _, block in encoder.blocks() for p in block.parameters()]
    assert len(in_blocks) == len({id(p) for p in in_blocks}) == len(list(encoder.parameters()))
    x = images(size=32)
    with torch.no_grad():
        expected = encoder.pool(encoder.layers(scale_images(x))).flatten(1)  # the pre-blocks forward
        torch.testing.assert_close(_chain(encoder, x), expected, rtol=0, atol=0)
        torch.testing.assert_close(encoder(x), expected, rtol=0, atol=0)
    assert expected.shape == (2, 32)


def test_state_dict_keys_are_unchanged():
    # Existing checkpoints hold these keys: the blocks() views must not add or rename any.
    small = SmallCNN(SmallCNNParams(width=8, depth=2)).state_dict()
    assert list(small)[:6] == ["blocks.0.weight", "blocks.1.weight", "blocks.1.bias", "blocks.1.running_mean",
                               "blocks.1.running_var", "blocks.1.num_batches_tracked"]
    assert len(small) == 2 * 6
    resnet = ResNetEncoder(ResNetParams(kind="resnet18")).state_dict()
    assert set(resnet) == {f"net.{k}" for k in models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
