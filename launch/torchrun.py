"""``qwenimage torchrun``: torchrun in this process, its own log and failure report kept in a file.

Plain torchrun ends a failed run with its own ``ChildFailedError`` report and traceback after the
training processes' one-line error, so a user reads a traceback instead of the cause. `run_torchrun`
routes torchrun's loggers to ``--torchrun-log`` and exits with the failed process's own status;
only a process killed by a signal (which could say nothing itself) gets a line from here.
``qwenimage run`` (`launch.local`), the Slurm script (`launch.slurm`) and the docs use it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from megatron_qwenimage.errors import UserError

#: torch's loggers that make up torchrun's own output: the launcher, the elastic agent and its
#: process contexts (their children log under these names).
TORCHRUN_LOGGERS = ("torch.distributed.run", "torch.distributed.launcher", "torch.distributed.elastic")


class ChildKilled(UserError):
    """A training process died of a signal, so it said nothing itself; `exit_code` is 128 + signal."""

    exit_code = 1


class RendezvousFailed(UserError):
    """torchrun could not bring the processes together (address, port, other nodes)."""

    exit_code = 1


def add_torchrun_arguments(parser) -> None:
    """torchrun's own flags (`torch.distributed.run.get_args_parser`), and where its log goes."""
    from torch.distributed.run import get_args_parser

    for action in get_args_parser()._actions:
        if action.option_strings and "-h" in action.option_strings:
            continue
        parser._add_action(action)
    parser.add_argument(
        "--torchrun-log",
        default=None,
        metavar="FILE",
        help="where torchrun's own log and failure report go (appended; default: qwenimage-torchrun-<pid>.log in "
        "the temporary directory); the console keeps the training processes' output only",
    )


def default_torchrun_log() -> Path:
    import tempfile

    return Path(tempfile.gettempdir()) / f"qwenimage-torchrun-{os.getpid()}.log"


def run_torchrun(args) -> int:
    """``qwenimage torchrun [torchrun flags] -m megatron_qwenimage.cli train ...``: torchrun in this
    process, its own output kept in ``--torchrun-log``.

    Plain torchrun ends a failed run with its own report (``ChildFailedError`` and a traceback)
    after the training processes' one-line error. Here the console shows only what the training
    processes print, so it ends with their line; the exit status is the failed process's own (2
    for a config error; 128 + N when torchrun was stopped by signal N and stopped them). Only a
    process killed by a signal, which could say nothing itself, gets a line from here: which rank,
    which signal, and where torchrun's report is.
    """
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import run

    log_path = Path(args.torchrun_log) if args.torchrun_log else default_torchrun_log()
    with _torchrun_log(log_path) as log:
        try:
            run(args)
        except ChildFailedError as exc:
            log.error("%s", exc)  # torchrun's report, as it prints it
            return _failed_child(exc, log_path)
        except SignalException as exc:
            log.warning("stopped by %s", exc.sigval.name)
            return 128 + int(exc.sigval)
        except (RendezvousError, DistError) as exc:
            log.exception("rendezvous failed")
            raise RendezvousFailed(
                f"torchrun could not start the processes' rendezvous (--master-addr {args.master_addr}, "
                f"--master-port {args.master_port}, --nnodes {args.nnodes}): {' '.join(str(exc).split())}; "
                f"torchrun's log: {log_path}"
            ) from None
    return 0


#: Exit statuses and signals of a process that was stopped (torchrun stops the others once one
#: fails; a SIGTERM from outside stops them all): not the cause of a failure.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _failed_child(exc, log_path: Path) -> int:
    """The exit status of a failed torchrun run, from its failed processes (rank -> failure):

    1. a process killed by a signal other than a stop (SIGKILL: out of memory; SIGSEGV) printed
       nothing itself: one line says which rank and signal (`ChildKilled`, exit 128 + signal);
    2. else the earliest process that exited on its own, with its status (it printed its error);
    3. else every process was stopped (SIGTERM / SIGINT): 128 + that signal.
    """
    stops = {int(s) for s in STOP_SIGNALS}
    failures = sorted(exc.failures.items(), key=lambda rf: (rf[1].timestamp, rf[0]))
    for rank, failure in failures:
        if failure.exitcode < 0 and -failure.exitcode not in stops:
            error = ChildKilled(
                f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid} on {socket.gethostname()}) was "
                f"killed by {failure.signal_name()} before it could report anything (out of memory? see the "
                f"kernel log); torchrun's report: {log_path}"
            )
            error.exit_code = 128 - failure.exitcode
            raise error
    for _, failure in failures:
        if failure.exitcode > 0 and failure.exitcode - 128 not in stops:
            return failure.exitcode
    code = failures[0][1].exitcode
    return code if code > 0 else 128 - code


class _torchrun_log:
    """Route torchrun's loggers (`TORCHRUN_LOGGERS`) to a file, not the console, while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    def __enter__(self) -> logging.Logger:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, delay=True)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in TORCHRUN_LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.handlers[:], logger.propagate))
            logger.handlers, logger.propagate = [self.handler], False
        return logging.getLogger("torch.distributed.run")

    def __exit__(self, *exc) -> None:
        for logger, handlers, propagate in self.saved:
            logger.handlers, logger.propagate = handlers, propagate
        self.handler.close()
