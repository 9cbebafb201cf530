"""Frozen encoder blocks and the cache of their output.

``freeze: all`` or ``freeze: {until: <block>}`` in an encoder's params fixes
:meth:`~distillkit.interfaces.Encoder.preprocess` and the blocks up to and including the named
one: no gradient, always in eval mode, not in the optimizer. Their output for an image then
never changes, so a run computes it once per image and split (eval mode, ``no_grad``, in
batches), stores it, and every stage trains and evaluates only the blocks above it on the
stored tensors: fine-tuning the top of an ImageNet encoder costs what training its heads costs.

The cache of one split is a folder of safetensors shards plus ``index.json`` (written last,
with each shard's checksum), named by a hash of everything its content depends on: the frozen
tensors (weights and BatchNorm statistics), the freeze point, the encoder's params, the data,
the split's rows, the input shape and dtype, and the storage dtype. It lives in the shared
data cache (next to the decoded images) rather than in one run's folder: the key says all
there is to say about the content, so every run over the same data and pretrained encoder
(a sweep over temperatures, a re-run in a new folder) reuses it. A folder is built under a
temporary name and renamed into place, so two processes never see each other's half-written
shards; a shard that does not match its checksum makes the folder be rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch

from distillkit import distributed
from distillkit.checkpoint import file_checksum, load_tensors, save_tensors
from distillkit.config import dump
from distillkit.data import SplitData
from distillkit.errors import DistillkitError, did_you_mean
from distillkit.interfaces import Encoder, EncoderParams, FreezeUntil, Student
from distillkit.io import read_json, write_json
from distillkit.schema import component_fields

Tensor = torch.Tensor
CACHE_FORMAT = "distillkit.frozen_features/1"
#: ``fp32``: the frozen part's output as computed; ``fp16``: half the memory and disk, rounded;
#: ``off``: no cache, the frozen part runs at every step (same weights as ``fp32``)
FeatureStorage = Literal["fp32", "fp16", "off"]
SHARD_BYTES = 256 * 2**20


# -- freezing -------------------------------------------------------------------------------

def frozen_block_count(encoder: Encoder, where: str = "student.encoder") -> int:
    """How many of the encoder's blocks its ``freeze`` param fixes (0: none).

    A freeze point that names no block is a :class:`DistillkitError` at ``<where>.freeze.until``
    listing the block names.
    """
    freeze = encoder.params.freeze if isinstance(encoder.params, EncoderParams) else "none"
    if freeze == "none":
        return 0
    try:
        names = [name for name, _ in encoder.blocks()]
    except NotImplementedError:
        raise DistillkitError(f"encoder '{encoder.params.kind}' does not list its blocks, so it cannot be "
                              "frozen.", where=f"{where}.freeze") from None
    if freeze == "all":
        return len(names)
    assert isinstance(freeze, FreezeUntil)
    if freeze.until not in names:
        raise DistillkitError(f"'{freeze.until}' is not a block of the {encoder.params.kind} encoder."
                              f"{did_you_mean(freeze.until, names)} Blocks, in order: {', '.join(names)}.",
                              where=f"{where}.freeze.until")
    return names.index(freeze.until) + 1


def freeze_encoder(encoder: Encoder, where: str = "student.encoder") -> None:
    """Apply the encoder's ``freeze`` param: fix preprocess and the frozen blocks."""
    count = frozen_block_count(encoder, where)
    encoder.frozen_blocks = count
    if not count:
        return
    for tensor in _frozen_tensors(encoder).values():
        tensor.requires_grad_(False)
    encoder.train(encoder.training)  # put the frozen part in eval mode now


def frozen_encoder_params(student_params: Any, registries: Any) -> dict[str, EncoderParams]:
    """The student's nested encoders (by field) whose params freeze blocks."""
    student_cls = registries.student.get(student_params.kind)
    found = {}
    for field, kind in component_fields(student_cls).items():
        params = getattr(student_params, field, None)
        if kind == "encoder" and isinstance(params, EncoderParams) and params.freeze != "none":
            found[field] = params
    return found


def check_frozen_encoders(student_params: Any, registries: Any, file: str = "<config>") -> None:
    """Build the student's encoders that freeze blocks and check their freeze points.

    For the runner before it loads any data: a misspelt block name costs no decoding.
    """
    for field, params in frozen_encoder_params(student_params, registries).items():
        encoder = registries.encoder.get(params.kind)(params)
        try:
            frozen_block_count(encoder, where=f"student.{field}")
        except DistillkitError as exc:
            raise DistillkitError(exc.message, where=f"{file}: {exc.where}") from None


def _frozen_tensors(encoder: Encoder) -> dict[str, Tensor]:
    """The encoder's state (parameters and buffers) outside the trainable blocks, by name."""
    if not encoder.frozen_blocks:
        return {}
    trainable = {id(t) for _, block in encoder.blocks()[encoder.frozen_blocks:]
                 for t in (*block.parameters(), *block.buffers())}
    return {k: v for k, v in encoder.state_dict(keep_vars=True).items() if id(v) not in trainable}


@dataclass(frozen=True)
class FrozenPrefix:
    """What the output of an encoder's frozen part depends on, besides its input."""

    encoder: str  # the encoder's params as JSON
    blocks: int
    checksum: str  # of the frozen tensors

    @classmethod
    def of(cls, encoder: Encoder) -> "FrozenPrefix | None":
        if not encoder.frozen_blocks:
            return None
        h = hashlib.sha256()
        for name, tensor in sorted(_frozen_tensors(encoder).items()):
            value = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{value.dtype}:{list(value.shape)}".encode())
            h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        return cls(json.dumps(dump(encoder.params), sort_keys=True), encoder.frozen_blocks, h.hexdigest()[:20])


@contextlib.contextmanager
def reading_features(models: Sequence[Student]) -> Iterator[None]:
    """Feed these models the cached output of their frozen part instead of raw inputs."""
    for model in models:
        model.encoder.reads_features = True
    try:
        yield
    finally:
        for model in models:
            model.encoder.reads_features = False


# -- the cache ------------------------------------------------------------------------------

def cache_key(prefix: FrozenPrefix, split: SplitData, data_fingerprint: str, storage: str,
              plugins: Mapping[str, str] | None = None) -> str:
    """Identifies the frozen features of one split: a key that left out any of these would
    hand a stage features of other images, rows or weights, or of an older encoder's code
    (``plugins``: name -> version of the plugins whose code computes them)."""
    description = {
        "plugins": dict(sorted((plugins or {}).items())),
        "format": CACHE_FORMAT, "encoder": prefix.encoder, "blocks": prefix.blocks, "weights": prefix.checksum,
        "data": data_fingerprint, "split": split.name, "rows": hashlib.sha256(split.indices.tobytes()).hexdigest(),
        "inputs": [list(split.inputs.shape[1:]), str(split.inputs.dtype)], "storage": storage,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """The frozen-feature views of a run's splits, stored under ``root`` (one folder per key)."""

    def __init__(self, root: Path, data_fingerprint: str, storage: str = "fp32", batch_size: int = 256,
                 device: torch.device | str = "cpu", progress=None, plugins: Mapping[str, str] | None = None):
        if storage not in ("fp32", "fp16"):
            raise ValueError(f"feature storage must be fp32 or fp16, not {storage!r}")
        self.root = Path(root)
        self.data_fingerprint = data_fingerprint
        self.storage = storage
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress  # label -> fit-style callbacks, or None
        self.plugins = dict(plugins or {})  # the encoder's plugin and version, part of every key

    def view(self, encoder: Encoder, split: SplitData) -> SplitData:
        """``split`` with ``inputs`` replaced by the frozen part's output, row for row."""
        prefix = FrozenPrefix.of(encoder)
        if prefix is None:
            raise ValueError("the encoder freezes no block")
        if len(split) == 0:
            return split  # no batch is ever drawn from it
        directory = self.root / cache_key(prefix, split, self.data_fingerprint, self.storage, self.plugins)
        features = _load(directory) if distributed.is_main() else None
        if distributed.broadcast_object(features is not None):  # rank 0's finding holds for every rank
            features = features if features is not None else _load(directory)
        else:
            features = self._build(encoder, split, directory)
        if features is None:
            raise DistillkitError(f"the feature cache {directory} could not be read.", where=str(directory))
        if len(features) != len(split):
            raise DistillkitError(f"the feature cache {directory} holds {len(features)} rows for the "
                                  f"{len(split)} of the {split.name} split; delete it.", where=str(directory))
        return SplitData(split.name, split.indices, features, split.targets, split.raw_labels, split.groups)

    def _build(self, encoder: Encoder, split: SplitData, directory: Path) -> Tensor:
        """Compute and write the features of ``split``. Under torchrun every rank computes every
        ``world``-th batch; rank 0 receives them in order and writes the cache once, and the
        others read it when it is complete."""
        main = distributed.is_main()
        progress = self.progress(f"frozen features ({split.name})") if self.progress and main else None
        batches = extract(encoder, split, self.batch_size, self.device, progress)
        if not main:
            for _ in batches:  # this rank's turns, sent to rank 0
                pass
            distributed.barrier()
            return _load(directory)
        _remove_stale_builds(directory)
        shutil.rmtree(directory, ignore_errors=True)  # damaged: rebuilt from scratch
        work = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            shards = _write_shards(work, batches, self.storage)
            write_json(work / "index.json", {"format": CACHE_FORMAT, "rows": len(split), "split": split.name,
                                             "storage": self.storage, "shards": shards})
            try:
                os.replace(work, directory)
            except OSError:  # another process put the same features in place first
                shutil.rmtree(work, ignore_errors=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        distributed.barrier()  # the others read what rank 0 has just written
        features = _load(directory)
        if features is None:
            raise DistillkitError(f"the feature cache {directory} could not be read back after writing it.",
                                  where=str(directory))
        return features


@torch.no_grad()
def extract(encoder: Encoder, split: SplitData, batch_size: int, device: torch.device,
            progress=None) -> Iterator[Tensor]:
    """The frozen part's output for every row of ``split``, in order, batch by batch (on the CPU).

    Under torchrun the ranks compute the batches in turn and only rank 0 yields (all of them,
    in order); the others yield nothing.
    """
    from distillkit.training import split_outputs

    was_training = encoder.training
    encoder.eval()
    steps = (len(split) + batch_size - 1) // batch_size
    if progress is not None:
        progress.on_epoch_start(0, 1, steps)
    try:
        for _, features in split_outputs(split, batch_size, device, [],
                                         lambda batch: encoder.forward_frozen(batch.inputs).cpu()):
            yield features
            if progress is not None:
                progress.on_step()
    finally:
        encoder.train(was_training)


def _write_shards(directory: Path, batches: Iterator[Tensor], storage: str) -> list[dict]:
    shards: list[dict] = []
    buffer: list[Tensor] = []

    def flush() -> None:
        if not buffer:
            return
        path = directory / f"shard-{len(shards):05d}.safetensors"
        rows = torch.cat(buffer)
        save_tensors(path, {"features": rows}, {"format": CACHE_FORMAT, "rows": len(rows)})
        shards.append({"file": path.name, "rows": len(rows), "sha256": file_checksum(path)})
        buffer.clear()

    for features in batches:
        buffer.append(features.half() if storage == "fp16" else features.float())
        if sum(t.numel() * t.element_size() for t in buffer) >= SHARD_BYTES:
            flush()
    flush()
    return shards


def _load(directory: Path) -> Tensor | None:
    """The stored features, or None when the folder is absent, incomplete or damaged."""
    index_path = directory / "index.json"
    if not index_path.exists():
        return None
    try:
        index = read_json(index_path)
        parts = []
        for shard in index["shards"]:
            path = directory / shard["file"]
            if file_checksum(path) != shard["sha256"]:
                raise ValueError(f"{path} does not match its checksum")
            tensors, _ = load_tensors(path)
            parts.append(tensors["features"])
        features = torch.cat(parts) if parts else None
        if features is None or len(features) != index["rows"]:
            raise ValueError("row count mismatch")
    except (OSError, ValueError, KeyError, DistillkitError, json.JSONDecodeError):
        return None
    return features


def _remove_stale_builds(directory: Path) -> None:
    """Remove half-built folders of this key left by processes that died while building."""
    for stale in directory.parent.glob(f"{directory.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another live process is building the same features
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
