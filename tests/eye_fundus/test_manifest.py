"""Reading manifest CSVs: columns, labels, the unlabeled pool, groups, and every user mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillkit.errors import DistillkitError
from eye_fundus.manifest import ManifestColumns, read_manifest

HEADER = "image,patient_id,broad_label,fine_label,diagnosis_text,suggested_split\n"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_rows_labels_pool_and_groups(tmp_path):
    manifest = write(tmp_path / "data" / "manifest.csv", HEADER + (
        "img/p1_left.jpg,p1,cataract,cataract; drusen,\"cataract, drusen\",train\n"
        "img/p1_right.jpg,p1,normal,normal fundus,,train\n"          # no text: missing for T3 only
        "img/p2.jpg,p2,glaucoma,,,val\n"
        "img/solo.jpg,,DR,,,train\n"                                   # no patient: its own group
        "img/aug1.jpg,,,,,unlabeled\n"                                 # unlabeled by split value
        "img/aug2.jpg,p3,,,,train\n"                                   # unlabeled: no label at all
        "img/aug3.jpg,p4,normal,normal fundus,normal fundus,unlabeled\n"  # pool rows drop labels
        ",,,,,\n"                                                      # spreadsheet filler: ignored
    ))
    rows = read_manifest(manifest, ManifestColumns(split="suggested_split"))
    assert len(rows) == 7
    assert rows.images[0] == tmp_path / "data" / "img" / "p1_left.jpg"  # relative to the manifest's folder
    assert rows.names[0] == "img/p1_left.jpg" and rows.lines[:3] == [2, 3, 4]
    assert rows.labels["broad_label"] == ["cataract", "normal", "glaucoma", "DR", None, None, None]
    assert rows.labels["fine_label"] == ["cataract; drusen", "normal fundus", None, None, None, None, None]
    assert rows.labels["diagnosis_text"] == ["cataract, drusen", None, None, None, None, None, None]
    assert rows.pool.tolist() == [False, False, False, False, True, True, True]
    assert rows.groups[0] == rows.groups[1] == "p1"
    assert rows.groups[3] == "image:img/solo.jpg" and rows.groups[4] == "image:img/aug1.jpg"
    assert rows.splits == ["train", "train", "val", "train", "unlabeled", "train", "unlabeled"]
    assert rows.where(2) == f"{manifest}:line 4"
    assert len(rows.content_hash) == 64


def test_relative_manifest_path_resolves_against_base_dir(tmp_path):
    write(tmp_path / "cfg" / "sub" / "m.csv", HEADER + "a.jpg,p,normal,,,\n")
    rows = read_manifest("sub/m.csv", base_dir=tmp_path / "cfg")
    assert rows.images == [tmp_path / "cfg" / "sub" / "a.jpg"]


def test_include_splits_filters_rows(tmp_path):
    manifest = write(tmp_path / "m.csv", HEADER + "a.jpg,p1,normal,,,train\nb.jpg,p2,DR,,,Val\nc.jpg,p3,DR,,,test\n")
    rows = read_manifest(manifest, ManifestColumns(split="suggested_split", include_splits=["train", "val"]))
    assert rows.names == ["a.jpg", "b.jpg"] and rows.filtered_out == 1
    with pytest.raises(DistillkitError, match="no row is left"):
        read_manifest(manifest, ManifestColumns(split="suggested_split", include_splits=["unlabeled"]))
    with pytest.raises(DistillkitError, match="needs a split column"):
        read_manifest(manifest, ManifestColumns(include_splits=["train"]))


def test_custom_columns_and_fields(tmp_path):
    manifest = write(tmp_path / "m.csv", "file,grade\nx.png,2\ny.png,\n")
    rows = read_manifest(manifest, ManifestColumns(image="file", patient_id=None, fields={"dr_grade": "grade"}))
    assert rows.labels == {"dr_grade": ["2", None]} and rows.pool.tolist() == [False, True]
    assert rows.groups == ["image:x.png", "image:y.png"]


def test_wrong_column_lists_header_and_suggests(tmp_path):
    manifest = write(tmp_path / "m.csv", HEADER + "a.jpg,p,normal,,,train\n")
    with pytest.raises(DistillkitError) as info:
        read_manifest(manifest, ManifestColumns(patient_id="patient", fields={"broad_label": "broad-label"}))
    err = info.value
    assert err.where == f"{manifest}:line 1"
    assert "column 'patient' (patient id) is not in the header. Did you mean 'patient_id'?" in err.message
    assert "Did you mean 'broad_label'?" in err.message  # every missing column in one message
    assert "'suggested_split'" in err.message  # the header's columns are listed


def test_duplicate_image_names_both_lines(tmp_path):
    manifest = write(tmp_path / "m.csv", HEADER + "a.jpg,p1,normal,,,\nb.jpg,p2,DR,,,\n./a.jpg,p3,DR,,,\n")
    with pytest.raises(DistillkitError) as info:
        read_manifest(manifest)
    assert info.value.where == f"{manifest}:line 4"
    assert "line 2 and on line 4" in info.value.message


def test_non_utf8_names_the_line(tmp_path):
    manifest = write(tmp_path / "m.csv", HEADER + "a.jpg,p1,normal,,,\nb.jpg,p2,DR,,rétinopathie,\n", "latin-1")
    with pytest.raises(DistillkitError) as info:
        read_manifest(manifest)
    assert info.value.where == f"{manifest}:line 3"
    assert "not valid UTF-8" in info.value.message and "0xe9" in info.value.message


def test_utf8_bom_and_text_with_commas_are_fine(tmp_path):
    manifest = write(tmp_path / "m.csv", "\ufeff" + HEADER + 'a.jpg,p1,DR,x,"mild, non proliferative",\n')
    rows = read_manifest(manifest)
    assert rows.labels["diagnosis_text"] == ["mild, non proliferative"]


@pytest.mark.parametrize("text, message", [
    ("", "no header row"),
    (HEADER, "no rows"),
    (HEADER + "\n\n", "no rows"),
])
def test_empty_manifest(tmp_path, text, message):
    manifest = write(tmp_path / "m.csv", text)
    with pytest.raises(DistillkitError, match=message) as info:
        read_manifest(manifest)
    assert info.value.where == str(manifest)


def test_row_with_wrong_field_count_and_empty_image(tmp_path):
    manifest = write(tmp_path / "m.csv", HEADER + "a.jpg,p1,normal,,,\nb.jpg,p2,DR,,cataract, drusen,\n")
    with pytest.raises(DistillkitError, match="7 fields but the header has 6") as info:
        read_manifest(manifest)
    assert info.value.where == f"{manifest}:line 3" and "Quote" in info.value.hint
    manifest = write(tmp_path / "m2.csv", HEADER + ",p1,normal,,,\n")
    with pytest.raises(DistillkitError, match="image cell") as info:
        read_manifest(manifest)
    assert info.value.where == f"{manifest}:line 2"


def test_missing_manifest(tmp_path):
    with pytest.raises(DistillkitError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


DUP_HEADER = "image,patient_id,broad_label,fine_label,diagnosis_text,suggested_split,near_duplicate_of\n"


def test_copies_join_the_group_of_the_image_they_copy(tmp_path):
    manifest = write(tmp_path / "m.csv", DUP_HEADER + (
        "img/a.jpg,pa,normal,,,train,\n"
        "img/b.jpg,pb,DR,,,val,\n"
        "aug/1.jpg,,,,,unlabeled,img/a.jpg\n"
        "aug/2.jpg,,,,,unlabeled,./img/../img/b.jpg\n"   # another spelling of img/b.jpg
        "aug/3.jpg,,,,,unlabeled,aug/2.jpg\n"             # a copy of a copy: b's patient
        "aug/4.jpg,,,,,unlabeled,\n"                      # no original: its own group
        "img/c.jpg,,cataract,,,test,\n"
        "aug/5.jpg,,,,,unlabeled,img/c.jpg\n"             # original without a patient id
    ))
    plain = read_manifest(manifest, ManifestColumns(split="suggested_split"))
    assert plain.groups[2:6] == ["image:aug/1.jpg", "image:aug/2.jpg", "image:aug/3.jpg", "image:aug/4.jpg"]
    rows = read_manifest(manifest, ManifestColumns(split="suggested_split", duplicate_of="near_duplicate_of"))
    assert rows.groups == ["pa", "pb", "pa", "pb", "pb", "image:aug/4.jpg", "image:img/c.jpg", "image:img/c.jpg"]
    assert rows.pool.tolist() == [False, False, True, True, True, True, False, True]


def test_a_copy_of_a_held_out_photograph_leaves_the_pool(tmp_path):
    """End to end through the core split: the pool keeps copies of training photographs only."""
    import numpy as np

    from distillkit.data import Dataset, SplitParams, split_indices

    lines = []
    for p in range(40):
        lines.append(f"img/{p}.jpg,p{p},{'normal' if p % 2 else 'DR'},,,train,")
        lines.append(f"aug/{p}.jpg,,,,,unlabeled,img/{p}.jpg")
    manifest = write(tmp_path / "m.csv", DUP_HEADER + "\n".join(lines) + "\n")
    rows = read_manifest(manifest, ManifestColumns(split="suggested_split", duplicate_of="near_duplicate_of"))
    dataset = Dataset(inputs=np.zeros((len(rows), 1)), labels=rows.labels, groups=rows.groups, ids=rows.names,
                      pool=rows.pool, source=str(manifest))
    split = split_indices(dataset, SplitParams(val=0.25, test=0.25, train_fraction=0.5))
    name = lambda i: rows.names[i]  # noqa: E731
    originals = {s: {name(i).split("/")[1] for i in split[s]} for s in ("train", "val", "test")}
    copies = {name(i).split("/")[1] for i in split["unlabeled"]}
    assert originals["val"] and originals["test"]
    assert copies == originals["train"]


def test_a_copy_of_an_unknown_image_names_the_line(tmp_path):
    manifest = write(tmp_path / "m.csv", DUP_HEADER + "img/a.jpg,pa,normal,,,train,\naug/1.jpg,,,,,unlabeled,img/x.jpg\n")
    with pytest.raises(DistillkitError, match="'img/x.jpg' in column 'near_duplicate_of' is not an image") as err:
        read_manifest(manifest, ManifestColumns(split="suggested_split", duplicate_of="near_duplicate_of"))
    assert err.value.where == f"{manifest}:line 3"
    with pytest.raises(DistillkitError, match="column 'near_dup' \\(duplicate of\\) is not in the header"):
        read_manifest(manifest, ManifestColumns(split="suggested_split", duplicate_of="near_dup"))


def test_a_copy_of_a_row_left_out_by_include_splits_takes_its_group(tmp_path):
    manifest = write(tmp_path / "m.csv", DUP_HEADER + "img/a.jpg,pa,normal,,,test,\nimg/b.jpg,pb,DR,,,train,\n"
                     "aug/1.jpg,,,,,unlabeled,img/a.jpg\n")
    rows = read_manifest(manifest, ManifestColumns(split="suggested_split", include_splits=["train", "unlabeled"],
                                                   duplicate_of="near_duplicate_of"))
    assert rows.names == ["img/b.jpg", "aug/1.jpg"] and rows.groups == ["pb", "pa"]
