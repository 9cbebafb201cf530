"""Decode every fundus photograph once into a compact uint8 store reused across epochs and runs.

Epochs must not decode JPEGs: :func:`load_image_store` decodes, converts and resizes each
image a single time and keeps the result as one ``.npy`` array ``(N, 3, S, S)`` (channels
first, the layout :class:`distillkit.data.Dataset` wants) in a cache folder. The store's
name is a hash of every image's path, size and modification time, the image size and
:data:`STORE_FORMAT_VERSION`, so editing, adding or removing an image, or asking for
another size, builds a new store, and everything else reuses the old one.

Files are written atomically (temporary file, flush, fsync, rename): a crash leaves the old
store or none. A store that is nevertheless damaged (wrong size, bad header, missing
metadata) is detected before use and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from distillkit import DistillkitError, atomic_write, read_json, write_json

#: bump when decoding changes what a store holds (conversion, filter, padding, layout)
STORE_FORMAT_VERSION = 1
BAD_IMAGE_POLICIES = ("error", "skip")

# What Pillow raises on a missing, unreadable, truncated or corrupt image file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


class ImageStore(NamedTuple):
    """What :func:`load_image_store` returns."""

    #: ``(K, 3, S, S)`` uint8 RGB, one row per readable image (K = ``kept.sum()``)
    images: torch.Tensor
    #: human-readable, counted notes: conversions, skipped images, a rebuilt store
    warnings: list[str]
    #: ``(N,)`` bool, ``False`` for images skipped under ``on_bad_image="skip"``
    kept: np.ndarray


class _BadImage(Exception):
    """An image that cannot be used; the message says why (kept inside this module)."""


# ------------------------------------------------------------------------------------------
# Decoding one image
# ------------------------------------------------------------------------------------------


def decode_image(path: Path, image_size: int) -> tuple[np.ndarray, str | None]:
    """Decode one image file into ``(S, S, 3)`` uint8 RGB.

    The aspect ratio is kept: the image is resized so that its long side is ``S`` (Lanczos,
    with ``reducing_gap`` so that large photographs are first reduced by an integer factor)
    and centred on a black square. Resizing before padding gives the same picture as padding
    then resizing, but filters fewer pixels and does not blur the black border into the eye.

    Returns the pixels and a note naming the conversion that was needed (``None`` for
    8-bit RGB), e.g. ``"16-bit grayscale (I;16)"``. Raises ``OSError`` and friends (see
    ``_DECODE_ERRORS``) for a missing, truncated or corrupt file.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= S on both sides:
            # a 2000 px fundus photo then costs a fraction of a full decode.
            img.draft(None, (image_size, image_size))
        img.load()  # decodes now, so a truncated file fails here and not later
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        rgb, note = _to_rgb(img)
    return _fit_square(rgb, image_size), note


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB version of any Pillow image, and a note when a conversion was needed."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in _SIXTEEN_BIT_MODES:
        # Scale the full 16-bit range onto 0..255 with rounding. Pillow's own convert("L")
        # clips values above 255 instead, which turns almost every pixel white.
        wide = np.asarray(img).astype(np.int64)
        scaled = (np.clip(wide, 0, 65535) * 255 + 32767) // 65535
        gray = Image.fromarray(scaled.astype(np.uint8), mode="L")
        label = "16-bit grayscale" if mode != "I" else "32-bit integer grayscale (read as 16-bit)"
        return gray.convert("RGB"), f"{label} ({mode})"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, like the background of a fundus photograph.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB"), f"transparent ({mode})"
    names = {"L": "grayscale", "P": "palette", "1": "black-and-white"}
    return img.convert("RGB"), f"{names[mode]} ({mode})" if mode in names else f"in mode {mode}"


def _fit_square(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if img.size == (size, size):
        return np.asarray(img, dtype=np.uint8)
    canvas = Image.new("RGB", (size, size))  # black
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return np.asarray(canvas, dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------


def load_image_store(paths: Sequence[Path], image_size: int, cache_dir: Path, where: str, *,
                     row_names: Sequence[str] | None = None, on_bad_image: str = "error",
                     workers: int | None = None) -> ImageStore:
    """Images of ``paths`` as one ``(K, 3, S, S)`` uint8 tensor, decoded at most once.

    The first call decodes every image in a thread pool (Pillow releases the GIL while it
    decodes and resizes) and writes ``cache_dir/images-<S>px-<hash>.npy`` plus a ``.json``
    with the conversion notes; later calls with unchanged files memory-map that store
    (copy-on-write, so the tensor is writable and nothing is read until used).

    A bad image (missing file, truncated or corrupt JPEG/PNG, not an image) is handled by
    ``on_bad_image``:

    * ``"error"`` (default): stop with a :class:`DistillkitError` whose ``where`` is the
      manifest row (``row_names[i]``) and whose message names the image path. Missing files
      are found before any decoding starts. Stopping is the default because a silently
      smaller data set changes every split and metric.
    * ``"skip"``: leave the image out and add one counted warning; ``kept`` marks the
      images that remain, so the caller can drop the same rows from its labels.

    Grayscale, palette, transparent and 16-bit images are converted to 8-bit RGB with one
    counted warning per kind. 16-bit values are scaled (``v * 255 / 65535``), not clipped.

    :param paths: image files, in manifest order.
    :param image_size: side ``S`` of the square output.
    :param cache_dir: folder of the stores (created if needed).
    :param where: the manifest (or other source), for messages when ``row_names`` is absent.
    :param row_names: one ``where`` per image, e.g. ``"manifest.csv:line 12"``.
    :param workers: decoding threads; default: the CPU cores available to this process.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, not {on_bad_image!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, not {image_size}")
    paths = [Path(p) for p in paths]
    if row_names is None:
        row_names = [f"{where}: image {i + 1}" for i in range(len(paths))]
    if len(row_names) != len(paths):
        raise ValueError("row_names must have one entry per path")
    if not paths:
        return ImageStore(torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), [], np.ones(0, bool))

    stats = [_file_stat(p) for p in paths]
    if on_bad_image == "error":
        missing = [i for i, s in enumerate(stats) if s is None]
        if missing:
            more = f" ({len(missing) - 1} more images are missing too)" if len(missing) > 1 else ""
            i = missing[0]
            raise DistillkitError(f"image file not found: {paths[i]}{more}.", where=row_names[i],
                                  hint="Image paths resolve relative to the manifest's folder.")

    key = _store_key(paths, stats, image_size)
    cache_dir = Path(cache_dir)
    store_path = cache_dir / f"images-{image_size}px-{key}.npy"
    meta_path = store_path.with_suffix(".json")
    shape = (len(paths), 3, image_size, image_size)

    warnings: list[str] = []
    cached = _open_store(store_path, meta_path, shape)
    if cached is None:
        if store_path.exists() or meta_path.exists():
            warnings.append(f"the image store {store_path} was incomplete or damaged; it was rebuilt.")
        _build_store(paths, image_size, store_path, meta_path, shape, row_names, on_bad_image, workers)
        cached = _open_store(store_path, meta_path, shape)
        if cached is None:  # pragma: no cover - only if the file system loses our write
            raise RuntimeError(f"the image store {store_path} could not be read back after writing it")
    array, meta = cached

    bad = {int(i): reason for i, reason in meta["bad"]}
    if bad and on_bad_image == "error":
        # A store built under "skip" records its bad images: report them without decoding.
        i = min(bad)
        raise DistillkitError(f"cannot read image {paths[i]}: {bad[i].rstrip('.')}.", where=row_names[i],
                              hint=_skip_hint(len(bad)))
    for note, (count, example) in meta["notes"].items():
        warnings.append(f"{count} of {len(paths)} images were {note} and were converted to 8-bit RGB "
                        f"(e.g. {example}).")
    kept = np.ones(len(paths), dtype=bool)
    if bad:
        kept[list(bad)] = False
        i = min(bad)
        warnings.append(f"skipped {len(bad)} of {len(paths)} images that cannot be read (on_bad_image: skip); "
                        f"first: {row_names[i]}: {paths[i]}: {bad[i]}")
        array = np.ascontiguousarray(array[kept])
    return ImageStore(torch.from_numpy(array), warnings, kept)


def _skip_hint(count: int) -> str:
    total = f" ({count} unreadable images in all)" if count > 1 else ""
    return f"Fix or remove the file, or set on_bad_image: skip to leave such images out{total}."


def _file_stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _store_key(paths: Sequence[Path], stats, image_size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([STORE_FORMAT_VERSION, image_size]).encode())
    for path, file_stat in zip(paths, stats):
        digest.update(json.dumps([os.path.abspath(path), file_stat]).encode())
    return digest.hexdigest()[:24]


def _build_store(paths, image_size, store_path, meta_path, shape, row_names, on_bad_image, workers) -> None:
    notes: dict[str, list] = {}
    bad: list[tuple[int, str]] = []

    def fill(tmp: Path) -> None:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

        def decode_into(i: int) -> tuple[str | None, str | None]:
            try:
                pixels, note = decode_image(paths[i], image_size)  # module global: tests count calls
            except _DECODE_ERRORS as exc:
                return None, _reason(exc)
            store[i] = pixels.transpose(2, 0, 1)  # threads write disjoint rows of one memmap
            return note, None

        n_workers = workers or _available_cores()
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="decode") as pool:
            try:
                for i, (note, reason) in enumerate(pool.map(decode_into, range(len(paths)))):
                    if reason is not None:
                        if on_bad_image == "error":
                            raise DistillkitError(f"cannot read image {paths[i]}: {reason.rstrip('.')}.",
                                                  where=row_names[i], hint=_skip_hint(1))
                        bad.append((i, reason))  # its row stays black; `kept` hides it
                    elif note is not None:
                        notes.setdefault(note, [0, str(paths[i])])[0] += 1
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # stop decoding the rest
                raise
        store.flush()
        del store

    atomic_write(store_path, fill)
    # The metadata is written last: a store without it is treated as incomplete.
    write_json(meta_path, {"version": STORE_FORMAT_VERSION, "shape": list(shape), "bad": bad, "notes": notes})


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, OSError) else f"{type(exc).__name__}: {text}"


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _open_store(store_path: Path, meta_path: Path, shape: tuple[int, ...]):
    """``(array, meta)`` when both files exist and are complete, else ``None``."""
    try:
        meta = read_json(meta_path)
        if meta.get("version") != STORE_FORMAT_VERSION or tuple(meta.get("shape", ())) != shape:
            return None
        if not isinstance(meta.get("bad"), list) or not isinstance(meta.get("notes"), dict):
            return None
        array = open_npy(store_path, shape, np.uint8)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (array, meta) if array is not None else None


def open_npy(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray | None:
    """Memory-map an ``.npy`` file if its header says ``shape``/``dtype`` and its size matches.

    Returns ``None`` for a missing, half-written or foreign file (the caller rebuilds it).
    The map is copy-on-write: the array is writable, and writes never reach the file.
    """
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(fh)
            else:
                return None
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError):
        return None
    file_shape, fortran_order, file_dtype = header
    if tuple(file_shape) != tuple(shape) or fortran_order or file_dtype != np.dtype(dtype):
        return None
    if size != offset + int(np.prod(shape)) * np.dtype(dtype).itemsize:
        return None
    if int(np.prod(shape)) == 0:  # numpy cannot map an empty array
        return np.zeros(shape, dtype=dtype)
    return np.load(path, mmap_mode="c")


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as ``.npy``, atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
    atomic_write(path, write)
