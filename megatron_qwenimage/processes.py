"""Stopping process trees: what the embedded Ray's failed start, ``qwenimage run``'s Ctrl-C and
the tests' private Ray heads all need (psutil; no ``ray stop``, which stops every Ray of the user).
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil


def descendants(root: psutil.Process) -> list[psutil.Process]:
    """Every process below `root` (none when it is gone or cannot be listed). List them before
    signalling anything: a dying parent's children are re-parented and no longer found."""
    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


def terminate(procs: Iterable[psutil.Process], grace_s: float, reap_s: float = 10.0) -> None:
    """SIGTERM each of `procs`, SIGKILL those still alive after `grace_s` seconds, then wait up to
    `reap_s` seconds for them to go. Processes already gone are skipped."""
    procs = list({p.pid: p for p in procs}.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=reap_s)
