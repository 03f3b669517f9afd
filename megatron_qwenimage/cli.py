"""The ``qwenimage`` command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; this file only
collects them, so the producer, consumer and launcher sides add commands without touching each
other. Every flag carries a help text: ``qwenimage <command> --help`` explains it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import traceback
import warnings

from megatron_qwenimage.errors import UserError

# megatron-core announces at import that it falls back to torch kernels without TE/apex; that is
# the expected state of a CPU machine, not something a user of the command line can act on.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

#: Our packages: their loggers log at the level a command asks for; every other library's log at
#: WARNING (megatron-core, Ray, torch announce at INFO what a user cannot act on; warnings stay).
OWN_LOGGERS = ("megatron_qwenimage", "producers", "consumers", "launch", "benchmarks")


def configure_logging(level: int | str = logging.INFO, *, fmt: str = "[%(asctime)s] %(message)s", stream=None) -> None:
    """Root handler at WARNING (libraries), our packages' loggers at `level`."""
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=stream or sys.stderr, force=True)
    level = getattr(logging, level.upper()) if isinstance(level, str) else level
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


#: Modules that register subcommands, in the order they appear in ``qwenimage --help``.
COMMAND_MODULES = (
    "megatron_qwenimage.commands.model_info",
    "megatron_qwenimage.commands.plan",
    "megatron_qwenimage.commands.convert",
    "producers.cli",
    "producers.cache_cli",
    "consumers.cli",
    "launch.cli",
    "launch.commands",
    "megatron_qwenimage.commands.monitor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenimage",
        description=(
            "Pretrain the Qwen-Image MMDiT: producers encode images and captions into a latent "
            "cache, consumers train the model from it with Megatron-style parallelism."
        ),
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of a user error (bad flag, input, config, cache or checkpoint) "
        "instead of its one-line message",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _rank() -> str:
    """Global rank under torchrun / srun ("0" for a plain process)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or "0"


def _prints_errors() -> bool:
    """Whether this process reports a stop (Ctrl-C / SIGTERM): global rank 0 only."""
    return _rank() == "0"


def report_user_error(command: str, error: UserError, *, as_json: bool, debug: bool) -> None:
    """Print `error` as one line on stderr (and an error object on stdout under ``--json``).

    Under torchrun / srun, global rank 0 prints every error; another rank prints one only if it
    is not marked collective (`mark_collective`: rank 0 says the same), prefixed ``[rank N]``, so
    a fault that one rank alone hit (a shard only it read, a file only it opened) is not lost.
    """
    message = " ".join(str(error).split()) or type(error).__name__
    if debug:
        traceback.print_exception(error)
    rank = _rank()
    if rank != "0":
        if getattr(error, "collective", False):
            return
        message = f"[rank {rank}] {message}"
    if as_json:
        print(json.dumps({"error": message, "type": type(error).__name__, "command": command}, sort_keys=True))
    print(f"qwenimage {command}: error: {message}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (Ray shutdown, exporters, temp files) runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one ``qwenimage`` command; returns its exit status.

    A `UserError` becomes one line (``qwenimage <command>: error: ...``) and its ``exit_code``;
    any other exception is a programming error and propagates with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    command = " ".join(
        filter(None, (args.command, getattr(args, "cache_command", None), getattr(args, "launch_command", None)))
    )
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:
        name = "SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT"
        if _prints_errors():
            print(f"qwenimage {command}: stopped by {name}; committed work is kept, rerun to resume", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    except UserError as error:
        report_user_error(command, error, as_json=bool(getattr(args, "json", False)), debug=args.debug)
        return error.exit_code


if __name__ == "__main__":
    # `python -m megatron_qwenimage.cli`: run the package module's `main`, not this `__main__`
    # copy, so that its exception classes (`Terminated`) are the ones every other module raises.
    from megatron_qwenimage.cli import main as package_main

    sys.exit(package_main())
