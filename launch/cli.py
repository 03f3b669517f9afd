"""``qwenimage run RUN.yaml``: the main job on this machine, and ``qwenimage torchrun``, the torchrun
that its consumer, the Slurm consumer job and the docs' commands run (see `launch.local`)."""

from __future__ import annotations

import json
import logging
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the producers and a consumer job at once on this machine, watched side by side",
        description=(
            "Start the producers (embedded local Ray on 127.0.0.1) on the run's input and, as soon as the cache "
            "exists, a torchrun consumer job that trains from it while it grows (tail mode). Shows both sides "
            "live, then writes the checkpoint, the diffusers export, the metrics and a PNG report under the run "
            "directory. Ctrl-C stops both sides cleanly; the same command resumes (committed partitions are "
            "skipped, training continues from its latest checkpoint)."
        ),
    )
    p.add_argument(
        "config",
        metavar="RUN_YAML",
        help="run config: name, run_dir, cache, producer (qwenimage produce flags as keys), consumer "
        "(nproc_per_node and the qwenimage train run config); e.g. examples/local.yaml",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the final summary (where the outputs are, what they hold) as one JSON object on stdout",
    )
    p.add_argument(
        "--no-live",
        action="store_true",
        help="no live panel: one status line per interval (the default when stdout is not a terminal)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between status lines when the view is not live (default 5)",
    )
    p.set_defaults(func=run_from_args)

    from launch.torchrun import add_torchrun_arguments, run_torchrun

    t = subparsers.add_parser(
        "torchrun",
        help="torchrun whose own log and failure report go to a file: the console ends with the training's own line",
        description=(
            "Run torchrun (same flags) with its own log and its failure report (ChildFailedError) in --torchrun-log "
            "instead of the console, so that a failed run ends with the training processes' one-line error; the "
            "exit status is the failed process's own. E.g. qwenimage torchrun --nproc-per-node 2 -m "
            "megatron_qwenimage.cli train --config examples/train-tiny.yaml"
        ),
    )
    add_torchrun_arguments(t)
    t.set_defaults(func=run_torchrun)


def run_from_args(args) -> int:
    from launch.local import LocalRun
    from launch.run_config import load_run_spec
    from launch.view import RunView, render_report
    from megatron_qwenimage.cli import configure_logging
    from megatron_qwenimage.config import ConfigError

    configure_logging(logging.WARNING, fmt="%(message)s")
    if not args.interval > 0:
        raise ConfigError(f"--interval {args.interval:g}: expected seconds > 0")
    spec = load_run_spec(args.config)
    live = sys.stdout.isatty() and not args.no_live and not args.json
    view = RunView(spec, live=live, interval_s=args.interval, stream=sys.stderr if args.json else sys.stdout)
    summary = LocalRun(spec, view=view).run()
    if spec.report:
        summary["report"] = render_report(spec)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        view.print_summary(summary)
    return 0
