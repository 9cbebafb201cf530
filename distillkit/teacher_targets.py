"""Teacher soft targets: routing, aggregation, online computation and the teacher-output cache.

For one task, sum_k KL(p_k || q) = K * CE(mean_k p_k, q) - sum_k H(p_k): the second term does
not depend on the student, so distilling from every teacher that learned a task has the same
student gradient as distilling from the mean of their tempered distributions, times K. The
loss uses the mean (the sum divided by K), which is not a matter of lambda alone: with labels
(M2) it sets the soft term's weight against the cross-entropy to alpha / (1 - alpha) instead of
K alpha / (1 - alpha) (docs/design.md gives the alpha that matches the sum); without labels
(M3) it scales the whole loss by 1/K. We therefore aggregate once per image (the policy may weight teachers unequally), store the
result, and let the student train at the cost of training without teachers.

A task declares what each soft-target tensor is (``Task.soft_target_kinds``). Storage of a
distribution (e.g. ``probs``) can be ``fp32``, ``fp16`` (renormalised on read) or ``topk``: the
k largest probabilities plus the dropped mass r, which is spread evenly over the other C - k
classes on read. The L1 error of a reconstructed distribution is at most 2r, so the error of
the KD gradient with respect to the student's logits, (q - p) / tau per row, is at most
2r / tau in L1 norm. ``index.json`` records the largest r seen. Plain values (a regression
teacher's prediction) are never renormalised: they are stored in fp32 whatever the storage,
or in fp16 under fp16/topk storage only where the task declares ``value_fp16``; fp16 would
turn a house price of 97,000,000 into infinity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
from pydantic import Field

from distillkit import distributed
from distillkit.checkpoint import load_tensors, save_tensors, file_checksum
from distillkit.data import Batch, SplitData
from distillkit.errors import DistillkitError
from distillkit.interfaces import AggregationPolicy, Params, Task, Teacher
from distillkit.io import write_json, read_json
from distillkit.training import split_outputs

Tensor = torch.Tensor
CACHE_FORMAT = "distillkit.teacher_outputs/2"


class TeacherOutputParams(Params):
    #: ``cache``: compute once per image and view, store, read every epoch; ``online``: run the
    #: teachers on every batch (needed with random augmentation)
    mode: Literal["cache", "online"] = "cache"
    storage: Literal["fp32", "fp16", "topk"] = Field("fp16",
                                                     description="how cached teacher outputs are stored: fp32, fp16, "
                                                                 "or topk (the k largest probabilities per row)")
    topk: int = Field(16, ge=1, description="k of topk storage")
    shard_size: int = Field(4096, ge=1, description="rows per file of the teacher-output cache")


@dataclass
class Route:
    teachers: list[int]  # positions in the teacher list
    weights: list[float]


def route_teachers(tasks: Sequence[str], teachers: Sequence[Teacher], policy: AggregationPolicy,
                   where: str = "teachers") -> dict[str, Route]:
    """For each task, the teachers that learned it and their weights from the policy."""
    routes = {}
    for task in tasks:
        chosen = [i for i, t in enumerate(teachers) if task in t.tasks]
        if not chosen:
            names = ", ".join(f"{t.name} ({'/'.join(sorted(t.tasks))})" for t in teachers)
            raise DistillkitError(f"no teacher learned task '{task}' (teachers: {names}).", where=where)
        weights = [float(w) for w in policy.weights(task, [teachers[i] for i in chosen])]
        total = sum(weights)
        if len(weights) != len(chosen) or total <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"aggregation policy returned invalid weights {weights} for task '{task}'")
        routes[task] = Route(chosen, [w / total for w in weights])
    return routes


class OnlineTargets:
    """Runs the teachers on a batch: each teacher's encoder once, then each routed head.

    When the batches carry a student's cached frozen features rather than the raw inputs,
    the teachers in ``raw_teachers`` (positions) read their rows of ``raw_inputs`` instead:
    batches index the split's rows, so ``raw_inputs[batch.index]`` are the same images.
    """

    def __init__(self, teachers: Sequence[Teacher], tasks: Mapping[str, Task], routes: Mapping[str, Route],
                 tau: Mapping[str, float], use_labels: bool, raw_inputs: Tensor | None = None,
                 raw_teachers: Sequence[int] = ()):
        self.raw_inputs = raw_inputs
        self.raw_teachers = frozenset(raw_teachers)
        self.teachers = list(teachers)
        self.tasks = dict(tasks)
        self.routes = dict(routes)
        self.tau = dict(tau)
        self.use_labels = use_labels
        needed = sorted({i for r in self.routes.values() for i in r.teachers})
        self.needed = needed

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, dict[str, Tensor]]:
        for t in self.teachers:
            t.model.eval()  # a teacher that shares modules with a student must not drift
        feats = {i: self.teachers[i].features(self._inputs(i, batch)) for i in self.needed}
        out = {}
        for name, task in self.tasks.items():
            r = self.routes[name]
            target = batch.targets[name] if (self.use_labels and batch.targets is not None) else None
            out[name] = check_soft_target(task, task.soft_target(
                [self.teachers[i].model.heads[name] for i in r.teachers], [feats[i] for i in r.teachers],
                r.weights, target, self.tau[name]))
        return out


    def _inputs(self, teacher: int, batch: Batch) -> Tensor:
        if teacher in self.raw_teachers:
            assert self.raw_inputs is not None
            return self.raw_inputs[batch.index.cpu()].to(batch.inputs.device)
        return batch.inputs


def check_soft_target(task: Task, parts: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``parts`` if it holds every key ``task`` declares in ``soft_target_kinds``, else a clear error."""
    declared = task.soft_target_kinds
    missing = [k for k in declared if k not in parts] if isinstance(parts, Mapping) else list(declared)
    if missing:
        cls = type(task)
        got = ", ".join(sorted(parts)) if isinstance(parts, Mapping) else type(parts).__name__
        raise DistillkitError(
            f"task '{task.name}' ({cls.__name__} from {cls.__module__}) returned a soft target without "
            f"{', '.join(repr(k) for k in missing)}, which its soft_target_kinds declares "
            f"({', '.join(f'{k}: {v}' for k, v in declared.items())}); it returned: {got or 'nothing'}.",
            hint="Return every declared key from Task.soft_target, or declare only the keys it returns.")
    return parts


def _store_soft(parts: Mapping[str, Tensor], kinds: Mapping[str, str], storage: str,
                k: int) -> tuple[dict[str, Tensor], dict[str, int], float]:
    """One task's soft target as stored: (tensors by stored name, width of each distribution, max dropped mass)."""
    stored: dict[str, Tensor] = {}
    widths: dict[str, int] = {}
    dropped = 0.0
    for key, value in parts.items():
        kind = kinds.get(key)
        if kind == "distribution":
            widths[key] = value.shape[-1]
            for part, tensor in _compress(value, storage, k).items():
                stored[key if part == "probs" else f"{key}.{part}"] = tensor
            if storage == "topk":
                dropped = max(dropped, float(stored[f"{key}.residual"].max()) if value.numel() else 0.0)
        elif kind is not None and value.is_floating_point():
            half = kind == "value_fp16" and storage in ("fp16", "topk")
            stored[key] = value.half() if half else value.float()
        else:  # undeclared: stored as it is (e.g. integer tokens, a mask)
            stored[key] = value
    return stored, widths, dropped


def _read_soft(rows: Mapping[str, Tensor], kinds: Mapping[str, str], storage: str,
               widths: Mapping[str, int]) -> dict[str, Tensor]:
    """The inverse of :func:`_store_soft` for some rows: distributions rebuilt, values as fp32."""
    out: dict[str, Tensor] = {}
    for key, kind in kinds.items():
        if kind == "distribution":
            if storage == "topk":
                parts = {p: rows[f"{key}.{p}"] for p in ("topv", "topi", "residual")}
            else:
                parts = {"probs": rows[key]}
            out[key] = _decompress(parts, storage, widths[key])
        elif key in rows:
            out[key] = rows[key].float() if rows[key].is_floating_point() else rows[key]
    distribution_parts = {f"{key}.{p}" for key, kind in kinds.items() if kind == "distribution"
                          for p in ("topv", "topi", "residual")}
    for key, value in rows.items():  # undeclared keys, as stored
        if key not in out and key not in distribution_parts and key not in kinds:
            out[key] = value
    return out


def _compress(probs: Tensor, storage: str, k: int) -> dict[str, Tensor]:
    if storage == "fp32":
        return {"probs": probs.float()}
    if storage == "fp16":
        return {"probs": probs.half()}
    k = min(k, probs.shape[-1])
    values, indices = probs.float().topk(k, dim=-1)
    residual = (1.0 - values.sum(-1)).clamp_min(0.0)
    # The kept values stay fp32: fp16 rounding (up to 2^-12 per value) would break the bound
    # L1 <= 2r documented above for a confident teacher, whose r is close to 0.
    return {"topv": values, "topi": indices.to(torch.int32), "residual": residual.float()}


def _decompress(parts: Mapping[str, Tensor], storage: str, num_classes: int) -> Tensor:
    if storage in ("fp32", "fp16"):
        p = parts["probs"].float()
        return p / p.sum(-1, keepdim=True).clamp_min(1e-12) if storage == "fp16" else p
    values = parts["topv"].float()
    k = values.shape[-1]
    fill = (parts["residual"] / max(num_classes - k, 1)).unsqueeze(-1)
    dense = fill.expand(*values.shape[:-1], num_classes).clone()
    dense.scatter_(-1, parts["topi"].long(), values)
    return dense


class CachedTargets:
    """Soft targets of a split read from the cache by row position (``batch.index``)."""

    def __init__(self, tensors: Mapping[str, Mapping[str, Tensor]], storage: str, num_classes: Mapping[str, int],
                 device: torch.device, kinds: Mapping[str, Mapping[str, str]] | None = None,
                 widths: Mapping[str, Mapping[str, int]] | None = None):
        self.storage = storage
        self.num_classes = dict(num_classes)
        self.device = device
        self.tensors = {t: dict(v) for t, v in tensors.items()}
        # without kinds (a cache written by a task that declares nothing else): "probs" is the distribution
        self.kinds = {t: dict((kinds or {}).get(t, {"probs": "distribution"})) for t in self.tensors}
        self.widths = {t: dict((widths or {}).get(t, {"probs": self.num_classes.get(t, 0)})) for t in self.tensors}

    def __call__(self, batch: Batch) -> dict[str, dict[str, Tensor]]:
        idx = batch.index
        out = {}
        for task, parts in self.tensors.items():
            rows = {k: v[idx].to(self.device, non_blocking=True) for k, v in parts.items()}
            out[task] = _read_soft(rows, self.kinds[task], self.storage, self.widths[task])
        return out


def cache_key(teachers: Sequence[Teacher], routes: Mapping[str, Route], tau: Mapping[str, float], use_labels: bool,
              split: SplitData, data_fingerprint: str, params: TeacherOutputParams, view: str = "identity",
              plugins: Mapping[str, str] | None = None) -> str:
    """Identifies a cache by the teachers' checkpoints, their weights, the data, split and view,
    and the versions of the plugins whose code computes the outputs (``plugins``): retrained
    teachers may have the same weights as before, their new code other outputs."""
    description = {
        "plugins": dict(sorted((plugins or {}).items())),
        "teachers": [t.checksum for t in teachers],
        "routes": {k: [[teachers[i].checksum for i in r.teachers], r.weights] for k, r in sorted(routes.items())},
        "tau": dict(sorted(tau.items())), "labels": use_labels, "split": split.name,
        "rows": hashlib.sha256(split.indices.tobytes()).hexdigest(), "data": data_fingerprint,
        "storage": params.storage, "topk": params.topk if params.storage == "topk" else None, "view": view,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def build_or_load_cache(online: OnlineTargets, split: SplitData, directory: Path, params: TeacherOutputParams,
                        batch_size: int, device: torch.device, progress=None) -> CachedTargets:
    """Compute the aggregated soft targets of every row of ``split`` once, or read them back.

    The cache is a folder of safetensors shards plus ``index.json``, which is written last and
    lists each shard's checksum: a folder without it, or with a shard that does not match,
    is rebuilt.

    Under torchrun the ranks compute the batches in turn (every ``world``-th batch each);
    rank 0 receives them in order and writes the cache once, the others read it when it is
    complete.
    """
    kinds = {name: dict(task.soft_target_kinds) for name, task in online.tasks.items()}
    loaded = _load_cache(directory, params.storage, kinds)
    if distributed.broadcast_object(loaded is not None):  # rank 0's finding holds for every rank
        loaded = loaded or _load_cache(directory, params.storage, kinds)
        if loaded is not None:
            return CachedTargets(loaded[0], params.storage, loaded[1], device, kinds=kinds, widths=loaded[2])
    distributed.main_only(lambda: _clear(directory))
    main = distributed.is_main()
    shards: list[dict] = []
    buffer: dict[str, dict[str, list[Tensor]]] = {}
    widths: dict[str, dict[str, int]] = {}
    buffered = 0
    max_residual = 0.0
    steps = (len(split) + batch_size - 1) // batch_size
    if progress is not None and main:
        progress.on_epoch_start(0, 1, steps)

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffered:
            return
        flat = {f"{task}.{key}": torch.cat(chunks) for task, parts in buffer.items() for key, chunks in parts.items()}
        path = directory / f"shard-{len(shards):05d}.safetensors"
        save_tensors(path, flat, {"format": CACHE_FORMAT, "rows": buffered})
        shards.append({"file": path.name, "rows": buffered, "sha256": file_checksum(path)})
        buffer, buffered = {}, 0

    def stored_targets(batch) -> dict[str, tuple[dict[str, Tensor], dict[str, int], float]]:
        return {task: _store_soft(parts, kinds[task], params.storage, params.topk)
                for task, parts in online(batch).items()}

    for batch, per_task in split_outputs(split, batch_size, device,
                                         list(online.tasks) if online.use_labels else None, stored_targets):
        for task, (stored, task_widths, dropped) in per_task.items():
            widths[task] = task_widths
            max_residual = max(max_residual, dropped)
            for key, value in stored.items():
                buffer.setdefault(task, {}).setdefault(key, []).append(value.cpu())
        buffered += len(batch.index)
        if buffered >= params.shard_size:
            flush()
        if progress is not None:
            progress.on_step()
    if main:
        flush()
        # num_classes: the width of each task's "probs" (where it has one); widths: of every distribution
        num_classes = {t: w["probs"] for t, w in widths.items() if "probs" in w}
        write_json(directory / "index.json", {"format": CACHE_FORMAT, "rows": len(split), "storage": params.storage,
                                              "num_classes": num_classes, "kinds": kinds, "widths": widths,
                                              "shards": shards, "max_dropped_mass": max_residual})
    distributed.barrier()  # the others read the cache rank 0 has just written
    loaded = _load_cache(directory, params.storage, kinds)
    assert loaded is not None
    return CachedTargets(loaded[0], params.storage, loaded[1], device, kinds=kinds, widths=loaded[2])


def _clear(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("shard-*.safetensors"):
        stale.unlink()


def _load_cache(directory: Path, storage: str, kinds: Mapping[str, Mapping[str, str]]):
    """(tensors, num_classes, widths) of a complete cache written for ``storage`` and ``kinds``, else None."""
    index_path = directory / "index.json"
    if not index_path.exists():
        return None
    try:
        index = read_json(index_path)
        if index.get("format") != CACHE_FORMAT or index.get("kinds") != {t: dict(k) for t, k in kinds.items()}:
            raise ValueError("written by another version or for other soft-target kinds")
        parts: dict[str, dict[str, list[Tensor]]] = {}
        for shard in index["shards"]:
            path = directory / shard["file"]
            if file_checksum(path) != shard["sha256"]:
                raise ValueError(f"{path} does not match its checksum")
            tensors, _ = load_tensors(path)
            for name, value in tensors.items():
                task, key = name.split(".", 1)
                parts.setdefault(task, {}).setdefault(key, []).append(value)
        if index["storage"] != storage:
            raise ValueError("storage mismatch")
    except (OSError, ValueError, KeyError, DistillkitError, json.JSONDecodeError):
        index_path.unlink(missing_ok=True)  # half-written or damaged: rebuild
        return None
    tensors = {t: {k: torch.cat(v) for k, v in p.items()} for t, p in parts.items()}
    return tensors, index["num_classes"], index["widths"]
