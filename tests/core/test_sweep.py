"""distillkit sweep: the statistics against hand computation, table layout, stage sharing, bad input."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distillkit.cli import cli
from distillkit.stats import mean_ci, paired_diff, t975
from distillkit.sweep import cells, csv_table, markdown_tables
from tests.conftest import toy_config


# -- statistics --------------------------------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045),
                                          (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t975(df) == pytest.approx(expected, abs=1.5e-3)


def test_ci_of_1_2_3_by_hand():
    est = mean_ci([1, 2, 3])
    assert est.mean == 2.0
    # s = 1, n = 3: half-width t(0.975, 2) * 1 / sqrt(3)
    assert est.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-9)
    assert (est.low, est.high) == pytest.approx((2 - 2.48434, 2 + 2.48434), abs=1e-4)
    assert est.n == 3


def test_ci_uses_the_sample_standard_deviation():
    est = mean_ci([0.5, 0.7])  # s = sqrt(0.02) = 0.141421, df 1
    assert est.half_width == pytest.approx(12.706 * 0.1414213562 / math.sqrt(2), rel=1e-9)


def test_one_value_has_no_interval():
    est = mean_ci([0.4])
    assert est.mean == 0.4 and est.half_width is None and est.text() == "0.400 (n=1)"


def test_paired_difference_is_the_ci_of_the_per_seed_differences():
    a, b = [0.80, 0.85, 0.90], [0.70, 0.80, 0.75]
    d = paired_diff(a, b)  # differences 0.10, 0.05, 0.15: mean 0.10, s 0.05
    assert d.mean == pytest.approx(0.10)
    assert d.half_width == pytest.approx(4.303 * 0.05 / math.sqrt(3))
    # pairing matters: the unpaired intervals would be wider than the paired one here
    assert d.half_width < mean_ci(a).half_width + mean_ci(b).half_width


# -- tables -----------------------------------------------------------------------------------

def _summary() -> dict:
    runs = []
    values = {("m1", 0.3): [0.5, 0.6, 0.7], ("m3", 0.3): [0.6, 0.8, 0.7],
              ("m1", 0.7): [0.8, 0.8, 0.8], ("m3", 0.7): [0.9, 0.85, 0.95]}
    for p in (0.3, 0.7):
        for i, seed in enumerate((0, 1, 2)):
            runs.append({"overrides": {"split.train_fraction": p, "seed": seed},
                         "metrics": {"m1": {"broad.accuracy": values["m1", p][i]},
                                     "m3": {"broad.accuracy": values["m3", p][i]}}})
    return {"name": "t", "grid": {"split.train_fraction": [0.3, 0.7], "seed": [0, 1, 2]}, "runs": runs,
            "table": {"columns": "split.train_fraction", "rows": {"M1": "m1", "M3+ens": "m3"},
                      "metrics": None, "baseline": "M1", "split": "test"}}


def test_table_rows_are_models_and_columns_p():
    summary = _summary()
    text = markdown_tables(summary)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model | split"))
    assert header == "| model | split.train_fraction=0.3 | split.train_fraction=0.7 |"
    i = lines.index(header)
    assert lines[i + 2] == "| M1 | 0.600 ± 0.248 | 0.800 ± 0.000 |"  # 4.303 * 0.1 / sqrt 3 = 0.2484
    assert lines[i + 3] == "| M3+ens | 0.700 ± 0.248 | 0.900 ± 0.124 |"
    # paired: m3 - m1 at p = 0.3 is 0.1, 0.2, 0.0 (mean 0.1, s 0.1); at 0.7 it is 0.1, 0.05, 0.15
    assert "| M3+ens − M1 | +0.100 ± 0.248 | +0.100 ± 0.124 |" in lines


def test_a_lower_is_better_metric_is_marked_in_its_table_title():
    summary = _summary()
    for run in summary["runs"]:
        for label in ("m1", "m3"):
            run["metrics"][label]["price.rmse"] = 1.0
            run["metrics"][label]["price.r2"] = 0.5
    summary["lower_is_better"] = ["price.rmse"]
    titles = [line for line in markdown_tables(summary).splitlines() if line.startswith("## ")]
    assert titles == ["## broad.accuracy", "## price.r2", "## price.rmse, lower is better"]


def test_csv_holds_the_same_numbers():
    rows = list(csv.DictReader(io.StringIO(csv_table(cells(_summary())))))
    row = next(r for r in rows if r["model"] == "M3+ens" and r["column"] == "0.7")
    assert float(row["mean"]) == pytest.approx(0.9)
    assert float(row["ci_high"]) - float(row["mean"]) == pytest.approx(4.303 * 0.05 / math.sqrt(3), abs=1e-6)
    assert float(row["diff_mean"]) == pytest.approx(0.1)
    assert int(row["n"]) == 3


def test_pairs_are_matched_by_seed_not_by_order():
    summary = _summary()
    summary["runs"] = list(reversed(summary["runs"][:3])) + summary["runs"][3:]
    summary["runs"][0], summary["runs"][1] = summary["runs"][1], summary["runs"][0]
    cell = next(c for c in cells(summary) if c.row == "M3+ens" and c.column == "0.3")
    assert cell.diff.mean == pytest.approx(0.1) and cell.diff.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_comparisons_are_paired_differences_between_two_rows():
    summary = _summary()
    summary["runs"] = [dict(r, metrics=dict(r["metrics"], m2={"broad.accuracy": r["metrics"]["m1"]["broad.accuracy"]
                                                                + 0.01 * (i + 1)}))
                       for i, r in enumerate(summary["runs"])]
    summary["table"]["rows"] = {"M1": "m1", "M2": "m2", "M3+ens": "m3"}
    summary["table"]["comparisons"] = [["M3+ens", "M2"]]
    lines = markdown_tables(summary).splitlines()
    # p = 0.3: m3 - m2 = (0.6 - 0.51, 0.8 - 0.62, 0.7 - 0.73) = (0.09, 0.18, -0.03): mean 0.08, s 0.10536
    # p = 0.7: (0.9 - 0.84, 0.85 - 0.85, 0.95 - 0.86) = (0.06, 0.0, 0.09): mean 0.05, s 0.04583
    half_03, half_07 = 4.303 * 0.105357 / math.sqrt(3), 4.303 * 0.045826 / math.sqrt(3)
    assert f"| M3+ens − M2 | +0.080 ± {half_03:.3f} | +0.050 ± {half_07:.3f} |" in lines
    i = lines.index("Paired comparisons (same seed):")
    assert lines[i + 2] == "| comparison | 0.3 | 0.7 |"
    # the comparison rows are not models: not in the model table, the baseline table or the figure's rows
    assert not any(line.startswith("| M3+ens − M2 − M1") for line in lines)
    rows = list(csv.DictReader(io.StringIO(csv_table(cells(summary)))))
    row = next(r for r in rows if r["model"] == "M3+ens − M2" and r["column"] == "0.3")
    assert float(row["mean"]) == pytest.approx(0.08) and row["diff_mean"] == ""


def test_comparisons_name_rows(tmp_path):
    path = _sweep(tmp_path, {"seed": [0, 1]}, {"rows": {"M1": "m1", "M2": "m2"}, "comparisons": [["M2", "M3"]]})
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 2 and "table.comparisons" in result.output and "'M3' is not a row" in result.output
    path = _sweep(tmp_path, {"seed": [0, 1]}, {"rows": {"M1": "m1"}, "comparisons": ["M1"]})
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 2 and "list of row pairs" in result.output


# -- running ----------------------------------------------------------------------------------

def _sweep(tmp_path: Path, grid: dict, table: dict | None = None, base: dict | None = None) -> Path:
    config = base or toy_config()
    config["training"].update(epochs=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    spec = {"base": "base.yaml", "grid": grid}
    if table:
        spec["table"] = table
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_identical_stages_train_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    path = _sweep(tmp_path, {"seed": [0, 1], "stages.m2.temperature": [1.0, 4.0]},
                  {"rows": {"M1": "m1", "M2": "m2"}, "baseline": "M1"})
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    # 4 runs x 5 stages; teachers and m1 depend on the seed only: 2 + 2 trained, m2/m3/report 4 each
    assert summary["stages_naive"] == 20
    assert summary["stages_trained"] == 16
    assert len(summary["runs"]) == 4 and summary["complete"] is True
    keys = {(r["overrides"]["seed"], r["overrides"]["stages.m2.temperature"]): r["stages"] for r in summary["runs"]}
    assert keys[0, 1.0]["m1"] == keys[0, 4.0]["m1"] != keys[1, 1.0]["m1"]
    assert keys[0, 1.0]["m2"] != keys[0, 4.0]["m2"]
    # the shared m1 is the same file in both runs (a hard link to the store), metrics equal
    runs = {(r["overrides"]["seed"], r["overrides"]["stages.m2.temperature"]): r for r in summary["runs"]}
    assert runs[0, 1.0]["metrics"]["m1"] == runs[0, 4.0]["metrics"]["m1"]
    a = tmp_path / "out" / runs[0, 1.0]["dir"] / "stages" / "m1" / "model.safetensors"
    b = tmp_path / "out" / runs[0, 4.0]["dir"] / "stages" / "m1" / "model.safetensors"
    assert a.stat().st_ino == b.stat().st_ino
    assert len(summary["timing"]["stage_seconds"]) == 16
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "results.csv").is_file()
    # the classification task's lower-is-better metrics, as it declares them, are marked in the tables
    from distillkit.builtin.classification import ClassificationTask

    declared = sorted(f"{t}.{m}" for t in ("cluster", "quadrant")
                      for m, way in ClassificationTask.metric_directions.items() if way == "min")
    assert summary["lower_is_better"] == declared and "cluster.ece" in declared
    results = (tmp_path / "out" / "results.md").read_text()
    assert "## cluster.ece, lower is better" in results and "## cluster.accuracy\n" in results
    # a second invocation trains nothing and gives the same tables
    before = (tmp_path / "out" / "results.csv").read_text()
    again = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "out" / "results.csv").read_text() == before
    second = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert second["stages_trained"] == 16 and second["stages_trained_this_invocation"] == 0
    # the rerun adds its seconds to the sweep's wall time; it does not replace it
    assert second["timing"]["wall_total"] == pytest.approx(summary["timing"]["wall_total"]
                                                           + second["timing"]["wall"], rel=1e-9)
    assert second["timing"]["wall_total"] > summary["timing"]["unique_stage_seconds"]
    assert summary["stages_trained_this_invocation"] == 16


@pytest.mark.parametrize("grid, where, words", [
    ({"stages.m2.temprature": [1.0]}, "grid.stages.m2.temprature", "Did you mean 'temperature'?"),
    ({"sed": [0, 1]}, "grid.sed", "Did you mean 'seed'?"),
    ({"stages.m2.temperature": ["hot"]}, "grid.stages.m2.temperature", "temperature"),
    ({"seed": [0, 1, 1]}, "grid.seed", "repeat"),
    ({"seed": []}, "grid.seed", "non-empty"),
    ({}, "grid", "empty"),
    ({"stages.m2.teachers": [["m1", "nosuch"]]}, "grid.stages.m2.teachers", "nosuch"),
])
def test_bad_grid_exits_2_with_the_key_before_training(tmp_path, grid, where, words):
    path = _sweep(tmp_path, grid)
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"{path}: {where}" in result.output
    assert words in result.output
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_flatten_metrics_reads_per_class_values_and_skips_the_rest():
    from distillkit.sweep import flatten_metrics

    metrics = {"evaluate": {
        "test": {"m1": {"broad": {"accuracy": 0.5, "n": 10, "sensitivity": {"DR": 0.25, "normal": 1.0},
                                  "reliability": {"bins": [0.1, 0.2]}, "ok": True},
                        "loss": 1.5}},
        "val": {"m1": {"broad": {"accuracy": 0.9}}},
    }}
    assert flatten_metrics(metrics, "test") == {"m1": {
        "broad.accuracy": 0.5, "broad.sensitivity.DR": 0.25, "broad.sensitivity.normal": 1.0, "loss": 1.5}}
    assert flatten_metrics(metrics, "val") == {"m1": {"broad.accuracy": 0.9}}
