"""The decoded-image store: pixel values, conversions, bad images, caching and rebuilds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillkit.errors import DistillkitError
from eye_fundus import image_store
from eye_fundus.image_store import load_image_store

S = 16


def solid(path: Path, colour, size=(S, S), mode="RGB") -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def noise_jpeg(path: Path, size=64) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


@pytest.fixture
def count_decodes(monkeypatch):
    """Wrap the decoder so a test can tell whether the store decoded anything."""
    calls = []
    real = image_store.decode_image

    def counting(path, size):
        calls.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(image_store, "decode_image", counting)
    return calls


def rows(n):
    return [f"m.csv:line {i + 2}" for i in range(n)]


def test_solid_colour_decodes_to_its_value_channels_first(tmp_path):
    paths = [solid(tmp_path / "a.png", (10, 200, 30)), solid(tmp_path / "b.png", (250, 0, 128), size=(4 * S, 4 * S))]
    store = load_image_store(paths, S, tmp_path / "cache", "m.csv")
    assert store.images.shape == (2, 3, S, S) and store.images.dtype == torch.uint8
    # an image already S x S is not resampled: exact values; a downscaled one is within rounding
    assert (store.images[0, 0] == 10).all() and (store.images[0, 1] == 200).all() and (store.images[0, 2] == 30).all()
    expected = np.array([250, 0, 128]).reshape(3, 1, 1)
    assert np.abs(store.images[1].numpy().astype(int) - expected).max() <= 1
    assert store.warnings == [] and store.kept.all()


def test_aspect_is_kept_with_black_bars(tmp_path):
    path = solid(tmp_path / "wide.png", (200, 100, 50), size=(4 * S, 2 * S))
    img = load_image_store([path], S, tmp_path / "cache", "m.csv").images[0].numpy()
    # 64x32 -> 16x8, centred: rows 4..11 hold the image, the rest is black padding
    assert (img[:, :4] == 0).all() and (img[:, 12:] == 0).all()
    assert np.abs(img[:, 5:11].astype(int) - np.array([200, 100, 50]).reshape(3, 1, 1)).max() <= 1


def test_grayscale_and_transparent_images_are_converted_with_counted_warnings(tmp_path):
    paths = [solid(tmp_path / "g1.png", 77, mode="L"), solid(tmp_path / "g2.png", 78, mode="L"),
             solid(tmp_path / "t.png", (255, 0, 0, 0), mode="RGBA")]
    store = load_image_store(paths, S, tmp_path / "cache", "m.csv")
    assert (store.images[0] == 77).all() and (store.images[1] == 78).all()
    assert (store.images[2] == 0).all()  # fully transparent -> black background, not red
    text = " | ".join(store.warnings)
    assert "2 of 3 images were grayscale (L)" in text and "1 of 3 images were transparent (RGBA)" in text


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    paths = []
    for name, value in (("max", 65535), ("mid", 257 * 100), ("low", 200)):
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((S, S), value, dtype=np.uint16)).save(path)
        assert Image.open(path).mode in ("I;16", "I")
        paths.append(path)
    store = load_image_store(paths, S, tmp_path / "cache", "m.csv")
    # 65535 -> 255, 25700 -> 100, 200 -> 1 (clipping would give 255, 255, 200)
    assert [int(store.images[i, 0, 0, 0]) for i in range(3)] == [255, 100, 1]
    assert (store.images[1] == 100).all()
    assert any("16-bit grayscale" in w for w in store.warnings)


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "not_an_image"])
def test_bad_image_names_row_and_path(tmp_path, kind):
    good = solid(tmp_path / "good.png", (1, 2, 3))
    if kind == "truncated_jpeg":
        bad = noise_jpeg(tmp_path / "bad.jpg")
    else:
        bad = tmp_path / "bad.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if kind == "not_an_image" else data[: len(data) // 2])
    with pytest.raises(DistillkitError) as info:
        load_image_store([good, bad], S, tmp_path / "cache", "m.csv", row_names=rows(2))
    assert info.value.where == "m.csv:line 3"
    assert str(bad) in info.value.message and "on_bad_image: skip" in info.value.hint
    assert not list((tmp_path / "cache").glob("*.npy")), "a failed build must leave no store behind"


def test_missing_file_is_reported_before_decoding(tmp_path, count_decodes):
    paths = [solid(tmp_path / "a.png", (1, 2, 3)), tmp_path / "gone.png", tmp_path / "also_gone.png"]
    with pytest.raises(DistillkitError) as info:
        load_image_store(paths, S, tmp_path / "cache", "m.csv", row_names=rows(3))
    assert info.value.where == "m.csv:line 3" and "gone.png" in info.value.message
    assert "1 more" in info.value.message
    assert count_decodes == []


def test_skip_leaves_bad_images_out_with_one_counted_warning(tmp_path, count_decodes):
    a = solid(tmp_path / "a.png", (10, 20, 30))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(noise_jpeg(tmp_path / "n.jpg").read_bytes()[:300])
    c = solid(tmp_path / "c.png", (40, 50, 60))
    paths = [a, tmp_path / "missing.png", broken, c]
    store = load_image_store(paths, S, tmp_path / "cache", "m.csv", row_names=rows(4), on_bad_image="skip")
    assert store.kept.tolist() == [True, False, False, True]
    assert store.images.shape[0] == 2
    assert int(store.images[0, 0, 0, 0]) == 10 and int(store.images[1, 0, 0, 0]) == 40
    skipped = [w for w in store.warnings if w.startswith("skipped")]
    assert len(skipped) == 1 and "skipped 2 of 4" in skipped[0] and "m.csv:line 3" in skipped[0]
    # the store remembers the bad images: "error" now fails without decoding anything again
    decoded = len(count_decodes)
    with pytest.raises(DistillkitError) as info:
        load_image_store(paths, S, tmp_path / "cache", "m.csv", row_names=rows(4))
    assert info.value.where == "m.csv:line 3" and len(count_decodes) == decoded


def test_second_call_reads_the_store_without_decoding(tmp_path, count_decodes):
    paths = [solid(tmp_path / f"{i}.png", (i, 2 * i, 3 * i)) for i in range(5)]
    first = load_image_store(paths, S, tmp_path / "cache", "m.csv", workers=2)
    assert len(count_decodes) == 5
    second = load_image_store(paths, S, tmp_path / "cache", "m.csv")
    assert len(count_decodes) == 5
    assert (first.images == second.images).all()
    second.images[0] += 1  # copy-on-write map: the tensor is writable, the file is untouched
    assert (load_image_store(paths, S, tmp_path / "cache", "m.csv").images == first.images).all()
    # another size is another store
    load_image_store(paths, S // 2, tmp_path / "cache", "m.csv")
    assert len(count_decodes) == 10


def test_edited_image_invalidates_the_store(tmp_path, count_decodes):
    path = solid(tmp_path / "a.png", (1, 1, 1))
    load_image_store([path], S, tmp_path / "cache", "m.csv")
    solid(path, (99, 99, 99))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    store = load_image_store([path], S, tmp_path / "cache", "m.csv")
    assert len(count_decodes) == 2 and int(store.images[0, 0, 0, 0]) == 99


@pytest.mark.parametrize("damage", ["truncate", "drop_metadata", "garbage_header"])
def test_damaged_store_is_detected_and_rebuilt(tmp_path, count_decodes, damage):
    paths = [solid(tmp_path / f"{i}.png", (i * 40, 7, 7)) for i in range(3)]
    first = load_image_store(paths, S, tmp_path / "cache", "m.csv").images.clone()
    (store_file,) = (tmp_path / "cache").glob("*.npy")
    if damage == "truncate":  # as if a copy or a crash left half a file
        with open(store_file, "r+b") as fh:
            fh.truncate(store_file.stat().st_size // 2)
    elif damage == "drop_metadata":
        store_file.with_suffix(".json").unlink()
    else:
        store_file.write_bytes(b"\x00" * store_file.stat().st_size)
    store = load_image_store(paths, S, tmp_path / "cache", "m.csv")
    assert len(count_decodes) == 6
    assert (store.images == first).all()
    assert any("rebuilt" in w for w in store.warnings)


def test_threaded_decoding_matches_sequential(tmp_path):
    paths = [noise_jpeg(tmp_path / f"{i}.jpg", size=40 + i) for i in range(6)]
    one = load_image_store(paths, S, tmp_path / "c1", "m.csv", workers=1).images
    two = load_image_store(paths, S, tmp_path / "c2", "m.csv", workers=3).images
    assert (one == two).all()
