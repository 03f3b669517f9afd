"""The ``qwenimage`` command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; this file only
collects them, so the producer, consumer and launcher sides add commands without touching each
other. Every flag carries a help text: ``qwenimage <command> --help`` explains it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# megatron-core announces at import that it falls back to torch kernels without TE/apex; that is
# the expected state of a CPU machine, not something a user of the command line can act on.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

#: Modules that register subcommands, in the order they appear in ``qwenimage --help``.
COMMAND_MODULES = (
    "megatron_qwenimage.commands.model_info",
    "megatron_qwenimage.commands.convert",
    "producers.cli",
    "consumers.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenimage",
        description=(
            "Pretrain the Qwen-Image MMDiT: producers encode images and captions into a latent "
            "cache, consumers train the model from it with Megatron-style parallelism."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
