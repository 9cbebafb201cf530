"""What the teacher-output cache buys: M3-style distillation from the seven-teacher ensemble.

On the same student (small CNN, 64 px), data and batch size, one training epoch of
  * plain supervised training (labels, no teachers),
  * unlabeled distillation from the 7-teacher ensemble read from the cache,
  * the same with the 7 teachers run online on every batch,
rounds alternating; prints the ratios of median step times, then the cache build time and
the cache size per 1,000 images for fp32, fp16 and top-k storage.

    python benchmarks/distillation.py [--patients 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import StepTimer, eye_setup, seven_teachers
from distillkit.builtin.components import MeanPolicy
from distillkit.losses import KDLoss
from distillkit.models import build_student
from distillkit.teacher_targets import OnlineTargets, TeacherOutputParams, build_or_load_cache, route_teachers
from distillkit.training import TrainingParams, fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    registries, config, tasks, splits = eye_setup(args.patients)
    train, val = splits["train"], splits["val"]
    teachers = seven_teachers(registries, config, tasks)
    tau = {t: 2.0 for t in tasks}
    routes = route_teachers(list(tasks), teachers, MeanPolicy(MeanPolicy.Params()))
    online = OnlineTargets(teachers, tasks, routes, tau, use_labels=False)
    device = torch.device("cpu")
    params = TrainingParams(batch_size=args.batch, epochs=1, early_stopping=None)
    loss = KDLoss(KDLoss.Params())

    print(f"{len(train)} training images at 64 px, batch {args.batch}, student small_cnn, "
          f"{len(teachers)} teachers, {torch.get_num_threads()} threads")
    tmp = Path(tempfile.mkdtemp(prefix="distillkit-bench-"))
    caches = {}
    for storage in ("fp32", "fp16", "topk"):
        out = TeacherOutputParams(storage=storage, topk=8)
        started = time.perf_counter()
        caches[storage] = build_or_load_cache(online, train, tmp / storage, out, 256, device)
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in (tmp / storage).glob("shard-*.safetensors"))
        print(f"cache {storage:>4}: built in {seconds:.1f}s ({seconds / len(train) * 1000:.1f}s per 1,000 images), "
              f"{size / len(train) * 1000 / 2**20:.2f} MiB per 1,000 images")

    def epoch(kind: str) -> float:
        torch.manual_seed(0)
        model = build_student(config.student, tasks, registries)
        timer = StepTimer()
        kw = {}
        if kind == "cache":
            kw = dict(use_labels=False, soft_targets=caches["fp16"], alpha=1.0, tau=tau)
        elif kind == "online":
            kw = dict(use_labels=False, soft_targets=online, alpha=1.0, tau=tau)
        with tempfile.TemporaryDirectory() as work:
            # validation runs after the epoch's steps and is not part of the step times
            fit(model, tasks, loss, train, val, params, device=device, seed=0, workdir=Path(work),
                callbacks=timer, **kw)
        return timer.per_step()

    times = {"plain": [], "cache": [], "online": []}
    for _ in range(args.rounds):
        for kind in times:
            times[kind].append(epoch(kind))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>6}: {v * 1e3:.1f} ms/step (median of {args.rounds})")
    print(f"ratio cached 7-teacher distillation / plain training: {med['cache'] / med['plain']:.3f} (goal <= 1.05)")
    print(f"ratio online 7-teacher distillation / plain training: {med['online'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
