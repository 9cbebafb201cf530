"""distillkit/rundir.py owns the run-directory layout: no other module spells its paths."""

from __future__ import annotations

import re

from distillkit.rundir import RunLayout
from tests.conftest import REPO

#: a path join onto a run-level name of the layout, e.g. ``run_dir / "stages"``
JOIN = re.compile(r"/\s*[\"'](stages|config\.yaml|plan\.json|run\.json|summary\.json|stage\.json|\.lock|cache|"
                  r"teacher_outputs|\.work|\.previous)[\"']")


def test_no_module_but_rundir_joins_run_directory_paths():
    offenders = []
    for path in sorted([*(REPO / "distillkit").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]):
        if path == REPO / "distillkit" / "rundir.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if JOIN.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_layout(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.stage("m1") == tmp_path / "stages" / "m1"
    assert layout.stage_marker("m1") == tmp_path / "stages" / "m1" / "stage.json"
    assert layout.work("m1", "abc") == tmp_path / "stages" / ".work" / "m1-abc"
    assert layout.previous("m1") == tmp_path / "stages" / ".previous" / "m1"
    assert layout.teacher_outputs == tmp_path / "cache" / "teacher_outputs"
    for name in ("m2", "m1", ".work"):
        (tmp_path / "stages" / name).mkdir(parents=True)
    (tmp_path / "stages" / "m2" / "stage.json").write_text("{}")
    (tmp_path / "stages" / "m1" / "stage.json").write_text("{}")
    assert list(layout.finished_markers()) == [layout.stage_marker("m1"), layout.stage_marker("m2")]
