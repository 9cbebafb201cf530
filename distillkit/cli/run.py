"""``distillkit run CONFIG``: run (or resume) every stage of a config.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process is one rank of a data-parallel run
(:mod:`distillkit.distributed`); ``--nproc N`` starts those N processes itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/<config name>). An interrupted run there is resumed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set training.epochs=3 (repeatable).")
@click.option("--quiet", is_flag=True, help="Print only the final table.")
@click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train with N processes on this machine (data parallel, as under torchrun: gloo on CPUs, "
                   "NCCL with one GPU per process).")
@click.pass_context
def run(ctx: click.Context, config: Path, out: Path | None, overrides: tuple[str, ...], quiet: bool,
        nproc: int | None) -> None:
    """Run every stage of CONFIG in dependency order.

    Finished stages whose config and inputs are unchanged are skipped; an interrupted stage
    resumes from its last checkpoint.
    """
    from distillkit import distributed
    from distillkit.config import load_config
    from distillkit.plugins import get_plugin_manager
    from distillkit.progress import Reporter
    from distillkit.rundir import RunLayout
    from distillkit.feature_cache import check_frozen_encoders
    from distillkit.runner import Runner, check_mixed_precision, check_plan, check_processes, resolve_device

    registries = get_plugin_manager().registries
    cfg = load_config(config, registries, list(overrides))
    run_dir = out if out is not None else Path("runs") / cfg.name
    world = distributed.world_from_env()
    if nproc is not None and nproc > 1:
        if world is not None:
            raise click.UsageError("--nproc starts its own processes; under torchrun leave it out.")
        # every mistake the config can show is reported here, before any process starts
        check_processes(cfg, registries, nproc)
        check_mixed_precision(cfg, resolve_device(cfg.device))
        check_frozen_encoders(cfg.student, registries, cfg.file)
        check_plan(cfg, registries)
        args = [str(config), "--out", str(run_dir), *(f"--set={o}" for o in overrides)] + (["--quiet"] if quiet else [])
        sys.exit(_launch(nproc, args, debug=bool((ctx.find_root().obj or {}).get("debug"))))
    if world is not None:
        check_processes(cfg, registries, world.size)
    device = resolve_device(cfg.device)
    with distributed.session(world, device) as device:
        _check_same_config(cfg, run_dir)
        reporter = Reporter(quiet=quiet) if distributed.is_main() else Reporter(quiet=True, silent=True)
        Runner(cfg, registries, run_dir, reporter, device=device).run()
        if distributed.is_main():
            click.echo(f"results: {RunLayout(run_dir).metrics}", err=True)


def _check_same_config(cfg, run_dir: Path) -> None:
    """Under torchrun: every rank must run the same resolved config into the same directory
    (a config file edited while the ranks started, or different ``--set`` per rank, would
    otherwise train different models in lockstep)."""
    from distillkit import distributed
    from distillkit.errors import DistillkitError

    if not distributed.active():
        return
    text = json.dumps({"config": cfg.resolved(), "out": str(Path(run_dir).resolve())}, sort_keys=True, default=str)
    hashes = distributed.all_gather_object(hashlib.sha256(text.encode()).hexdigest()[:16])
    differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise DistillkitError(f"the processes of this torchrun job resolved different configs or run directories: "
                              f"{'ranks' if len(differ) > 1 else 'rank'} {', '.join(map(str, differ))} "
                              f"{'differ' if len(differ) > 1 else 'differs'} from "
                              f"rank 0 (config hashes {', '.join(hashes)}).", where=cfg.file,
                              hint="Start every rank with the same config file, --set overrides and --out.")


def _launch(nproc: int, args: list[str], debug: bool) -> int:
    """Run ``python -m distillkit run ARGS`` in ``nproc`` processes on this machine (torchrun's
    standalone mode) and return the exit status: 2 when rank 0 reported a user error (it has
    printed it), 130 on Ctrl-C, 1 for any other failure."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # share the cores out instead of oversubscribing them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if debug:
        os.environ["DISTILLKIT_DEBUG"] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"distillkit-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    # the launcher's own log lines (a rank that stopped, the others sent SIGTERM) repeat what
    # the ranks and the summary below say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "distillkit", "run", *args)
    except ChildFailedError as exc:
        codes = {f.local_rank: f.exitcode for f in exc.failures.values()}
        # a user error (exit 2, said by rank 0); the other ranks may have been ended by signal
        if 2 in codes.values() and all(c in (2, -signal.SIGTERM, -signal.SIGKILL) for c in codes.values()):
            return 2
        failed = ", ".join(f"rank {r}: exit status {c}" for r, c in sorted(codes.items()))
        click.echo(f"error: a training process failed ({failed}); run the same command again to resume.", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted; run the same command again to resume.", err=True)
        return 130
    return 0
