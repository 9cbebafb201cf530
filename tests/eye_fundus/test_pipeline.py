"""The main job's pipeline end to end on a tiny synthetic data set (teachers, M1, M2, M3, report)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.config import load_config
from distillkit.plugins import PluginManager
from tests.conftest import REPO, m3_weights_with_and_without_labels

TINY = ["data.num_patients=24", "data.num_unlabeled=16", "data.image_size=32", "data.num_fine_classes=12",
        "student.encoder.width=8", "student.encoder.depth=3", "training.epochs=1", "training.batch_size=16",
        "tasks.text.embedding_dim=16", "tasks.text.hidden_dim=32", "tasks.broad.hidden=16", "tasks.fine.hidden=16",
        "stages.m3.training.epochs=1", "split.train_fraction=0.5"]


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path, cache_dir, fresh_plugin_manager):
    out = tmp_path / "run"
    args = ["run", str(REPO / "plugins" / "eye_fundus" / "m3.yaml"), "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [row[0] for row in summary["rows"]] == ["m1", "m2_single", "m2", "m3"]
    metrics = json.loads((out / "metrics.json").read_text())
    # an "unseen" column per task whose test labels include some that training never saw
    unseen = [f"{t} unseen" for t in ("broad", "fine")
              if any(m[t]["unseen"] for m in metrics["report"]["test"].values())]
    assert summary["header"] == ["model", "broad accuracy", "broad bal. acc", "broad majority", "broad AUC", "fine accuracy",
                                 "fine bal. acc", "fine majority", "fine AUC", "fine top-5", "text bleu", "text most frequent", *unseen]
    assert len(metrics["teachers"]["val"]) == 6  # the six proper subsets; M1 is the seventh teacher
    by_group = metrics["report"]["test"]["m3"]["by_group"]
    assert set(by_group) <= {"normal", "DR", "AMD", "glaucoma", "melanoma"}
    caches = list((out / "cache" / "teacher_outputs").glob("*/index.json"))
    assert len(caches) == 6  # M2 (single, ensemble) and M3, each for its training split and validation
    # M2 distilled from M1 and the six subset teachers: its cache stores every task's aggregate
    m2_plan = [p for p in json.loads((out / "plan.json").read_text()) if p["name"] == "m2"][0]
    assert "teachers m1, teachers (mean)" in m2_plan["description"]


@pytest.mark.slow
def test_m3_reads_no_label_or_caption(tmp_path, cache_dir):
    """Scrambling every label and caption of every split leaves M3's weights bit-identical."""
    registries = PluginManager().registries
    overrides = TINY + ["stages.teachers.subsets=[[broad]]", "stages.m2.teachers=[m1]"]
    config = load_config(REPO / "plugins" / "eye_fundus" / "m3.yaml", registries, overrides)
    config.stages.pop("report")
    config.stages.pop("m2_single")
    a, b = m3_weights_with_and_without_labels(config, registries, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # M2 (labeled distillation, which would have changed) was reused, not retrained
    assert (tmp_path / "b" / "stages" / "m2" / "stage.json").read_text() == \
        (tmp_path / "a" / "stages" / "m2" / "stage.json").read_text()


def test_main_job_m3_distils_from_the_ensemble_on_the_pool():
    """M3 learns from M2 and the subset teachers (not M2 alone, whose loss is at its minimum at init)."""
    config = load_config(REPO / "plugins" / "eye_fundus" / "m3.yaml", PluginManager().registries)
    m3 = config.stages["m3"]
    assert m3.init == "m2"
    assert m3.teachers == ["m2", "teachers"]
    assert m3.data == "unlabeled"
    paper = load_config(REPO / "plugins" / "eye_fundus" / "paper.yaml", PluginManager().registries)
    assert paper.stages["m3"].teachers == ["m2", "teachers"]
    assert paper.tasks["text"].reduction == "sum"  # section 3.1: CE summed over the generated words
    assert paper.tasks["text"].min_caption_count == 10  # section 4.1
