"""Data parallelism across processes started by ``torchrun`` (or ``distillkit run --nproc N``).

A run under torchrun has one process per rank. Every rank holds the whole in-memory dataset
and draws the same global batches in the same order as a single process would; each takes
its contiguous shard of every batch (:func:`shard_bounds`), and the gradients are summed
across ranks (:func:`all_reduce_gradients`). Losses divide by totals over the *global*
batch (:func:`batch_total`), so each rank's loss is its share of the single-process loss and
the summed gradient is the single-process gradient of the global batch, uneven shards
included. Rank 0 alone writes files; the others wait at barriers and read them.

Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) there is no process group: every helper
here returns at once (rank 0 of a world of one), and a single-process run does exactly what
it did before, at the same speed.

The backend is chosen from the run's device: NCCL for CUDA (one GPU per rank,
``cuda:LOCAL_RANK``), gloo for the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from distillkit.errors import DistillkitError

Tensor = torch.Tensor
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks, as torchrun's environment gives it."""

    rank: int
    size: int
    local_rank: int


def world_from_env(environ: Any = None) -> World | None:
    """The world torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; ``None`` for a
    single process (no ``WORLD_SIZE``, or 1)."""
    environ = os.environ if environ is None else environ
    size = int(environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    rank = int(environ.get("RANK", "0"))
    return World(rank, size, int(environ.get("LOCAL_RANK", rank)))


def launched_rank() -> int:
    """This process's rank from the environment (0 outside torchrun), before any process group
    exists: the CLI prints user errors on rank 0 only."""
    world = world_from_env()
    return world.rank if world is not None else 0


_device: torch.device | None = None  # the device of this rank's tensors while a group is active
_global_batch = False  # inside a training step whose batch is sharded across the ranks


def active() -> bool:
    """Whether a process group of several ranks is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes files and reports progress (True without a group)."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise; NCCL needs CUDA, which the device check
    (:func:`distillkit.runner.resolve_device`) has already asked for by then."""
    return "nccl" if device.type == "cuda" else "gloo"


def start(world: World, device: torch.device, timeout_s: float = 1800) -> torch.device:
    """Join the process group of ``world`` on ``device`` and return this rank's device: on CUDA
    ``cuda:LOCAL_RANK`` (one GPU per rank), else ``device`` itself."""
    global _device
    _die_with_launcher()
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise DistillkitError(f"rank {world.rank} would use GPU {world.local_rank}, but this machine has "
                                  f"{torch.cuda.device_count()}.", where="--nproc",
                                  hint="Start at most one process per GPU on each machine.")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend_for(device), rank=world.rank, world_size=world.size,
                                         timeout=datetime.timedelta(seconds=timeout_s))
    _device = device
    return device


def _die_with_launcher() -> None:
    """Ask Linux to end this rank when its launcher (the torchrun agent) dies, even by SIGKILL:
    an orphaned rank would train on, holding the run lock, and the same command could not
    resume the run until it finished."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop() -> None:
    """Leave the process group (a no-op without one)."""
    global _device
    if active():
        torch.distributed.destroy_process_group()
    _device = None


@contextlib.contextmanager
def session(world: World | None, device: torch.device) -> Iterator[torch.device]:
    """The process group of ``world`` for the duration of the block; ``device`` unchanged and no
    group for a single process."""
    if world is None:
        yield device
        return
    device = start(world, device)
    try:
        yield device
    finally:
        stop()


def _collective_device() -> torch.device:
    """Where this rank's collectives run: the device given to :func:`start`, else (a group
    started by other code) the current GPU under NCCL, the CPU under gloo."""
    if _device is not None:
        return _device
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        if _device is not None and _device.type == "cuda":
            torch.distributed.barrier(device_ids=[_device.index])
        else:
            torch.distributed.barrier()


# -- agreement: one rank's error stops every rank ---------------------------------------------

class PeerFailed(DistillkitError):
    """Raised on the ranks that did not fail themselves, with the failing rank's message; the
    CLI prints user errors on rank 0 only, so the message appears once."""


def raise_if_any(error: BaseException | None) -> None:
    """Every rank learns whether any rank failed: the failing rank raises its own ``error``,
    the others a :class:`PeerFailed` with its message. Without a group: raise ``error`` if given.

    A collective: every rank must call it at the same point, failed or not.
    """
    if not active():
        if error is not None:
            raise error
        return
    message = None
    if error is not None:
        message = error.render() if isinstance(error, DistillkitError) else f"{type(error).__name__}: {error}"
    messages = all_gather_object(message)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise PeerFailed(m if r == 0 else f"(on rank {r}) {m}")


def main_only(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 alone (a file write); the other ranks wait for it and fail if it failed.
    Returns ``fn()``'s value on rank 0, ``None`` elsewhere."""
    if not active():
        return fn()
    value, error = None, None
    if is_main():
        try:
            value = fn()
        except Exception as exc:  # every rank must learn of it, or they would wait forever
            error = exc
    raise_if_any(error)
    return value


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first (it may fill a cache), then on the other ranks (they read it)."""
    value = main_only(fn)
    return value if is_main() else fn()


# -- collectives --------------------------------------------------------------------------------

def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (pickled; for small objects: flags, hashes, messages)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj: Any) -> list[Any] | None:
    """``obj`` of every rank, in rank order, on rank 0; ``None`` on the others."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the ranks (``tensor`` itself without a group)."""
    if active():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


def all_gather_rows(tensor: Tensor) -> Tensor:
    """The rows of ``tensor`` of every rank, concatenated in rank order; the ranks may hold
    different numbers of rows (the other dimensions and the dtype must match)."""
    if not active():
        return tensor
    counts = torch.tensor([len(tensor)], device=tensor.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world_size())]
    torch.distributed.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# -- the sharded training step ---------------------------------------------------------------

def shard_bounds(rows: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's contiguous part ``[start, stop)`` of a batch of ``rows``: sizes differ by at
    most one (the first ranks take the extra rows); with fewer rows than ranks the last
    ranks' parts are empty."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(rows, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


@contextlib.contextmanager
def global_batch() -> Iterator[None]:
    """Inside: the losses' totals over rows (:func:`batch_total`) span the whole global batch."""
    global _global_batch
    previous, _global_batch = _global_batch, active()
    try:
        yield
    finally:
        _global_batch = previous


def batch_total(value: Any) -> Any:
    """A loss's denominator, a total over the batch's rows (rows, labeled rows, weight sums).

    Outside a sharded training step it is ``value`` itself. Inside one (:func:`global_batch`)
    it is the total over every rank's shard (a sum across ranks), so that a loss written as
    ``sum over my rows / batch_total(...)`` is this rank's share of the global batch's loss,
    and the shares' gradients add up to the single-process gradient exactly. A loss that
    divides by its own shard's size instead gives the mean of the shards' means: the same
    when every shard has as many rows (and labels), not otherwise.
    """
    if not _global_batch:
        return value
    device = _collective_device()
    total = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value, device=device)
    if total.device.type != device.type:
        total = total.to(device)
    torch.distributed.all_reduce(total)
    return total


def batch_mean(rows: Tensor) -> Tensor:
    """The mean of per-row values over the batch: ``rows.mean()``, or inside a sharded training
    step this rank's rows' sum over the global batch's row count (see :func:`batch_total`)."""
    if not _global_batch:
        return rows.mean()
    return rows.sum() / batch_total(len(rows))


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient across the ranks, in one collective.

    Each rank's loss is its share of the global batch's loss (:func:`batch_total`), so the sum
    is the global gradient. A parameter whose gradient is ``None`` on every rank (unused by
    the step) stays ``None``, as in a single process: an optimizer skips it rather than
    decaying it; one that has a gradient on some ranks gets zeros where it had none.

    Why not DistributedDataParallel: DDP hooks its gradient synchronisation into the wrapped
    module's ``forward``, but a student is called through ``features`` and its task heads
    (:func:`distillkit.training.forward_tasks`), never through ``forward``; and
    :func:`distillkit.training.fit_together` steps several models on one batch. One flat
    all-reduce after ``backward`` is the same sum, with none of that wrapping.
    """
    if not active():  # a single process: nothing to sum, and no pass over the parameters
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    device = params[0].device
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in params])  # float64 stays exact
    has = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for p in params] + [has])
    torch.distributed.all_reduce(flat)
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if bool(flat[-len(params) + i] > 0):
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        else:
            p.grad = None
        offset += n


@contextlib.contextmanager
def global_batch_norm(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every BatchNorm layer of ``model`` in training mode normalises with the
    statistics of the *global* batch (sums over every rank's part, all-reduced, and their
    gradient all-reduced back), as one process does on the whole batch; the running
    statistics move as one process's do. PyTorch's SyncBatchNorm does the same on CUDA with
    DDP only; this works on any backend. A no-op without a group."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if active() else []
    for layer in layers:
        layer.forward = functools.partial(_global_batch_norm, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's own forward


def _global_batch_norm(layer: torch.nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    if not layer.training:
        return type(layer).forward(layer, x)
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    channels = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                       torch.full((1,), x.numel() // max(channels, 1), dtype=xf.dtype, device=x.device)])
    total = differentiable_all_reduce(local)
    count = total[-1].detach()
    mean = total[:channels] / count
    var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
    if layer.track_running_stats and layer.running_mean is not None:
        with torch.no_grad():
            layer.num_batches_tracked += 1
            factor = (1.0 / float(layer.num_batches_tracked) if layer.momentum is None else layer.momentum)
            unbiased = var.detach() * count / (count - 1).clamp_min(1)
            layer.running_mean.mul_(1 - factor).add_(mean.detach().to(layer.running_mean.dtype), alpha=factor)
            layer.running_var.mul_(1 - factor).add_(unbiased.to(layer.running_var.dtype), alpha=factor)
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + layer.eps)
    if layer.affine:
        y = y * layer.weight.view(shape) + layer.bias.view(shape)
    return y.to(x.dtype)


def average_buffers(module: torch.nn.Module) -> None:
    """Average the floating-point buffers across the ranks, so that every rank validates and
    saves the same model. BatchNorm's running statistics already agree (:func:`global_batch_norm`);
    a plugin module that keeps statistics of its own rank's rows gets their mean."""
    if not active():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b))
        offset += n


# -- computing per batch, gathering in order -----------------------------------------------------

def to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (dicts, lists and tuples searched)."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def ordered_outputs(count: int, compute: Callable[[int], T], device: torch.device) -> Iterator[tuple[int, T]]:
    """``(i, compute(i))`` for ``i`` in ``range(count)``, in order.

    Without a group: computed here, one after the other. With one: rank ``r`` computes the
    items ``i`` with ``i % world == r``; they are gathered on rank 0 one round of ``world``
    items at a time (the memory of one round), and only rank 0 yields, in order, with the
    outputs on ``device``: each item computed exactly as a single process computes it, so
    what rank 0 accumulates from them is what a single process accumulates.
    """
    if not active():
        for i in range(count):
            yield i, compute(i)
        return
    world, me = world_size(), rank()
    for start in range(0, count, world):
        i = start + me
        mine = to_cpu(compute(i)) if i < count else None
        gathered = gather_object(mine)
        if gathered is None:
            continue
        for k, out in enumerate(gathered):
            if start + k < count:
                yield start + k, to_device(out, device)
