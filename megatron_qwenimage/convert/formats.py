"""The two checkpoint directory formats on disk: their files, configs and detection.

* ``diffusers``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or shards + an index),
  what ``QwenImageTransformer2DModel.from_pretrained`` loads;
* ``native``: ``mmdit_config.json`` (the `MMDiTConfig`) + ``model.safetensors`` (or shards + an
  index) holding every full tensor under our canonical names.

The tensor names inside each format are `megatron_qwenimage.model.state_dict_names`'s business.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_qwenimage.config import ConfigError, MMDiTConfig
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.model.state_dict_names import DIFFUSERS, NATIVE

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
DIFFUSERS_VERSION = "0.42.1"

NATIVE_WEIGHTS_NAME = "model.safetensors"
NATIVE_INDEX_NAME = "model.safetensors.index.json"
NATIVE_CONFIG_NAME = "mmdit_config.json"
NATIVE_FORMAT = {"format": "megatron-qwenimage", "format_version": "1"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(UserError, ValueError):
    """A checkpoint directory is missing tensors, has unexpected ones, or wrong shapes."""


@dataclass(frozen=True)
class Layout:
    """The files of one checkpoint format.

    Attributes:
        format: ``"diffusers"`` or ``"native"`` (also the tensor naming scheme).
        weights_name: the single weights file; shards are ``<stem>-0000k-of-0000n.safetensors``.
        index_name: the shards' index (``weight_map``: tensor name -> file).
        config_name: the config file that identifies the format.
        metadata: safetensors header metadata written besides ``format: pt``.
    """

    format: str
    weights_name: str
    index_name: str
    config_name: str
    metadata: Mapping[str, str] | None = None


LAYOUTS = {
    DIFFUSERS: Layout(DIFFUSERS, WEIGHTS_NAME, INDEX_NAME, CONFIG_NAME),
    NATIVE: Layout(NATIVE, NATIVE_WEIGHTS_NAME, NATIVE_INDEX_NAME, NATIVE_CONFIG_NAME, NATIVE_FORMAT),
}


def checkpoint_format(directory: str | os.PathLike) -> str:
    """``"diffusers"`` or ``"native"``, from the files in `directory`; raises `CheckpointError`."""
    d = Path(directory)
    if not d.exists():
        raise CheckpointError(
            f"{d}: not a directory, it does not exist (expected a diffusers or native checkpoint directory)"
        )
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a diffusers or native checkpoint directory)")
    if (d / NATIVE_CONFIG_NAME).exists():
        return NATIVE
    if (d / CONFIG_NAME).exists():
        return DIFFUSERS
    raise CheckpointError(
        f"{d}: neither {CONFIG_NAME} (a diffusers QwenImageTransformer2DModel directory) nor "
        f"{NATIVE_CONFIG_NAME} (a megatron-qwenimage native checkpoint) is there"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; `CheckpointError` naming `path` when it is unreadable or no object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- diffusers config
def read_diffusers_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a diffusers transformer directory")
    return read_json(path)


def config_from_diffusers(data: Mapping[str, Any], where: str, **overrides: Any) -> MMDiTConfig:
    """`MMDiTConfig.from_diffusers_config`, failing with a `CheckpointError` prefixed by `where`."""
    try:
        return MMDiTConfig.from_diffusers_config(data, **overrides)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def diffusers_model_config(directory: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of a diffusers directory's ``config.json``; `CheckpointError` naming the file."""
    data = read_diffusers_config(directory)
    name = data.get("_class_name")
    if name not in (None, "QwenImageTransformer2DModel"):
        raise CheckpointError(
            f"{Path(directory) / CONFIG_NAME}: _class_name {name!r}, expected "
            "'QwenImageTransformer2DModel' (another architecture)"
        )
    return config_from_diffusers(data, str(Path(directory) / CONFIG_NAME), **overrides)


def write_diffusers_config(directory: str | os.PathLike, config: MMDiTConfig) -> None:
    with open(Path(directory) / CONFIG_NAME, "w") as f:
        json.dump(dict(config.to_diffusers_config(), _diffusers_version=DIFFUSERS_VERSION), f, indent=2)


# ----------------------------------------------------------------------------- native config
def read_native_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / NATIVE_CONFIG_NAME
    data = read_json(path)
    if data.get("format") != NATIVE_FORMAT["format"] or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{path}: not a megatron-qwenimage checkpoint config (no format "
            f"{NATIVE_FORMAT['format']!r} and `model` mapping)"
        )
    return dict(data["model"])


def native_model_config(directory: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of a native checkpoint's ``mmdit_config.json``; `CheckpointError` naming the file."""
    stored = read_native_config(directory)
    stored.pop("tensor_model_parallel_size", None)
    try:
        return MMDiTConfig(**{**stored, **overrides})
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{Path(directory) / NATIVE_CONFIG_NAME}: {exc}") from None


def write_native_config(directory: str | os.PathLike, config: MMDiTConfig) -> None:
    model = config.to_dict()
    model.pop("tensor_model_parallel_size")
    model.pop("sequence_parallel")
    with open(Path(directory) / NATIVE_CONFIG_NAME, "w") as f:
        json.dump({**NATIVE_FORMAT, "model": model}, f, indent=2)


def model_config(fmt: str, directory: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` stored in a `fmt` checkpoint directory, with `overrides`."""
    reader = diffusers_model_config if fmt == DIFFUSERS else native_model_config
    return reader(directory, **overrides)


def write_config(fmt: str, directory: str | os.PathLike, config: MMDiTConfig) -> None:
    """Write the config file of a `fmt` checkpoint directory."""
    (write_diffusers_config if fmt == DIFFUSERS else write_native_config)(directory, config)
