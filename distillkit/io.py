"""Atomic file writes and small JSON helpers.

Every result file is written to a temporary name in the same folder, flushed, fsynced and
renamed over the target, so a crash leaves either the old file or the new one, never half.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from distillkit.errors import DistillkitError

log = logging.getLogger(__name__)

#: where :func:`file_digests` keeps its digests, inside the data cache folder
FILE_HASHES = "file_hashes.json"
_SETTLED_NS = 2_000_000_000  # a file's digest is cached once it is this old

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file readable by its owner only; results should get the usual mode
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise DistillkitError(f"no space left on the device while writing {path}; earlier files are intact.") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files of atomic writes that a killed process left under ``folder``.

    Call it only while holding the folder's lock: a live writer's temporary looks the same.
    Returns how many were removed.
    """
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):  # mkstemp(prefix=".<name>.", suffix=".tmp")
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing metric reads as null
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line to a JSON-lines log (a torn last line is skipped by readers)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_jsonable(record)) + "\n")
        fh.flush()


def file_digests(paths: Sequence[str | Path], cache_dir: str | Path) -> list[str]:
    """BLAKE2b of each file's bytes (``"missing"`` for an unreadable file), cached by
    (resolved path, size, mtime_ns) in ``<cache_dir>/file_hashes.json``: an unchanged file is not read again, a
    touched one is hashed again (the same bytes give the same digest). Dataset sources use it
    for their fingerprints (see :meth:`distillkit.data.DatasetSource.fingerprint`)."""
    cache_file = Path(cache_dir) / FILE_HASHES
    try:
        cache = read_json(cache_file) if cache_file.exists() else {}
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    out: list[str] = []
    changed = False
    for path in paths:
        key = str(Path(path).resolve())
        try:
            stat = Path(path).stat()
        except OSError:
            out.append("missing")
            continue
        entry = cache.get(key)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            out.append(str(entry[2]))
            continue
        try:
            digest = _file_digest(path)
        except OSError:
            out.append("missing")
            continue
        out.append(digest)
        # A file modified in the last seconds may change again within the file system's mtime
        # granularity, keeping size and mtime: its digest is not trusted to the cache yet.
        if time.time_ns() - stat.st_mtime_ns > _SETTLED_NS:
            cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
            changed = True
    if changed:
        try:
            write_json(cache_file, cache)
        except OSError:
            log.warning("cannot write the file hash cache %s; files will be hashed again next time.", cache_file)
    return out


def _file_digest(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
