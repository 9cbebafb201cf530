"""Datasets in memory, patient-level splits, and batches.

Every dataset source (synthetic generator, manifest reader, importer) produces one
:class:`Dataset`: a tensor of inputs (images stay ``uint8``; the encoder scales them), raw
string labels per field, and a group id per item (the patient) so that splits never cut a
patient in two. Epochs index that tensor directly: no decoding, no per-item Python work.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from distillkit.distributed import shard_bounds
from distillkit.errors import DistillkitError
from distillkit.interfaces import Params, Task
from distillkit.io import file_digests

Tensor = torch.Tensor
SPLITS = ("train", "val", "test", "unlabeled")


@dataclass
class Dataset:
    """All items of a source. ``pool[i]`` marks items that are unlabeled by nature."""

    inputs: Tensor
    labels: dict[str, list[str | None]]
    groups: list[str]
    ids: list[str]
    pool: np.ndarray
    source: str = "dataset"
    #: per item, a split it is fixed to (``train``/``val``/``test``/``unlabeled``) or ``None``
    #: (split at random, by group); ``None`` for the whole list: nothing is fixed
    fixed: list[str | None] | None = None
    #: where the fixed splits come from, for messages (e.g. ``"manifest.csv, column 'split'"``)
    fixed_source: str = ""

    def __post_init__(self) -> None:
        n = len(self.inputs)
        if self.fixed is not None:
            if len(self.fixed) != n:
                raise ValueError("fixed must have one entry per input")
            bad = sorted({v for v in self.fixed if v is not None and v not in SPLITS})
            if bad:
                raise ValueError(f"fixed split values must be one of {SPLITS}, got {bad}")
        for name, values in self.labels.items():
            if len(values) != n:
                raise ValueError(f"label field {name!r} has {len(values)} values for {n} inputs")
        if len(self.groups) != n or len(self.ids) != n or len(self.pool) != n:
            raise ValueError("groups, ids and pool must have one entry per input")

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class DataContext:
    """What a dataset source may need besides its params."""

    cache_dir: Path
    base_dir: Path  # relative paths in a config resolve against the config file's folder
    where: str = "data"  # the config path, for error messages


class DatasetSource(ABC):
    """A registered way to obtain a :class:`Dataset` (the ``data:`` section of a config)."""

    Params: ClassVar[type[Params]]

    def __init__(self, params: Params, context: DataContext):
        self.params = params
        self.context = context

    #: file suffixes (lower case, with the dot) ``distillkit predict`` keeps when it expands a
    #: folder given as input; empty: every file
    input_suffixes: ClassVar[tuple[str, ...]] = ()
    #: what ``distillkit predict --json`` calls one input (e.g. ``image``)
    input_kind: ClassVar[str] = "file"

    @abstractmethod
    def load(self) -> Dataset: ...

    def fingerprint(self) -> str:
        """Identifies the data for stage keys and caches: a value that changes whenever
        :meth:`load` could return other data.

        By default: the params, and the bytes of every file of :meth:`data_files` (digests
        cached by path, size and mtime in ``<cache_dir>/file_hashes.json``, so an unchanged
        file is not read again). Override it when the data also depends on something else
        (a server, a database, files the params do not name), or :meth:`data_files` when the
        files read are not the ones the params name.
        """
        digest = hashlib.sha256(self.params.model_dump_json().encode())
        files = self.data_files()
        if not files:
            return digest.hexdigest()[:16]  # the value it always had: existing stage keys stay valid
        for (name, _), content in zip(files, file_digests([p for _, p in files], self.context.cache_dir)):
            digest.update(f"\0{name}\0{content}".encode())
        return digest.hexdigest()[:16]

    def data_files(self) -> list[tuple[str, Path]]:
        """The files whose bytes enter :meth:`fingerprint`, each with the name it enters under.

        By default every string in the params (at any depth) that names an existing file,
        relative paths resolved against the config's folder; a folder named so stands for
        every file under it (hidden ones aside), each under its path inside the folder. A file
        named so is read wherever it lies, inside the data cache's folder too (``cache_dir: .``
        beside the CSV); a folder is read without the data cache in it (the cache changes as a
        run goes), and the config's folder and its parents are never read as folders.
        """
        base = Path(self.context.base_dir).resolve()
        cache = Path(self.context.cache_dir).resolve()
        out: dict[str, Path] = {}
        for value in _strings(self.params.model_dump()):
            if not value.strip() or len(value) > 4096 or "\n" in value or "\0" in value:
                continue
            path = Path(value).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            try:
                is_file, is_dir = path.is_file(), path.is_dir()
            except OSError:
                continue
            if is_file:
                out.setdefault(value, path)
            elif is_dir and path not in (base, *base.parents) and cache not in (path, *path.parents):
                # a folder holding the data cache is read without it (the cache changes as it runs)
                for item in sorted(path.rglob("*")):
                    rel = item.relative_to(path)
                    if (item.is_file() and not any(part.startswith(".") for part in rel.parts)
                            and cache not in item.parents):
                        out.setdefault(f"{value}/{rel.as_posix()}", item)
        return sorted(out.items())

    def load_inputs(self, paths: Sequence[Path]) -> Tensor:
        """User files -> model inputs, one row per file in order, stored exactly as :meth:`load`
        stores its inputs (dtype and shape of a row); used by ``distillkit predict``.

        The fitted input transform is not applied here: it travels in the model file and the
        model applies it. A file that cannot be read raises :class:`DistillkitError` naming it.
        The default refuses: a source reads files only if it says how.
        """
        raise DistillkitError(f"the dataset source '{self.params.kind}' cannot read inputs from files, so "
                              f"its models cannot predict for files.", where="data.kind",
                              hint=f"Its plugin can implement {type(self).__name__}.load_inputs(paths).")

    def fit_input_transform(self, train_inputs: Tensor) -> dict[str, Tensor] | None:
        """A transform of raw inputs fitted on the training split's inputs (never validation,
        test or the pool), e.g. standardisation: ``{"shift": mean, "scale": std}`` per feature,
        applied as ``(x - shift) / scale`` (:class:`distillkit.interfaces.InputTransform`).

        Called by the runner once the data is split, before the first stage. The tensors are
        saved in every model file of the run and applied wherever a model reads raw inputs.
        The default, ``None``, transforms nothing.
        """
        return None


def _strings(value: Any) -> Iterator[str]:
    """Every string in a params dump (mappings and lists searched), component names aside."""
    if isinstance(value, (str, Path)):
        yield str(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key != "kind":
                yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class SplitParams(Params):
    """Patient-level split of the labeled items; the rest forms the unlabeled pool."""

    val: float = Field(0.15, gt=0, lt=1,
                       description="fraction of the labeled groups (patients) in the validation split")
    test: float = Field(0.15, gt=0, lt=1, description="fraction of the labeled groups (patients) in the test split")
    #: p: the fraction of the labeled data used for training (the paper's 0.15 ... 0.70)
    train_fraction: float = Field(0.70, gt=0, le=1)
    seed: int = Field(0, description="seed of the random split (the same seed gives the same patients in each split)")
    #: labeled items left out of training (when p < 1 - val - test) join the unlabeled pool, labels dropped
    unused_to_unlabeled: bool = True

    @field_validator("val", "test", "train_fraction", mode="before")
    @classmethod
    def _not_a_percentage(cls, value: Any) -> Any:
        # The paper speaks of p = 70%; the config takes fractions. Say so rather than "<= 1".
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 1 < value <= 100:
            raise ValueError(f"must be a fraction in (0, 1], not a percentage: write {value / 100:g} for {value:g}%")
        return value

    @model_validator(mode="after")
    def _fits(self) -> "SplitParams":
        if self.val + self.test + self.train_fraction > 1 + 1e-9:
            raise ValueError(
                f"val + test + train_fraction = {self.val + self.test + self.train_fraction:.2f} exceeds 1"
            )
        return self


def fixed_split_conflicts(groups: Sequence[str], fixed: Sequence[str | None], pool: np.ndarray) -> dict[str, str]:
    """Patients whose fixed splits cannot all hold, each with the reason.

    A patient may have rows fixed to one of train/val/test (its unfixed rows follow it there),
    plus rows fixed to ``unlabeled`` only if it trains. Conflicts: two of train/val/test;
    ``unlabeled`` with val or test (a held-out patient's pool images never join the pool);
    ``unlabeled`` with labeled rows left unfixed (the random split could hold them out).
    """
    seen: dict[str, set[str]] = {}
    unfixed_labeled: set[str] = set()
    for g, v, is_pool in zip(groups, fixed, pool):
        if not g:
            continue
        if v is not None:
            seen.setdefault(g, set()).add(v)
        elif not is_pool:
            unfixed_labeled.add(g)
    out: dict[str, str] = {}
    for g, values in seen.items():
        held = sorted(values - {"unlabeled"})
        if len(held) > 1:
            out[g] = " and ".join(held)
        elif "unlabeled" in values and held and held[0] != "train":
            out[g] = f"unlabeled and {held[0]}"
        elif values == {"unlabeled"} and g in unfixed_labeled:
            out[g] = "unlabeled and (by patient grouping) a random split"
    return out


def check_fixed_splits(groups: Sequence[str], fixed: Sequence[str | None], pool: np.ndarray, where: str) -> None:
    """Raise naming the first few patients (and how many) whose fixed splits conflict."""
    conflicts = fixed_split_conflicts(groups, fixed, pool)
    if not conflicts:
        return
    names = sorted(conflicts)
    shown = "; ".join(f"'{g}' ({conflicts[g]})" for g in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    raise DistillkitError(
        f"{len(names)} patient{'s are' if len(names) > 1 else ' is'} fixed to more than one split: {shown}{more}.",
        where=where, hint="A patient's rows must all be in one split (rows fixed to unlabeled: only beside train); "
                          "fix them to one split or leave the cells empty.")


def split_indices(dataset: Dataset, params: SplitParams) -> dict[str, np.ndarray]:
    """Indices of train / val / test / unlabeled, disjoint by group.

    Groups are shuffled once by ``params.seed``; test, then val take groups in that order
    until they reach their fraction of the labeled items; training takes a prefix of the
    remaining order. Hence a smaller ``train_fraction`` gives a subset of a larger one
    (nested), and val/test do not depend on ``train_fraction`` at all.

    With ``dataset.fixed``, a group with rows fixed to train/val/test goes there whole, rows
    fixed to ``unlabeled`` join the pool, and the fractions apply to the remaining labeled
    items (see docs/design.md, "Fixed splits").
    """
    pool = dataset.pool
    fixed_of: dict[str, str] = {}
    if dataset.fixed is not None:
        pool = pool | np.asarray([v == "unlabeled" for v in dataset.fixed], dtype=bool)
        check_fixed_splits(dataset.groups, dataset.fixed, pool, dataset.fixed_source or dataset.source)
        for i, v in enumerate(dataset.fixed):
            if v is not None and v != "unlabeled":
                fixed_of[dataset.groups[i] or f"\0item{i}"] = v
    labeled = np.flatnonzero(~pool)
    if len(labeled) == 0:
        raise DistillkitError("the dataset has no labeled items.", where=dataset.source)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    groups: dict[str, list[int]] = {}
    for i in labeled:
        key = dataset.groups[i] or f"\0item{i}"
        if key in fixed_of:
            out[fixed_of[key]].append(int(i))
        else:
            groups.setdefault(key, []).append(int(i))
    names = sorted(groups)
    order = np.random.default_rng(params.seed).permutation(len(names))
    n = sum(len(v) for v in groups.values())
    quota = {"test": params.test * n, "val": params.val * n, "train": params.train_fraction * n}
    target = "test"
    base = {k: len(v) for k, v in out.items()}  # fixed rows do not count towards the quotas
    for g in order:
        items = groups[names[g]]
        while target != "rest" and len(out[target]) - base[target] >= quota[target] - 1e-9:
            target = {"test": "val", "val": "train", "train": "rest"}[target]
        if target == "rest":
            if params.unused_to_unlabeled:
                out["unlabeled"].extend(items)
            continue
        out[target].extend(items)
    # A pool image of a patient whose labeled images are in val or test would leak that
    # patient into training: such pool images are left out.
    held_out = {dataset.groups[i] for i in out["val"] + out["test"] if dataset.groups[i]}
    out["unlabeled"].extend(int(i) for i in np.flatnonzero(pool)
                            if not dataset.groups[i] or dataset.groups[i] not in held_out)
    for name in ("train", "val", "test"):
        if not out[name]:
            raise DistillkitError(
                f"the {name} split is empty ({len(labeled)} labeled items in {len(names) + len(fixed_of)} "
                f"patients/groups).",
                where=dataset.source, hint="Use more data or larger split fractions.",
            )
    return {k: np.asarray(sorted(v), dtype=np.int64) for k, v in out.items()}


@dataclass
class SplitData:
    """One split: its inputs and, for labeled splits, each task's encoded targets."""

    name: str
    indices: np.ndarray  # into the Dataset
    inputs: Tensor
    targets: dict[str, dict[str, Tensor]] | None = None
    #: every label field's raw values (labeled splits only), e.g. for ``group_by`` a field
    raw_labels: dict[str, list[str | None]] = field(default_factory=dict)
    #: each row's group id (e.g. its patient)
    groups: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inputs)


def prepare_splits(dataset: Dataset, params: SplitParams, tasks: Mapping[str, Task]) -> dict[str, SplitData]:
    """Split, fit every task on the training labels only, and encode every labeled split.

    The unlabeled split never carries targets: a stage that trains on it cannot read a label.
    """
    for name, task in tasks.items():
        if task.field not in dataset.labels:
            fields = ", ".join(sorted(dataset.labels)) or "none"
            raise DistillkitError(
                f"task '{name}' reads label field '{task.field}', which {dataset.source} does not have "
                f"(fields: {fields}).", where=f"tasks.{name}.field",
            )
    idx = split_indices(dataset, params)
    for name, task in tasks.items():
        train_labels = [dataset.labels[task.field][i] for i in idx["train"]]
        if all(v is None for v in train_labels):
            raise DistillkitError(f"no training item has a label for task '{name}' (field '{task.field}').",
                                  where=dataset.source)
        task.fit(train_labels)
    splits = {}
    for split in SPLITS:
        rows = idx[split]
        inputs = dataset.inputs[torch.from_numpy(rows)] if len(rows) else dataset.inputs[:0]
        data = SplitData(split, rows, inputs.contiguous(), groups=[dataset.groups[i] for i in rows])
        if split != "unlabeled":
            data.raw_labels = {f: [values[i] for i in rows] for f, values in dataset.labels.items()}
            data.targets = {
                name: task.encode(data.raw_labels[task.field], where=f"{dataset.source} ({split} split)")
                for name, task in tasks.items()
            }
        splits[split] = data
    return splits


@dataclass
class Batch:
    index: Tensor  # positions within the split (keys for the teacher-output cache)
    inputs: Tensor
    targets: dict[str, dict[str, Tensor]] | None


def iterate_batches(split: SplitData, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                    epoch: int = 0, device: torch.device | str = "cpu", tasks: Sequence[str] | None = None,
                    drop_last: bool = False, row_weights: Tensor | None = None,
                    shard: tuple[int, int] | None = None) -> Iterator[Batch]:
    """Batches of a split, moved to ``device``.

    The order depends only on ``(seed, epoch)``, so an interrupted epoch replays identically.
    With ``row_weights`` (and ``shuffle``) an epoch draws ``len(split)`` rows with replacement,
    each with probability proportional to its weight (a class-balanced sampler).
    ``shard=(rank, world)`` yields only that rank's contiguous part of every batch
    (:func:`distillkit.distributed.shard_bounds`; possibly empty): the ranks together see the
    batches of a single process, row for row.
    """
    n = len(split)
    if shuffle and row_weights is not None:
        gen = torch.Generator().manual_seed(hash_seed(seed, epoch, "weighted"))
        order = torch.multinomial(row_weights.double(), n, replacement=True, generator=gen)
    elif shuffle:
        gen = torch.Generator().manual_seed(hash_seed(seed, epoch))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if shard is not None:
            lo, hi = shard_bounds(len(idx), *shard)
            idx = idx[lo:hi]
        yield batch_of(split, idx, device, tasks)


def batch_of(split: SplitData, idx: Tensor, device: torch.device | str = "cpu",
             tasks: Sequence[str] | None = None, inputs: bool = True) -> Batch:
    """The rows ``idx`` of a split as a batch on ``device`` (every task's targets, or ``tasks``'s);
    ``inputs=False``: the targets only (the batch's inputs are empty)."""
    non_blocking = torch.device(device).type == "cuda"
    inputs = (split.inputs[idx] if inputs else split.inputs[:0]).to(device, non_blocking=non_blocking)
    targets = None
    if split.targets is not None:
        names = tasks if tasks is not None else list(split.targets)
        targets = {t: {k: v[idx].to(device, non_blocking=non_blocking) for k, v in split.targets[t].items()}
                   for t in names}
    return Batch(idx, inputs, targets)


def hash_seed(*parts: Any) -> int:
    """A 63-bit seed derived from several values, stable across processes and machines."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
