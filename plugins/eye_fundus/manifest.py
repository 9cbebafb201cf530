"""The manifest: the general input format for a folder of fundus photographs.

A manifest is a UTF-8 CSV file with one row per image and a header row. Which column holds
what is configurable (:class:`ManifestColumns`); the defaults match
``../shared/datasets/fundus-mix/manifest.csv``::

    image,patient_id,broad_label,fine_label,diagnosis_text,suggested_split
    images/odir/103_left.jpg,odir_103,cataract,cataract,cataract,train
    images/odir/103_right.jpg,odir_103,normal,normal fundus,normal fundus,train
    images/aug/0001.jpg,,,,,unlabeled

Rules:

* Image paths resolve relative to the manifest's folder (absolute paths stay as they are).
  An image listed twice is an error naming both lines.
* An empty label cell is a missing label for that row (a task skips it). A row whose label
  cells are all empty, or whose split value is ``unlabeled``, belongs to the unlabeled pool;
  pool rows never carry labels, so no stage can train on one by accident.
* Rows of one patient share a group, so splits never cut a patient in two. An empty patient
  id makes the image its own group.
* With a split column, ``include_splits`` keeps only rows whose value is listed (compared
  case-insensitively); by default every row is kept. Other columns are ignored.
* With ``fixed_splits`` (opt-in), the split column fixes each row's split: ``train``, ``val``,
  ``test`` or ``unlabeled`` (case-insensitive); an empty cell leaves the row to the random
  patient-grouped split. Another value is an error naming the line; a patient fixed to two
  splits is an error naming the patients (see docs/design.md, "Fixed splits").
* With a duplicate-of column (fundus-mix: ``near_duplicate_of``), a row whose cell names
  another image of the manifest (a path as in the image column) joins that image's group:
  an augmented copy of a photograph lands in the split of the photograph's patient, and a
  pool copy of a validation or test photograph is left out of the pool by the split (see
  :func:`distillkit.data.split_indices`). A name that is not in the manifest is an error.

Every mistake raises :class:`~distillkit.errors.DistillkitError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from distillkit import DistillkitError, check_fixed_splits, did_you_mean

#: dataset label field -> CSV column, as in fundus-mix
DEFAULT_FIELDS = {"broad_label": "broad_label", "fine_label": "fine_label", "diagnosis_text": "diagnosis_text"}
UNLABELED_SPLIT = "unlabeled"
FIXED_SPLITS = ("train", "val", "test", "unlabeled")


@dataclass(frozen=True)
class ManifestColumns:
    """Which CSV column holds what."""

    image: str = "image"
    #: ``None``: the manifest has no patient column, every image is its own group
    patient_id: str | None = "patient_id"
    #: dataset label field name -> CSV column (any subset; none at all gives an unlabeled set)
    fields: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    #: e.g. fundus-mix's ``suggested_split``; its value ``unlabeled`` sends a row to the pool
    split: str | None = None
    #: keep only rows whose split value is one of these (``None``: keep every row)
    include_splits: Sequence[str] | None = None
    #: the split column fixes each row's split (train/val/test/unlabeled; empty: split at random)
    fixed_splits: bool = False
    #: a column naming, per row, another image of the manifest that this one copies (fundus-mix:
    #: ``near_duplicate_of``): the row joins that image's group (patient)
    duplicate_of: str | None = None


@dataclass
class ManifestRows:
    """The rows of a manifest, one entry per kept row in file order."""

    path: Path
    #: resolved image files
    images: list[Path]
    #: the image cell as written: a stable, readable id
    names: list[str]
    #: line of each row in the file (the header is line 1), for messages
    lines: list[int]
    #: patient id, or ``"image:<name>"`` when the row has none
    groups: list[str]
    #: field name -> one value per row, ``None`` = missing
    labels: dict[str, list[str | None]]
    #: the split column's value per row (``None`` without a split column or for an empty cell)
    splits: list[str | None]
    #: with ``fixed_splits``: the split each row is fixed to (lower case), ``None`` = not fixed
    fixed: list[str | None] | None
    #: True for unlabeled-pool rows
    pool: np.ndarray
    #: sha256 of the file's bytes
    content_hash: str
    #: rows dropped by ``include_splits``
    filtered_out: int = 0
    #: counted notes about accepted oddities (e.g. a patient in two suggested splits)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def where(self, i: int) -> str:
        """``"<manifest>:line <n>"`` for row ``i``: the ``where`` of an error about that row."""
        return f"{self.path}:line {self.lines[i]}"

    def subset(self, keep: np.ndarray) -> "ManifestRows":
        """The rows where the boolean mask ``keep`` is True."""
        idx = np.flatnonzero(keep)
        pick = lambda values: [values[i] for i in idx]  # noqa: E731
        return replace(self, images=pick(self.images), names=pick(self.names), lines=pick(self.lines),
                       groups=pick(self.groups), labels={k: pick(v) for k, v in self.labels.items()},
                       splits=pick(self.splits), pool=self.pool[idx],
                       fixed=None if self.fixed is None else pick(self.fixed))


def read_manifest(path: str | Path, columns: ManifestColumns | None = None,
                  base_dir: str | Path | None = None) -> ManifestRows:
    """Read a manifest CSV (see the module docstring for its rules).

    :param path: the CSV file; a relative path resolves against ``base_dir`` (the config
        file's folder) when given, else against the working directory.
    :param columns: column names; defaults match fundus-mix.
    :raises DistillkitError: unreadable or non-UTF-8 file, a configured column missing from
        the header (with the header's columns and the closest name), a row with the wrong
        number of fields, an empty image cell, a duplicate image, or no rows at all.
    """
    columns = columns or ManifestColumns()
    path = Path(path)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if columns.include_splits is not None and columns.split is None:
        raise DistillkitError("include_splits needs a split column to read the split from.", where=str(path))
    if columns.fixed_splits and columns.split is None:
        raise DistillkitError("fixed_splits needs a split column to read the splits from.", where=str(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DistillkitError(f"manifest file not found: {path}", where=str(path)) from None
    except OSError as exc:
        raise DistillkitError(f"cannot read the manifest: {exc.strerror or exc}", where=str(path)) from None
    text = _decode_utf8(raw, path)
    reader = csv.reader(io.StringIO(text, newline=""))
    records = _records(reader, path)
    header = next(records, None)
    if header is None or not any(h.strip() for h in header):
        raise DistillkitError("the manifest is empty: it has no header row.", where=str(path),
                              hint="The first line must name the columns, e.g. image,patient_id,broad_label.")
    header = [h.strip() for h in header]
    position = _column_positions(header, columns, path)

    folder = path.parent
    include = None if columns.include_splits is None else {s.strip().lower() for s in columns.include_splits}
    rows = ManifestRows(path, [], [], [], [], {name: [] for name in columns.fields}, [],
                        [] if columns.fixed_splits else None, np.zeros(0, bool), hashlib.sha256(raw).hexdigest())
    pool: list[bool] = []
    first_line: dict[str, int] = {}  # normalised image path -> line that listed it first
    suggested: dict[str, set[str]] = {}  # patient -> its rows' split values (pool rows aside)
    group_of: dict[str, str] = {}  # normalised image path of every listed row -> its group
    copies: list[tuple[int, str, str, str, int]] = []  # (kept row, its key, referenced key, cell, line)
    for record in records:
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue  # blank lines and the ",,,," rows spreadsheets append
        where = f"{path}:line {line}"
        if len(record) != len(header):
            raise DistillkitError(f"the row has {len(record)} fields but the header has {len(header)}.",
                                  where=where, hint="Quote cells that contain commas, e.g. \"cataract, drusen\".")
        cell = lambda column: record[position[column]].strip()  # noqa: E731
        split = (cell(columns.split) or None) if columns.split else None
        patient = cell(columns.patient_id) if columns.patient_id else ""
        if patient and split and split.lower() != UNLABELED_SPLIT:
            suggested.setdefault(patient, set()).add(split.lower())
        name = cell(columns.image)
        key = _image_key(folder, name) if name else ""
        if include is not None and (split or "").lower() not in include:
            rows.filtered_out += 1
            if key:
                group_of.setdefault(key, patient or f"image:{name}")
            continue
        if not name:
            raise DistillkitError(f"the image cell (column '{columns.image}') is empty.", where=where)
        image = Path(os.path.normpath(folder / name))
        if key in first_line:
            raise DistillkitError(f"image '{name}' is listed twice: on line {first_line[key]} and on line {line}.",
                                  where=where, hint="Each image may appear once; remove one of the rows.")
        first_line[key] = line
        values = {f: cell(c) or None for f, c in columns.fields.items()}
        unlabeled = (split or "").lower() == UNLABELED_SPLIT or all(v is None for v in values.values())
        for f, v in values.items():
            rows.labels[f].append(None if unlabeled else v)
        rows.images.append(image)
        rows.names.append(name)
        rows.lines.append(line)
        rows.groups.append(patient or f"image:{name}")
        group_of[key] = rows.groups[-1]
        copied = cell(columns.duplicate_of) if columns.duplicate_of else ""
        if copied:
            copies.append((len(rows.groups) - 1, key, _image_key(folder, copied), copied, line))
        rows.splits.append(split)
        pool.append(unlabeled)
        if rows.fixed is not None:
            value = (split or "").lower() or None
            if value is not None and value not in FIXED_SPLITS:
                raise DistillkitError(
                    f"split value '{split}' in column '{columns.split}' is not a split.{did_you_mean(value, FIXED_SPLITS)} "
                    f"With fixed_splits the column holds {', '.join(FIXED_SPLITS)} or nothing (split at random).",
                    where=where)
            rows.fixed.append(value)

    if not rows.images:
        if rows.filtered_out:
            raise DistillkitError(f"no row is left after keeping only the splits {sorted(include)} of column "
                                  f"'{columns.split}' ({rows.filtered_out} rows dropped).", where=str(path))
        raise DistillkitError("the manifest has a header but no rows.", where=str(path))
    rows.pool = np.asarray(pool, dtype=bool)
    copy_of = {own: ref for _, own, ref, _, _ in copies}
    for i, own, ref, copied, line in copies:
        if ref not in group_of:
            raise DistillkitError(
                f"'{copied}' in column '{columns.duplicate_of}' is not an image of this manifest.",
                where=f"{path}:line {line}",
                hint="The column names the image a row copies, written as in the image column (or is empty).")
        seen = {own}
        while ref in copy_of and ref not in seen:  # a copy of a copy joins the original's group
            seen.add(ref)
            ref = copy_of[ref]
        rows.groups[i] = group_of[ref]
    if rows.fixed is not None:
        check_fixed_splits(rows.groups, rows.fixed, rows.pool, f"{path}: column '{columns.split}'")
    # Accepted: distillkit splits by patient itself and reads the split column only for
    # include_splits and the pool. But such a column is no patient-level split: say so.
    mixed = sorted(p for p, values in suggested.items() if len(values) > 1)
    if mixed and not columns.fixed_splits:
        n = len(mixed)
        rows.notes.append(f"{n} patient{'s' if n > 1 else ''} of {path} {'have' if n > 1 else 'has'} rows in more "
                          f"than one suggested split (column '{columns.split}'), e.g. '{mixed[0]}' in "
                          f"{', '.join(sorted(suggested[mixed[0]]))}; distillkit keeps each patient in one split "
                          "of its own, so this column serves only include_splits and the unlabeled pool.")
    return rows


def _image_key(folder: Path, name: str) -> str:
    """The normalised absolute path of an image cell: equal for two spellings of one file."""
    return os.path.normcase(os.path.abspath(os.path.normpath(folder / name)))


def _records(reader, path: Path):
    """The reader's records, with the csv module's own errors (a NUL byte, an unterminated
    quote running past the field size limit) reported as user mistakes."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DistillkitError(f"the CSV is malformed: {exc}.", where=f"{path}:line {reader.line_num}") from None
        yield record


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate the BOM spreadsheet programs write
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DistillkitError(
            f"the manifest is not valid UTF-8: byte 0x{raw[exc.start]:02x} at line {line}, column {column}.",
            where=f"{path}:line {line}",
            hint="Save it as UTF-8 (in a spreadsheet program: 'CSV UTF-8').",
        ) from None


def _column_positions(header: list[str], columns: ManifestColumns, path: Path) -> dict[str, int]:
    """Index of every configured column in the header; one error listing all that are missing."""
    wanted = [("image", columns.image), ("patient id", columns.patient_id), ("split", columns.split),
              ("duplicate of", columns.duplicate_of)]
    wanted += [(f"field '{f}'", c) for f, c in columns.fields.items()]
    problems = []
    for role, column in wanted:
        if column is None:
            continue
        if column not in header:
            problems.append(f"column '{column}' ({role}) is not in the header.{did_you_mean(column, header)}")
        elif header.count(column) > 1:
            problems.append(f"column '{column}' ({role}) appears {header.count(column)} times in the header.")
    if problems:
        listed = ", ".join(repr(h) for h in header)
        raise DistillkitError(" ".join(problems) + f" The header's columns are: {listed}.", where=f"{path}:line 1")
    return {column: header.index(column) for _, column in wanted if column is not None}
