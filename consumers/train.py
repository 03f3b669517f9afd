"""``qwenimage train --config run.yaml`` / ``python -m consumers.train --config run.yaml``.

Run under torchrun (``torchrun --nproc-per-node N -m consumers.train --config run.yaml``) or srun
(one task per GPU, MASTER_ADDR/MASTER_PORT exported). The YAML is a `consumers.run_config.RunConfig`
(its module docstring shows every section); `preflight` checks what it names on disk before
torch.distributed starts.

This module is the CLI glue (`add_arguments`, `run_from_args`, `main`) and `train`, which builds a
`consumers.trainer.Trainer`, the loop. `RunConfig`, `preflight` and `validate` are re-exported
here, where scripts and tests have always imported them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from consumers.run_config import RunConfig as RunConfig
from consumers.run_config import preflight as preflight
from consumers.validate import validate as validate
from megatron_qwenimage.errors import collective


def train(cfg: RunConfig) -> dict:
    """Run (or resume) training; returns a summary ``{"final_step", "last_record"}`` (the last
    logged metrics record). The loop is `consumers.trainer.Trainer` (imported here: ``--help``
    stays fast)."""
    from consumers.trainer import Trainer

    return Trainer(cfg).train()


def main(argv: list[str] | None = None) -> int:
    """``python -m consumers.train ARGS`` is ``qwenimage train ARGS`` (``--debug`` anywhere): the
    same one-line error report (`megatron_qwenimage.cli.main`) and exit status."""
    from megatron_qwenimage.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = ["--debug"] if "--debug" in argv else []
    return cli_main([*debug, "train", *(a for a in argv if a != "--debug")])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="run YAML (sections: model, parallel, optimizer, "
        "precision, recompute, flow_matching, data, schedule, checkpoint, logging)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="python logging level of rank 0 (others log warnings; default: %(default)s)",
    )


def run_from_args(args) -> int:
    """``qwenimage train``. A bad config, cache, layout or checkpoint raises a `UserError`, which
    `megatron_qwenimage.cli.main` reports as one line (rank 0 only when it is raised alike on
    every rank) with its exit status."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    from megatron_qwenimage.cli import configure_logging

    configure_logging(args.log_level if rank == 0 else logging.WARNING, stream=sys.stdout)
    with collective():  # every rank reads the same file
        cfg = RunConfig.from_yaml(args.config)
    from consumers.parallel import shutdown

    try:
        train(cfg)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
