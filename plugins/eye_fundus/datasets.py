"""The eye plugin's dataset sources: the embedded synthetic generator and the CSV manifest.

Both produce a :class:`distillkit.data.Dataset` whose inputs are ``(N, 3, S, S)`` uint8
images (the encoder scales them) and whose label fields are ``broad_label`` (T1),
``fine_label`` (T2) and ``diagnosis_text`` (T3). Both cache what is expensive to make
(generated or decoded pixels) under ``context.cache_dir``, keyed by everything that changes
the result, so a second run, or a second stage of one run, starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from distillkit import (DataContext, Dataset, DatasetSource, DistillkitError, Params, file_digests, read_json,
                        write_json)

from eye_fundus.image_store import load_image_store, open_npy, save_npy
from eye_fundus.manifest import DEFAULT_FIELDS, ManifestColumns, read_manifest
from eye_fundus.predict import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

#: bump when the cached files of :class:`SyntheticFundusSource` change meaning or layout
SYNTHETIC_CACHE_VERSION = 1
LABEL_FIELDS = ("broad_label", "fine_label", "diagnosis_text")


def _generate_fundus(**kwargs):
    """Run the generator (imported here: only this source needs its drawing code)."""
    from eye_fundus.synthetic import generate_fundus

    return generate_fundus(**kwargs)


def _generator_version() -> str:
    """The generator's own version constant when it has one, so a changed drawing invalidates caches."""
    try:
        from eye_fundus import synthetic
    except ImportError:
        return "unknown"
    return str(getattr(synthetic, "GENERATOR_VERSION", "unversioned"))


# ------------------------------------------------------------------------------------------
# Synthetic fundus photographs
# ------------------------------------------------------------------------------------------


class ImageInputs:
    """``distillkit predict`` reads image files as this source stores its images (uint8, its ``image_size``)."""

    input_kind = "image"
    input_suffixes = tuple(sorted(IMAGE_SUFFIXES))

    def load_inputs(self, paths):
        from eye_fundus.predict import decode_images

        return decode_images(paths, self.params.image_size)


class SyntheticFundusParams(Params):
    kind: str = "synthetic_fundus"
    #: labeled patients (1-4 images each, about 2.3 on average)
    num_patients: int = Field(600, ge=1)
    #: images in the unlabeled pool (from patients of their own)
    num_unlabeled: int = Field(600, ge=0)
    image_size: int = Field(64, ge=16, description="side of the square generated images, in pixels")
    #: size of the fine sub-category catalogue (T2 classes)
    num_fine_classes: int = Field(60, ge=1)
    seed: int = Field(0, ge=0, description="seed of the generator")


class SyntheticFundusSource(ImageInputs, DatasetSource):
    """Procedural fundus photographs with all three labels; needs no download.

    The generated set is cached in ``context.cache_dir/synthetic_fundus/`` (pixels as
    ``.npy``, labels as ``.json``), keyed by the params and the generator's version.
    Item ids read ``synthetic/<patient>/<k>`` (the k-th image of that patient).
    """

    Params = SyntheticFundusParams

    def __init__(self, params: SyntheticFundusParams, context: DataContext):
        super().__init__(params, context)
        self.warnings: list[str] = []

    def cache_key(self) -> str:
        payload = [SYNTHETIC_CACHE_VERSION, _generator_version(), self.params.model_dump(mode="json")]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def fingerprint(self) -> str:
        return self.cache_key()

    def load(self) -> Dataset:
        p = self.params
        folder = Path(self.context.cache_dir) / "synthetic_fundus"
        images_path = folder / f"{self.cache_key()}.npy"
        labels_path = images_path.with_suffix(".json")
        cached = self._read_cache(images_path, labels_path)
        if cached is None:
            data = _generate_fundus(num_patients=p.num_patients, num_unlabeled=p.num_unlabeled,
                                    image_size=p.image_size, num_fine_classes=p.num_fine_classes,
                                    seed=p.seed, workers=0)
            # Channels first once, here, so every later load maps the file without a copy.
            save_npy(images_path, np.ascontiguousarray(np.asarray(data.images, dtype=np.uint8).transpose(0, 3, 1, 2)))
            # The labels are written last: they mark the cache entry as complete.
            write_json(labels_path, {
                "version": SYNTHETIC_CACHE_VERSION,
                "shape": [len(data.images), 3, p.image_size, p.image_size],
                "patient_id": list(data.patient_id),
                **{name: list(getattr(data, name)) for name in LABEL_FIELDS},
                "labeled": [bool(x) for x in data.labeled],
            })
            cached = self._read_cache(images_path, labels_path)
            if cached is None:  # pragma: no cover - only if the file system loses our write
                raise RuntimeError(f"cannot read back {images_path}")
        images, meta = cached
        patients = meta["patient_id"]
        seen: dict[str, int] = {}
        ids = []
        for pid in patients:
            ids.append(f"synthetic/{pid}/{seen.get(pid, 0)}")
            seen[pid] = seen.get(pid, 0) + 1
        return Dataset(
            inputs=torch.from_numpy(images),
            labels={name: meta[name] for name in LABEL_FIELDS},
            groups=list(patients),
            ids=ids,
            pool=~np.asarray(meta["labeled"], dtype=bool),
            source="synthetic_fundus",
        )

    def _read_cache(self, images_path: Path, labels_path: Path):
        try:
            meta = read_json(labels_path)
        except (OSError, ValueError):
            return None
        if meta.get("version") != SYNTHETIC_CACHE_VERSION or "shape" not in meta:
            return None
        n = meta["shape"][0]
        if any(len(meta.get(k, ())) != n for k in ("patient_id", "labeled", *LABEL_FIELDS)):
            return None
        images = open_npy(images_path, tuple(meta["shape"]), np.uint8)
        return None if images is None else (images, meta)


# ------------------------------------------------------------------------------------------
# Manifest of real photographs
# ------------------------------------------------------------------------------------------


class ManifestParams(Params):
    kind: str = "manifest"
    #: the manifest CSV; a relative path resolves against the config file's folder
    path: Path
    #: side of the square images the photographs are resized (and black-padded) to
    image_size: int = Field(224, ge=16)
    image_column: str = Field("image",
                              description="the CSV column holding each image's path (relative to the manifest's "
                                          "folder)")
    #: ``null``: no patient column, every image is its own group
    patient_column: str | None = "patient_id"
    #: dataset label field -> CSV column; the defaults match fundus-mix
    fields: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_FIELDS))
    #: a column whose value ``unlabeled`` sends a row to the unlabeled pool (fundus-mix: suggested_split)
    split_column: str | None = None
    #: keep only rows whose split value is listed (needs split_column); ``null`` keeps all
    include_splits: list[str] | None = None
    #: the split column fixes each row's split: train/val/test/unlabeled, empty = split at random
    #: by patient as usual (needs split_column; see docs/design.md, "Fixed splits")
    fixed_splits: bool = False
    #: a column naming the image each row copies (fundus-mix: near_duplicate_of): the copy joins
    #: that image's patient, so a copy never sits in another split than its original
    duplicate_of_column: str | None = None
    #: a missing or corrupt image: "error" stops naming the row, "skip" leaves it out with a warning
    on_bad_image: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _splits_need_a_column(self) -> "ManifestParams":
        if self.include_splits is not None and self.split_column is None:
            raise ValueError("include_splits needs split_column (the column the split values are read from)")
        if self.fixed_splits and self.split_column is None:
            raise ValueError("fixed_splits needs split_column (the column the splits are read from)")
        return self


class ManifestSource(ImageInputs, DatasetSource):
    """Real photographs listed in a CSV manifest (see :mod:`eye_fundus.manifest`).

    Images are decoded once into a store under ``context.cache_dir/image_store/`` (see
    :mod:`eye_fundus.image_store`). Item ids are the image cells as written; groups are the
    patient ids. Conversion and skip notes end up in :attr:`warnings` and in the log.
    """

    Params = ManifestParams

    def __init__(self, params: ManifestParams, context: DataContext):
        super().__init__(params, context)
        self.warnings: list[str] = []

    @property
    def manifest_path(self) -> Path:
        path = Path(self.params.path)
        return path if path.is_absolute() else Path(self.context.base_dir) / path

    def columns(self) -> ManifestColumns:
        p = self.params
        return ManifestColumns(image=p.image_column, patient_id=p.patient_column, fields=dict(p.fields),
                               split=p.split_column, include_splits=p.include_splits, fixed_splits=p.fixed_splits,
                               duplicate_of=p.duplicate_of_column)

    def fingerprint(self) -> str:
        """Params, the manifest's bytes and every image's bytes, in manifest order.

        Editing a label or replacing an image in place changes every stage hash (and so the
        teacher-output and feature caches). The images enter by content only (a BLAKE2b digest
        of the file), not by path, so moving a data set to another disk keeps finished stages.
        The digests are cached by (path, size, mtime_ns) in ``cache_dir/file_hashes.json``: an
        unchanged file is not read again; a touched one is re-hashed (same bytes, same value).
        """
        digest = hashlib.sha256(self.params.model_dump_json().encode())
        digest.update(hashlib.sha256(self._manifest_bytes()).digest())
        rows = read_manifest(self.manifest_path, self.columns())
        for content in file_digests(rows.images, self.context.cache_dir):
            digest.update(content.encode())
        return digest.hexdigest()[:16]

    def load(self) -> Dataset:
        self._manifest_bytes()  # a missing manifest is reported against the config field
        rows = read_manifest(self.manifest_path, self.columns())
        store = load_image_store(rows.images, self.params.image_size, Path(self.context.cache_dir) / "image_store",
                                 where=str(rows.path), row_names=[rows.where(i) for i in range(len(rows))],
                                 on_bad_image=self.params.on_bad_image)
        self.warnings = list(rows.notes) + list(store.warnings)
        if rows.filtered_out:
            self.warnings.append(f"{rows.filtered_out} rows of {rows.path} were left out by include_splits.")
        for message in self.warnings:
            log.warning("%s", message)
        if not store.kept.all():
            rows = rows.subset(store.kept)
            if not len(rows):
                raise DistillkitError("none of the manifest's images can be read.", where=str(self.manifest_path))
        return Dataset(inputs=store.images, labels=rows.labels, groups=rows.groups, ids=rows.names,
                       pool=rows.pool, source=str(rows.path), fixed=rows.fixed,
                       fixed_source=f"{rows.path}: column '{self.params.split_column}'")

    def _manifest_bytes(self) -> bytes:
        try:
            return self.manifest_path.read_bytes()
        except OSError as exc:
            raise DistillkitError(f"cannot read the manifest {self.manifest_path}: {exc.strerror or exc}.",
                                  where=f"{self.context.where}.path") from None
