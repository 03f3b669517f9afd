"""The autoscale controller's settings: flags of ``qwenimage launch autoscale`` and keys of a job
spec's ``producer.autoscale`` section, checked and resolved into a `ScalingPolicy`.

Pure configuration: `launch.job_spec` checks a job spec's section with it before anything is
submitted, and `launch.autoscale_cli` runs the controller with it; it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from launch.autoscale import ScalingPolicy
from megatron_qwenimage.config import ConfigError

ACTUATORS = ("pools", "slurm-workers", "ray-autoscaler")


@dataclass(frozen=True)
class Setting:
    """One controller setting: a ``--flag`` of the command and a key of ``producer.autoscale``.
    `kind` is str, int (whole numbers) or float (any real number)."""

    kind: type
    default: Any
    metavar: str
    help: str

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")


#: The controller's settings (flag ``--low-s`` = job spec key ``producer.autoscale.low_s``). A flag
#: given on the command line wins over the job spec, which wins over the default.
SETTINGS = {
    "actuator": Setting(
        str,
        "pools",
        "{" + ",".join(ACTUATORS) + "}",
        "how capacity changes: pools = the running producer's actors per pool (at its next window; default); "
        "slurm-workers = extra Ray worker nodes as Slurm jobs; ray-autoscaler = bundles requested from the "
        "cluster's Ray autoscaler",
    ),
    "low_s": Setting(
        float, 120.0, "S", "grow while the lead time (backlog / consumer samples/s) is under S seconds (default 120)"
    ),
    "high_s": Setting(float, 1800.0, "S", "shrink while the lead time is over S seconds (default 1800)"),
    "min_size": Setting(
        int,
        None,
        "N",
        "fewest units (default: pools: the producer's vae_actors MIN; slurm-workers and ray-autoscaler: 0)",
    ),
    "max_size": Setting(
        int,
        None,
        "N",
        "most units (default: pools: the producer's vae_actors MAX; slurm-workers: producer.nodes extra nodes; "
        "ray-autoscaler: vae_actors MAX bundles)",
    ),
    "step": Setting(int, 1, "N", "units added or removed per change (default 1)"),
    "hold_observations": Setting(int, 3, "N", "a change needs its condition in N consecutive observations (default 3)"),
    "hold_s": Setting(float, 0.0, "S", "... and for at least S seconds (default 0)"),
    "cooldown_s": Setting(
        float,
        300.0,
        "S",
        "no change within S seconds of the previous one: new capacity needs time to show (default 300)",
    ),
    "interval_s": Setting(float, 30.0, "S", "seconds between observations (default 30)"),
    "pools": Setting(
        str, "vae,text", "NAMES", "pools actuator: the encoder pools that follow the controller (default vae,text)"
    ),
}


def _is_kind(value: Any, kind: type) -> bool:
    """YAML's `value` fits `kind`: a string for str, a whole number for int, any number for float
    (booleans are neither)."""
    if isinstance(value, bool):
        return False
    if kind is str:
        return isinstance(value, str)
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def check_section(section: Any, where: str = "producer.autoscale") -> dict[str, Any]:
    """A job spec's ``producer.autoscale`` mapping, checked key by key (`ConfigError` naming the key)."""
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of controller settings ({', '.join(SETTINGS)}), got {section!r}"
        )
    unknown = sorted(set(section) - set(SETTINGS), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {list(SETTINGS)}")
    out = {}
    for name, value in section.items():
        setting = SETTINGS[name]
        if value is None:
            continue
        if name == "actuator" and value not in ACTUATORS:
            raise ConfigError(f"{where}.actuator={value!r}: expected one of {list(ACTUATORS)}")
        if not _is_kind(value, setting.kind):
            raise ConfigError(f"{where}.{name}={value!r}: expected {setting.kind.__name__} ({setting.help})")
        out[name] = setting.kind(value)
    return out


def settings(args, section: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each setting: the flag if given, else the job spec's ``producer.autoscale``, else the default."""
    section = section or {}
    values = {}
    for name, setting in SETTINGS.items():
        flag = getattr(args, name, None)
        values[name] = flag if flag is not None else section.get(name, setting.default)
    return values


def _where(name: str, given_by_flag: bool) -> str:
    """Who set `name`: its flag, or its job spec key."""
    return Setting.flag(name) if given_by_flag else f"producer.autoscale.{name}"


def _set(name: str, given_by_flag: bool, value: Any) -> str:
    """``--min-size 0`` or ``producer.autoscale.min_size=0``, as the user wrote it."""
    return f"{Setting.flag(name)} {value}" if given_by_flag else f"producer.autoscale.{name}={value}"


def _policy(values: dict[str, Any], args, lo: int, hi: int) -> ScalingPolicy:
    """The policy of `values`, with `lo`/`hi` where no min_size/max_size is set; a fault names the
    flag or the job spec key that set the value."""
    try:
        return ScalingPolicy(
            low_s=values["low_s"],
            high_s=values["high_s"],
            min_size=lo if values["min_size"] is None else values["min_size"],
            max_size=hi if values["max_size"] is None else values["max_size"],
            step=values["step"],
            hold_observations=values["hold_observations"],
            hold_s=values["hold_s"],
            cooldown_s=values["cooldown_s"],
        )
    except ConfigError as exc:
        message = str(exc)
        low, high = (_where(n, getattr(args, n, None) is not None) for n in ("low_s", "high_s"))
        message = message.replace("ScalingPolicy: the band needs", f"{low}/{high}: the band needs")
        for name in ScalingPolicy.__dataclass_fields__:
            by_flag = getattr(args, name, None) is not None
            message = message.replace(f"ScalingPolicy.{name}=", _set(name, by_flag, ""))
        raise ConfigError(message) from None


def _vae_actors(spec) -> tuple[int, int]:
    """The producer's ``vae_actors`` MIN:MAX (``qwenimage produce``'s default 1:1)."""
    from producers.cli import parse_pool_range

    return parse_pool_range(str(spec.run.producer.options.get("vae_actors", "1:1")), "producer.options.vae_actors")


def resolve(args, spec) -> tuple[dict[str, Any], ScalingPolicy]:
    """The settings (flag, else ``producer.autoscale``, else default) and the policy they make for
    the job `spec`, all checked (`ConfigError` naming the flag or the job spec key). `args` None:
    the job spec alone (how `launch.job_spec` checks its section before anything is submitted)."""
    values = settings(args, spec.producer.autoscale)

    def assigned(name: str, value: Any) -> str:
        return _set(name, getattr(args, name, None) is not None, value)

    if values["actuator"] == "slurm-workers":
        lo, hi = 0, spec.producer.resources.nodes
    else:
        vae_min, vae_max = _vae_actors(spec)
        lo, hi = (vae_min, vae_max) if values["actuator"] == "pools" else (0, vae_max)
    policy = _policy(values, args, lo, hi)
    if values["actuator"] == "pools":
        from producers.pool_control import POOL_NAMES

        pools = [p.strip() for p in values["pools"].split(",") if p.strip()]
        if not pools or not set(pools) <= set(POOL_NAMES):
            raise ConfigError(
                f"{assigned('pools', repr(values['pools']))}: expected some of {list(POOL_NAMES)}, comma-separated"
            )
        if policy.min_size < 1:
            raise ConfigError(f"{assigned('min_size', policy.min_size)}: a producer's pool needs at least 1 actor")
    interval = values["interval_s"]
    if not 0 < interval < float("inf"):
        raise ConfigError(f"{assigned('interval_s', f'{interval:g}')}: expected seconds > 0")
    return values, policy
