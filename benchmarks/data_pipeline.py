"""Is the data pipeline ever the bottleneck? Images/s of batching vs. images/s of a training step.

The pipeline is what an epoch does per batch: gather rows of the uint8 image store, move them
(and the targets) to the device. The step is forward + backward + optimizer on the student.
Prints both rates and their ratio (goal: pipeline >= 3x step).

    python benchmarks/data_pipeline.py [--patients 300] [--encoder small_cnn]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import eye_setup
from distillkit.data import iterate_batches
from distillkit.losses import KDLoss
from distillkit.models import build_student
from distillkit.training import forward_tasks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--encoder", default="small_cnn")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    registries, config, tasks, splits = eye_setup(args.patients, args.size, {"kind": args.encoder})
    train = splits["train"]
    device = torch.device("cpu")

    started = time.perf_counter()
    seen = 0
    for epoch in range(5):
        for batch in iterate_batches(train, args.batch, shuffle=True, epoch=epoch, device=device):
            seen += len(batch.index)
    pipeline = seen / (time.perf_counter() - started)

    model = build_student(config.student, tasks, registries)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = KDLoss(KDLoss.Params())
    batches = list(iterate_batches(train, args.batch, shuffle=True, device=device))
    started = time.perf_counter()
    seen = 0
    for batch in batches:
        logits = forward_tasks(model, tasks, batch.inputs, batch.targets, None, train=True)
        loss, _ = loss_fn(tasks, logits, batch.targets, None, 0.0, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(batch.index)
    step = seen / (time.perf_counter() - started)
    print(f"{len(train)} images at {args.size} px, batch {args.batch}, encoder {args.encoder}, "
          f"tasks {', '.join(tasks)}, {torch.get_num_threads()} threads")
    print(f"data pipeline: {pipeline:,.0f} images/s")
    print(f"training step: {step:,.0f} images/s")
    print(f"ratio pipeline / step: {pipeline / step:.1f} (goal >= 3)")


if __name__ == "__main__":
    main()
