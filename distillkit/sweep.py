"""Sweeps: one base config run over a grid of overrides, sharing identical stages.

A sweep file::

    base: toy.yaml                 # the run config (relative to this file)
    grid:                          # dotted keys, as ``--set`` takes them; every combination runs
      seed: [0, 1]
      stages.m2.temperature: [1.0, 4.0]
    table:                         # optional: the layout of the result tables
      columns: stages.m2.temperature
      rows: {M1: m1, M2: m2}       # row name -> model label (default: every model)
      metrics: [cluster.accuracy]  # default: every scalar test metric
      baseline: M1                 # paired differences against this row

Layout of a sweep directory::

    runs/<id>/        one run directory per grid point (as ``distillkit run`` writes)
    store/<stage>-<key>/   every finished stage once, by its stage key (hard links into the runs)
    sweep.json        runs, overrides, metrics, stage counts and timings
    results.md, results.csv, results.png   the tables and the figure

A stage's key hashes everything that decides its result (see :mod:`distillkit.runner`), so a
stage whose key is already in the store is linked into the run instead of trained: the
teachers and M1 of one (p, seed) serve every temperature. Re-running the command resumes:
finished runs are read back, an interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from distillkit.config import RunConfig, apply_overrides, read_yaml, validate_config
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.io import atomic_write_text, read_json, remove_stale_temporaries, write_json
from distillkit.rundir import RunLayout, stage_marker
from distillkit.stats import Estimate, mean_ci, paired_diff

SWEEP_FORMAT = "distillkit.sweep/1"
SWEEP_KEYS = ("base", "grid", "table", "name")
TABLE_KEYS = ("columns", "rows", "metrics", "baseline", "comparisons", "split")


@dataclass
class SweepRun:
    id: str
    overrides: dict[str, Any]
    config: RunConfig


@dataclass
class SweepSpec:
    file: str
    name: str
    base: Path
    grid: dict[str, list[Any]]
    runs: list[SweepRun]
    columns: str | None
    rows: dict[str, str] | None
    metrics: list[str] | None
    baseline: str | None
    split: str = "test"
    #: pairs of rows ``(a, b)``: the paired difference a - b per column, beside the baseline's
    comparisons: list[tuple[str, str]] = field(default_factory=list)


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is a YAML flow value: apply_overrides reads it back exactly


def _lookup(tree: Any, key: str) -> tuple[bool, str, list[str]]:
    """Whether ``key`` exists in ``tree``; else the first missing part and its siblings."""
    node = tree
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
            continue
        return False, part, list(node) if isinstance(node, Mapping) else []
    return True, "", []


def run_id(overrides: Mapping[str, Any]) -> str:
    text = json.dumps(overrides, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_sweep(path: str | Path, registries) -> SweepSpec:
    """Read and check a sweep file; every grid point's config is validated before anything trains."""
    path = Path(path)
    file = str(path)
    data, _ = read_yaml(path)
    for key in data:
        if key not in SWEEP_KEYS:
            raise DistillkitError(f"unknown key '{key}'.{did_you_mean(str(key), SWEEP_KEYS)} "
                                  f"Valid keys: {', '.join(SWEEP_KEYS)}.", where=f"{file}: {key}")
    if not isinstance(data.get("base"), str):
        raise DistillkitError("'base' must name the run config the grid varies.", where=f"{file}: base")
    base = (path.resolve().parent / data["base"])
    if not base.is_file():
        raise DistillkitError(f"the base config {base} does not exist.", where=f"{file}: base")
    grid = data.get("grid")
    if not isinstance(grid, Mapping) or not grid:
        raise DistillkitError("the grid is empty; give at least one key with a list of values, "
                              "e.g. grid: {seed: [0, 1, 2]}.", where=f"{file}: grid")
    base_data, lines = read_yaml(base)
    base_config = validate_config(base_data, registries, file=str(base), lines=lines, base_dir=base.parent)
    resolved = base_config.resolved()
    for key, values in grid.items():
        where = f"{file}: grid.{key}"
        if not isinstance(values, list) or not values:
            raise DistillkitError("must be a non-empty list of values.", where=where)
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            dupes = sorted({json.dumps(v) for v in values if sum(json.dumps(w) == json.dumps(v) for w in values) > 1})
            raise DistillkitError(f"the values repeat ({', '.join(dupes)}); each grid point must differ.", where=where)
        found, part, known = _lookup(resolved, str(key))
        found = found or _lookup(base_data, str(key))[0]
        if not found:
            raise DistillkitError(f"'{key}' is not a key of the base config: '{part}' is unknown."
                                  f"{did_you_mean(part, known)}"
                                  + (f" Keys there: {', '.join(map(str, known))}." if known else ""), where=where)
        for value in values:  # each value alone, so an error names the key it comes from
            try:
                cfg = validate_config(apply_overrides(base_data, [_override(key, value)]), registries,
                                      file=str(base), base_dir=base.parent)
                _plan_check(cfg, registries)
            except DistillkitError as exc:
                raise DistillkitError(f"the value {json.dumps(value)} is not valid here: {exc.render()}",
                                      where=where) from None
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        overrides = dict(zip(keys, combo))
        try:
            cfg = validate_config(apply_overrides(base_data, [_override(k, v) for k, v in overrides.items()]),
                                  registries, file=str(base), base_dir=base.parent)
            _plan_check(cfg, registries)
        except DistillkitError as exc:
            raise DistillkitError(f"the grid point {json.dumps(overrides)} is not valid: {exc.render()}",
                                  where=f"{file}: grid") from None
        runs.append(SweepRun(run_id(overrides), overrides, cfg))

    table = data.get("table") or {}
    if not isinstance(table, Mapping):
        raise DistillkitError("must be a mapping.", where=f"{file}: table")
    for key in table:
        if key not in TABLE_KEYS:
            raise DistillkitError(f"unknown key '{key}'.{did_you_mean(str(key), TABLE_KEYS)} "
                                  f"Valid keys: {', '.join(TABLE_KEYS)}.", where=f"{file}: table.{key}")
    columns = table.get("columns")
    if columns is None:
        columns = next((k for k in keys if k != "seed"), None)
    elif columns not in grid:
        raise DistillkitError(f"'{columns}' is not a grid key.{did_you_mean(str(columns), keys)}",
                              where=f"{file}: table.columns")
    rows = table.get("rows")
    if rows is not None and not isinstance(rows, Mapping):
        raise DistillkitError("must map row names to model labels, e.g. {M1: m1}.", where=f"{file}: table.rows")
    baseline = table.get("baseline")
    if baseline is not None and rows is not None and baseline not in rows:
        raise DistillkitError(f"'{baseline}' is not a row.{did_you_mean(str(baseline), rows)}",
                              where=f"{file}: table.baseline")
    comparisons = table.get("comparisons") or []
    where = f"{file}: table.comparisons"
    if not isinstance(comparisons, list) or not all(isinstance(c, list) and len(c) == 2 for c in comparisons):
        raise DistillkitError("must be a list of row pairs, e.g. [[M2+ens, M2], [M3+ens, M2+ens]].", where=where)
    for a, b in comparisons:
        for name in (a, b):
            if rows is not None and name not in rows:
                raise DistillkitError(f"'{name}' is not a row.{did_you_mean(str(name), rows)}", where=where)
        if a == b:
            raise DistillkitError(f"compares the row '{a}' with itself.", where=where)
    return SweepSpec(file=file, name=str(data.get("name", path.stem)), base=base, grid=dict(grid), runs=runs,
                     columns=columns, rows=dict(rows) if rows else None, metrics=table.get("metrics"),
                     baseline=baseline, split=str(table.get("split", "test")),
                     comparisons=[(str(a), str(b)) for a, b in comparisons])


def _plan_check(cfg: RunConfig, registries) -> None:
    from distillkit.runner import plan

    plan(cfg, registries)


# -- running ----------------------------------------------------------------------------------

def _link_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` by hard links (a copy where links are not possible), atomically."""
    tmp = dst.parent / f".{dst.name}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _done_key(folder: Path) -> str | None:
    marker = stage_marker(folder)
    if not marker.is_file():
        return None
    saved = read_json(marker)
    return saved.get("key") if saved.get("status") == "done" else None


@dataclass
class SweepOutcome:
    summary: dict[str, Any]
    path: Path


def run_sweep(spec: SweepSpec, registries, out: Path, progress=None) -> SweepOutcome:
    """Run every grid point into ``out``; stages already in the store are linked, not trained."""
    from distillkit.runner import RunLock

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DistillkitError(f"--out {out} is a file, not a directory.", where="--out")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # one sweep process per folder
        remove_stale_temporaries(out)  # left by a sweep killed mid-write
        return _run_sweep(spec, registries, out, progress)


def _run_sweep(spec: SweepSpec, registries, out: Path, progress) -> SweepOutcome:
    from distillkit.progress import Reporter
    from distillkit.runner import Runner, plan

    class _SweepRunner(Runner):
        _prepared = False

        def prepare_data(self) -> None:  # once per run: the sweep plans before the runner runs
            if not self._prepared:
                super().prepare_data()
                self._prepared = True

    store = out / "store"
    store.mkdir(parents=True, exist_ok=True)
    previous = read_json(out / "sweep.json") if (out / "sweep.json").is_file() else {}
    started = time.perf_counter()
    # every invocation's wall time adds up, so a rerun that only rewrites the tables keeps the
    # sweep's own time (and its overhead ratio) instead of replacing it with seconds
    earlier_wall = float(previous.get("timing", {}).get("wall_total", 0.0))
    records = []
    naive = 0
    trained_now = 0
    lower: set[str] = set()  # "task.metric" whose lower values are better (an RMSE), for the tables
    for run in spec.runs:
        for task, params in run.config.tasks.items():
            declared = getattr(registries.task.get(params.kind), "metric_directions", {}) or {}
            lower.update(f"{task}.{m}" for m, way in declared.items() if way == "min")
    spec_lower = sorted(lower)
    for index, run in enumerate(spec.runs):
        run_dir = out / "runs" / run.id
        run_dir.mkdir(parents=True, exist_ok=True)
        runner = _SweepRunner(run.config, registries, run_dir, Reporter(quiet=True))
        runner.prepare_data()
        planned = plan(run.config, registries, runner.data_fingerprint)
        naive += len(planned)
        reused, trained = [], []
        for step in planned:
            folder = RunLayout(run_dir).stage(step.name)
            stored = store / f"{step.name}-{step.key}"
            if _done_key(folder) == step.key:
                reused.append(step.name)
            elif _done_key(stored) == step.key:
                _link_tree(stored, folder)
                reused.append(step.name)
            else:
                trained.append(step.name)
        if progress is not None:
            progress(index, len(spec.runs), run, trained, reused)
        runner.run()
        for step in planned:
            stored = store / f"{step.name}-{step.key}"
            if _done_key(stored) != step.key:
                _link_tree(RunLayout(run_dir).stage(step.name), stored)
        trained_now += len(trained)
        metrics = read_json(RunLayout(run_dir).metrics)
        records.append({"id": run.id, "overrides": run.overrides, "dir": str(run_dir.relative_to(out)),
                        "stages": {p.name: p.key for p in planned},
                        "metrics": flatten_metrics(metrics, spec.split)})
        _write_summary(out, spec, records, naive, started, earlier_wall, complete=False, trained_now=trained_now,
                       lower_is_better=spec_lower)
    summary = _write_summary(out, spec, records, naive, started, earlier_wall, complete=True,
                             trained_now=trained_now, lower_is_better=spec_lower)
    write_tables(out, spec, summary)
    return SweepOutcome(summary, out / "sweep.json")


def _stage_seconds(store: Path, records: list) -> dict[str, float]:
    """Seconds of every unique stage the recorded runs planned, as its ``stage.json`` says."""
    out = {}
    for name, key in sorted({(n, k) for r in records for n, k in r["stages"].items()}):
        marker = stage_marker(store / f"{name}-{key}")
        saved = read_json(marker) if marker.is_file() else {}
        if saved.get("status") == "done":
            out[f"{name}-{key}"] = float(saved.get("seconds", 0.0))
    return out


def _write_summary(out: Path, spec: SweepSpec, records: list, naive: int, started: float, earlier_wall: float,
                   complete: bool, trained_now: int = 0, lower_is_better: Sequence[str] = ()) -> dict[str, Any]:
    seconds = _stage_seconds(out / "store", records)
    wall = time.perf_counter() - started
    summary = {"format": SWEEP_FORMAT, "name": spec.name, "sweep_file": str(Path(spec.file).resolve()),
               "base": str(spec.base), "grid": spec.grid, "complete": complete,
               "table": {"columns": spec.columns, "rows": spec.rows, "metrics": spec.metrics,
                         "baseline": spec.baseline, "comparisons": [list(c) for c in spec.comparisons],
                         "split": spec.split},
               "lower_is_better": list(lower_is_better),
               "stages_trained": len(seconds), "stages_naive": naive,
               "stages_trained_this_invocation": trained_now,
               "runs": records,
               "timing": {"wall": wall, "wall_total": earlier_wall + wall, "stage_seconds": seconds,
                          "unique_stage_seconds": sum(seconds.values())}}
    write_json(out / "sweep.json", summary)
    return summary


def flatten_metrics(metrics: Mapping[str, Any], split: str) -> dict[str, dict[str, float]]:
    """``model label -> "task.metric" -> value`` over every stage's scalar metrics of ``split``;
    a metric per class (a mapping of scalars) gives ``"task.metric.class"`` values."""
    out: dict[str, dict[str, float]] = {}
    for stage, by_split in metrics.items():
        for label, tasks in (by_split.get(split) or {}).items():
            row = out.setdefault(label, {})
            for task, values in tasks.items():
                if not isinstance(values, Mapping):
                    if isinstance(values, (int, float)) and task != "n":
                        row[task] = float(values)
                    continue
                for metric, value in values.items():
                    if _scalar(value) and metric != "n":
                        row[f"{task}.{metric}"] = float(value)
                    elif isinstance(value, Mapping):  # per class: "broad.sensitivity.DR"
                        for key, item in value.items():
                            if _scalar(item):
                                row[f"{task}.{metric}.{key}"] = float(item)
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- tables -----------------------------------------------------------------------------------

@dataclass
class Cell:
    group: str          # the other grid values (not seed, not the column)
    row: str
    column: str
    metric: str
    estimate: Estimate
    diff: Estimate | None = None  # paired difference against the baseline row
    comparison: bool = False      # a row "a − b" of table.comparisons: ``estimate`` is the paired difference


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def cells(summary: Mapping[str, Any]) -> list[Cell]:
    """Mean and CI over seeds for every (other grid values, row, column, metric)."""
    table = summary["table"]
    columns = table.get("columns")
    runs = summary["runs"]
    labels = sorted({label for r in runs for label in r["metrics"]})
    rows = table.get("rows") or {label: label for label in labels}
    metric_names = table.get("metrics") or sorted({m for r in runs for v in r["metrics"].values() for m in v})
    baseline = table.get("baseline")

    def group_of(r) -> str:
        rest = {k: v for k, v in r["overrides"].items() if k not in ("seed", columns)}
        return ", ".join(f"{k}={_fmt(v)}" for k, v in rest.items())

    def seed_of(r) -> str:
        return json.dumps(r["overrides"].get("seed"))

    buckets: dict[tuple[str, str], list] = {}
    for r in runs:
        column = _fmt(r["overrides"].get(columns)) if columns else ""
        buckets.setdefault((group_of(r), column), []).append(r)
    out = []
    for (group, column), members in buckets.items():
        for metric in metric_names:
            by_row: dict[str, dict[str, float]] = {}
            for name, label in rows.items():
                values = {seed_of(r): r["metrics"].get(label, {}).get(metric) for r in members}
                by_row[name] = {s: v for s, v in values.items() if v is not None and math.isfinite(v)}
            for name, values in by_row.items():
                if not values:
                    continue
                diff = None
                if baseline and name != baseline:
                    seeds = sorted(set(values) & set(by_row.get(baseline, {})))
                    if seeds:
                        diff = paired_diff([values[s] for s in seeds], [by_row[baseline][s] for s in seeds])
                out.append(Cell(group, name, column, metric, mean_ci(list(values.values())), diff))
            for a, b in table.get("comparisons") or []:  # "a − b" rows: the estimate is the paired difference
                seeds = sorted(set(by_row.get(a, {})) & set(by_row.get(b, {})))
                if seeds:
                    d = paired_diff([by_row[a][s] for s in seeds], [by_row[b][s] for s in seeds])
                    out.append(Cell(group, f"{a} − {b}", column, metric, d, None, comparison=True))
    return out


def markdown_tables(summary: Mapping[str, Any], cell_list: Sequence[Cell] | None = None) -> str:
    """One table per (other grid values, metric): rows are models, columns the column key's values."""
    cell_list = list(cell_list if cell_list is not None else cells(summary))
    table = summary["table"]
    columns_key = table.get("columns") or ""
    row_order = list(table.get("rows") or dict.fromkeys(c.row for c in cell_list if not c.comparison))
    compared = [f"{a} − {b}" for a, b in table.get("comparisons") or []]
    column_order = [_fmt(v) for v in summary["grid"].get(columns_key, [None])] if columns_key else [""]
    lines = [f"# {summary['name']}: mean ± 95% CI over seeds ({table.get('split', 'test')} split)", ""]
    lower = summary.get("lower_is_better") or []
    index = {(c.group, c.metric, c.row, c.column): c for c in cell_list}
    for group in dict.fromkeys(c.group for c in cell_list):
        for metric in dict.fromkeys(c.metric for c in cell_list):
            title = f"## {metric}" + (f" ({group})" if group else "")
            if any(metric == m or metric.startswith(m + ".") for m in lower):
                title += ", lower is better"  # a negative paired difference is an improvement
            lines += [title, "", "| model | " + " | ".join(f"{columns_key}={c}" if columns_key else "value"
                                                          for c in column_order) + " |",
                      "|---" * (len(column_order) + 1) + "|"]
            for row in row_order:
                texts = []
                for column in column_order:
                    c = index.get((group, metric, row, column))
                    texts.append(c.estimate.text() if c else "")
                lines.append(f"| {row} | " + " | ".join(texts) + " |")
            baseline = table.get("baseline")
            if baseline:
                lines += ["", f"Paired difference against {baseline} (same seed):", "",
                          "| model | " + " | ".join(column_order) + " |", "|---" * (len(column_order) + 1) + "|"]
                for row in row_order:
                    if row == baseline:
                        continue
                    texts = []
                    for column in column_order:
                        c = index.get((group, metric, row, column))
                        texts.append(f"{c.diff.mean:+.3f} ± {c.diff.half_width:.3f}" if c and c.diff and
                                     c.diff.half_width is not None else (f"{c.diff.mean:+.3f}" if c and c.diff else ""))
                    lines.append(f"| {row} − {baseline} | " + " | ".join(texts) + " |")
            if compared:
                lines += ["", "Paired comparisons (same seed):", "",
                          "| comparison | " + " | ".join(column_order) + " |", "|---" * (len(column_order) + 1) + "|"]
                for row in compared:
                    texts = []
                    for column in column_order:
                        c = index.get((group, metric, row, column))
                        texts.append("" if c is None else (f"{c.estimate.mean:+.3f} ± {c.estimate.half_width:.3f}"
                                                           if c.estimate.half_width is not None
                                                           else f"{c.estimate.mean:+.3f} (n=1)"))
                    lines.append(f"| {row} | " + " | ".join(texts) + " |")
            lines.append("")
    return "\n".join(lines)


def csv_table(cell_list: Sequence[Cell]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "metric", "model", "column", "n", "mean", "ci_low", "ci_high",
                "diff_mean", "diff_ci_low", "diff_ci_high"])
    for c in cell_list:
        d = c.diff
        w.writerow([c.group, c.metric, c.row, c.column, c.estimate.n, f"{c.estimate.mean:.6f}",
                    "" if c.estimate.low is None else f"{c.estimate.low:.6f}",
                    "" if c.estimate.high is None else f"{c.estimate.high:.6f}",
                    "" if d is None else f"{d.mean:.6f}",
                    "" if d is None or d.low is None else f"{d.low:.6f}",
                    "" if d is None or d.high is None else f"{d.high:.6f}"])
    return buf.getvalue()


def write_tables(out: Path, spec_or_none, summary: Mapping[str, Any]) -> list[Path]:
    cell_list = cells(summary)
    atomic_write_text(out / "results.md", markdown_tables(summary, cell_list))
    atomic_write_text(out / "results.csv", csv_table(cell_list))
    written = [out / "results.md", out / "results.csv"]
    try:
        from distillkit.io import atomic_write_bytes
        from distillkit.plots import sweep_figure, to_png

        fig = sweep_figure([c for c in cell_list if not c.comparison], summary["table"].get("columns") or "",
                           summary["grid"])
        if fig is not None:
            atomic_write_bytes(out / "results.png", to_png(fig))
            written.append(out / "results.png")
    except ImportError:  # matplotlib is an extra
        pass
    return written
