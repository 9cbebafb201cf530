"""Predictions of a model file for user files (``distillkit predict``).

The files become inputs through the dataset source the model was trained with
(:meth:`distillkit.data.DatasetSource.load_inputs`): images for the eye plugin, rows of numbers
for the toy data, anything a plugin's source can read. The model applies its own fitted input
transform, so raw files give what evaluation gives on the same rows.

Per file, one entry per task: a classification task gives ``{"kind": "classes", "top": [...],
"probabilities": {...}}``, a task that decodes text ``{"kind": "text", "text": ...}``, a task
that predicts a few plain numbers (regression) ``{"kind": "values", "values": {name: [...]}}``,
any other ``{"kind": "other", "outputs": {name: shape}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from distillkit.config import apply_overrides
from distillkit.data import DataContext, DatasetSource
from distillkit.data_spec import DataSpec
from distillkit.errors import DistillkitError
from distillkit.registry import Registries


def checkpoint_source(checkpoint: Path, meta: Mapping[str, Any], registries: Registries,
                      data_file: Path | None = None, overrides: Sequence[str] = ()) -> DatasetSource:
    """The dataset source that reads inputs for ``checkpoint``: ``data_file``'s ``data:`` section
    if given, else the one the model file records, else that of the run it lies in."""
    from distillkit.rundir import find_run_dir

    overrides = [f"data.{o}" for o in overrides]  # settings of the source
    if data_file is not None:
        spec = DataSpec.from_file(data_file, registries, overrides)
    else:
        run = find_run_dir(checkpoint)
        raw = meta.get("data") or (run.config.get("data") if run is not None else None)
        if not raw:
            raise DistillkitError("the model file does not name the dataset source that reads its inputs (it "
                                  "predates that record and lies in no run directory).", where=str(checkpoint),
                                  hint="Pass --data FILE with a 'data:' section (kind: ... and its settings).")
        raw = apply_overrides({"data": raw}, overrides) if overrides else {"data": raw}
        spec = DataSpec.from_mapping(raw, registries, where=str(checkpoint),
                                     base_dir=run.base_dir if run is not None else Path.cwd())
    source_cls = registries.dataset.get(spec.data.kind, where=f"{spec.where}: data.kind")
    return source_cls(spec.data, DataContext(cache_dir=spec.cache_dir, base_dir=spec.base_dir, where="data"))


def collect_files(paths: Sequence[Path], suffixes: Sequence[str] = ()) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted, hidden entries skipped) to the files
    whose suffix is in ``suffixes`` (every file when empty)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and (not suffixes or p.suffix.lower() in suffixes)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                kinds = f" ({', '.join(sorted(suffixes))})" if suffixes else ""
                raise DistillkitError(f"the folder holds no input files{kinds}.", where=str(path))
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise DistillkitError("no such file or folder.", where=str(path))
    return out


#: a prediction whose every tensor holds at most this many numbers per row is shown as numbers
MAX_SHOWN_VALUES = 16


def top_k_for(task: Any, top_k: int | None) -> int:
    if top_k is not None:
        return top_k
    return max([1, *task.topk])


@torch.no_grad()
def predict_rows(model: Any, tasks: Mapping[str, Any], inputs: torch.Tensor, top_k: int | None = None,
                 batch_size: int = 64) -> list[dict[str, Any]]:
    """One dict per input row: task name -> its prediction (see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for start in range(0, len(inputs), batch_size):
        feats = model.features(inputs[start:start + batch_size].to(device))
        per_task = {name: task.predict(model.heads[name], feats) for name, task in tasks.items()}
        for row in range(feats.shape[0]):
            result: dict[str, Any] = {}
            for name, task in tasks.items():
                prediction = per_task[name]
                if "probs" in prediction:
                    probs = prediction["probs"][row].float().cpu()
                    classes = task.class_names or [str(i) for i in range(len(probs))]
                    k = min(top_k_for(task, top_k), len(probs))
                    values, indices = probs.topk(k)
                    result[name] = {"kind": "classes",
                                    "top": [{"label": classes[i], "probability": float(p)}
                                            for p, i in zip(values.tolist(), indices.tolist())],
                                    "probabilities": {c: float(p) for c, p in zip(classes, probs.tolist())}}
                elif "tokens" in prediction and (text := task.decode_text(prediction["tokens"][row:row + 1].cpu())):
                    result[name] = {"kind": "text", "text": text[0]}
                elif all(v.is_floating_point() and v[row].numel() <= MAX_SHOWN_VALUES for v in prediction.values()):
                    # plain values (a regression's predicted price): shown as numbers
                    result[name] = {"kind": "values",
                                    "values": {k: v[row].float().cpu().flatten().tolist() for k, v in prediction.items()}}
                else:
                    result[name] = {"kind": "other",
                                    "outputs": {k: list(v[row].shape) for k, v in prediction.items()}}
            out.append(result)
    return out


def format_prediction(name: str, result: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal."""
    lines = [name]
    width = max(len(task) for task in result) if result else 0
    for task, value in result.items():
        if value["kind"] == "classes":
            shown = [f"{t['probability']:.3f}  {t['label']}" for t in value["top"]]
        elif value["kind"] == "text":
            shown = [f'"{value["text"]}"']
        elif value["kind"] == "values":
            shown = [f"{k} {', '.join(f'{x:.6g}' for x in v)}" for k, v in value["values"].items()]
        else:
            shown = [", ".join(f"{k} {v}" for k, v in value["outputs"].items())]
        lines.append(f"  {task:<{width}}  {shown[0]}")
        lines += [f"  {'':<{width}}  {line}" for line in shown[1:]]
    return lines
