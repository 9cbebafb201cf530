"""What the frozen-feature cache buys: one training epoch above a frozen encoder.

On the same student (default: the eye plugin's resnet18 with ``freeze: all`` at 128 px), data,
batches and seed, one epoch of M1-style supervised training
  * on the cached output of the frozen part (``training.feature_cache: fp32``),
  * running the frozen part on every batch (``feature_cache: off``),
rounds alternating; prints the time of each epoch's steps (validation excluded), their
ratio, and the one-time extraction (the frozen part over the training split).

    python -m benchmarks.feature_cache [--encoder resnet18] [--freeze all] [--image-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import StepTimer, eye_setup
from distillkit.feature_cache import FeatureCache, reading_features
from distillkit.losses import KDLoss
from distillkit.models import build_student
from distillkit.training import TrainingParams, fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--freeze", default="all", help="all, or the name of the last frozen block")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--tasks", default="broad,fine,text", help="comma-separated, of broad, fine, text")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a shared machine: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    freeze = "all" if args.freeze == "all" else {"until": args.freeze}
    registries, config, tasks, splits = eye_setup(args.patients, args.image_size,
                                                  encoder={"kind": args.encoder, "freeze": freeze})
    tasks = {name: tasks[name] for name in args.tasks.split(",")}
    train, val = splits["train"], splits["val"]
    device = torch.device("cpu")
    params = TrainingParams(batch_size=args.batch, epochs=1, early_stopping=None)
    loss = KDLoss(KDLoss.Params())

    def student():
        torch.manual_seed(0)
        return build_student(config.student, tasks, registries)

    print(f"{len(train)} training images at {args.image_size} px, batch {args.batch}, encoder {args.encoder} "
          f"with freeze {args.freeze}, tasks {args.tasks}, {torch.get_num_threads()} threads")
    tmp = Path(tempfile.mkdtemp(prefix="distillkit-bench-"))
    model = student()
    started = time.perf_counter()
    cache = FeatureCache(tmp / "features", "bench", batch_size=64)
    views = {name: cache.view(model.encoder, split) for name, split in (("train", train), ("val", val))}
    seconds = time.perf_counter() - started
    print(f"extraction (train + val, {len(train) + len(val)} images, once): {seconds:.1f}s, "
          f"{(len(train) + len(val)) / seconds:.1f} images/s; features {tuple(views['train'].inputs.shape[1:])}")

    def epoch(kind: str) -> float:
        model = student()
        timer = StepTimer()
        with tempfile.TemporaryDirectory() as work, reading_features([model] if kind == "cached" else []):
            data = views if kind == "cached" else {"train": train, "val": val}
            fit(model, tasks, loss, data["train"], data["val"], params, device=device, seed=0, workdir=Path(work),
                callbacks=timer)
        return timer.epoch()

    times: dict[str, list[float]] = {"cached": [], "frozen encoder": []}
    for _ in range(args.rounds):
        for kind in times:
            times[kind].append(epoch(kind))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>14}: {v:.2f}s per epoch of steps, {len(train) / v:.0f} images/s (median of {args.rounds})")
    print(f"ratio frozen encoder / cached features: {med['frozen encoder'] / med['cached']:.1f} (goal >= 20)")


if __name__ == "__main__":
    main()
