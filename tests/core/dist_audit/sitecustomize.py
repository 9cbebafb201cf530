"""Test helper: log every file a torchrun worker writes, creates, renames or removes.

On ``PYTHONPATH`` with ``DISTILLKIT_AUDIT_LOG`` set, each process that has a ``RANK`` (a
torchrun worker) appends the paths it writes to ``$DISTILLKIT_AUDIT_LOG.rank<RANK>``, through
an audit hook (``sys.addaudithook``), so a test can check that ranks other than 0 wrote nothing.
"""

import os
import sys

_log_path = os.environ.get("DISTILLKIT_AUDIT_LOG")
_rank = os.environ.get("RANK")
if _log_path and _rank is not None:
    _log = open(f"{_log_path}.rank{_rank}", "a", buffering=1)
    _busy = False

    def _hook(event, args):
        global _busy
        if _busy:
            return
        path = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or ""), (args[2] or 0)
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = args[0]
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            path = args[0] if event != "os.rename" else args[1]
        if path is not None:
            _busy = True
            try:
                _log.write(f"{event} {os.fsdecode(path) if not isinstance(path, int) else path}\n")
            finally:
                _busy = False

    sys.addaudithook(_hook)
