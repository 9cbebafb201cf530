"""Per-step time of distillkit's training loop against a hand-written PyTorch loop.

Same model (MLP encoder + two classification heads), same data, same batches, same seed,
same optimizer. Rounds alternate between the two loops so that machine noise hits both;
the ratio of the median per-step times is printed (goal: <= 1.03).

    python -m benchmarks.loop_overhead [--rows 8192] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import StepTimer
from distillkit.builtin.classification import ClassificationTask
from distillkit.builtin.components import MLPEncoder, MultiTaskStudent
from distillkit.data import SplitParams, hash_seed, prepare_splits
from distillkit.builtin.toy import ToyBlobs
from distillkit.data import DataContext
from distillkit.losses import KDLoss
from distillkit.training import TrainingParams, fit


def build(dim: int, seed: int):
    torch.manual_seed(seed)
    tasks = {name: ClassificationTask(name, ClassificationTask.Params(hidden=256)) for name in ("cluster", "quadrant")}
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    source = ToyBlobs(ToyBlobs.Params(num_labeled=args.rows, num_unlabeled=0, dim=args.dim, missing=0.0),
                      DataContext(Path("."), Path(".")))
    dataset = source.load()
    tasks = build(args.dim, 0)
    splits = prepare_splits(dataset, SplitParams(val=0.01, test=0.01, train_fraction=0.98), tasks)
    train = splits["train"]
    encoder_params = MLPEncoder.Params(in_features=args.dim, hidden=512, depth=3)
    opt_params = TrainingParams.model_fields["optimizer"].default
    device = torch.device("cpu")

    def new_model():
        torch.manual_seed(0)
        return MultiTaskStudent(MLPEncoder(encoder_params), tasks)

    def distillkit_loop() -> float:
        model = new_model()
        timer = StepTimer()
        params = TrainingParams(batch_size=args.batch, epochs=1, early_stopping=None)
        with tempfile.TemporaryDirectory() as tmp:
            fit(model, tasks, KDLoss(KDLoss.Params()), train, splits["val"], params, device=device, seed=0,
                workdir=Path(tmp), callbacks=timer)
        return timer.per_step()

    def plain_loop() -> float:
        model = new_model()
        opt = torch.optim.SGD(model.parameters(), lr=opt_params.lr, momentum=opt_params.momentum,
                              nesterov=True, weight_decay=opt_params.weight_decay)
        gen = torch.Generator().manual_seed(hash_seed(0, 0))
        order = torch.randperm(len(train), generator=gen)
        ys = {t: train.targets[t]["y"] for t in tasks}
        stamps = [time.perf_counter()]
        model.train()
        for start in range(0, len(train), args.batch):
            idx = order[start:start + args.batch]
            x = train.inputs[idx]
            feats = model.encoder(x)
            loss = sum(F.cross_entropy(model.heads[t](feats), ys[t][idx]) for t in tasks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        return statistics.median(gaps)

    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(distillkit_loop())
        theirs.append(plain_loop())
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"rows {len(train)}, batch {args.batch}, MLP {args.dim}->512x3, 2 tasks, {args.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"distillkit loop : {a * 1e3:.3f} ms/step (median)")
    print(f"hand-written    : {b * 1e3:.3f} ms/step (median)")
    print(f"ratio distillkit / hand-written: {a / b:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
