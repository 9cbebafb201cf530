"""The figures of ``distillkit report``, drawn with matplotlib's object API.

Figures are built as :class:`matplotlib.figure.Figure` objects (no ``pyplot``, no global
backend switch: PNG output goes through Agg), so a report can be made in any process, in
threads, and without a display. Each function takes plain data and returns the figure; the
report saves it. matplotlib is imported here only: the rest of the core never needs it.
"""

from __future__ import annotations

import io
import json as _json
import math
import textwrap
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: status of a prediction -> text colour (the paper's Fig. 5: green, yellow, red)
STATUS_COLORS = {"correct": "#1a7f37", "partial": "#9a6700", "wrong": "#cf222e", "none": "#57606a"}
DPI = 80


def to_png(fig: Figure, dpi: int = DPI, palette: bool = False) -> bytes:
    """PNG bytes of ``fig``. ``palette``: reduce to 256 colours (photographs with heat maps
    shrink about 3x, with barely visible banding)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    if not palette:
        return buffer.getvalue()
    from PIL import Image  # a dependency of matplotlib

    buffer.seek(0)
    with Image.open(buffer) as image:
        reduced = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    reduced.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _grid(n: int, ncols: int, width: float, height: float, **kw) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def confusion_figure(matrices: Mapping[str, Sequence[Sequence[int]]], classes: Sequence[str], task: str) -> Figure:
    """One heat map per model: rows are the true classes, columns the predicted ones, with counts."""
    fig, axes = _grid(len(matrices), 3, 0.55 * len(classes) + 2.6, 0.5 * len(classes) + 2.0)
    for ax, (label, matrix) in zip(axes, matrices.items()):
        cm = np.asarray(matrix, dtype=np.int64)
        image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        threshold = cm.max() / 2 if cm.size else 0
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
        ticks = range(len(classes))
        ax.set_xticks(ticks, [textwrap.shorten(c, 18) for c in classes], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, [textwrap.shorten(c, 18) for c in classes], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = np.trace(cm) / cm.sum() if cm.sum() else float("nan")
        ax.set_title(f"{label}: {task} (accuracy {accuracy:.3f})", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8, ticks=MaxNLocator(integer=True))
    return fig


def reliability_figure(bins_by_model: Mapping[str, Sequence[Mapping]], ece: Mapping[str, float],
                       task: str) -> Figure:
    """Reliability diagram per model: accuracy against mean confidence of each non-empty bin."""
    fig, axes = _grid(len(bins_by_model), 3, 4.2, 3.8)
    for ax, (label, bins) in zip(axes, bins_by_model.items()):
        full = [b for b in bins if b["count"]]
        centers = [(b["lower"] + b["upper"]) / 2 for b in full]
        width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
        ax.bar(centers, [b["accuracy"] for b in full], width * 0.9, color="tab:blue", alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="tab:red", markersize=3,
                label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        for x, b in zip(centers, full):
            ax.text(x, 0.02, str(b["count"]), ha="center", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.set_title(f"{label}: {task} (ECE {ece.get(label, float('nan')):.3f})", fontsize=10)
    axes[0].legend(fontsize=7, loc="upper left")
    return fig


def topk_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], task: str, group_task: str | None) -> Figure:
    """Top-K accuracy against K, one panel per model and one line per group (the paper's Fig. 4)."""
    fig, axes = _grid(len(curves), 3, 4.6, 3.4, sharey=True)
    for ax, (label, by_group) in zip(axes, curves.items()):
        for group, values in by_group.items():
            ks = np.arange(1, len(values) + 1)
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if group == "all" else {"marker": "o",
                                                                                               "markersize": 3}
            ax.plot(ks, values, label=textwrap.shorten(group, 24), **style)
        ax.set_xlabel("K")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        ax.set_title(f"{label}: {task} top-K accuracy", fontsize=10)
    axes[0].set_ylabel("top-K accuracy")
    axes[-1].legend(title=f"per {group_task}" if group_task else None, fontsize=7, title_fontsize=8,
                    loc="lower right")
    return fig


def group_bars_figure(values: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                      metric_names: Mapping[str, str], group_task: str) -> Figure:
    """Each task's primary metric per group: ``values[task][model][group]`` (e.g. BLEU per disease)."""
    fig, axes = _grid(len(values), 3, 4.8, 3.4)
    for ax, (task, by_model) in zip(axes, values.items()):
        groups = list(dict.fromkeys(g for per_group in by_model.values() for g in per_group))
        width = 0.8 / max(len(by_model), 1)
        x = np.arange(len(groups))
        for i, (label, per_group) in enumerate(by_model.items()):
            heights = [np.nan if per_group.get(g) is None else per_group[g] for g in groups]
            bars = ax.bar(x + (i - (len(by_model) - 1) / 2) * width, heights, width, label=label)
            large = any(v is not None and abs(v) >= 100 for v in per_group.values())  # e.g. an RMSE in dollars
            ax.bar_label(bars, fmt="%.3g" if large else "%.2f", fontsize=6, padding=1)
        ax.set_xticks(x, [textwrap.shorten(g, 14) for g in groups], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(*value_axis([v for per_group in by_model.values() for v in per_group.values()]))
        ax.set_ylabel(metric_names.get(task, ""))
        ax.set_title(f"{task} {metric_names.get(task, '')} per {group_task}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def value_axis(values: Sequence[float | None]) -> tuple[float, float]:
    """y-limits for bars of ``values``: from 0 (or the lowest negative value) to the highest,
    with 10% headroom for the bar labels; [0, 1.1] for scores up to 1, as RMSE in the millions
    or a negative R2 must not be clipped."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    low = min([0.0, *finite])
    high = max([0.0, *finite])
    span = (high - low) or 1.0
    return (low - 0.1 * span if low < 0 else 0.0), high + 0.1 * span


def learning_curves_figure(logs: Mapping[str, Sequence[Mapping]]) -> Figure:
    """Per trained model: training loss, validation loss and (distillation) validation KD per epoch."""
    fig, axes = _grid(len(logs), 4, 3.6, 2.8)
    for ax, (label, records) in zip(axes, logs.items()):
        epochs = [r["epoch"] + 1 for r in records]
        series = {"train loss": [r.get("train_loss") for r in records],
                  "val loss": [r.get("val", {}).get("loss") for r in records],
                  "val KD": [r.get("val", {}).get("kd") for r in records]}
        styles = {"train loss": "-", "val loss": "--", "val KD": ":"}
        for name, ys in series.items():
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], styles[name], marker="o", markersize=3,
                        label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


@dataclass
class CamCell:
    """One image of a Grad-CAM figure: the map to overlay (or ``None``) and coloured text lines."""

    heatmap: np.ndarray | None
    lines: list[tuple[str, str]]  # (text, status)


def gradcam_figure(images: np.ndarray, columns: Sequence[str], cells: Sequence[Sequence[CamCell]], title: str,
                   dpi: int = DPI, min_cell_px: int = 150) -> Figure:
    """Rows of images; column 0 the image itself, then one Grad-CAM overlay per model.

    ``images`` is ``(N, H, W, 3)`` uint8 (or ``(N, H, W)`` grayscale); ``cells[row][col]``.
    Images are enlarged by a whole factor with nearest-neighbour sampling (at ``dpi``): the
    pixels the model saw, not an interpolation of them. Text under each image is wrapped to
    the cell's width and coloured by its status.
    """
    side = images.shape[1]
    cell = side * max(1, math.ceil(min_cell_px / side)) / dpi  # inches
    wrap = max(16, int(cell * 17))
    wrapped = [[[(piece, status) for text, status in c.lines for piece in (textwrap.wrap(text, wrap) or [""])[:3]]
                for c in row] for row in cells]
    line_h = 0.125
    rows_text = [max(len(c) for c in row) * line_h + 0.06 for row in wrapped]
    pad, top = 0.08, 0.55
    width = len(columns) * (cell + pad) + pad
    height = top + sum(cell + t + pad for t in rows_text)
    fig = Figure(figsize=(width, height), dpi=dpi)
    fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=10, weight="bold")
    y = height - top
    for r, row in enumerate(cells):
        y -= cell
        for c, item in enumerate(row):
            x = pad + c * (cell + pad)
            ax = fig.add_axes((x / width, y / height, cell / width, cell / height))
            ax.imshow(images[r], cmap="gray" if images[r].ndim == 2 else None, interpolation="nearest")
            if item.heatmap is not None:
                ax.imshow(item.heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            for i, (text, status) in enumerate(wrapped[r][c]):
                fig.text((x + 0.02) / width, (y - 0.04 - i * line_h) / height, text, fontsize=6.5, va="top",
                         color=STATUS_COLORS.get(status, "black"))
        y -= rows_text[r] + pad
    return fig


def sweep_figure(cells, column_key: str, grid: Mapping[str, Sequence]) -> Figure | None:
    """A sweep's metric against the column key (e.g. the training fraction p): a line per model,
    its 95% CI over seeds as a band. One panel per metric (and per value of the other grid keys)."""
    panels: dict[tuple[str, str], list] = {}
    for c in cells:
        panels.setdefault((c.metric, c.group), []).append(c)
    if not panels or not column_key:
        return None
    columns = [str(v) if isinstance(v, str) else _json.dumps(v) for v in grid.get(column_key, [])]
    numeric = all(_is_number(c) for c in columns)
    xs_of = {c: (float(c) if numeric else i) for i, c in enumerate(columns)}
    fig, axes = _grid(len(panels), min(3, len(panels)), 4.2, 3.2)
    for ax, ((metric, group), members) in zip(axes, panels.items()):
        for row in dict.fromkeys(c.row for c in members):
            pts = sorted((xs_of[c.column], c.estimate) for c in members if c.row == row and c.column in xs_of)
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1].mean for p in pts]
            line, = ax.plot(x, y, marker="o", label=row)
            if all(p[1].half_width is not None for p in pts):
                ax.fill_between(x, [p[1].low for p in pts], [p[1].high for p in pts], color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.set_title(metric + (f"\n{group}" if group else ""), fontsize=9)
        ax.set_xlabel(column_key)
        if not numeric:
            ax.set_xticks(list(range(len(columns))), columns)
        ax.legend(fontsize=7)
    return fig


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
