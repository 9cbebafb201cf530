"""Importers: turn the annotation files of public fundus data sets into manifest CSVs.

Each importer writes a manifest in the format of :mod:`eye_fundus.manifest` (one row per
image: ``image, patient_id, eye, broad_label, fine_label, diagnosis_text``), so every data
set is then read by the one ``manifest`` dataset source.

* :func:`eye_fundus.importers.odir.import_odir`: the ODIR-5K training spreadsheet.
"""

from eye_fundus.importers.odir import import_odir

__all__ = ["import_odir"]
