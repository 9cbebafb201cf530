"""Teacher routing, aggregation, the ensemble identity, and the teacher-output cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillkit.builtin.classification import ClassificationParams, ClassificationTask
from distillkit.builtin.components import (MeanParams, MeanPolicy, MLPEncoder, MLPParams, MultiTaskStudent,
                                           ValScoreParams, ValScorePolicy)
from distillkit.data import Batch, SplitData
from distillkit.errors import DistillkitError
from distillkit.interfaces import Encoder, Student, Teacher
from distillkit.losses import kl_rows
from distillkit.teacher_targets import (OnlineTargets, TeacherOutputParams, build_or_load_cache, cache_key,
                                        route_teachers)

IN = 4
TAU = {"a": 2.0, "b": 1.5}


def _tasks():
    a = ClassificationTask("a", ClassificationParams(hidden=0))
    a.fit(["a0", "a1", "a2"])
    b = ClassificationTask("b", ClassificationParams(hidden=5))
    b.fit([f"b{i}" for i in range(8)])  # 8 classes: room for top-k storage to drop mass
    return {"a": a, "b": b}


def _teacher(name, tasks, task_names, seed, scores=None, checksum=None):
    torch.manual_seed(seed)
    model = MultiTaskStudent(MLPEncoder(MLPParams(in_features=IN, hidden=6, depth=1)),
                             {t: tasks[t] for t in task_names})
    # Larger weights give peaked, clearly different teachers.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return Teacher(name=name, model=model, tasks=frozenset(task_names), scores=dict(scores or {}),
                   checksum=checksum or f"sum-{name}")


@pytest.fixture
def setup():
    tasks = _tasks()
    teachers = [_teacher("only_a", tasks, ["a"], 1), _teacher("only_b", tasks, ["b"], 2),
                _teacher("both", tasks, ["a", "b"], 3)]
    return tasks, teachers


def _probs(teacher: Teacher, task: str, x: torch.Tensor, tau: float) -> torch.Tensor:
    """A teacher's tempered distribution, computed without the code under test."""
    with torch.no_grad():
        logits = teacher.model.heads[task](teacher.model.encoder(x))
    return F.softmax(logits.double() / tau, dim=-1)


def _split(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SplitData("unlabeled", np.arange(100, 100 + n), torch.randn(n, IN, generator=g) * 2)


def _all_rows(split):
    return Batch(torch.arange(len(split)), split.inputs, None)


# -- routing and policies ------------------------------------------------------------------

def test_each_task_is_routed_only_to_teachers_that_learned_it(setup):
    tasks, teachers = setup
    routes = route_teachers(["a", "b"], teachers, MeanPolicy(MeanParams()))
    assert routes["a"].teachers == [0, 2]
    assert routes["b"].teachers == [1, 2]
    assert routes["a"].weights == [0.5, 0.5]
    assert routes["b"].weights == [0.5, 0.5]


def test_a_task_no_teacher_learned_is_a_user_error(setup):
    _, teachers = setup
    with pytest.raises(DistillkitError, match="no teacher learned task 'c'") as info:
        route_teachers(["a", "c"], teachers, MeanPolicy(MeanParams()), where="stages.m3.teachers")
    assert info.value.where == "stages.m3.teachers"


def test_val_score_weights_are_proportional_to_scores(setup):
    tasks, _ = setup
    teachers = [_teacher("t0", tasks, ["a"], 1, scores={"a": 0.8}),
                _teacher("t1", tasks, ["a"], 2, scores={"a": 0.4}),
                _teacher("t2", tasks, ["a"], 3, scores={"a": 0.2})]
    assert ValScorePolicy(ValScoreParams()).weights("a", teachers) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    # score ** power
    assert ValScorePolicy(ValScoreParams(power=2)).weights("a", teachers) == pytest.approx([16 / 21, 4 / 21, 1 / 21])
    # a teacher without a score keeps the floor's weight
    unknown = [teachers[0], _teacher("t3", tasks, ["a"], 4)]
    assert ValScorePolicy(ValScoreParams(floor=0.2)).weights("a", unknown) == pytest.approx([0.8, 0.2])
    routes = route_teachers(["a"], teachers, ValScorePolicy(ValScoreParams()))
    assert routes["a"].weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])


# -- online targets ------------------------------------------------------------------------

def test_online_target_is_the_mean_of_routed_teachers_tempered_probs(setup):
    tasks, teachers = setup
    routes = route_teachers(["a", "b"], teachers, MeanPolicy(MeanParams()))
    online = OnlineTargets(teachers, tasks, routes, TAU, use_labels=False)
    x = _split(9).inputs
    out = online(Batch(torch.arange(9), x, None))
    expected_a = (_probs(teachers[0], "a", x, 2.0) + _probs(teachers[2], "a", x, 2.0)) / 2
    expected_b = (_probs(teachers[1], "b", x, 1.5) + _probs(teachers[2], "b", x, 1.5)) / 2
    assert torch.allclose(out["a"]["probs"].double(), expected_a, atol=1e-6)
    assert torch.allclose(out["b"]["probs"].double(), expected_b, atol=1e-6)
    assert not out["a"]["probs"].requires_grad
    # The teachers disagree, so the mean is not any one of them.
    assert (expected_b - _probs(teachers[1], "b", x, 1.5)).abs().max() > 0.05


def test_online_target_uses_the_policy_weights(setup):
    tasks, _ = setup
    teachers = [_teacher("t0", tasks, ["b"], 1, scores={"b": 0.9}), _teacher("t1", tasks, ["b"], 2, scores={"b": 0.3})]
    routes = route_teachers(["b"], teachers, ValScorePolicy(ValScoreParams()))
    online = OnlineTargets(teachers, {"b": tasks["b"]}, routes, TAU, use_labels=False)
    x = _split(5).inputs
    out = online(Batch(torch.arange(5), x, None))["b"]["probs"]
    expected = 0.75 * _probs(teachers[0], "b", x, 1.5) + 0.25 * _probs(teachers[1], "b", x, 1.5)
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_ensemble_trick_sum_of_kls_has_k_times_the_mean_targets_gradient(setup):
    """sum_k KL(p_k || q) and K * KL(mean_k p_k || q) differ by a constant: same student gradient."""
    tasks, _ = setup
    teachers = [_teacher(f"t{k}", tasks, ["b"], 10 + k) for k in range(4)]
    K, tau = len(teachers), 1.5
    routes = route_teachers(["b"], teachers, MeanPolicy(MeanParams()))
    x = _split(6).inputs
    mean_p = OnlineTargets(teachers, {"b": tasks["b"]}, routes, {"b": tau}, False)(
        Batch(torch.arange(6), x, None))["b"]["probs"]
    each_p = [_probs(t, "b", x, tau).float() for t in teachers]
    torch.manual_seed(7)
    constants = []
    for trial in range(3):
        z = (torch.randn(6, 8) * 2).requires_grad_(True)
        summed = sum(kl_rows(z, p, tau).sum() for p in each_p)
        g_sum, = torch.autograd.grad(summed, z)
        to_mean = kl_rows(z, mean_p, tau).sum()
        g_mean, = torch.autograd.grad(to_mean, z)
        assert torch.allclose(g_sum, K * g_mean, atol=1e-6)
        constants.append(summed.item() - K * to_mean.item())
    # The difference does not depend on the student: sum_k -H(p_k) + K H(mean p).
    entropy = lambda p: -(p * p.log()).sum()  # noqa: E731
    expected = sum(-entropy(p.double()) for p in each_p) + K * entropy(mean_p.double())
    assert constants == pytest.approx([expected.item()] * 3, abs=1e-4)


# -- the teacher is frozen -----------------------------------------------------------------

class _NormEncoder(Encoder):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5))
        self.out_features = 6

    def forward(self, x):
        return self.net(x.float())


def test_teacher_keeps_weights_and_batchnorm_statistics(setup):
    tasks, _ = setup
    torch.manual_seed(0)
    model = Student(_NormEncoder(), {"b": tasks["b"]})
    with torch.no_grad():  # non-trivial running statistics
        model.encoder.net[1].running_mean.uniform_(-1, 1)
        model.encoder.net[1].running_var.uniform_(0.5, 2)
    teacher = Teacher("bn", model, frozenset({"b"}), checksum="bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # e.g. a student sharing modules switched it to training mode
    assert model.training
    online = OnlineTargets([teacher], {"b": tasks["b"]}, route_teachers(["b"], [teacher], MeanPolicy(MeanParams())),
                           TAU, use_labels=False)
    split = _split(16)
    first = [online(Batch(torch.arange(i, i + 8), split.inputs[i:i + 8], None))["b"]["probs"] for i in (0, 8)]
    model.train()
    again = [online(Batch(torch.arange(i, i + 8), split.inputs[i:i + 8], None))["b"]["probs"] for i in (0, 8)]
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert int(after["encoder.net.1.num_batches_tracked"]) == 0
    assert all(not p.requires_grad for p in model.parameters())
    # Eval mode: no dropout, statistics from the running buffers, so outputs are deterministic ...
    for f, g in zip(first, again):
        assert torch.equal(f, g)
    # ... and equal to an eval-mode forward computed by hand.
    bn = model.encoder.net[1]
    h = model.encoder.net[0](split.inputs[:8])
    h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    expected = F.softmax(model.heads["b"](h.relu()) / TAU["b"], -1)
    assert torch.allclose(first[0], expected, atol=1e-6)


# -- the cache -----------------------------------------------------------------------------

@pytest.fixture
def online(setup):
    tasks, teachers = setup
    routes = route_teachers(["a", "b"], teachers, MeanPolicy(MeanParams()))
    return OnlineTargets(teachers, tasks, routes, TAU, use_labels=False)


@pytest.fixture
def calls(monkeypatch):
    """Counts the teacher forward passes of every OnlineTargets."""
    count = {"n": 0}
    original = OnlineTargets.__call__

    def counting(self, batch):
        count["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(OnlineTargets, "__call__", counting)
    return count


def _build(online, split, directory, **kw):
    params = TeacherOutputParams(**{"shard_size": 10, **kw})
    return build_or_load_cache(online, split, directory, params, batch_size=4, device=torch.device("cpu"))


def test_fp32_cache_equals_online_targets(online, tmp_path):
    split = _split()
    cached = _build(online, split, tmp_path / "c", storage="fp32")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["rows"] == 23 and index["num_classes"] == {"a": 3, "b": 8}
    assert len(index["shards"]) >= 2 and sum(s["rows"] for s in index["shards"]) == 23  # shard_size 10
    expected = online(_all_rows(split))
    # any order of rows: the cache is keyed by position in the split
    idx = torch.tensor([22, 0, 5, 13, 7])
    got = cached(Batch(idx, split.inputs[idx], None))
    for task in ("a", "b"):
        assert torch.allclose(got[task]["probs"], expected[task]["probs"][idx], atol=1e-6)


def test_fp16_cache_is_within_1e3(online, tmp_path):
    split = _split()
    cached = _build(online, split, tmp_path / "c", storage="fp16")
    expected = online(_all_rows(split))
    got = cached(_all_rows(split))
    for task in ("a", "b"):
        assert (got[task]["probs"] - expected[task]["probs"]).abs().max() <= 1e-3
        assert torch.allclose(got[task]["probs"].sum(-1), torch.ones(len(split)), atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_cache_error_is_bounded_by_the_dropped_mass(online, tmp_path, k):
    split = _split()
    cached = _build(online, split, tmp_path / "c", storage="topk", topk=k)
    exact = online(_all_rows(split))["b"]["probs"]
    approx = cached(_all_rows(split))["b"]["probs"]
    # r: the mass outside each row's k largest probabilities, computed independently
    dropped = 1.0 - exact.double().sort(-1, descending=True).values[:, :k].sum(-1)
    assert dropped.max() > 0.01  # the bound is being exercised
    l1 = (approx.double() - exact.double()).abs().sum(-1)
    assert (l1 <= 2 * dropped + 1e-6).all(), (l1 - 2 * dropped).max()
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["max_dropped_mass"] == pytest.approx(dropped.max().item(), abs=1e-6)
    # The KD gradient w.r.t. the student's logits, (q - p) / tau, moves by at most 2r / tau in L1.
    tau = TAU["b"]
    z = torch.randn(len(split), 8, requires_grad=True)
    g_exact, = torch.autograd.grad(kl_rows(z, exact, tau).sum(), z)
    g_approx, = torch.autograd.grad(kl_rows(z, approx, tau).sum(), z)
    g_err = (g_exact - g_approx).double().abs().sum(-1)
    assert (g_err <= 2 * dropped / tau + 1e-6).all()
    # the classes that were kept are stored at their own value
    top = exact.topk(k, -1).indices
    assert torch.allclose(approx.gather(-1, top), exact.gather(-1, top), atol=1e-7)


def test_topk_bound_holds_when_almost_no_mass_is_dropped():
    """The documented L1 <= 2r must also hold for a confident teacher (r close to 0)."""
    from distillkit.teacher_targets import _compress, _decompress

    exact = torch.tensor([[0.59990, 0.40005, 0.00005, 0.0], [0.33331, 0.33331, 0.33331, 0.00007]])
    stored = _decompress(_compress(exact, "topk", 2), "topk", 4)
    dropped = 1.0 - exact.double().sort(-1, descending=True).values[:, :2].sum(-1)
    l1 = (stored.double() - exact.double()).abs().sum(-1)
    assert (l1 <= 2 * dropped + 1e-6).all(), (l1, 2 * dropped)


def test_cache_is_reused_on_a_second_build(online, tmp_path, calls):
    split = _split()
    first = _build(online, split, tmp_path / "c", storage="fp16")
    assert calls["n"] == 6  # 23 rows in batches of 4
    second = _build(online, split, tmp_path / "c", storage="fp16")
    assert calls["n"] == 6
    for task in ("a", "b"):
        assert torch.equal(first(_all_rows(split))[task]["probs"], second(_all_rows(split))[task]["probs"])


def test_corrupted_shard_is_rebuilt(online, tmp_path, calls):
    split = _split()
    expected = _build(online, split, tmp_path / "c", storage="fp32")(_all_rows(split))
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\xff" * 8  # damage tensor bytes (the header stays readable)
    shard.write_bytes(bytes(data))
    calls["n"] = 0
    rebuilt = _build(online, split, tmp_path / "c", storage="fp32")
    assert calls["n"] == 6
    for task in ("a", "b"):
        assert torch.equal(rebuilt(_all_rows(split))[task]["probs"], expected[task]["probs"])


def test_missing_index_is_rebuilt(online, tmp_path, calls):
    split = _split()
    _build(online, split, tmp_path / "c", storage="fp32")
    (tmp_path / "c" / "index.json").unlink()
    calls["n"] = 0
    _build(online, split, tmp_path / "c", storage="fp32")
    assert calls["n"] == 6
    assert (tmp_path / "c" / "index.json").exists()


def test_truncated_shard_and_other_storage_are_rebuilt(online, tmp_path, calls):
    split = _split()
    _build(online, split, tmp_path / "c", storage="fp32")
    shard = tmp_path / "c" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    calls["n"] = 0
    _build(online, split, tmp_path / "c", storage="fp32")
    assert calls["n"] == 6
    calls["n"] = 0
    cached = _build(online, split, tmp_path / "c", storage="topk", topk=2)  # same folder, other storage
    assert calls["n"] == 6
    assert cached.storage == "topk"


def test_cache_key_tracks_teachers_tau_and_storage(setup):
    tasks, teachers = setup
    routes = route_teachers(["a", "b"], teachers, MeanPolicy(MeanParams()))
    split = _split()
    fp16 = TeacherOutputParams(storage="fp16")

    def key(ts=teachers, tau=TAU, params=fp16, sp=split, labels=False, data="d0"):
        return cache_key(ts, routes, tau, labels, sp, data, params)

    base = key()
    assert key() == base  # deterministic
    assert len(base) == 20
    changed = [_teacher("both", tasks, ["a", "b"], 3, checksum="another-checkpoint")]
    assert key(ts=teachers[:2] + changed) != base
    assert key(tau={"a": 2.0, "b": 1.0}) != base
    assert key(params=TeacherOutputParams(storage="fp32")) != base
    assert key(params=TeacherOutputParams(storage="topk", topk=4)) != key(params=TeacherOutputParams(storage="topk"))
    # topk only matters for top-k storage; the shard size never does
    assert key(params=TeacherOutputParams(storage="fp16", topk=4, shard_size=7)) == base
    assert key(labels=True) != base
    assert key(data="d1") != base
    assert key(sp=SplitData("unlabeled", np.arange(23), split.inputs)) != base
    scored = [_teacher(t.name, tasks, sorted(t.tasks), 0, scores={"a": 0.9, "b": 0.9}, checksum=t.checksum)
              for t in teachers]
    scored[2].scores = {"a": 0.3, "b": 0.3}
    weighted = route_teachers(["a", "b"], scored, ValScorePolicy(ValScoreParams()))
    assert cache_key(scored, routes, TAU, False, split, "d0", fp16) == base  # same checksums, same routes
    assert cache_key(scored, weighted, TAU, False, split, "d0", fp16) != base  # other teacher weights
