"""``qwenimage train``: the consumer side of the CLI (see `consumers.train`)."""

from __future__ import annotations


def register(subparsers) -> None:
    from consumers.train import add_arguments, run_from_args

    parser = subparsers.add_parser(
        "train",
        help="train the MMDiT from a latent cache (run under torchrun or srun)",
        description="Train (or resume) the Qwen-Image MMDiT from a latent cache with TP/SP/PP/DP "
        "parallelism, as configured by a run YAML. Launch one process per GPU with torchrun or srun; "
        "a plain run is a single process.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)
