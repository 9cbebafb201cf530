"""The GPU path: training images/s of a ResNet under mixed precision and channels_last, and the
cached-ensemble distillation step against plain training, on one device.

Every step is distillkit's own training step (the ``_train_step`` that ``fit`` runs: autocast
from ``training.mixed_precision``, ``laid_out`` for ``channels_last``, the fp16 gradient scaler,
losses on fp32 logits), on the eye plugin's ResNet student with two classification heads.
Batches are uint8 images gathered on the host into pinned memory and copied to the device
without blocking; the augmentation (``fundus_jitter`` from the augmentation registry) runs on
the device. Warm-up steps are not timed; ``torch.cuda.synchronize`` brackets every timing.

  (a) for each precision of ``--precision`` (``fp32``; ``bf16``; ``fp16`` with the gradient
      scaler): images/s of training with the augmentation;
  (b) at the first precision listed, rounds alternating: plain supervised training against
      M2-style distillation (labels and soft targets, alpha 0.95, tau 5) whose soft targets are
      read from the teacher-output cache of a three-teacher ensemble (one teacher per non-empty
      subset of the two tasks), as the distill stage reads them; no augmentation in either (the
      cache holds one view per image, so the distill stage refuses augmentation with a cache).
      Prints the ratio distill / plain of images/s.

The images are random: the arithmetic of a step does not depend on what the pixels show.

    python -m benchmarks.gpu_throughput                      # CUDA: resnet50 at 224 px, batch 128
    python -m benchmarks.gpu_throughput --device cpu         # small sizes, to try it without a GPU
    python -m benchmarks.gpu_throughput --precision bf16 --steps 100 --json gpu.json

Without CUDA (and without ``--device cpu``) it exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from distillkit.builtin.components import MeanPolicy
from distillkit.config import validate_config
from distillkit.data import Batch, SplitData, hash_seed
from distillkit.errors import DistillkitError
from distillkit.interfaces import Teacher
from distillkit.losses import KDLoss
from distillkit.models import build_student
from distillkit.plugins import PluginManager
from distillkit.teacher_targets import OnlineTargets, TeacherOutputParams, build_or_load_cache, route_teachers
# the step fit() runs and the placement it does, so that the figures are distillkit's own
from distillkit.training import TrainingParams, _placed_with_optimizer, _train_step, autocast_dtype

PRECISIONS = ("fp32", "bf16", "fp16")
#: per device kind: arch, image size, batch, timed steps, warm-up steps, precisions
DEFAULTS = {"cuda": ("resnet50", 224, 128, 50, 10, "bf16,fp16,fp32"),
            "cpu": ("resnet18", 64, 16, 5, 2, "fp32,bf16")}
TASKS = {"broad": 4, "fine": 32}  # classes; heads as in plugins/eye_fundus/paper.yaml (hidden 512)
ALPHA, TAU = 0.95, 5.0  # the paper's M2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_throughput",
                                     description="Training images/s on a GPU under mixed precision, and the "
                                                 "cached-ensemble distillation step against plain training.")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (small sizes) (default: cuda)")
    parser.add_argument("--arch", help="encoder: resnet18, resnet34, resnet50, small_cnn, efficientnet_lite0 "
                                       "(default: resnet50 on CUDA, resnet18 on the CPU)")
    parser.add_argument("--image-size", type=int, help="pixels per side (default: 224 on CUDA, 64 on the CPU)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 128 on CUDA, 16 on the CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: 50 on CUDA, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each model's first measurement "
                                                   "(default: 10 on CUDA, 2 on the CPU)")
    parser.add_argument("--precision", help="comma-separated, from fp32, bf16, fp16; (b) runs at the first "
                                            "(default: bf16,fp16,fp32 on CUDA, fp32,bf16 on the CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of plain and distillation (b)")
    parser.add_argument("--rows", type=int, help="images held in memory (default: 4 batches)")
    parser.add_argument("--augment", default="fundus_jitter",
                        help="augmentation of (a), by registered name, or none (default: fundus_jitter)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="training.channels_last (default: on)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    arch, size, batch, steps, warmup, precision = DEFAULTS[kind]
    args.arch = args.arch or arch
    args.image_size = args.image_size or size
    args.batch_size = args.batch_size or batch
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.rows = args.rows or 4 * args.batch_size
    args.precision = [p.strip() for p in (args.precision or precision).split(",") if p.strip()]
    unknown = [p for p in args.precision if p not in PRECISIONS]
    if unknown or not args.precision:
        parser.error(f"--precision: {', '.join(unknown) or 'empty'}; choose from {', '.join(PRECISIONS)}")
    for name in ("image_size", "batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.rows < args.batch_size:
        parser.error("--warmup must be >= 0 and --rows >= --batch-size")
    return args


def setup(args: argparse.Namespace):
    """(registries, student config, fitted tasks, the training split of random uint8 images)."""
    registries = PluginManager().registries
    raw = {
        "data": {"kind": "synthetic_fundus", "image_size": args.image_size},  # never loaded: names the inputs
        "tasks": {name: {"kind": "classification", "field": name, "hidden": 512} for name in TASKS},
        "student": {"kind": "multitask", "encoder": {"kind": args.arch}},
        "stages": {"m1": {"kind": "train"}},
    }
    config = validate_config(raw, registries)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.rows, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    tasks, targets = {}, {}
    for name, classes in TASKS.items():
        labels = [f"{name}{int(c)}" for c in torch.randint(0, classes, (args.rows,), generator=g)]
        task = registries.task.get("classification")(name, config.tasks[name])
        task.fit(labels)
        tasks[name], targets[name] = task, task.encode(labels)
    return registries, config.student, tasks, SplitData("train", np.arange(args.rows), images, targets)


class PinnedBatches:
    """Full batches of ``split`` in a new random order each epoch, endlessly: the images gathered on
    the host into one of two pinned buffers (alternating) and copied to the device without
    blocking, so the host prepares the next batch while the device still computes; the labels
    live on the device.

    A buffer is refilled only once its previous copy has finished (a CUDA event), never while
    the device still reads it. ``Batch.index`` stays on the host, where the teacher-output cache
    looks its rows up.
    """

    def __init__(self, split: SplitData, batch_size: int, device: torch.device):
        self.split, self.batch_size, self.device = split, batch_size, device
        pin = device.type == "cuda"
        shape = (batch_size, *split.inputs.shape[1:])
        self.buffers = [torch.empty(shape, dtype=split.inputs.dtype, pin_memory=pin) for _ in range(2)]
        self.copied: list = [None, None]
        self.targets = {t: {k: v.to(device) for k, v in parts.items()} for t, parts in split.targets.items()}

    def __iter__(self) -> Iterator[Batch]:
        n, b = len(self.split), self.batch_size
        for step in itertools.count():
            epoch, start = divmod(step * b, n - n % b)
            if start == 0:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(hash_seed(0, epoch)))
            idx = order[start:start + b]
            slot = step % 2
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()
            torch.index_select(self.split.inputs, 0, idx, out=self.buffers[slot])
            images = self.buffers[slot].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                self.copied[slot] = torch.cuda.Event()
                self.copied[slot].record()
            # (on the CPU `images` is the buffer itself: each step has finished before the next refill)
            device_idx = idx.to(self.device, non_blocking=True)
            yield Batch(idx, images, {t: {k: v[device_idx] for k, v in parts.items()}
                                      for t, parts in self.targets.items()})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One student, its optimizer and gradient scaler as ``fit`` makes them, and its step."""

    def __init__(self, registries, student_params, tasks, params: TrainingParams, device: torch.device,
                 soft_targets: Callable[[Batch], dict] | None = None, augment: Callable | None = None):
        torch.manual_seed(0)  # every trainer starts from the same weights
        self.model = build_student(student_params, tasks, registries)
        self.tasks, self.params, self.device = tasks, params, device
        self.amp_dtype = autocast_dtype(params.mixed_precision, device)
        self.optimizer, _ = _placed_with_optimizer(self.model, params, device)
        # as in fit(): fp16 gradients need loss scaling; disabled, the scaler passes the step through
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.loss_fn = KDLoss(KDLoss.Params())
        self.soft_targets, self.augment = soft_targets, augment
        self.losses: list[torch.Tensor] = []
        self.model.train()

    def step(self, batch: Batch) -> None:
        inputs = self.augment(batch.inputs) if self.augment is not None else batch.inputs
        soft = self.soft_targets(batch) if self.soft_targets is not None else None
        alpha, tau = (ALPHA, {t: TAU for t in self.tasks}) if soft is not None else (0.0, {})
        parts = _train_step(self.model, self.tasks, self.loss_fn, self.optimizer, self.scaler, self.params,
                            inputs, batch.targets, soft, alpha, tau, self.amp_dtype)
        self.losses.append(parts[0])  # stays on the device: read once, after the timing

    def timed(self, batches: Iterator[Batch], steps: int, warmup: int) -> float:
        """Seconds of ``steps`` steps after ``warmup`` untimed ones, the device synchronised around them."""
        for _ in range(warmup):
            self.step(next(batches))
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self.step(next(batches))
        synchronize(self.device)
        return time.perf_counter() - started

    def last_loss(self) -> float:
        loss = float(self.losses[-1])
        if not np.isfinite(loss):
            raise SystemExit(f"gpu_throughput: the training loss became {loss}; the figures are not valid.")
        return loss


def figures(mode: str, precision: str, seconds: float, args: argparse.Namespace, **extra) -> dict:
    return {"mode": mode, "precision": precision, "steps": args.steps, "images": args.steps * args.batch_size,
            "seconds": seconds, "images_per_s": args.steps * args.batch_size / seconds,
            "ms_per_step": 1000 * seconds / args.steps, **extra}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"gpu_throughput: unknown device '{args.device}'; give cuda, cuda:N or cpu.", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_throughput: CUDA is not available (torch {torch.__version__}); this benchmark measures a GPU. "
              f"Run it on a CUDA machine, or pass --device cpu for a small run on the CPU.", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_throughput: device '{args.device}' is not supported; give cuda, cuda:N or cpu.", file=sys.stderr)
        return 2
    for precision in args.precision:
        try:  # the same rule as training.mixed_precision: fp16 on CUDA only
            autocast_dtype("off" if precision == "fp32" else precision, device)
        except DistillkitError:
            print(f"gpu_throughput: --precision {precision} is not available on device '{device}' "
                  f"(fp16 runs on CUDA only, bf16 on CUDA and CPU).", file=sys.stderr)
            return 2
    try:
        registries, student_params, tasks, split = setup(args)
        augment = None
        if args.augment != "none":
            cls = registries.augmentation.get(args.augment)
            augment = cls(cls.Params())
    except DistillkitError as exc:
        print(f"gpu_throughput: {exc}", file=sys.stderr)
        return 2

    def training(precision: str) -> TrainingParams:
        return TrainingParams(batch_size=args.batch_size, early_stopping=None, channels_last=args.channels_last,
                              mixed_precision="off" if precision == "fp32" else precision)

    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {layout}, tasks "
          f"{', '.join(f'{t} ({c} classes)' for t, c in TASKS.items())}; {device_name(device)} ({device}), "
          f"torch {torch.__version__}")
    source = "from pinned memory, copied without blocking" if device.type == "cuda" else "gathered on the host"
    print(f"{args.warmup} warm-up steps per model untimed, then {args.steps} timed steps per measurement; "
          f"uint8 batches {source}{'; augmentation ' + args.augment + ' on the device' if augment else ''}")
    batches = iter(PinnedBatches(split, args.batch_size, device))
    result = {"argv": list(sys.argv[1:] if argv is None else argv), "device": str(device),
              "device_name": device_name(device), "torch": torch.__version__, "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "warmup": args.warmup, "channels_last": args.channels_last,
              "augment": args.augment, "tasks": dict(TASKS), "training": [], "distillation": None}

    # (a) training images/s per precision
    for precision in args.precision:
        trainer = Trainer(registries, student_params, tasks, training(precision), device, augment=augment)
        seconds = trainer.timed(batches, args.steps, args.warmup)
        result["training"].append(figures("train", precision, seconds, args, augment=args.augment,
                                          last_loss=trainer.last_loss()))
        del trainer

    # (b) cached-ensemble distillation against plain training, at the first precision
    precision = args.precision[0]
    teachers = []
    for r in range(1, len(TASKS) + 1):
        for subset in itertools.combinations(TASKS, r):
            torch.manual_seed(len(teachers))  # untrained: a teacher's outputs cost the same either way
            model = build_student(student_params, {t: tasks[t] for t in subset}, registries).to(device)
            teachers.append(Teacher(name="+".join(subset), model=model, tasks=frozenset(subset),
                                    checksum=f"bench{len(teachers)}"))
    tau = {t: TAU for t in tasks}
    online = OnlineTargets(teachers, tasks, route_teachers(list(tasks), teachers, MeanPolicy(MeanPolicy.Params())),
                           tau, use_labels=True)
    outputs = TeacherOutputParams()  # the distill stage's default: cache, fp16 storage
    with tempfile.TemporaryDirectory(prefix="distillkit-gpu-bench-") as folder:
        synchronize(device)
        started = time.perf_counter()
        cached = build_or_load_cache(online, split, Path(folder), outputs, args.batch_size, device)
        synchronize(device)
        build_seconds = time.perf_counter() - started
    num_teachers = len(teachers)
    del teachers, online
    plain = Trainer(registries, student_params, tasks, training(precision), device)
    distill = Trainer(registries, student_params, tasks, training(precision), device, soft_targets=cached)
    trainers = {"plain": plain, "distill": distill}
    seconds: dict[str, list[float]] = {"plain": [], "distill": []}
    for r in range(args.rounds):
        for name in (("plain", "distill") if r % 2 == 0 else ("distill", "plain")):
            warmup = args.warmup if not seconds[name] else 0  # each model warms up once, before its first round
            seconds[name].append(trainers[name].timed(batches, args.steps, warmup))
    rows = {name: figures(name, precision, statistics.median(s), args, rounds_seconds=s,
                          last_loss=trainers[name].last_loss())
            for name, s in seconds.items()}
    ratio = rows["distill"]["images_per_s"] / rows["plain"]["images_per_s"]
    result["distillation"] = {"precision": precision, "teachers": num_teachers, "alpha": ALPHA, "tau": TAU,
                              "cache_storage": outputs.storage, "cache_build_seconds": build_seconds,
                              "rounds": args.rounds, "plain": rows["plain"], "distill": rows["distill"],
                              "ratio": ratio}

    print()
    print(f"{'mode':<28} {'precision':<9} {'images/s':>10} {'ms/step':>9}")
    for row in result["training"]:
        print(f"{'train' + (' + ' + args.augment if augment else ''):<28} {row['precision']:<9} "
              f"{row['images_per_s']:>10.2f} {row['ms_per_step']:>9.2f}")
    labels = {"plain": "plain (no augmentation)", "distill": f"distill, cached {num_teachers} teachers"}
    for name in ("plain", "distill"):
        row = rows[name]
        print(f"{labels[name]:<28} {row['precision']:<9} {row['images_per_s']:>10.2f} {row['ms_per_step']:>9.2f}")
    print(f"(b): median of {args.rounds} alternating rounds; teacher-output cache ({outputs.storage}, "
          f"{len(split)} images) built once in {build_seconds:.1f} s, not timed")
    print(f"ratio distill / plain images/s: {ratio:.3f} (1.000: the cached teachers cost nothing)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
