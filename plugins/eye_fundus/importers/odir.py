"""Import the ODIR-5K annotation spreadsheet into a manifest CSV.

ODIR-5K (Ocular Disease Intelligent Recognition, 2019) ships one spreadsheet row per
patient: ``ID``, ``Left-Fundus`` and ``Right-Fundus`` (image file names), and
``Left-Diagnostic Keywords`` / ``Right-Diagnostic Keywords`` (the ophthalmologist's
keywords for each eye, comma separated). :func:`import_odir` writes one manifest row per
eye (columns ``image, patient_id, eye, broad_label, fine_label, diagnosis_text``), readable
by :func:`eye_fundus.manifest.read_manifest` with its default columns.

Keyword cleaning (applied before any rule):

* lower case; Chinese commas ``，`` become ``,``; runs of spaces become one; duplicates go;
* keywords that say the photo is not of the fundus (:data:`NOT_A_FUNDUS_PHOTO`:
  ``anterior segment image``, ``no fundus image``): the eye is skipped and counted;
* keywords about image quality, not the eye (:data:`IMAGE_QUALITY_KEYWORDS`: ``lens dust``,
  ``low image quality``, ``image offset``, ``optic disk photographically invisible``) are
  dropped;
* ``normal fundus`` next to a disease keyword is dropped (the disease is the finding).

Labels, from the cleaned (diagnostic) keywords:

* ``diagnosis_text``: the keywords in annotated order, joined by ``", "``;
* ``fine_label``: the keywords sorted and joined by ``"; "`` (as in fundus-mix);
* ``broad_label``: by :data:`BROAD_RULES`, a substring match on each keyword, *first rule
  wins* when an eye has findings of several classes:

  1. ``glaucoma`` (also ``suspected glaucoma``) -> ``glaucoma``
  2. ``cataract`` (also ``suspected cataract``) -> ``cataract``
  3. ``macular degeneration`` (dry / wet age-related) -> ``AMD``
  4. ``diabetic retinopathy`` or ``proliferative retinopathy`` (mild / moderate / severe
     non proliferative, proliferative, suspected) -> ``DR``; ``hypertensive retinopathy``
     and ``myopic retinopathy`` are *not* DR.
  5. only ``normal fundus`` -> ``normal``
  6. any other finding (hypertensive retinopathy, pathological myopia, drusen, epiretinal
     membrane, vein occlusion, ...) -> ``other_label`` (``"other"``; ``None`` leaves the
     broad label empty, so the eye still counts for the fine and text tasks).

  The precedence puts DR last because mild and moderate non-proliferative retinopathy is
  the commonest co-finding in this diabetic screening population, so the rarer disease is
  the more informative broad class. It also reproduces how fundus-mix was curated
  (glaucoma beats cataract and DR, cataract beats DR).
* An eye left with no diagnostic keyword (e.g. only ``low image quality``) gets empty labels:
  the manifest reader puts it in the unlabeled pool.

Eyes whose image is not in ``image_dir`` are skipped and counted (ODIR is often used as a
subset). An image named twice keeps its first row; the rest are counted as duplicates.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distillkit import DistillkitError, atomic_write_text, did_you_mean

#: spreadsheet columns this importer reads
ID_COLUMN = "ID"
EYE_COLUMNS = {  # eye -> (image column, keywords column)
    "left": ("Left-Fundus", "Left-Diagnostic Keywords"),
    "right": ("Right-Fundus", "Right-Diagnostic Keywords"),
}
NORMAL_KEYWORD = "normal fundus"
NOT_A_FUNDUS_PHOTO = frozenset({"anterior segment image", "no fundus image"})
IMAGE_QUALITY_KEYWORDS = frozenset({"lens dust", "low image quality", "image offset",
                                    "optic disk photographically invisible"})
#: (broad label, pattern matched inside one keyword), in precedence order
BROAD_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("glaucoma", re.compile(r"glaucoma")),
    ("cataract", re.compile(r"cataract")),
    ("AMD", re.compile(r"macular degeneration")),
    ("DR", re.compile(r"diabetic retinopathy|proliferative retinopathy")),
)
MANIFEST_HEADER = ("image", "patient_id", "eye", "broad_label", "fine_label", "diagnosis_text")


@dataclass
class OdirLabels:
    """The labels of one eye (``None`` = missing) or ``skip`` when the photo is not a fundus."""

    broad_label: str | None
    fine_label: str | None
    diagnosis_text: str | None
    skip: bool = False


@dataclass
class OdirImportReport:
    """What :func:`import_odir` did."""

    out_csv: Path
    patients: int = 0
    eyes: int = 0
    rows_written: int = 0
    missing_images: int = 0
    not_fundus: int = 0
    duplicates: int = 0
    unlabeled: int = 0
    broad_counts: Counter = field(default_factory=Counter)
    missing_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        classes = ", ".join(f"{k} {v}" for k, v in sorted(self.broad_counts.items()))
        return (f"wrote {self.rows_written} rows ({self.patients} patients) to {self.out_csv}: {classes}; "
                f"{self.unlabeled} without a diagnostic keyword; skipped {self.missing_images} eyes whose image "
                f"is missing, {self.not_fundus} non-fundus photos, {self.duplicates} duplicates.")


def clean_keywords(raw: object) -> list[str]:
    """The keywords of one spreadsheet cell, lower case, in order, without duplicates."""
    text = "" if raw is None else str(raw)
    out: list[str] = []
    for part in text.replace("，", ",").lower().split(","):
        keyword = " ".join(part.split())
        if keyword and keyword not in out:
            out.append(keyword)
    return out


def eye_labels(raw_keywords: object, other_label: str | None = "other") -> OdirLabels:
    """Broad label, fine label and diagnosis text of one eye (rules in the module docstring)."""
    keywords = clean_keywords(raw_keywords)
    if any(k in NOT_A_FUNDUS_PHOTO for k in keywords):
        return OdirLabels(None, None, None, skip=True)
    findings = [k for k in keywords if k not in IMAGE_QUALITY_KEYWORDS]
    if any(k != NORMAL_KEYWORD for k in findings):
        findings = [k for k in findings if k != NORMAL_KEYWORD]
    if not findings:
        return OdirLabels(None, None, None)
    if findings == [NORMAL_KEYWORD]:
        broad = "normal"
    else:
        broad = next((label for label, pattern in BROAD_RULES if any(pattern.search(k) for k in findings)),
                     other_label)
    return OdirLabels(broad, "; ".join(sorted(findings)), ", ".join(findings))


def import_odir(xlsx_path: str | Path, image_dir: str | Path, out_csv: str | Path, *,
                other_label: str | None = "other", patient_prefix: str = "odir_",
                sheet: str | None = None) -> OdirImportReport:
    """Write a manifest CSV with one row per eye of the ODIR-5K spreadsheet.

    :param xlsx_path: ``ODIR-5K_Training_Annotations(Updated)_V2.xlsx`` (or a file with the
        same columns).
    :param image_dir: folder holding the fundus images named in the spreadsheet; image
        paths in the CSV are written relative to ``out_csv``'s folder.
    :param out_csv: the manifest to write (atomically; its folder is created).
    :param other_label: broad label of eyes whose findings match no rule; ``None`` = empty.
    :param patient_prefix: prepended to the spreadsheet's ID (``odir_0``) so ids of several
        sources cannot collide.
    :param sheet: worksheet name; default: the first sheet.
    :raises DistillkitError: openpyxl missing, unreadable workbook, missing columns, no rows.
    """
    xlsx_path, image_dir, out_csv = Path(xlsx_path), Path(image_dir), Path(out_csv)
    rows, header_where = _read_sheet(xlsx_path, sheet)
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    needed = [ID_COLUMN] + [c for pair in EYE_COLUMNS.values() for c in pair]
    missing = [c for c in needed if c not in header]
    if missing:
        hints = "".join(did_you_mean(c, header) for c in missing)
        raise DistillkitError(f"missing column(s) {', '.join(repr(c) for c in missing)}.{hints} "
                              f"The header has: {', '.join(repr(h) for h in header if h)}.", where=header_where)
    col = {name: header.index(name) for name in needed}

    report = OdirImportReport(out_csv)
    if not image_dir.is_dir():
        raise DistillkitError(f"image folder not found: {image_dir}", where=str(image_dir))
    available = {p.name for p in image_dir.iterdir()}  # one listing instead of a stat per eye
    written: set[str] = set()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_HEADER)
    for values in rows[1:]:
        if values is None or all(v is None or str(v).strip() == "" for v in values):
            continue
        cell = lambda name: values[col[name]] if col[name] < len(values) else None  # noqa: E731
        patient_id = _id_text(cell(ID_COLUMN))
        patient = f"{patient_prefix}{patient_id}" if patient_id else ""  # empty: each eye its own group
        report.patients += 1
        for eye, (image_column, keywords_column) in EYE_COLUMNS.items():
            name = str(cell(image_column) or "").strip()
            if not name:
                continue
            report.eyes += 1
            labels = eye_labels(cell(keywords_column), other_label)
            if labels.skip:
                report.not_fundus += 1
                continue
            if name not in available:
                report.missing_images += 1
                if len(report.missing_examples) < 5:
                    report.missing_examples.append(name)
                continue
            if name in written:
                report.duplicates += 1
                continue
            written.add(name)
            image = Path(os.path.relpath(image_dir / name, out_csv.parent)).as_posix()
            writer.writerow([image, patient, eye, labels.broad_label or "", labels.fine_label or "",
                             labels.diagnosis_text or ""])
            report.rows_written += 1
            if labels.broad_label:
                report.broad_counts[labels.broad_label] += 1
            elif labels.fine_label is None:
                report.unlabeled += 1
    if report.rows_written == 0:
        raise DistillkitError(f"no eye of the spreadsheet has its image in {image_dir} "
                              f"({report.eyes} eyes listed, e.g. {report.missing_examples[:3]}).",
                              where=str(xlsx_path))
    atomic_write_text(out_csv, buffer.getvalue())
    return report


def _read_sheet(xlsx_path: Path, sheet: str | None) -> tuple[list[tuple], str]:
    try:
        import openpyxl  # optional: only this importer needs it
    except ImportError:
        raise DistillkitError("reading the ODIR spreadsheet needs the openpyxl package.",
                              where=str(xlsx_path), hint="Install it: pip install openpyxl") from None
    if not xlsx_path.is_file():
        raise DistillkitError(f"spreadsheet not found: {xlsx_path}", where=str(xlsx_path))
    try:
        workbook = openpyxl.load_workbook(xlsx_path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError and its own errors on a bad file
        raise DistillkitError(f"cannot read the spreadsheet: {type(exc).__name__}: {exc}",
                              where=str(xlsx_path)) from None
    try:
        if sheet is not None and sheet not in workbook.sheetnames:
            raise DistillkitError(f"no sheet named '{sheet}'; sheets: {', '.join(workbook.sheetnames)}."
                                  f"{did_you_mean(sheet, workbook.sheetnames)}", where=str(xlsx_path))
        worksheet = workbook[sheet] if sheet is not None else workbook.worksheets[0]
        rows = list(worksheet.iter_rows(values_only=True))
    finally:
        workbook.close()
    if not rows:
        raise DistillkitError("the spreadsheet is empty.", where=str(xlsx_path))
    return rows, f"{xlsx_path}:{worksheet.title}!row 1"


def _id_text(value: object) -> str:
    """The patient ID as text; spreadsheets turn ``12`` into ``12.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if value is not None else ""
