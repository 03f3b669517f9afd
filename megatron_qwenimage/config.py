"""Model configuration for the Qwen-Image MMDiT.

`MMDiTConfig` holds the architecture (the numbers of QWEN_IMAGE_SPEC.md section 1.1) together with
the few runtime choices that change how the model is *built*: tensor-parallel size, sequence
parallelism, kernel backend and parameter dtype. Like megatron-core's ``TransformerConfig`` it is
validated when it is constructed, so a bad value fails before any weight is allocated.

Named configs live as YAML files in ``megatron_qwenimage/configs/``; `load_config` takes such a
name or a path to a YAML file, plus keyword overrides.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

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
        # YAML and JSON give lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
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
            raise ConfigError(
                f"MMDiTConfig.attention_head_dim={self.attention_head_dim}: RoPE needs an even head dim"
            )
        if len(self.axes_dims_rope) != 3:
            raise ConfigError(
                f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope}: expected 3 entries (frame, height, width)"
            )
        if any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ConfigError(
                f"MMDiTConfig.axes_dims_rope={self.axes_dims_rope}: each axis needs a positive even size"
            )
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
            raise ConfigError(
                f"MMDiTConfig.max_text_tokens={self.max_text_tokens}: at most {MAX_TEXT_TOKENS}"
            )
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
        if not self.norm_eps > 0:
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

    def replace(self, **overrides: Any) -> "MMDiTConfig":
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
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides: Any) -> "MMDiTConfig":
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
    if not path.exists():
        raise ConfigError(f"model config file {str(path)!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of MMDiTConfig fields, got {type(data).__name__}")
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    known = {f.name for f in fields(MMDiTConfig)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{path}: unknown MMDiTConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
    data.setdefault("name", name)
    data.update(overrides)
    return MMDiTConfig(**data)
