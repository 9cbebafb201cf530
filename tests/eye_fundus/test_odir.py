"""The ODIR-5K spreadsheet importer: keyword rules, skipped eyes, and the manifest it writes."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from distillkit.errors import DistillkitError
from eye_fundus.importers.odir import clean_keywords, eye_labels, import_odir
from eye_fundus.manifest import read_manifest

FUNDUS_MIX = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "fundus-mix"
ODIR_XLSX = FUNDUS_MIX / "annotations" / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
HEADER = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
          "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]


@pytest.mark.parametrize("keywords, broad, fine, text", [
    ("normal fundus", "normal", "normal fundus", "normal fundus"),
    ("lens dust，normal fundus", "normal", "normal fundus", "normal fundus"),
    ("Cataract, lens dust", "cataract", "cataract", "cataract"),
    ("moderate non proliferative retinopathy", "DR", "moderate non proliferative retinopathy",
     "moderate non proliferative retinopathy"),
    ("mild nonproliferative retinopathy，hypertensive retinopathy", "DR",
     "hypertensive retinopathy; mild nonproliferative retinopathy",
     "mild nonproliferative retinopathy, hypertensive retinopathy"),
    ("proliferative diabetic retinopathy", "DR", "proliferative diabetic retinopathy",
     "proliferative diabetic retinopathy"),
    ("wet age-related macular degeneration", "AMD", "wet age-related macular degeneration",
     "wet age-related macular degeneration"),
    # precedence: glaucoma > cataract > AMD > DR
    ("moderate non proliferative retinopathy，suspected glaucoma", "glaucoma",
     "moderate non proliferative retinopathy; suspected glaucoma",
     "moderate non proliferative retinopathy, suspected glaucoma"),
    ("cataract，dry age-related macular degeneration", "cataract",
     "cataract; dry age-related macular degeneration", "cataract, dry age-related macular degeneration"),
    ("dry age-related macular degeneration，mild nonproliferative retinopathy", "AMD",
     "dry age-related macular degeneration; mild nonproliferative retinopathy",
     "dry age-related macular degeneration, mild nonproliferative retinopathy"),
    # retinopathies that are not diabetic, and other findings
    ("hypertensive retinopathy", "other", "hypertensive retinopathy", "hypertensive retinopathy"),
    ("myopia retinopathy", "other", "myopia retinopathy", "myopia retinopathy"),
    ("lens dust, drusen, normal fundus", "other", "drusen", "drusen"),  # the finding beats "normal"
    ("pathological  myopia, pathological myopia", "other", "pathological myopia", "pathological myopia"),
    # nothing diagnostic left: empty labels (an unlabeled-pool row)
    ("low image quality", None, None, None),
    ("", None, None, None),
])
def test_keyword_rules(keywords, broad, fine, text):
    labels = eye_labels(keywords)
    assert (labels.broad_label, labels.fine_label, labels.diagnosis_text, labels.skip) == (broad, fine, text, False)


def test_non_fundus_photos_are_skipped_and_other_label_is_configurable():
    assert eye_labels("anterior segment image").skip
    assert eye_labels("no fundus image").skip
    assert eye_labels("hypertensive retinopathy", other_label=None).broad_label is None
    assert clean_keywords("A，b ,  c  d,,a") == ["a", "b", "c d"]


def write_xlsx(path: Path, rows: list[list], header=HEADER) -> Path:
    openpyxl = pytest.importorskip("openpyxl")
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    workbook.save(path)
    return path


def patient(pid, left_kw, right_kw, left=None, right=None):
    return [pid, 60, "Female", left or f"{pid}_left.jpg", right or f"{pid}_right.jpg", left_kw, right_kw,
            0, 0, 0, 0, 0, 0, 0, 0]


def test_import_writes_a_manifest_the_reader_accepts(tmp_path):
    xlsx = write_xlsx(tmp_path / "odir.xlsx", [
        patient(0, "cataract", "normal fundus"),
        patient(1, "moderate non proliferative retinopathy，glaucoma", "lens dust，normal fundus"),
        patient(2, "anterior segment image", "hypertensive retinopathy"),
        patient(3, "low image quality", "wet age-related macular degeneration"),
        patient(4, "normal fundus", "normal fundus"),  # its images are not in the folder
        patient(5.0, "cataract", "cataract", left="5_left.jpg", right="0_left.jpg"),  # float id; an image named twice
    ])
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name in ["0_left.jpg", "0_right.jpg", "1_left.jpg", "1_right.jpg", "2_left.jpg", "2_right.jpg",
                 "3_left.jpg", "3_right.jpg", "5_left.jpg"]:
        (images / name).write_bytes(b"")
    out = tmp_path / "data" / "odir.csv"
    report = import_odir(xlsx, images, out)

    with open(out, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = [(r["image"], r["patient_id"], r["eye"], r["broad_label"], r["fine_label"], r["diagnosis_text"])
           for r in rows]
    assert got == [
        ("images/0_left.jpg", "odir_0", "left", "cataract", "cataract", "cataract"),
        ("images/0_right.jpg", "odir_0", "right", "normal", "normal fundus", "normal fundus"),
        ("images/1_left.jpg", "odir_1", "left", "glaucoma", "glaucoma; moderate non proliferative retinopathy",
         "moderate non proliferative retinopathy, glaucoma"),
        ("images/1_right.jpg", "odir_1", "right", "normal", "normal fundus", "normal fundus"),
        ("images/2_right.jpg", "odir_2", "right", "other", "hypertensive retinopathy", "hypertensive retinopathy"),
        ("images/3_left.jpg", "odir_3", "left", "", "", ""),
        ("images/3_right.jpg", "odir_3", "right", "AMD", "wet age-related macular degeneration",
         "wet age-related macular degeneration"),
        ("images/5_left.jpg", "odir_5", "left", "cataract", "cataract", "cataract"),
    ]
    assert (report.rows_written, report.patients, report.eyes) == (8, 6, 12)
    assert (report.missing_images, report.not_fundus, report.duplicates, report.unlabeled) == (2, 1, 1, 1)
    assert report.broad_counts == {"cataract": 2, "normal": 2, "glaucoma": 1, "other": 1, "AMD": 1}
    assert "wrote 8 rows" in report.summary()

    manifest = read_manifest(out)
    assert manifest.images[0] == images / "0_left.jpg"
    assert manifest.pool.tolist() == [False] * 5 + [True, False, False]
    assert manifest.groups[0] == manifest.groups[1] == "odir_0"


def test_missing_column_suggests_the_closest(tmp_path):
    header = [h if h != "Left-Diagnostic Keywords" else "Left-Diagnostic Keyword" for h in HEADER]
    xlsx = write_xlsx(tmp_path / "odir.xlsx", [patient(0, "cataract", "cataract")], header=header)
    (tmp_path / "img").mkdir()
    with pytest.raises(DistillkitError) as info:
        import_odir(xlsx, tmp_path / "img", tmp_path / "out.csv")
    assert "'Left-Diagnostic Keywords'" in info.value.message
    assert "Did you mean 'Left-Diagnostic Keyword'?" in info.value.message
    assert info.value.where.endswith("row 1")


def test_no_image_found_is_an_error_and_writes_nothing(tmp_path):
    xlsx = write_xlsx(tmp_path / "odir.xlsx", [patient(0, "cataract", "cataract")])
    (tmp_path / "img").mkdir()
    with pytest.raises(DistillkitError, match="no eye of the spreadsheet has its image"):
        import_odir(xlsx, tmp_path / "img", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_openpyxl_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # makes `import openpyxl` raise ImportError
    with pytest.raises(DistillkitError, match="needs the openpyxl package") as info:
        import_odir(tmp_path / "odir.xlsx", tmp_path, tmp_path / "out.csv")
    assert "pip install openpyxl" in info.value.hint


@pytest.mark.integration
@pytest.mark.skipif(not ODIR_XLSX.exists(), reason="fundus-mix is not available")
def test_real_spreadsheet_agrees_with_fundus_mix(tmp_path):
    """Every ODIR image of fundus-mix gets the broad label, fine label and patient of its manifest."""
    pytest.importorskip("openpyxl")
    out = tmp_path / "odir.csv"
    report = import_odir(ODIR_XLSX, FUNDUS_MIX / "images" / "odir", out)
    with open(out, encoding="utf-8", newline="") as fh:
        mine = {Path(r["image"]).name: r for r in csv.DictReader(fh)}
    with open(FUNDUS_MIX / "manifest.csv", encoding="utf-8", newline="") as fh:
        reference = [r for r in csv.DictReader(fh) if r["image"].startswith("images/odir/")]
    assert report.rows_written == len(mine) == len(reference)
    for field in ("broad_label", "fine_label", "patient_id", "eye"):
        agree = sum(mine[Path(r["image"]).name][field] == r[field] for r in reference)
        assert agree == len(reference), f"{field}: {agree} of {len(reference)} agree"
