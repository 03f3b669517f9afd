"""Model configuration for the Qwen-Image MMDiT.

`MMDiTConfig` holds the architecture (the numbers of docs/spec.md §1.1) together with
the few runtime choices that change how the model is *built*: tensor-parallel size, sequence
parallelism, kernel backend and parameter dtype. Like megatron-core's ``TransformerConfig`` it is
validated when it is constructed, so a bad value fails before any weight is allocated.

Named configs live as YAML files in ``megatron_qwenimage/configs/``; `load_config` takes such a
name or a path to a YAML file, plus keyword overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from megatron_qwenimage.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"

#: Pixels per side of one image token: VAE downsampling (8) times patch size (2).
PIXELS_PER_TOKEN_SIDE = 16
#: Hard cap on text-conditioning tokens after the template prefix is dropped (spec 5.5).
MAX_TEXT_TOKENS = 1024

BACKENDS = ("local", "transformer_engine")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and what was expected."""


# ----------------------------------------------------------------------------- YAML and field types
def read_yaml(path: str | os.PathLike, *, what: str = "YAML file") -> Any:
    """The document of the YAML file `path`; `ConfigError` naming the file (and the line of a
    syntax error) when it is missing, unreadable or not valid YAML."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} is not a file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML{where}: {' '.join(str(problem).split())}") from None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple, set)):
        return "a list"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    return f"a {type(value).__name__}"


def _to_int(where: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = None
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                pass
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    raise ConfigError(f"{where}={value!r}: expected an integer, got {_kind(value)}")


def _to_float(where: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # PyYAML reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    raise ConfigError(f"{where}={value!r}: expected a number, got {_kind(value)}")


def coerce_value(where: str, value: Any, annotation: Any) -> Any:
    """`value` made to fit a dataclass field annotated `annotation`, or `ConfigError` naming `where`.

    Numeric strings become numbers where the field is an int or a float (``"1e-3"``; an integral
    float is accepted for an int); a bool is refused where a number is expected, a list or a
    mapping where a scalar is, a scalar where a list is. None is passed through (the dataclass
    decides whether it is allowed). Other annotations are left to the dataclass's own checks.
    """
    if value is None:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return coerce_value(where, value, options[0]) if len(options) == 1 else value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false, got {_kind(value)}")
        return value
    if annotation is int:
        return _to_int(where, value)
    if annotation is float:
        return _to_float(where, value)
    if annotation is str:
        if isinstance(value, (Mapping, list, tuple, set)):
            raise ConfigError(f"{where}={value!r}: expected a string, got {_kind(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        if not args:
            return tuple(value)
        return tuple(coerce_value(f"{where}[{i}]", v, args[min(i, len(args) - 1)]) for i, v in enumerate(value))
    return value


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    """Resolved annotations of the dataclass `cls`'s fields (empty if they cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no coercion, the class checks itself
        return {}
    return {f.name: hints[f.name] for f in fields(cls) if f.name in hints}


def coerce_fields(cls, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`data` (keyword arguments of the dataclass `cls`) with each value `coerce_value`-d to its
    field's annotation; errors name ``<where>.<key>``. Keys that are no field pass through."""
    types_ = field_types(cls)
    return {k: coerce_value(f"{where}.{k}", v, types_[k]) if k in types_ else v for k, v in data.items()}


def validate_image_size(height_px: int, width_px: int, *, what: str = "image size") -> None:
    """Raise `ConfigError` unless both sides are positive multiples of 16 px.

    16 px = 8 (VAE downsampling) x 2 (patch size): one image token covers a 16x16 pixel square.
    """
    for name, value in (("height", height_px), ("width", width_px)):
        if not isinstance(value, int) or value <= 0 or value % PIXELS_PER_TOKEN_SIDE:
            raise ConfigError(
                f"{what}: {name}={value!r} px must be a positive multiple of "
                f"{PIXELS_PER_TOKEN_SIDE} px (VAE factor 8 x patch size 2)"
            )


def validate_text_length(num_tokens: int, *, limit: int = MAX_TEXT_TOKENS, what: str = "text") -> None:
    """Raise `ConfigError` if a text conditioning sequence is longer than `limit` tokens."""
    if num_tokens > limit:
        raise ConfigError(
            f"{what}: {num_tokens} tokens is longer than the {limit}-token limit of Qwen-Image "
            "text conditioning (truncate the prompt or raise max_text_tokens)"
        )


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture and build options of the Qwen-Image MMDiT.

    Architecture fields keep the names of diffusers' ``QwenImageTransformer2DModel`` config so
    that a diffusers ``config.json`` maps onto this class one to one.
    """

    # --- architecture (diffusers names) -------------------------------------------------
    num_layers: int = 60
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 3584
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    max_text_tokens: int = MAX_TEXT_TOKENS

    # --- build options ------------------------------------------------------------------
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    backend: str = "local"
    #: Compile the blocks' elementwise chains (LayerNorm+modulation, gated residuals, QK-norm +
    #: RoPE) into fused kernels with torch.compile; GEMMs and attention keep the backend's kernels.
    fused_elementwise: bool = False
    params_dtype: str = "float32"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        # YAML gives lists and reads `1e-6` as a string: numbers become numbers (or a ConfigError
        # names the field), lists tuples, so the dataclass stays hashable and comparable.
        for f in fields(self):
            if f.name != "name":
                object.__setattr__(
                    self,
                    f.name,
                    coerce_value(f"MMDiTConfig.{f.name}", getattr(self, f.name), field_types(MMDiTConfig)[f.name]),
                )
        positive = (
            "num_layers",
            "num_attention_heads",
            "attention_head_dim",
            "joint_attention_dim",
            "in_channels",
            "out_channels",
            "patch_size",
            "mlp_ratio",
            "max_text_tokens",
            "tensor_model_parallel_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MMDiTConfig.{name}={value!r}: expected a positive integer")
        if self.attention_head_dim % 2:
            raise ConfigError(f"MMDiTConfig.attention_head_dim={self.attention_head_dim}: RoPE needs an even head dim")
        if len(self.axes_dims_rope) != 3:
            raise ConfigError(
                f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope}: expected 3 entries (frame, height, width)"
            )
        if any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope}: each axis needs a positive even size")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, "
                f"but must sum to attention_head_dim={self.attention_head_dim}"
            )
        out_tokens = self.patch_size * self.patch_size * self.out_channels
        if self.in_channels != out_tokens:
            raise ConfigError(
                f"MMDiTConfig.in_channels={self.in_channels}: packed latent tokens carry "
                f"patch_size^2 * out_channels = {out_tokens} values; the two must agree"
            )
        if self.max_text_tokens > MAX_TEXT_TOKENS:
            raise ConfigError(f"MMDiTConfig.max_text_tokens={self.max_text_tokens}: at most {MAX_TEXT_TOKENS}")
        if self.num_attention_heads % self.tensor_model_parallel_size:
            raise ConfigError(
                f"MMDiTConfig: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={self.tensor_model_parallel_size}; attention is "
                "sharded by whole heads"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"MMDiTConfig.backend={self.backend!r}: expected one of {BACKENDS}")
        if not isinstance(self.fused_elementwise, bool):
            raise ConfigError(f"MMDiTConfig.fused_elementwise={self.fused_elementwise!r}: expected true or false")
        if self.params_dtype not in DTYPES:
            raise ConfigError(f"MMDiTConfig.params_dtype={self.params_dtype!r}: expected one of {DTYPES}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"MMDiTConfig.norm_eps={self.norm_eps!r}: expected a positive float")

    # --- derived sizes ------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width of both streams, ``D = heads * head_dim`` (3072 for the 20B model)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return self.mlp_ratio * self.hidden_size

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    @property
    def guidance_embeds(self) -> bool:
        """diffusers pipelines read ``transformer.config.guidance_embeds``; Qwen-Image has none."""
        return False

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.params_dtype)

    def replace(self, **overrides: Any) -> MMDiTConfig:
        """A copy with `overrides` applied (validated again)."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"MMDiTConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    # --- diffusers interop --------------------------------------------------------------
    def to_diffusers_config(self) -> dict[str, Any]:
        """The ``config.json`` fields of diffusers' ``QwenImageTransformer2DModel``."""
        return {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.axes_dims_rope),
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides: Any) -> MMDiTConfig:
        """Build from a diffusers ``config.json`` mapping; refuses variants this model lacks."""
        for flag in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if config.get(flag):
                raise ConfigError(
                    f"diffusers config sets {flag}=True: that Qwen-Image variant is not supported "
                    "(base Qwen-Image / Qwen-Image-Edit only)"
                )
        kwargs = {
            "num_layers": config.get("num_layers", 60),
            "num_attention_heads": config.get("num_attention_heads", 24),
            "attention_head_dim": config.get("attention_head_dim", 128),
            "joint_attention_dim": config.get("joint_attention_dim", 3584),
            "in_channels": config.get("in_channels", 64),
            "out_channels": config.get("out_channels") or config.get("in_channels", 64) // 4,
            "patch_size": config.get("patch_size", 2),
            "axes_dims_rope": tuple(config.get("axes_dims_rope", (16, 56, 56))),
            "name": "diffusers",
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


def available_configs() -> list[str]:
    """Names of the configs shipped in ``megatron_qwenimage/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
    """Load a named config (e.g. ``qwen-image-20b``, ``tiny``) or a YAML file, plus overrides.

    A YAML file holds the `MMDiTConfig` fields at top level, or under a ``model:`` key (so a
    training run's YAML can be passed directly).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown model config {str(name_or_path)!r}: expected one of {available_configs()} "
                "or a path to a YAML file"
            )
        name = str(name_or_path)
    else:
        name = path.stem
    data = read_yaml(path, what="model config file")
    if data is None:
        raise ConfigError(f"model config file {str(path)!r} is empty; expected a mapping of MMDiTConfig fields")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of MMDiTConfig fields, got {_kind(data)}")
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    known = {f.name for f in fields(MMDiTConfig)}
    unknown = (set(data) | set(overrides)) - known
    if unknown:
        raise ConfigError(f"{path}: unknown MMDiTConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
    data.setdefault("name", name)
    data.update(overrides)
    return MMDiTConfig(**data)
