"""The one base class of errors a user can fix.

Every error that a bad input, flag, config value, cache or checkpoint can cause derives from
`UserError`. The command line (`megatron_qwenimage.cli.main`) catches it at its boundary and prints
one line, ``qwenimage <command>: error: <message>``, with a non-zero exit status; ``--debug``
shows the traceback. Any other exception is a programming error and keeps its traceback.

A `UserError` message names the input (file, flag, config key, record) and what was expected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(Exception):
    """A user-fixable error; its message names the input and what was expected.

    `exit_code` is the process exit status the command line returns for it (2 for usage and
    config errors, as argparse does; subclasses for data faults may use 1).
    """

    exit_code: int = 2
    #: True when every rank of a distributed job raises this error alike (a config, layout or
    #: agreement decision made from the same inputs): only global rank 0 then reports it.
    collective: bool = False


def mark_collective(error: BaseException) -> BaseException:
    """Mark `error` as raised alike on every rank (a config, layout or resume decision every rank
    makes from the same inputs): only global rank 0 reports it. Returns `error`."""
    error.collective = True
    return error


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """A `UserError` raised in the block is raised alike on every rank (it depends only on the
    config, shared files or world-wide agreed values): mark it so that only rank 0 reports it."""
    try:
        yield
    except UserError as exc:
        mark_collective(exc)
        raise


__all__ = ["UserError", "collective", "mark_collective"]
