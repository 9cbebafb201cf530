"""Progress reporting: rich bars on a terminal, plain lines otherwise, as small callbacks."""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


#: counts and settings, not scores: left out of the per-epoch validation line
EPOCH_LINE_SKIP = frozenset({"n", "unseen", "screening_specificity"})


class Reporter:
    """Run-level messages plus per-stage epoch/step callbacks (see :class:`distillkit.training.Callbacks`)."""

    def __init__(self, console: Console | None = None, quiet: bool = False, silent: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet or silent
        #: not even the final table (the ranks other than 0 under torchrun)
        self.silent = silent
        self.interactive = self.console.is_terminal and not quiet
        self._progress: Progress | None = None

    # run level -----------------------------------------------------------------------------
    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def stage_start(self, index: int, total: int, name: str, description: str) -> None:
        self.message(f"[bold]stage {index}/{total} {escape(name)}[/bold]: {escape(description)}")
        if self.interactive:
            self._progress = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"), console=self.console, transient=True)
            self._progress.start()

    def stage_end(self, name: str, seconds: float) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.message(f"  {name} done in {seconds:.1f}s")

    def stage_skipped(self, name: str) -> None:
        self.message(f"stage {name}: already finished with the same config and inputs, skipped")

    def table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.silent:
            return
        table = Table(title=title)
        for i, h in enumerate(header):
            # the model column folds a long label (teachers[broad+fine]) rather than cutting it
            table.add_column(h, justify="left" if i == 0 else "right", overflow="fold" if i == 0 else "ellipsis")
        for row in rows:
            table.add_row(*(escape(str(cell)) for cell in row))
        # written to a file or pipe (a log), the table keeps its full width instead of
        # truncating every number to fit 80 columns
        console = Console(file=sys.stdout)
        if not console.is_terminal:
            console = Console(file=sys.stdout, width=max(80, 12 * len(header)))
        console.print(table)

    def callbacks(self, label: str) -> "StageCallbacks":
        return StageCallbacks(self, label)


class StageCallbacks:
    def __init__(self, reporter: Reporter, label: str):
        self.reporter = reporter
        self.label = escape(label)  # labels like "teachers[broad+fine]" are not markup
        self._task = None
        self._epochs_task = None
        self._start = time.perf_counter()

    def on_epoch_start(self, epoch: int, total_epochs: int, steps: int) -> None:
        self._start = time.perf_counter()
        progress = self.reporter._progress
        if progress is not None:
            if total_epochs > 1:
                # one bar for the model's epochs, one for the steps of the current epoch
                if self._epochs_task is None:
                    self._epochs_task = progress.add_task(f"{self.label} epochs", total=total_epochs,
                                                          completed=epoch, info="")
                else:
                    progress.update(self._epochs_task, completed=epoch)
            if self._task is not None:
                progress.remove_task(self._task)
            what = f"{self.label} epoch {epoch + 1}/{total_epochs}" if total_epochs > 1 else self.label
            self._task = progress.add_task(what, total=steps, info="")

    def on_step(self) -> None:
        if self.reporter._progress is not None and self._task is not None:
            self.reporter._progress.advance(self._task)

    def on_epoch_end(self, epoch: int, record: Mapping[str, Any]) -> None:
        progress = self.reporter._progress
        if progress is not None and self._epochs_task is not None:
            progress.update(self._epochs_task, completed=epoch + 1,
                            info=f"loss {record['train_loss']:.3f}")
        val = record.get("val", {})
        parts = [f"loss {record['train_loss']:.4f}"]
        for key, value in val.items():
            if isinstance(value, dict):
                parts += [f"{key} {k} {v:.3f}" for k, v in value.items() if k not in EPOCH_LINE_SKIP]
            else:
                parts.append(f"val {key} {value:.4f}")
        self.reporter.message(f"  {self.label} epoch {epoch + 1}: {', '.join(parts)} "
                              f"({time.perf_counter() - self._start:.1f}s)")
