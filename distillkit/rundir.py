"""The run directory: its layout, and reading a finished one.

Layout (:class:`RunLayout` is the one place that spells these paths)::

    config.yaml          the resolved config (every default filled in) of the last run that finished
    run.json             where the config came from (relative data paths resolve there)
    plan.json            stages in order with their keys
    metrics.json         every finished stage's metrics per split
    summary.json         the final comparison table (evaluate stages)
    report/              `distillkit report`'s page and figures (by default)
    .lock                held by the run writing here
    stages/<name>/       a finished stage: stage.json, model.safetensors, metrics.json, log.jsonl
    stages/.work/<name>-<key>/   a stage in progress (resumed from here after a crash)
    stages/.previous/<name>/     the result a re-run replaced
    cache/teacher_outputs/<key>/ cached soft targets

(Frozen encoder features are cached in the shared data cache, ``<cache_dir>/features/<key>/``,
not here: see :mod:`distillkit.feature_cache`.)

:class:`RunDirectory` reads what :class:`distillkit.runner.Runner` wrote and writes nothing:
the resolved config, the stages' results, their per-epoch logs, the metrics, and the data the
run used, re-created with :mod:`distillkit.data_spec`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from distillkit.data_spec import DataSpec, LoadedData
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.io import read_json
from distillkit.registry import Registries

#: a finished stage's marker in its folder (key, status, result)
STAGE_MARKER = "stage.json"
STAGES = "stages"


def stage_marker(folder: Path) -> Path:
    """The marker file of a stage folder (in a run, or in a sweep's store)."""
    return Path(folder) / STAGE_MARKER


class RunLayout:
    """The paths of a run directory; nothing here touches the disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def stages(self) -> Path:
        return self.root / STAGES

    def stage(self, name: str) -> Path:
        """A finished stage's folder."""
        return self.stages / name

    def stage_marker(self, name: str) -> Path:
        return stage_marker(self.stage(name))

    def work(self, name: str, key: str) -> Path:
        """The folder a stage runs in until it finishes (and resumes from after a crash)."""
        return self.stages / ".work" / f"{name}-{key}"

    def previous(self, name: str) -> Path:
        """Where a stage's earlier result goes when a re-run replaces it."""
        return self.stages / ".previous" / name

    def finished_markers(self) -> Iterator[Path]:
        """The markers of every stage folder in place, by name."""
        return iter(sorted(self.stages.glob(f"*/{STAGE_MARKER}")))

    @property
    def report(self) -> Path:
        """``distillkit report``'s default output folder."""
        return self.root / "report"

    @property
    def teacher_outputs(self) -> Path:
        """The teacher-output cache; one folder per cache key."""
        return self.root / "cache" / "teacher_outputs"


@dataclass
class ModelEntry:
    """One model a stage produced."""

    label: str  # e.g. ``m1`` or ``teachers[broad+fine]``
    stage: str
    path: Path  # absolute
    tasks: list[str]


class RunDirectory:
    """A run directory written by :class:`distillkit.runner.Runner`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.layout = RunLayout(self.path)
        config_path = self.layout.config
        if not self.path.is_dir():
            raise DistillkitError(f"{self.path} is not a directory.", where=str(self.path))
        if not config_path.is_file():
            raise DistillkitError("not a run directory: it has no config.yaml (written by `distillkit run`).",
                                  where=str(self.path))
        try:
            self.config: dict[str, Any] = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DistillkitError(f"its config.yaml cannot be read ({exc}).", where=str(self.path)) from None
        self.info: dict[str, Any] = self._json(self.layout.info) or {}
        self.plan: list[dict[str, Any]] = (self._json(self.layout.plan)
                                           or [{"name": n} for n in self.config.get("stages", {})])

    def _json(self, path: Path) -> Any:
        try:
            return read_json(path) if path.is_file() else None
        except (OSError, ValueError) as exc:
            raise DistillkitError(f"{path.name} cannot be read ({exc}).", where=str(self.path)) from None

    @property
    def name(self) -> str:
        return str(self.config.get("name", self.path.name))

    @property
    def base_dir(self) -> Path:
        """The original config's folder: relative data paths of ``config.yaml`` resolve there.

        Runs written before ``run.json`` existed fall back to the working directory.
        """
        return Path(self.info.get("base_dir") or ".")

    # -- stages -------------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        """Stages in plan order."""
        return [p["name"] for p in self.plan]

    def stage_kind(self, stage: str) -> str:
        return str((self.config.get("stages", {}).get(stage) or {}).get("kind", ""))

    def stage_params(self, stage: str) -> dict[str, Any]:
        return dict(self.config.get("stages", {}).get(stage) or {})

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        """``stage.json`` of a finished stage, or ``None`` when it has not finished."""
        path = self.layout.stage_marker(stage)
        if not path.is_file():
            return None
        record = read_json(path)
        return record if record.get("status") == "done" else None

    def evaluate_stages(self) -> list[str]:
        return [s for s in self.stage_names() if self.stage_kind(s) == "evaluate"]

    def models(self, stages: Sequence[str] | None = None) -> list[ModelEntry]:
        """Models of ``stages``; by default those the evaluate stages compared, else every model."""
        names = self.stage_names()
        if stages:
            for stage in stages:
                if stage not in names:
                    raise DistillkitError(f"the run has no stage '{stage}'.{did_you_mean(stage, names)} "
                                          f"Stages: {', '.join(names)}.", where="--stage")
            wanted = list(stages)
        elif self.evaluate_stages():
            wanted = list(dict.fromkeys(m for e in self.evaluate_stages() for m in self.stage_params(e)["models"]))
        else:
            wanted = names
        out: list[ModelEntry] = []
        for stage in wanted:
            if self.stage_kind(stage) == "evaluate" and stages:
                # an evaluate stage stands for the models it compared
                out += [m for m in self.models(self.stage_params(stage)["models"]) if m not in out]
                continue
            record = self.stage_record(stage)
            if record is None:
                if stages:
                    raise DistillkitError(f"stage '{stage}' has not finished; run the config again to complete it.",
                                          where=str(self.path))
                continue
            for m in record["result"]["models"]:
                out.append(ModelEntry(m["label"], stage, self.path / m["path"], list(m["tasks"])))
        if not out:
            raise DistillkitError("the run has no finished model yet.", where=str(self.path))
        return out

    def log(self, stage: str) -> dict[str, list[dict[str, Any]]]:
        """Per-epoch records of every model a stage trained: label -> records by epoch.

        A resumed stage may have logged an epoch twice; the last record of an epoch wins.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        record = self.stage_record(stage)
        if record is None:
            return out
        for m in record["result"]["models"]:
            path = (self.path / m["path"]).parent / "log.jsonl"
            if not path.is_file():
                continue
            by_epoch: dict[int, dict[str, Any]] = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a torn last line after a crash
                    continue
                by_epoch[int(entry.get("epoch", len(by_epoch)))] = entry
            out[m["label"]] = [by_epoch[e] for e in sorted(by_epoch)]
        return out

    def metrics(self) -> dict[str, Any]:
        return self._json(self.layout.metrics) or {}

    def summary(self) -> dict[str, Any] | None:
        return self._json(self.layout.summary)

    # -- data ---------------------------------------------------------------------------------
    def data_spec(self, registries: Registries) -> DataSpec:
        return DataSpec.from_mapping(self.config, registries, where=str(self.layout.config),
                                     base_dir=self.base_dir)

    def load_data(self, registries: Registries, warn=None) -> LoadedData:
        """The run's data, re-created; warns when it is not the data the run used."""
        data = self.data_spec(registries).load(registries)
        recorded = self.info.get("data_fingerprint")
        if recorded and recorded != data.fingerprint:
            (warn or _stderr)(f"warning: the data of {self.path} changed since the run (fingerprint "
                              f"{data.fingerprint}, the run used {recorded}); splits and metrics may differ.")
        return data


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def find_run_dir(checkpoint: str | Path) -> RunDirectory | None:
    """The run directory a model file lies in (``<run>/stages/<stage>[/<model>]/model.safetensors``)."""
    path = Path(checkpoint).resolve()
    for parent in list(path.parents)[:4]:
        if parent.name == STAGES and RunLayout(parent.parent).config.is_file():
            try:
                return RunDirectory(parent.parent)
            except DistillkitError:
                return None
    return None
