"""File-based service discovery for Prometheus: what both exporters (producer and consumer) publish.

Once its exporter listens, a process writes one target file ``<sd_dir>/<side>-<id>.json``::

    [{"targets": ["HOST:PORT"], "labels": {"run": RUN_LABEL, "side": "producer"|"consumer"}}]

atomically (a temporary name Prometheus' ``*.json`` glob does not match, then a rename), and
removes it when the exporter stops. ``launch/monitoring/prometheus.yml`` reads such files through
``file_sd_configs``. The run label is also checked here, once for both sides (`check_run_label`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile

from megatron_qwenimage.config import ConfigError

SIDES = ("producer", "consumer")
#: Longest run label accepted (it is a Prometheus label value, a file name part and a dashboard choice).
MAX_RUN_LABEL = 128
_BAD_LABEL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_run_label(value: object, where: str) -> str:
    """`value` if it is a usable run label, else a one-line `ConfigError` naming `where` (the flag or key)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}={value!r}: expected a string (the run's label), got {type(value).__name__}")
    if not value.strip() or value != value.strip() or len(value) > MAX_RUN_LABEL or _BAD_LABEL_CHARS.search(value):
        raise ConfigError(
            f"{where}={value!r}: expected a run label of 1..{MAX_RUN_LABEL} printable characters without "
            "leading or trailing spaces"
        )
    return value


def default_run_label(path: str | os.PathLike, where: str) -> str:
    """The basename of a directory path or URL (``s3://b/caches/run1/`` -> ``run1``), checked as a label.

    `where` names what the label would be given with (e.g. ``--run-label``) in the error raised
    when the basename is not a usable label.
    """
    text = os.fspath(path)
    base = text.rstrip("/").rsplit("/", 1)[-1] if "://" in text else os.path.basename(os.path.abspath(text))
    base = base or "run"
    try:
        return check_run_label(base, where)
    except ConfigError:
        raise ConfigError(
            f"{where}: the default label, the basename {base!r} of {text!r}, is not a usable run label; set one"
        ) from None


def check_sd_dir(value: object, where: str) -> str | None:
    """None, or `value` as a directory path: a one-line `ConfigError` naming `where` otherwise."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise ConfigError(f"{where}={value!r}: expected null or a directory path (where file-SD targets go)")
    path = os.fspath(value)
    if "://" in path:
        raise ConfigError(f"{where}={path!r}: expected a local directory (Prometheus reads file-SD targets from disk)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{where}={path!r}: is an existing file, not a directory")
    return path


def target_host(bind_host: str) -> str:
    """The HOST of ``HOST:PORT`` for an exporter bound to `bind_host` (a wildcard bind: this host's name)."""
    host = bind_host if bind_host not in ("", "0.0.0.0", "::") else socket.gethostname()
    return f"[{host}]" if ":" in host else host


class FileSDTarget:
    """One published target file; `remove` (idempotent) takes it back.

    Raises:
        OSError: the directory cannot be created or written (callers name their flag or key).
    """

    def __init__(self, sd_dir: str | os.PathLike, *, side: str, ident: str, host: str, port: int, run_label: str):
        if side not in SIDES:
            raise ValueError(f"side {side!r}: expected one of {SIDES}")
        self.sd_dir = os.fspath(sd_dir)
        self.path = os.path.join(self.sd_dir, f"{side}-{ident}.json")
        os.makedirs(self.sd_dir, exist_ok=True)
        group = [{"targets": [f"{target_host(host)}:{port}"], "labels": {"run": run_label, "side": side}}]
        fd, tmp = tempfile.mkstemp(dir=self.sd_dir, prefix=f".{side}-{ident}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # readable by a Prometheus running as another user (the mkstemp default is 0600)
            with os.fdopen(fd, "w") as f:
                json.dump(group, f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.group = group

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
