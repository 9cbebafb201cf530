"""distillkit/rundir.py owns the run-directory layout: no other module spells its paths."""

from __future__ import annotations

import ast
import re

from distillkit.rundir import RunLayout
from tests.conftest import REPO

#: a path join onto a run-level name of the layout, e.g. ``run_dir / "stages"``
JOIN = re.compile(r"/\s*[\"'](stages|config\.yaml|plan\.json|run\.json|summary\.json|stage\.json|\.lock|cache|"
                  r"teacher_outputs|\.work|\.previous)[\"']")


def _template_lines(source: str) -> set[int]:
    """Lines inside multi-line string literals: file templates (``distillkit new-plugin`` writes
    a plugin's own ``config.yaml`` and tests), not code that joins run-directory paths."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.end_lineno > node.lineno:
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def test_no_module_but_rundir_joins_run_directory_paths():
    offenders = []
    for path in sorted([*(REPO / "distillkit").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]):
        if path == REPO / "distillkit" / "rundir.py":
            continue
        source = path.read_text(encoding="utf-8")
        templates = _template_lines(source)
        for number, line in enumerate(source.splitlines(), 1):
            if JOIN.search(line) and number not in templates:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_check_sees_joins_in_code_but_not_in_templates():
    source = 'TEMPLATE = """\nconfig = ROOT / "config.yaml"\n"""\npath = run_dir / "stages"\n'
    assert _template_lines(source) == {1, 2, 3}
    assert [n for n, line in enumerate(source.splitlines(), 1) if JOIN.search(line)] == [2, 4]


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
