"""Run the ``distillkit`` CLI and SIGKILL this process at a chosen file write (a test helper).

    DISTILLKIT_KILL_AT="<glob>#<n>@<when>" python killpoint.py run CONFIG --out DIR

Every file distillkit writes reaches its final name through ``os.replace`` (atomic writes,
and the move of a finished stage folder into place), so wrapping ``os.replace`` finds every
moment a file or folder appears. ``glob`` is matched (fnmatch: ``*`` also crosses ``/``)
against the target's path relative to ``--out``; at its ``n``-th match:

* ``@after``: the rename happens, then the process is killed (the file has just appeared);
* ``@before``: the temporary file is cut to half its size and the process is killed before
  the rename, as if the power went out in the middle of writing it.

The kill is a real ``SIGKILL`` of this process: no ``finally`` block, ``atexit`` hook or
buffered write runs, exactly as when the OOM killer or a scheduler ends a job. Fault
injection lives here, in the tests, so the library carries no test hook.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys


def _install(spec: str, run_dir: str) -> None:
    pattern, _, rest = spec.partition("#")
    count, _, when = rest.partition("@")
    target, when = int(count or 1), when or "after"
    assert when in ("before", "after"), spec
    real_replace = os.replace
    seen = 0

    def replace(src, dst, *args, **kwargs):
        nonlocal seen
        relative = os.path.relpath(os.fspath(dst), run_dir)
        if fnmatch.fnmatch(relative, pattern):
            seen += 1
            if seen == target:
                if when == "before":
                    if os.path.isfile(src):
                        os.truncate(src, os.path.getsize(src) // 2)
                else:
                    real_replace(src, dst, *args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def main() -> None:
    args = sys.argv[1:]
    spec = os.environ.get("DISTILLKIT_KILL_AT")
    if spec:
        _install(spec, os.path.abspath(args[args.index("--out") + 1]))
    sys.argv = ["distillkit", *args]
    from distillkit.cli import main as distillkit_main

    distillkit_main()


if __name__ == "__main__":
    main()
