"""Data parallelism under torchrun: two gloo ranks give one process's gradients, metrics and files.

The unit checks run in two processes started with ``torch.multiprocessing`` (one start for
all of them); the end-to-end ones start ``python -m torch.distributed.run`` or
``distillkit run --nproc 2`` on the toy config.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from distillkit import distributed
from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import MLPEncoder, MLPParams, MultiTaskParams, MultiTaskStudent
from distillkit.cli import cli
from distillkit.cli.run import _check_same_config
from distillkit.data import SplitData
from distillkit.errors import DistillkitError
from distillkit.feature_cache import FeatureCache, freeze_encoder
from distillkit.losses import KDLoss, KDLossParams
from distillkit.plugins import PluginManager, set_plugin_manager
from distillkit.runner import RunLock, Runner
from distillkit.teacher_targets import TeacherOutputParams, build_or_load_cache
from distillkit.training import OptimizerParams, TrainingParams, _resume, evaluate, fit, forward_tasks
from tests.conftest import REPO, toy_config, write_config

IN = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tasks():
    a = ClassificationTask("a", ClassificationParams(hidden=8))
    a.fit(["a0", "a1", "a2"])
    b = ClassificationTask("b", ClassificationParams(hidden=0, weight=0.5))
    b.fit(["b0", "b1", "b2", "b3"])
    return {"a": a, "b": b}


def _student(tasks, dtype=torch.float32):
    torch.manual_seed(0)
    model = MultiTaskStudent.build(MultiTaskParams(encoder=MLPParams(in_features=IN, hidden=16, depth=2)), tasks,
                                   PluginManager(autoload=False).registries)
    return model.to(dtype)


def _split(tasks, n, seed, dtype=torch.float32, missing_b=()):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, IN))).to(dtype)
    labels_a = [f"a{i}" for i in rng.integers(0, 3, n)]
    labels_b = [None if i in missing_b else f"b{j}" for i, j in enumerate(rng.integers(0, 4, n))]
    return SplitData("train", np.arange(n), x, {"a": tasks["a"].encode(labels_a), "b": tasks["b"].encode(labels_b)})


def _gradients(model, tasks, inputs, targets, soft, alpha):
    """The gradient of the KD loss on these rows, every parameter flattened."""
    model.zero_grad(set_to_none=True)
    loss, _ = KDLoss(KDLossParams())(tasks, forward_tasks(model, tasks, inputs, targets, soft, True),
                                     targets, soft, alpha, {"a": 2.0, "b": 2.0})
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _rows(part, lo, hi):
    return {t: {k: v[lo:hi] for k, v in d.items()} for t, d in part.items()}


class _FakeTeacher:
    """Soft targets that are a fixed function of the inputs: what OnlineTargets gives the cache."""

    use_labels = False

    def __init__(self, tasks):
        self.tasks = tasks
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        x = batch.inputs.float()
        return {"a": {"probs": torch.softmax(x[:, :3] * 2, -1)}, "b": {"probs": torch.softmax(x[:, 1:5], -1)}}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    tasks = _tasks()
    out: dict = {}
    # -- references, computed by this process alone before the group exists --------------------
    # float64 batch of 7 rows (shards of 4 and 3), labels of task b missing on 3 of them (the
    # hard term's denominator differs per shard), and soft targets (the KL's batch mean)
    data = _split(tasks, 7, seed=1, dtype=torch.float64, missing_b=(0, 1, 5))
    gen = torch.Generator().manual_seed(3)
    soft = {t: {"probs": torch.softmax(torch.randn(7, n, generator=gen, dtype=torch.float64), -1)}
            for t, n in (("a", 3), ("b", 4))}
    model64 = _student(tasks, torch.float64)
    full_loss, full_grads = _gradients(model64, tasks, data.inputs, data.targets, soft, 0.7)
    one_loss, one_grads = _gradients(model64, tasks, data.inputs[:1], _rows(data.targets, 0, 1),
                                     _rows(soft, 0, 1), 0.7)
    val = _split(tasks, 50, seed=2)
    trained = _student(tasks)
    params = TrainingParams(optimizer=OptimizerParams(kind="sgd", lr=0.1, momentum=0.9), batch_size=7,
                            eval_batch_size=8, epochs=2, early_stopping=None)
    train = _split(tasks, 45, seed=4, missing_b=(3, 10, 11))  # 45 = 6 x 7 + 3: an uneven last batch
    fit(trained, tasks, KDLoss(KDLossParams()), train, val, params, device=torch.device("cpu"), seed=0,
        workdir=folder / f"alone-{rank}", stage="s")
    reference = evaluate(trained, tasks, val, 8, torch.device("cpu"), KDLoss(KDLossParams()))

    # a BatchNorm model, float64: normalising with the global batch's statistics
    torch.manual_seed(5)
    bn_model = torch.nn.Sequential(torch.nn.Linear(IN, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 3)).double()
    bn_x = torch.randn(7, IN, dtype=torch.float64, generator=gen)
    bn_model.train()
    (bn_model(bn_x).tanh().sum(1).sum() / 7).backward()
    bn_full = [p.grad.clone() for p in bn_model.parameters()]
    bn_stats = [bn_model[1].running_mean.clone(), bn_model[1].running_var.clone()]
    bn_model.zero_grad(set_to_none=True)
    bn_model[1].reset_running_stats()

    # the teacher-output cache of a split of 45 rows in batches of 8, shards of 16 rows
    cache_split = _split(tasks, 45, seed=6)
    cache_params = TeacherOutputParams(storage="topk", topk=2, shard_size=16)
    teacher = _FakeTeacher(tasks)
    alone_cache = build_or_load_cache(teacher, cache_split, folder / f"cache-alone-{rank}", cache_params, 8,
                                      torch.device("cpu"))

    # the frozen-feature cache of the same split: an MLP encoder frozen up to its first block
    torch.manual_seed(7)
    frozen = MLPEncoder(MLPParams(in_features=IN, hidden=6, depth=2, freeze={"until": "layer1"}))
    freeze_encoder(frozen)
    frozen_calls = [0]
    forward_frozen = frozen.forward_frozen

    def counted(inputs):
        frozen_calls[0] += 1
        return forward_frozen(inputs)

    frozen.forward_frozen = counted
    alone_features = FeatureCache(folder / f"features-alone-{rank}", "data", batch_size=8).view(frozen, cache_split)

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        # -- the gradient of the shards, summed, is the full batch's --------------------------
        lo, hi = distributed.shard_bounds(7)
        with distributed.global_batch():
            share, grads = _gradients(model64, tasks, data.inputs[lo:hi], _rows(data.targets, lo, hi),
                                      _rows(soft, lo, hi), 0.7)
        distributed.all_reduce_gradients(list(model64.parameters()))
        grads = [p.grad for p in model64.parameters()]
        out["grad_error"] = max(float((g - f).abs().max()) for g, f in zip(grads, full_grads))
        out["loss_error"] = abs(float(distributed.all_reduce_sum(share) - full_loss))
        # one row for two ranks: rank 1's shard is empty
        lo, hi = distributed.shard_bounds(1)
        with distributed.global_batch():
            _gradients(model64, tasks, data.inputs[lo:hi], _rows(data.targets, lo, hi), _rows(soft, lo, hi), 0.7)
        distributed.all_reduce_gradients(list(model64.parameters()))
        out["one_row_grad_error"] = max(float((p.grad - f).abs().max()) for p, f in zip(model64.parameters(),
                                                                                         one_grads))
        lo, hi = distributed.shard_bounds(7)
        with distributed.global_batch(), distributed.global_batch_norm(bn_model):
            (bn_model(bn_x[lo:hi]).tanh().sum(1).sum() / distributed.batch_total(hi - lo)).backward()
        distributed.all_reduce_gradients(list(bn_model.parameters()))
        out["bn_grad_error"] = max(float((p.grad - f).abs().max()) for p, f in zip(bn_model.parameters(), bn_full))
        out["bn_stats_error"] = max(float((a - b).abs().max()) for a, b in
                                    zip([bn_model[1].running_mean, bn_model[1].running_var], bn_stats))
        out["bn_forward_restored"] = "forward" not in vars(bn_model[1])
        out["shards_of_7"] = distributed.shard_bounds(7)
        # -- the teacher-output cache: batches computed in turn, written once by rank 0 -------
        teacher.calls = 0
        shared_cache = build_or_load_cache(teacher, cache_split, folder / "cache-shared", cache_params, 8,
                                           torch.device("cpu"))
        out["cache_batches_here"] = teacher.calls
        out["cache_equal"] = all(torch.equal(shared_cache.tensors[t][k], alone_cache.tensors[t][k])
                                 for t in alone_cache.tensors for k in alone_cache.tensors[t])
        # -- the frozen-feature cache: the same, batches in turn, written once by rank 0 -------
        frozen_calls[0] = 0
        shared_features = FeatureCache(folder / "features-shared", "data", batch_size=8).view(frozen, cache_split)
        out["feature_batches_here"] = frozen_calls[0]
        out["features_equal"] = torch.equal(shared_features.inputs, alone_features.inputs)
        out["features_rows"] = len(shared_features.inputs)
        out["gathered_rows"] = distributed.all_gather_rows(torch.arange(rank + 2)).tolist()
        # -- evaluation: the batches shared out, the metrics exactly one process's -----------
        out["evaluate_equal"] = evaluate(trained, tasks, val, 8, torch.device("cpu"),
                                         KDLoss(KDLossParams())) == reference
        # -- training: two ranks end with (nearly) the weights of one process ----------------
        together = _student(tasks)
        fit(together, tasks, KDLoss(KDLossParams()), train, val, params, device=torch.device("cpu"), seed=0,
            workdir=folder / "together", stage="s")
        out["fit_weight_error"] = max(float((a - b).abs().max()) for a, b in
                                      zip(together.state_dict().values(), trained.state_dict().values()))
        # each rank resumes its own random state (dropout masks), not rank 0's
        ended = torch.get_rng_state()
        torch.manual_seed(123)
        resumed = _student(tasks)
        optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1)
        _resume(folder / "together" / "last.safetensors", folder / "unused.jsonl", resumed, optimizer, None,
                torch.amp.GradScaler("cpu", enabled=False))
        out["rng_resumed"] = torch.equal(torch.get_rng_state(), ended)
        # -- the run lock: rank 0 takes it; held elsewhere, every rank stops with its message --
        locked = folder / "locked"
        locked.mkdir(exist_ok=True)
        holder = RunLock(locked).__enter__() if rank == 1 else None  # another process holds it
        distributed.barrier()
        try:
            Runner(None, None, locked).run()
        except DistillkitError as exc:
            out["lock"] = [type(exc).__name__, exc.message]
        distributed.barrier()
        if holder is not None:
            holder.__exit__(None, None, None)
        # -- ranks that resolved different configs stop before anything is written --------------
        class Config:
            file = "config.yaml"

            def resolved(self):
                return {"seed": 0, "training": {"epochs": 3 + rank}}  # as if rank 1 read an edited file

        try:
            _check_same_config(Config(), folder / "run")
        except DistillkitError as exc:
            out["mismatch"] = exc.message
        # -- an error on one rank stops every rank, with its message --------------------------
        try:
            distributed.raise_if_any(DistillkitError("bad thing on rank 1") if rank == 1 else None)
        except DistillkitError as exc:
            out["error"] = [type(exc).__name__, exc.message]
    finally:
        torch.distributed.destroy_process_group()
    (folder / f"rank{rank}.json").write_text(json.dumps(out))


def test_two_ranks_give_one_process_gradients_metrics_and_weights(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, out in enumerate(ranks):
        # float64: the summed shard gradients equal the full batch's to rounding
        assert out["grad_error"] < 1e-12, r
        # the loss itself is computed in fp32 (losses.py): its shares add up to fp32 rounding
        assert out["loss_error"] < 1e-6, r
        assert out["one_row_grad_error"] < 1e-12, r
        # BatchNorm over the global batch: the gradient and running statistics of one process
        assert out["bn_grad_error"] < 1e-12 and out["bn_stats_error"] < 1e-12, r
        assert out["bn_forward_restored"] is True, r
        assert out["evaluate_equal"] is True, r
        # float32 over 14 SGD steps, shards summed in another order than one batch: rounding only
        assert out["fit_weight_error"] < 1e-5, r
        assert out["rng_resumed"] is True, r
    assert [ranks[0]["shards_of_7"], ranks[1]["shards_of_7"]] == [[0, 4], [4, 7]]
    # 6 batches of 8 rows shared out: 3 each; the cache equals one process's, bit for bit
    assert [out["cache_batches_here"] for out in ranks] == [3, 3]
    assert ranks[0]["cache_equal"] is True and ranks[1]["cache_equal"] is True
    assert sorted(p.name for p in (tmp_path / "cache-shared").iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # the frozen features likewise: 3 batches each, one process's features, one cache folder
    assert [out["feature_batches_here"] for out in ranks] == [3, 3]
    assert all(out["features_equal"] is True and out["features_rows"] == 45 for out in ranks)
    [entry] = (tmp_path / "features-shared").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["index.json", "shard-00000.safetensors"]
    assert ranks[0]["gathered_rows"] == [0, 1, 0, 1, 2] == ranks[1]["gathered_rows"]
    assert ranks[1]["error"] == ["DistillkitError", "bad thing on rank 1"]
    assert ranks[0]["mismatch"] == ranks[1]["mismatch"]
    assert "resolved different configs or run directories: rank 1 differs from rank 0" in ranks[0]["mismatch"]
    assert ranks[0]["lock"][0] == "DistillkitError" and ranks[1]["lock"][0] == "PeerFailed"
    assert "another distillkit run" in ranks[0]["lock"][1] and "another distillkit run" in ranks[1]["lock"][1]
    assert ranks[0]["error"][0] == "PeerFailed" and "bad thing on rank 1" in ranks[0]["error"][1]
    # rank 0 alone wrote the training files
    assert sorted(p.name for p in (tmp_path / "together").iterdir()) == ["best.safetensors", "last.safetensors",
                                                                        "log.jsonl"]
    from distillkit.checkpoint import load_tensors

    tensors, _ = load_tensors(tmp_path / "together" / "last.safetensors")
    assert "rng.torch.1" in tensors and not torch.equal(tensors["rng.torch"], tensors["rng.torch.1"])


def test_shard_bounds_cover_every_row_once():
    for rows in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard_bounds(rows, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_no_group_without_torchrun():
    assert distributed.world_from_env({}) is None
    assert distributed.world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert distributed.world_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == \
        distributed.World(1, 2, 1)
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.arange(3.0)
    assert distributed.batch_total(x) is x  # no collective, no copy
    with distributed.global_batch():
        assert distributed.batch_total(7) == 7
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"


# -- the command line --------------------------------------------------------------------------

def _env(tmp_path: Path, audit: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]), OMP_NUM_THREADS="1",
               DISTILLKIT_CACHE=str(tmp_path / "cache"))
    if audit:  # every file a rank other than 0 opens for writing is logged (tests/core/dist_audit)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "dist_audit"), env["PYTHONPATH"]])
        env["DISTILLKIT_AUDIT_LOG"] = str(tmp_path / "audit")
    return env


def _toy(tmp_path: Path, **training) -> Path:
    config = toy_config()
    config["training"].update(training)
    return write_config(tmp_path, config)


def _largest_difference(a, b) -> float:
    if isinstance(a, dict):
        return max([_largest_difference(a[k], b[k]) for k in a if k in b] or [0.0])
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)):
        return abs(a - b)
    return 0.0


@pytest.mark.slow
def test_torchrun_killed_then_resumed_matches_one_process_and_only_rank0_writes(tmp_path):
    """Two gloo ranks under torchrun (the ensemble's teachers trained together), rank 0 killed
    by SIGKILL as it writes m1's second epoch checkpoint; the same command resumes and ends
    with one process's metrics, and rank 1 never wrote into the run directory."""
    config = toy_config()
    config["stages"]["teachers"]["together"] = True
    config = write_config(tmp_path, config)
    set_plugin_manager(None)
    alone = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "one"), "--quiet"])
    assert alone.exit_code == 0, alone.output
    out = tmp_path / "two"

    def torchrun(**env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), str(REPO / "tests" / "robustness" / "killpoint.py"), "run", str(config),
               "--out", str(out), "--quiet"]
        return subprocess.run(cmd, env={**_env(tmp_path, audit=True), **env}, capture_output=True, text=True,
                              timeout=300)

    killed = torchrun(DISTILLKIT_KILL_AT="stages/.work/m1-*/last.safetensors#2@after")
    assert killed.returncode != 0
    assert not (out / "stages" / "m1").exists() and (out / "stages" / "teachers").exists()
    done = torchrun()
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    # the same batches and gradients: only the order of floating-point sums differs
    assert _largest_difference(one, two) <= 0.01
    assert one["report"]["test"]["m3"]["cluster"]["confusion"] == two["report"]["test"]["m3"]["cluster"]["confusion"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(p.name for p in (tmp_path / "one" / "stages").iterdir())
    written = (tmp_path / "audit.rank1").read_text().split("\n") if (tmp_path / "audit.rank1").exists() else []
    assert [w for w in written if str(out) in w] == []
    assert any(str(out) in w for w in (tmp_path / "audit.rank0").read_text().split("\n"))
    assert done.stdout.count("test metrics (report)") == 1  # rank 0 alone prints the table


def test_nproc_beyond_the_batch_size_exits_2_before_anything_starts(tmp_path):
    config = _toy(tmp_path, batch_size=4)
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["run", str(config), "--out", str(tmp_path / "run"), "--nproc", "6"])
    assert result.exit_code == 2, result.output
    assert "training.batch_size: 4 rows per batch cannot be shared by 6 processes" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_nccl_without_cuda_exits_2(tmp_path):
    config = toy_config()
    config["device"] = "cuda"
    path = write_config(tmp_path, config)
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--nproc", "2"])
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output and "NCCL" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("codes, status", [({0: 2, 1: -15}, 2), ({1: 2, 0: -15}, 2), ({0: 2, 1: 2}, 2),
                                           ({0: -9, 1: -15}, 1), ({1: 1}, 1)])
def test_launcher_exit_status(monkeypatch, codes, status):
    """``--nproc``: a user error (exit 2, said by one rank while torchrun ended the others) is
    exit 2; a rank killed or crashed is 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.launcher import api

    from distillkit.cli.run import _launch

    def failing(config, entrypoint):
        def call(*args):
            raise ChildFailedError("distillkit", {r: ProcessFailure(r, 1000 + r, c, "") for r, c in codes.items()})
        return call

    monkeypatch.setattr(api, "elastic_launch", failing)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _launch(2, ["config.yaml"], debug=False) == status


def test_sweep_under_torchrun_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["sweep", str(REPO / "examples" / "toy_sweep.yaml"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert "a sweep runs in one process, not under torchrun" in result.output
    assert not (tmp_path / "s").exists()


def test_nproc_checks_the_plan_before_any_process_starts(tmp_path):
    config = toy_config()
    config["stages"]["m2"]["teachers"] = ["m1", "teacherz"]
    path = write_config(tmp_path, config)
    set_plugin_manager(None)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(tmp_path / "run"), "--nproc", "2"])
    assert result.exit_code == 2, result.output
    assert "refers to stage 'teacherz', which does not exist" in result.output
    assert not (tmp_path / "run").exists()
