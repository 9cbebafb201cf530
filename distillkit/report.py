"""``distillkit report``: one self-contained HTML page about a finished run.

The page (PNG figures embedded as base64, so it can be mailed or attached alone) and the
same PNGs, plus ``report.json`` with the numbers behind every figure, are written to one
folder. Sections:

* the metrics table of the evaluate stage (``summary.json``) and the stages with their times;
* the confusion matrix of the grouping task (or the first classification task) per model,
  from the evaluate stage's metrics;
* every task's primary metric per group (e.g. BLEU per disease), from its ``by_group`` metrics;
* the learning curves of every trained model (``log.jsonl``);
* top-K accuracy against K per group for the other classification tasks (the paper's Fig. 4)
  and Grad-CAM overlays of a few test images per group for every task and two models (by
  default the first and the last the evaluate stage compared: M1 and M3; the paper's Fig. 5).
  These two re-run the models on the run's data, re-created from its ``config.yaml``.

Nothing here knows a domain: a task is "classes" when its prediction holds ``probs`` and
"text" when its ``decode_text`` gives text; Grad-CAM is drawn when the inputs are images.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from distillkit.data import SplitData, iterate_batches
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.io import atomic_write_bytes, atomic_write_text, write_json
from distillkit.metric_direction import direction
from distillkit.registry import Registries
from distillkit.rundir import RunDirectory

TOPK_MAX = 10


@dataclass
class ReportFigure:
    name: str  # file stem
    section: str
    caption: str
    png: bytes


@dataclass
class Report:
    """What :func:`build_report` wrote, and the numbers behind it (also in ``report.json``)."""

    html_path: Path
    figures: list[ReportFigure] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_report(run_path: str | Path, registries: Registries, out: str | Path | None = None, *,
                 images_per_class: int = 2, gradcam_models: Sequence[str] | None = None,
                 device: torch.device | str = "cpu", use_data: bool = True,
                 group_metrics: Mapping[str, str] | None = None,
                 warn: Callable[[str], None] | None = None) -> Report:
    """Write the report of the run in ``run_path`` to ``out`` (default ``<run>/report/report.html``).

    ``group_metrics`` chooses the metric shown per group for some tasks (default: each task's
    primary metric), e.g. ``{"text": "bleu_sentence_avg"}`` for captions of one or two words,
    whose corpus BLEU-4 is 0.
    """
    try:
        from distillkit import plots
    except ImportError as exc:
        raise DistillkitError(f"the report draws its figures with matplotlib, which is not installed ({exc}).",
                              hint="Install it: pip install 'distillkit[report]'.") from None
    run = RunDirectory(run_path)
    html_path = Path(out) if out is not None else run.layout.report / "report.html"
    report = Report(html_path)
    note = report.notes.append
    summary = run.summary()
    stage = summary["stage"] if summary else (run.evaluate_stages() or [None])[-1]
    params = run.stage_params(stage) if stage else {}
    split = summary["split"] if summary else params.get("split", "test")
    group_task = params.get("group_by")
    evaluated: dict[str, Any] = run.metrics().get(stage, {}).get(split, {}) if stage else {}
    task_kinds = {name: spec.get("kind") for name, spec in (run.config.get("tasks") or {}).items()}
    primary = {name: registries.task.get(kind).primary_metric if kind in registries.task
               else "accuracy" for name, kind in task_kinds.items()}
    for task in group_metrics or {}:
        if task not in task_kinds:
            raise DistillkitError(f"the run has no task '{task}' (tasks: {', '.join(task_kinds)}).",
                                  where="--group-metric")
    shown_metric = {**primary, **(group_metrics or {})}
    if stage is None:
        note("The run has no evaluate stage: no metrics table, confusion matrix or per-group metrics.")
    report.data.update(run=str(run.path), name=run.name, evaluate_stage=stage, split=split, group_by=group_task)

    def add(name: str, section: str, caption: str, fig, photo: bool = False) -> None:
        report.figures.append(ReportFigure(name, section, caption, plots.to_png(fig, palette=photo)))

    # -- from the evaluate stage's metrics ----------------------------------------------------
    confusion_task = next((t for t in [group_task, *task_kinds] if t and any(
        "confusion" in (m.get(t) or {}) for m in evaluated.values())), None)
    if confusion_task:
        matrices = {label: m[confusion_task]["confusion"] for label, m in evaluated.items()
                    if "confusion" in (m.get(confusion_task) or {})}
        classes = next(m[confusion_task]["classes"] for m in evaluated.values() if confusion_task in m)
        report.data["confusion"] = {"task": confusion_task, "classes": classes, "matrices": matrices}
        add(f"confusion_{confusion_task}", "Confusion matrix",
            f"Confusion matrix of task '{confusion_task}' on the {split} split (rows: true class, columns: "
            "predicted class; counts over the whole split).", plots.confusion_figure(matrices, classes, confusion_task))
    _screening(evaluated, task_kinds, report, add, plots, split)
    by_group: dict[str, dict[str, dict[str, Any]]] = {}
    for label, m in evaluated.items():
        for group, per_task in (m.get("by_group") or {}).items():
            for task, values in per_task.items():
                by_group.setdefault(task, {}).setdefault(label, {})[group] = values.get(shown_metric.get(task, "accuracy"))
    for task, metric in (group_metrics or {}).items():
        known = sorted({k for m in evaluated.values() for g in (m.get("by_group") or {}).values()
                        for k, v in (g.get(task) or {}).items() if isinstance(v, (int, float))})
        if known and metric not in known:
            raise DistillkitError(f"task '{task}' has no per-group metric '{metric}'. Known: {', '.join(known)}.",
                                  where="--group-metric")
    if by_group:
        report.data["by_group"] = by_group
        report.data["by_group_metric"] = {t: shown_metric.get(t, "accuracy") for t in by_group}
        shown = ", ".join(f"{t} {shown_metric.get(t)}" for t in by_group)
        add("metric_by_group", "Metrics per group",
            f"Metrics per true '{group_task}' class on the {split} split ({shown}); from the evaluate stage.",
            plots.group_bars_figure(by_group, {t: _with_direction(m, registries.task.get(task_kinds[t])
                                                  if task_kinds.get(t) in registries.task else None)
                                               for t, m in shown_metric.items()}, group_task))
    logs = {label: records for s in run.stage_names() for label, records in run.log(s).items() if records}
    if logs:
        report.data["learning_curves"] = {label: {"train_loss": [r.get("train_loss") for r in records],
                                                  "val_loss": [r.get("val", {}).get("loss") for r in records]}
                                          for label, records in logs.items()}
        add("learning_curves", "Learning curves",
            "Training loss and validation loss (labels) per epoch of every trained model; distillation stages also "
            "show the validation KD to their teachers. A distillation stage's training loss mixes KD and CE terms.",
            plots.learning_curves_figure(logs))

    # -- re-running the models on the run's data ----------------------------------------------
    if use_data and stage is not None and gradcam_models:
        known = [e.label for s in run.stage_names() if run.stage_kind(s) != "evaluate" and run.stage_record(s)
                 for e in run.models([s])]
        for label in gradcam_models:
            if label not in known:
                raise DistillkitError(f"the run has no model '{label}'.{did_you_mean(label, known)} "
                                      f"Models: {', '.join(known)}.", where="--gradcam-model")
    if use_data and stage is not None:
        try:
            # top-K and Grad-CAM rows go per class of a grouping task; a field or group id groups no classes
            class_task = group_task if group_task in task_kinds else None
            _model_figures(run, registries, report, add, plots, split, class_task, images_per_class,
                           gradcam_models, torch.device(device), warn)
        except DistillkitError as exc:
            # e.g. the data moved since the run: the page still shows what the run directory holds
            note(f"Top-K curves and Grad-CAM maps are missing: the models could not be re-run on the run's "
                 f"data ({exc}).")
            if warn:
                warn(f"warning: {exc}")
    elif not use_data:
        note("Top-K curves and Grad-CAM maps were not drawn (--no-data).")

    _write(report, run, summary, html_path)
    return report


def _with_direction(metric: str, task_cls: Any) -> str:
    """A metric's name for a chart axis, marked where lower is better (``rmse (lower is better)``)."""
    return f"{metric} (lower is better)" if direction(task_cls, metric) == "min" else metric


SCREENING_KEYS = ("n", "unseen", "accuracy", "balanced_accuracy", "majority_rate", "macro_f1", "macro_auc", "ece")


def _screening(evaluated: Mapping[str, Any], task_kinds: Mapping[str, Any], report: Report, add, plots,
               split: str) -> None:
    """Screening metrics per classification task and model, and the reliability diagrams."""
    for task in task_kinds:
        per_model = {label: m[task] for label, m in evaluated.items() if "reliability" in (m.get(task) or {})}
        if not per_model:
            continue
        report.data.setdefault("screening", {})[task] = {
            label: {**{k: v.get(k) for k in SCREENING_KEYS},
                    **{k: v.get(k) for k in ("sensitivity", "specificity", "auc", "sens_at_spec",
                                             "screening_specificity", "reliability")}}
            for label, v in per_model.items()}
        add(f"reliability_{task}", "Calibration",
            f"Reliability diagram of task '{task}' on the {split} split: rows binned into 15 equal-width bins of "
            "their highest probability; bars show each bin's accuracy (row count at the foot), dots its mean "
            "confidence. The dashed diagonal is perfect calibration.",
            plots.reliability_figure({k: v["reliability"] for k, v in per_model.items()},
                                     {k: v["ece"] for k, v in per_model.items()}, task))
        for label, v in per_model.items():
            if v.get("unseen"):
                report.notes.append(f"Task '{task}', model {label}: {v['unseen']} of {v['n']} {split} rows have a "
                                    "label training never saw; they are scored as wrong.")


def _screening_tables(screening: Mapping[str, Mapping[str, Any]]) -> list[str]:
    parts = []
    for task, per_model in screening.items():
        parts.append(f"<h3>Task {html.escape(task)}</h3>")
        parts.append(_table(["model", *SCREENING_KEYS],
                            [[label, *(_fmt(v.get(k)) for k in SCREENING_KEYS)] for label, v in per_model.items()]))
        for label, v in per_model.items():
            spec = v.get("screening_specificity")
            rows = [[cls, _fmt(v["sensitivity"].get(cls)), _fmt(v["specificity"].get(cls)), _fmt(v["auc"].get(cls)),
                     _fmt(v["sens_at_spec"].get(cls))] for cls in v["sensitivity"]]
            parts.append(f"<p>{html.escape(label)}: per class</p>")
            parts.append(_table(["class", "sensitivity", "specificity", "AUC", f"sensitivity at specificity {spec}"],
                                rows))
    return parts


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _model_figures(run: RunDirectory, registries: Registries, report: Report, add, plots, split: str,
                   group_task: str | None, images_per_class: int, gradcam_models: Sequence[str] | None,
                   device: torch.device, warn) -> None:
    from distillkit.models import load_model

    entries = run.models()
    evaluated = list(dict.fromkeys(e.label for e in entries))
    paths = {e.label: e.path for e in entries}
    data = run.load_data(registries, warn=warn)
    loaded = {label: load_model(paths[label], registries, device) for label in evaluated}

    # Top-K against K per group, for every classification task but the grouping one.
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for label, model in loaded.items():
        rows = data.split(split, model.tasks)
        probs = _class_probabilities(model, rows, device)
        for task, p in probs.items():
            if task == group_task and len(probs) > 1:
                continue
            curves.setdefault(task, {})[label] = _topk_by_group(p, rows, task, model.tasks, group_task)
    for task, by_model in curves.items():
        report.data.setdefault("topk", {})[task] = by_model
        add(f"topk_{task}", "Top-K accuracy per group",
            f"Top-K accuracy of task '{task}' on the {split} split, K = 1..{len(next(iter(by_model.values()))['all'])}"
            f", per true '{group_task}' class (dashed: all rows).", plots.topk_figure(by_model, task, group_task))

    # Grad-CAM of a few images per group, for every task and the chosen models.
    chosen = list(gradcam_models) if gradcam_models else list(dict.fromkeys([evaluated[0], evaluated[-1]]))
    unknown = [m for m in chosen if m not in loaded]  # checked by build_report: each is some stage's model
    if unknown:
        every = {e.label: e for s in run.stage_names() if run.stage_kind(s) != "evaluate" and run.stage_record(s)
                 for e in run.models([s])}
        for label in unknown:
            loaded[label] = load_model(every[label].path, registries, device)
    first = loaded[chosen[0]]
    rows = data.split(split, first.tasks)
    if rows.inputs.dim() != 4 or rows.inputs.shape[1] not in (1, 3):
        report.notes.append(f"No Grad-CAM maps: the inputs are not images (shape {tuple(rows.inputs.shape[1:])}).")
        return
    patients = [data.dataset.groups[i] for i in rows.indices]
    picked = _pick_rows(rows, first.tasks, group_task, images_per_class, patients)
    images = rows.inputs[torch.as_tensor(picked)]
    tasks = [t for t in first.tasks if all(t in loaded[m].tasks for m in chosen)]
    truths = {t: [rows.raw_labels[first.tasks[t].field][i] for i in picked] for t in tasks}
    columns = [f"{split} image (true labels)", *chosen]
    per_model = {m: _explain(loaded[m], tasks, images.to(device)) for m in chosen}
    shown = _displayable(images)
    report.data["gradcam"] = {"models": chosen, "rows": [int(rows.indices[i]) for i in picked],
                              "predictions": {m: {t: per_model[m][t]["text"] for t in tasks} for m in chosen}}
    for task in tasks:
        cells = []
        for r in range(len(picked)):
            row = [plots.CamCell(None, [(f"{t}: {_label(truths[t][r])}", "none") for t in tasks])]
            for m in chosen:
                lines = [(f"{t}: {per_model[m][t]['text'][r]}", _status(per_model[m][t], r, truths[t][r]))
                         for t in tasks]
                row.append(plots.CamCell(per_model[m][task]["cam"][r], lines))
            cells.append(row)
        add(f"gradcam_{task}", "Grad-CAM",
            f"Grad-CAM of task '{task}' for {len(picked)} {split} images ({images_per_class} per true "
            f"'{group_task}' class) with every task's prediction under each model's map: green correct, yellow "
            "partly correct (the true class in the top 5, or some words of the text), red wrong.",
            plots.gradcam_figure(shown, columns, cells, f"Grad-CAM: task '{task}'"), photo=True)


@torch.no_grad()
def _class_probabilities(model, rows: SplitData, device: torch.device, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Probabilities of every task whose prediction holds ``probs``, over a whole split."""
    model.model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    for batch in iterate_batches(rows, batch_size, device=device):
        feats = model.model.features(batch.inputs)
        for name, task in model.tasks.items():
            prediction = task.predict(model.model.heads[name], feats)
            if "probs" in prediction:
                out.setdefault(name, []).append(prediction["probs"].float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def _topk_by_group(probs: torch.Tensor, rows: SplitData, task: str, tasks: Mapping[str, Any],
                   group_task: str | None) -> dict[str, list[float]]:
    """Top-K accuracy for K = 1..min(10, classes) over all labeled rows and per true group class.

    Rows whose label training never saw count as misses at every K, as in the evaluate stage."""
    target = rows.targets[task]
    kmax = min(TOPK_MAX, probs.shape[1])
    # rank of the true class: how many classes have a higher probability
    true_p = probs.gather(1, target["y"][:, None])
    rank = (probs > true_p).sum(1)
    hits = torch.stack([rank < k for k in range(1, kmax + 1)], dim=1).float()  # (N, K)
    present = target["present"]
    unseen = target.get("unseen")
    if unseen is not None:
        hits[unseen] = 0.0
        present = present | unseen
    groups = {"all": present}
    if group_task and group_task in tasks and group_task in rows.targets:
        g = rows.targets[group_task]
        for i, name in enumerate(tasks[group_task].class_names or []):
            groups[name] = present & g["present"] & (g["y"] == i)
    return {name: hits[mask].mean(0).tolist() for name, mask in groups.items() if bool(mask.any())}


def _pick_rows(rows: SplitData, tasks: Mapping[str, Any], group_task: str | None, per_class: int,
               patients: Sequence[str]) -> list[int]:
    """Up to ``per_class`` rows of each true class of the grouping task, in split order, from
    different patients where possible (two eyes of one patient show little new)."""
    if group_task and group_task in rows.targets:
        g = rows.targets[group_task]
        candidates = [torch.nonzero(g["present"] & (g["y"] == i)).flatten().tolist()
                      for i in range(len(tasks[group_task].class_names or []))]
    else:
        candidates = [list(range(len(rows)))]
        per_class *= 4
    picked: list[int] = []
    for rows_of_class in candidates:
        seen: set[str] = set()
        first = [i for i in rows_of_class if not (patients[i] in seen or seen.add(patients[i]))][:per_class]
        picked += first + [i for i in rows_of_class if i not in first][:per_class - len(first)]
    return picked


def _explain(model, tasks: Sequence[str], images: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per task: Grad-CAM maps, predicted text per image, and what status checks need."""
    from distillkit.gradcam import gradcam

    out = {}
    with torch.no_grad():
        feats = model.model.features(images)
        predictions = {t: model.tasks[t].predict(model.model.heads[t], feats) for t in tasks}
    for t in tasks:
        task, prediction = model.tasks[t], predictions[t]
        entry: dict[str, Any] = {"cam": gradcam(model.model, task, images).cpu().numpy()}
        if "probs" in prediction:
            probs = prediction["probs"].float().cpu()
            classes = task.class_names or [str(i) for i in range(probs.shape[1])]
            top = probs.topk(min(5, probs.shape[1]), dim=1)
            entry["top"] = [[str(classes[i]) for i in row] for row in top.indices.tolist()]
            entry["text"] = [f"{classes[i]} ({p:.2f})" for p, i in zip(top.values[:, 0].tolist(),
                                                                         top.indices[:, 0].tolist())]
        elif "tokens" in prediction and (words := task.decode_text(prediction["tokens"].cpu())) is not None:
            entry["words"] = words
            entry["text"] = [w or "(empty)" for w in words]
        else:
            entry["text"] = ["?"] * len(images)
        out[t] = entry
    return out


def _status(entry: Mapping[str, Any], row: int, truth: str | None) -> str:
    if truth is None:
        return "none"
    if "top" in entry:
        top = entry["top"][row]
        return "correct" if top[0] == truth else "partial" if truth in top else "wrong"
    if "words" in entry:
        said, meant = entry["words"][row].lower().split(), truth.lower().split()
        return "correct" if said == meant else "partial" if set(said) & set(meant) else "wrong"
    return "none"


def _label(value: str | None) -> str:
    return "(no label)" if value is None else value


def _displayable(images: torch.Tensor) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 (or ``(N, H, W)`` for one channel) for imshow."""
    x = images.cpu()
    if x.dtype != torch.uint8:
        x = x.float()
        low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = ((x - low) / (high - low).clamp_min(1e-12) * 255).round().to(torch.uint8)
    array = x.permute(0, 2, 3, 1).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


# -- the page ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1300px;
       color: #1f2328; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.meta { color: #57606a; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; } th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: flex-start; }
figure { margin: 12px 0 20px; max-width: 100%; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9em; margin-top: 4px; max-width: 560px; }
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        text = str(value)
        numeric = text.replace(".", "", 1).lstrip("-").isdigit() or text == "-"
        return f"<td class=\"num\">{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _write(report: Report, run: RunDirectory, summary: Mapping[str, Any] | None, html_path: Path) -> None:
    folder = html_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for fig in report.figures:
        atomic_write_bytes(folder / f"{fig.name}.png", fig.png)
    report.data["figures"] = [f"{fig.name}.png" for fig in report.figures]
    write_json(folder / "report.json", report.data)

    parts = [f"<h1>distillkit report: {html.escape(run.name)}</h1>",
             f"<p class=\"meta\">Run directory {html.escape(str(run.path.resolve()))}; config "
             f"{html.escape(str(run.info.get('config_file', run.layout.config)))}; written "
             f"{time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    if summary:
        parts.append(f"<h2>Metrics ({html.escape(summary['split'])} split, stage {html.escape(summary['stage'])})</h2>")
        parts.append(_table(summary["header"], summary["rows"]))
    stages = []
    descriptions = {p["name"]: p.get("description", "") for p in run.plan}
    for name in run.stage_names():
        record = run.stage_record(name)
        seconds = f"{record['seconds']:.1f}" if record and "seconds" in record else "not finished"
        stages.append([name, descriptions.get(name, ""), seconds])
    parts.append("<h2>Stages</h2>" + _table(["stage", "what", "seconds"], stages))
    if report.data.get("screening"):
        parts.append("<h2>Screening metrics</h2><p>Definitions: docs/metrics.md. \"-\": not defined (e.g. AUC of a "
                     "class absent from the evaluated labels).</p>")
        parts += _screening_tables(report.data["screening"])
    sections: dict[str, list[ReportFigure]] = {}
    for fig in report.figures:
        sections.setdefault(fig.section, []).append(fig)
    for section, figures in sections.items():
        parts.append(f"<h2>{html.escape(section)}</h2><div class=\"figures\">")
        for fig in figures:  # side by side where the window is wide enough
            data = base64.b64encode(fig.png).decode("ascii")
            parts.append(f"<figure id=\"{fig.name}\"><img src=\"data:image/png;base64,{data}\" "
                         f"alt=\"{html.escape(fig.caption)}\"><figcaption>{html.escape(fig.caption)} "
                         f"(<a href=\"{fig.name}.png\">{fig.name}.png</a>)</figcaption></figure>")
        parts.append("</div>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>distillkit report: {html.escape(run.name)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    atomic_write_text(html_path, page)
