"""Weight conversion between diffusers' ``QwenImageTransformer2DModel`` and `QwenImageMMDiT`.

The mapping is a list of `Rule` s, one per tensor of ours. A rule names the diffusers tensor(s)
it is made from, the TP partition dim (shared by our tensor and its sources), an optional row range
of the source (the last block's ``txt_mod`` is split into the used shift/scale rows and the carried
tail), and whether several sources are fused per attention head (``[heads, (q, k, v), head_dim]``).

Import reads, for every tensor, only this TP rank's slice of each source (``safe_open().get_slice``),
so a rank never holds another rank's weights. Export gathers the shards over TP, inverts each rule
and writes a diffusers directory (``config.json`` + safetensors, sharded with an index when large)
that ``QwenImageTransformer2DModel.from_pretrained`` loads.

The *native* format is the same idea with our own canonical names: ``model.safetensors`` (or shards
+ ``model.safetensors.index.json``) holding every full (unsharded) tensor, and ``mmdit_config.json``
holding the `MMDiTConfig`. Any TP/PP layout loads it by reading its slices. `convert_checkpoint`
streams between the two formats one tensor at a time, without building the model.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_qwenimage.config import ConfigError, MMDiTConfig
from megatron_qwenimage.errors import UserError

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
class Rule:
    """How one of our tensors is made from diffusers tensors.

    Attributes:
        ours: our canonical tensor name.
        sources: diffusers tensor names, fused in this order.
        dim: TP partition dim of ours and of every source, None if replicated.
        rows: ``(start, stop)`` along dim 0 of the (single) source, None for the whole tensor.
        fuse_heads: interleave the sources per attention head (fused QKV / KV projections).
    """

    ours: str
    sources: tuple[str, ...]
    dim: int | None
    rows: tuple[int, int] | None = None
    fuse_heads: bool = False


def _linear(ours: str, theirs: str, dim: int | None, bias_dim: int | None) -> list[Rule]:
    return [
        Rule(f"{ours}.weight", (f"{theirs}.weight",), dim),
        Rule(f"{ours}.bias", (f"{theirs}.bias",), bias_dim),
    ]


def _column(ours: str, theirs: str) -> list[Rule]:
    return _linear(ours, theirs, 0, 0)


def _row(ours: str, theirs: str) -> list[Rule]:
    return _linear(ours, theirs, 1, None)


def _fused(ours: str, theirs: Iterable[str]) -> list[Rule]:
    theirs = tuple(theirs)
    return [
        Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs), 0, fuse_heads=True),
        Rule(f"{ours}.bias", tuple(f"{t}.bias" for t in theirs), 0, fuse_heads=True),
    ]


def block_rules(config: MMDiTConfig, index: int) -> list[Rule]:
    """Rules of block `index` (global); the last block's text weights go to its carried buffers."""
    d = config.hidden_size
    o, t = f"blocks.{index}", f"transformer_blocks.{index}"
    rules = [
        *_column(f"{o}.img_mod", f"{t}.img_mod.1"),
        *_fused(f"{o}.img_qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")),
        Rule(f"{o}.img_q_norm.weight", (f"{t}.attn.norm_q.weight",), None),
        Rule(f"{o}.img_k_norm.weight", (f"{t}.attn.norm_k.weight",), None),
        *_row(f"{o}.img_out", f"{t}.attn.to_out.0"),
        *_column(f"{o}.img_mlp.fc1", f"{t}.img_mlp.net.0.proj"),
        *_row(f"{o}.img_mlp.fc2", f"{t}.img_mlp.net.2"),
        Rule(f"{o}.txt_k_norm.weight", (f"{t}.attn.norm_added_k.weight",), None),
    ]
    if index != config.num_layers - 1:
        return rules + [
            *_column(f"{o}.txt_mod", f"{t}.txt_mod.1"),
            *_fused(f"{o}.txt_qkv", (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")),
            Rule(f"{o}.txt_q_norm.weight", (f"{t}.attn.norm_added_q.weight",), None),
            *_row(f"{o}.txt_out", f"{t}.attn.to_add_out"),
            *_column(f"{o}.txt_mlp.fc1", f"{t}.txt_mlp.net.0.proj"),
            *_row(f"{o}.txt_mlp.fc2", f"{t}.txt_mlp.net.2"),
        ]
    c = f"{o}.carried"
    return rules + [
        Rule(f"{o}.txt_mod.weight", (f"{t}.txt_mod.1.weight",), 0, rows=(0, 2 * d)),
        Rule(f"{o}.txt_mod.bias", (f"{t}.txt_mod.1.bias",), 0, rows=(0, 2 * d)),
        Rule(f"{c}.mod_tail_weight", (f"{t}.txt_mod.1.weight",), 0, rows=(2 * d, 6 * d)),
        Rule(f"{c}.mod_tail_bias", (f"{t}.txt_mod.1.bias",), 0, rows=(2 * d, 6 * d)),
        *_fused(f"{o}.txt_kv", (f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")),
        Rule(f"{c}.q_weight", (f"{t}.attn.add_q_proj.weight",), 0),
        Rule(f"{c}.q_bias", (f"{t}.attn.add_q_proj.bias",), 0),
        Rule(f"{c}.q_norm_weight", (f"{t}.attn.norm_added_q.weight",), None),
        Rule(f"{c}.out_weight", (f"{t}.attn.to_add_out.weight",), 1),
        Rule(f"{c}.out_bias", (f"{t}.attn.to_add_out.bias",), None),
        Rule(f"{c}.fc1_weight", (f"{t}.txt_mlp.net.0.proj.weight",), 0),
        Rule(f"{c}.fc1_bias", (f"{t}.txt_mlp.net.0.proj.bias",), 0),
        Rule(f"{c}.fc2_weight", (f"{t}.txt_mlp.net.2.weight",), 1),
        Rule(f"{c}.fc2_bias", (f"{t}.txt_mlp.net.2.bias",), None),
    ]


def conversion_rules(
    config: MMDiTConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    layer_range: tuple[int, int] | None = None,
) -> list[Rule]:
    """All rules for a model object holding the given stage pieces."""
    start, end = layer_range or (0, config.num_layers)
    rules: list[Rule] = []
    if pre_process:
        rules += [
            *_linear("time_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1", None, None),
            *_linear("time_embedder.linear_2", "time_text_embed.timestep_embedder.linear_2", None, None),
            Rule("txt_norm.weight", ("txt_norm.weight",), None),
            *_linear("txt_in", "txt_in", None, None),
            *_linear("img_in", "img_in", None, None),
        ]
    for i in range(start, end):
        rules += block_rules(config, i)
    if post_process:
        rules += [*_column("norm_out", "norm_out.linear"), *_linear("proj_out", "proj_out", None, None)]
    return rules


# ----------------------------------------------------------------------------- tensor sources
class TensorSource(abc.ABC):
    """Read-only access to a diffusers state: shapes, and slices along one dim."""

    @abc.abstractmethod
    def names(self) -> set[str]: ...

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor `name`, or its ``[start:stop]`` slice along `dim`."""

    @abc.abstractmethod
    def dtype(self, name: str) -> str:
        """The stored dtype of `name`, as torch names it without ``torch.`` (``float32``, ``int32``)."""


#: safetensors dtype codes -> torch dtype names (messages) and whether they are floating point.
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def check_floating(source: TensorSource, names: Iterable[str], where: str) -> None:
    """Raise `CheckpointError` naming every tensor of `names` whose dtype is not floating point
    (weights are never integers or booleans: such a tensor would be cast silently)."""
    bad = []
    for name in sorted(names):
        dtype = source.dtype(name)
        if not (dtype.startswith("float") or dtype.startswith("bfloat")):
            bad.append(f"{name} ({dtype})")
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} tensor(s) with a non-floating-point dtype: {_preview(bad)}; a transformer "
            "checkpoint holds floating-point weights only"
        )


class StateDictSource(TensorSource):
    """A diffusers model instance's (or any) in-memory state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> set[str]:
        return set(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> str:
        return str(self.state[name].dtype).removeprefix("torch.")

    def read(self, name, dim=None, start=0, stop=None):
        t = self.state[name].detach()
        if dim is None:
            return t.clone()
        return t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start).clone()


class SafetensorsDirSource(TensorSource):
    """A directory of one ``<weights_name>`` file or shards listed in ``<index_name>``.

    Slices are read with ``safe_open(...).get_slice`` so only the requested rows leave the disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        weights_name: str = WEIGHTS_NAME,
        index_name: str = INDEX_NAME,
    ):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / index_name
        single = self.directory / weights_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: no `weight_map` of tensor name -> file; not a safetensors index")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [weights_name]
        else:
            raise CheckpointError(f"{self.directory}: no {weights_name} or {index_name}")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{self.directory}: the index names {name}, which does not exist")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors' own error type: a truncated or foreign file
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({' '.join(str(exc).split())})"
                ) from None
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        code = self._handles[self._file_of[name]].get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code.lower())

    def read(self, name, dim=None, start=0, stop=None):
        sl = self._handles[self._file_of[name]].get_slice(name)
        if dim is None:
            return sl[:]
        stop = self.shape(name)[dim] if stop is None else stop
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; `CheckpointError` naming `path` when it is unreadable or no object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_diffusers_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a diffusers transformer directory")
    return _read_json(path)


def diffusers_model_config(directory: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of a diffusers directory's ``config.json``; `CheckpointError` naming the file."""
    data = read_diffusers_config(directory)
    name = data.get("_class_name")
    if name not in (None, "QwenImageTransformer2DModel"):
        raise CheckpointError(
            f"{Path(directory) / CONFIG_NAME}: _class_name {name!r}, expected "
            "'QwenImageTransformer2DModel' (another architecture)"
        )
    try:
        return MMDiTConfig.from_diffusers_config(data, **overrides)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: {exc}") from None


def native_model_config(directory: str | os.PathLike, **overrides: Any) -> MMDiTConfig:
    """The `MMDiTConfig` of a native checkpoint's ``mmdit_config.json``; `CheckpointError` naming the file."""
    stored = read_native_config(directory)
    stored.pop("tensor_model_parallel_size", None)
    try:
        return MMDiTConfig(**{**stored, **overrides})
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{Path(directory) / NATIVE_CONFIG_NAME}: {exc}") from None


# ----------------------------------------------------------------------------- import
def expected_source_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of a diffusers checkpoint for `config` (the full model)."""
    d, f, hd = config.hidden_size, config.ffn_hidden_size, config.attention_head_dim
    shapes = {
        "time_text_embed.timestep_embedder.linear_1.weight": (d, 256),
        "time_text_embed.timestep_embedder.linear_1.bias": (d,),
        "time_text_embed.timestep_embedder.linear_2.weight": (d, d),
        "time_text_embed.timestep_embedder.linear_2.bias": (d,),
        "txt_norm.weight": (config.joint_attention_dim,),
        "txt_in.weight": (d, config.joint_attention_dim),
        "txt_in.bias": (d,),
        "img_in.weight": (d, config.in_channels),
        "img_in.bias": (d,),
        "norm_out.linear.weight": (2 * d, d),
        "norm_out.linear.bias": (2 * d,),
        "proj_out.weight": (config.patch_size**2 * config.out_channels, d),
        "proj_out.bias": (config.patch_size**2 * config.out_channels,),
    }
    for i in range(config.num_layers):
        t = f"transformer_blocks.{i}"
        for s in ("img", "txt"):
            shapes[f"{t}.{s}_mod.1.weight"] = (6 * d, d)
            shapes[f"{t}.{s}_mod.1.bias"] = (6 * d,)
            shapes[f"{t}.{s}_mlp.net.0.proj.weight"] = (f, d)
            shapes[f"{t}.{s}_mlp.net.0.proj.bias"] = (f,)
            shapes[f"{t}.{s}_mlp.net.2.weight"] = (d, f)
            shapes[f"{t}.{s}_mlp.net.2.bias"] = (d,)
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            shapes[f"{t}.attn.{p}.weight"] = (d, d)
            shapes[f"{t}.attn.{p}.bias"] = (d,)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[f"{t}.attn.{n}.weight"] = (hd,)
    return shapes


def expected_native_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every (full) tensor of a native checkpoint for `config`."""
    theirs = expected_source_shapes(config)
    shapes = {}
    for rule in conversion_rules(config):
        sources = [theirs[name] for name in rule.sources]
        if rule.rows is not None:
            shapes[rule.ours] = (rule.rows[1] - rule.rows[0], *sources[0][1:])
        elif rule.fuse_heads:
            shapes[rule.ours] = (sum(s[0] for s in sources), *sources[0][1:])
        else:
            shapes[rule.ours] = sources[0]
    return shapes


def check_source(source: TensorSource, config: MMDiTConfig, where: str) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or mis-shaped diffusers tensor."""
    check_shapes(source, expected_source_shapes(config), f"{where} does not match the model config ({config.name})")


def check_shapes(
    source: TensorSource, expected: dict[str, tuple[int, ...]], what: str, *, allow_unexpected: bool = False
) -> None:
    """Raise `CheckpointError` (prefixed by `what`) naming every missing, mis-shaped and, unless
    `allow_unexpected`, unexpected tensor of `source` against `expected` shapes."""
    present = source.names()
    missing = sorted(set(expected) - present)
    unexpected = [] if allow_unexpected else sorted(present - set(expected))
    wrong = [
        f"{n}: expected {expected[n]}, found {source.shape(n)}"
        for n in sorted(set(expected) & present)
        if source.shape(n) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_preview(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with wrong shape: {_preview(wrong)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def read_shard(source: TensorSource, rule: Rule, tp_rank: int, tp_size: int, head_dim: int) -> torch.Tensor:
    """This TP rank's shard of the tensor described by `rule`, read from `source`."""
    pieces = []
    for name in rule.sources:
        if rule.dim is None:
            pieces.append(source.read(name))
            continue
        lo, hi = rule.rows if rule.rows is not None else (0, source.shape(name)[rule.dim])
        chunk = (hi - lo) // tp_size
        start = lo + tp_rank * chunk
        pieces.append(source.read(name, rule.dim, start, start + chunk))
    if not rule.fuse_heads:
        (piece,) = pieces
        return piece
    return fuse_heads(pieces, head_dim)


def fuse_heads(pieces: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """``n`` tensors ``[heads*d, ...]`` -> ``[heads*n*d, ...]`` laid out ``[heads, n, d]``."""
    heads = pieces[0].shape[0] // head_dim
    stacked = torch.stack([p.reshape(heads, head_dim, *p.shape[1:]) for p in pieces], dim=1)
    return stacked.reshape(heads * len(pieces) * head_dim, *pieces[0].shape[1:])


def split_heads(fused: torch.Tensor, parts: int, head_dim: int) -> list[torch.Tensor]:
    """Inverse of `fuse_heads`."""
    heads = fused.shape[0] // (parts * head_dim)
    view = fused.reshape(heads, parts, head_dim, *fused.shape[1:])
    return [view[:, i].reshape(heads * head_dim, *fused.shape[1:]) for i in range(parts)]


_MODEL_KWARGS = ("tp_group", "pre_process", "post_process", "layer_range")


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
        return "native"
    if (d / CONFIG_NAME).exists():
        return "diffusers"
    raise CheckpointError(
        f"{d}: neither {CONFIG_NAME} (a diffusers QwenImageTransformer2DModel directory) nor "
        f"{NATIVE_CONFIG_NAME} (a megatron-qwenimage native checkpoint) is there"
    )


def native_rules(model) -> list[Rule]:
    """Identity rules: each of our tensors from the same-named full tensor of a native checkpoint."""
    return [Rule(name, (name,), model.partition_dims[name]) for name, _ in model.named_model_tensors()]


def read_native_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / NATIVE_CONFIG_NAME
    data = _read_json(path)
    if data.get("format") != NATIVE_FORMAT["format"] or not isinstance(data.get("model"), dict):
        raise CheckpointError(
            f"{path}: not a megatron-qwenimage checkpoint config (no format "
            f"{NATIVE_FORMAT['format']!r} and `model` mapping)"
        )
    return dict(data["model"])


@torch.no_grad()
def load_from_diffusers(cls, path_or_model, **overrides: Any):
    """`QwenImageMMDiT.from_diffusers`: build a model (this rank's TP shard) and load it."""
    if isinstance(path_or_model, (str, os.PathLike)):
        where = str(path_or_model)
        if checkpoint_format(path_or_model) != "diffusers":
            raise CheckpointError(f"{where}: a native checkpoint; use QwenImageMMDiT.from_native")
        diffusers_config = read_diffusers_config(path_or_model)
        source: TensorSource = SafetensorsDirSource(path_or_model)
    else:
        where = f"{type(path_or_model).__name__} instance"
        diffusers_config = dict(path_or_model.config)
        source = StateDictSource(path_or_model.state_dict())
    model_kwargs, device, config_overrides = _split_overrides(overrides)
    try:
        config = MMDiTConfig.from_diffusers_config(diffusers_config, **config_overrides)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    check_source(source, config, where)
    check_floating(source, expected_source_shapes(config), where)
    model = _empty_model(cls, config, model_kwargs, device)
    rules = conversion_rules(
        config, pre_process=model.pre_process, post_process=model.post_process, layer_range=model.layer_range
    )
    _load_rules(model, source, rules, where)
    return model


@torch.no_grad()
def load_from_native(cls, directory: str | os.PathLike, **overrides: Any):
    """`QwenImageMMDiT.from_native`: build a model (any TP/PP piece) from a native checkpoint."""
    where = str(directory)
    if checkpoint_format(directory) != "native":
        raise CheckpointError(f"{where}: a diffusers directory; use QwenImageMMDiT.from_diffusers")
    source = SafetensorsDirSource(directory, NATIVE_WEIGHTS_NAME, NATIVE_INDEX_NAME)
    model_kwargs, device, config_overrides = _split_overrides(overrides)
    config = native_model_config(directory, **config_overrides)
    model = _empty_model(cls, config, model_kwargs, device)
    rules = native_rules(model)
    # A pipeline stage loads a subset of the checkpoint: other stages' tensors are expected there.
    expected = {name: model.full_shape(name, t) for name, t in model.named_model_tensors()}
    check_shapes(source, expected, f"{where} does not match the model", allow_unexpected=True)
    check_floating(source, expected, where)
    _load_rules(model, source, rules, where)
    return model


def _split_overrides(overrides: dict[str, Any]):
    """(constructor kwargs incl. the TP group, device, MMDiTConfig overrides)."""
    from megatron_qwenimage.model.mmdit import default_tp_group

    overrides = dict(overrides)
    model_kwargs = {k: overrides.pop(k) for k in _MODEL_KWARGS if k in overrides}
    device = torch.device(overrides.pop("device", "cpu"))
    tp_group = model_kwargs.get("tp_group") or default_tp_group()
    model_kwargs["tp_group"] = tp_group
    tp_size = 1 if tp_group is None else tp_group.size()
    overrides.setdefault("tensor_model_parallel_size", tp_size)
    return model_kwargs, device, overrides


def _empty_model(cls, config: MMDiTConfig, model_kwargs: dict[str, Any], device: torch.device):
    """Build on the meta device (nothing allocated, no init), then allocate this rank's shards."""
    with torch.device("meta"):
        model = cls(config, **model_kwargs)
    return model.to_empty(device=device)


def _load_rules(model, source: TensorSource, rules: list[Rule], where: str) -> None:
    tensors = dict(model.named_model_tensors())
    covered = {r.ours for r in rules}
    if covered != set(tensors):
        raise RuntimeError(f"conversion rules do not cover the model: {sorted(set(tensors) ^ covered)}")
    for rule in rules:
        shard = read_shard(source, rule, model.tp.rank, model.tp.size, model.config.attention_head_dim)
        target = tensors[rule.ours]
        if tuple(shard.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{where}: {rule.sources} gives a shard of shape {tuple(shard.shape)} for {rule.ours}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(shard.to(target.dtype))


# ----------------------------------------------------------------------------- writing
class ShardedSafetensorsWriter:
    """Writes tensors into ``<stem>.safetensors``, or numbered shards plus an index once the total
    passes `max_shard_bytes` (the layout diffusers and transformers use)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        weights_name: str,
        index_name: str,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes}: expected a positive byte count")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.weights_name, self.index_name = weights_name, index_name
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"part-{len(self._files) + 1:05d}.safetensors.tmp"
        save_file(self._pending, str(self.directory / tmp), metadata=self.metadata)
        self._files.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._files:
            self._flush()
        stem = self.weights_name[: -len(".safetensors")]
        if len(self._files) == 1:
            os.replace(self.directory / self._files[0][0], self.directory / self.weights_name)
            return
        weight_map = {}
        n = len(self._files)
        for k, (tmp, names) in enumerate(self._files, start=1):
            final = f"{stem}-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            weight_map.update({name: final for name in names})
        with open(self.directory / self.index_name, "w") as f:
            json.dump({"metadata": {"total_size": self._total}, "weight_map": weight_map}, f, indent=2)


def gather_full_state(model) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) tensors of `model` by canonical name, on CPU (collective over TP)."""
    full = {}
    for name, tensor in model.named_model_tensors():
        dim = model.partition_dims[name]
        t = tensor.detach()
        if dim is not None and model.tp.size > 1:
            parts = [torch.empty_like(t) for _ in range(model.tp.size)]
            torch.distributed.all_gather(parts, t.contiguous(), group=model.tp.group)
            t = torch.cat(parts, dim=dim)
        full[name] = t.cpu()
    return full


def diffusers_tensors(get: Callable[[str], torch.Tensor], config: MMDiTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Invert the rules: yield every diffusers tensor, reading our full tensors through `get`.

    Tensors are produced one diffusers name at a time (sorted), so a caller can stream them to
    disk; a fused tensor is read once per diffusers tensor it feeds (q, k, v), which is cheap.
    """
    shapes = expected_source_shapes(config)
    producers: dict[str, list[tuple[Rule, int]]] = {}
    for rule in conversion_rules(config):
        for position, name in enumerate(rule.sources):
            producers.setdefault(name, []).append((rule, position))
    for name in sorted(shapes):
        out = None
        for rule, position in producers[name]:
            ours = get(rule.ours)
            part = (
                split_heads(ours, len(rule.sources), config.attention_head_dim)[position] if rule.fuse_heads else ours
            )
            if rule.rows is None:
                out = part
            else:
                if out is None:
                    out = torch.empty(shapes[name], dtype=part.dtype)
                out[rule.rows[0] : rule.rows[1]] = part
        yield name, out.contiguous()


def to_diffusers_state(full: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our full tensors (a dict) -> the diffusers state dict of the whole model."""
    return dict(diffusers_tensors(full.__getitem__, config))


def write_diffusers_config(directory: str | os.PathLike, config: MMDiTConfig) -> None:
    with open(Path(directory) / CONFIG_NAME, "w") as f:
        json.dump(dict(config.to_diffusers_config(), _diffusers_version=DIFFUSERS_VERSION), f, indent=2)


def write_native_config(directory: str | os.PathLike, config: MMDiTConfig) -> None:
    model = config.to_dict()
    model.pop("tensor_model_parallel_size")
    model.pop("sequence_parallel")
    with open(Path(directory) / NATIVE_CONFIG_NAME, "w") as f:
        json.dump({**NATIVE_FORMAT, "model": model}, f, indent=2)


def _write_checkpoint(
    fmt: str,
    directory,
    items: Iterable[tuple[str, torch.Tensor]],
    config: MMDiTConfig,
    *,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Stream `items` into a ``fmt`` ("diffusers" | "native") directory, then write its config."""
    if fmt == "native":
        writer = ShardedSafetensorsWriter(
            directory, NATIVE_WEIGHTS_NAME, NATIVE_INDEX_NAME, max_shard_bytes, NATIVE_FORMAT
        )
    else:
        writer = ShardedSafetensorsWriter(directory, WEIGHTS_NAME, INDEX_NAME, max_shard_bytes)
    for done, (name, tensor) in enumerate(items, start=1):
        writer.add(name, tensor if dtype is None else tensor.to(dtype))
        if progress is not None:
            progress(done)
    writer.close()
    (write_native_config if fmt == "native" else write_diffusers_config)(directory, config)


def _save_whole_model(model, directory, fmt: str, *, max_shard_bytes: int, dtype, write: bool | None) -> None:
    if not (model.pre_process and model.post_process and model.layer_range == (0, model.config.num_layers)):
        raise ValueError(f"saving a {fmt} checkpoint needs the whole model, not one pipeline stage")
    full = gather_full_state(model)
    if not (model.tp.rank == 0 if write is None else write):
        return
    if fmt == "diffusers":
        items = diffusers_tensors(full.__getitem__, model.config)
    else:
        items = ((name, full[name]) for name in sorted(full))
    _write_checkpoint(fmt, directory, items, model.config, dtype=dtype, max_shard_bytes=max_shard_bytes)


def export_to_diffusers(
    model,
    directory,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    write: bool | None = None,
) -> None:
    """Write `model` as a diffusers ``QwenImageTransformer2DModel`` directory.

    Collective over the TP group when TP > 1 (every TP rank must call it); only TP rank 0 writes
    unless `write` says otherwise. Shards with an index past `max_shard_bytes`, as diffusers does.
    """
    _save_whole_model(model, directory, "diffusers", max_shard_bytes=max_shard_bytes, dtype=dtype, write=write)


def save_native(
    model,
    directory,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    write: bool | None = None,
) -> None:
    """Write `model` (whole) as a native checkpoint of full canonical tensors (collective over TP,
    as `export_to_diffusers`)."""
    _save_whole_model(model, directory, "native", max_shard_bytes=max_shard_bytes, dtype=dtype, write=write)


# ----------------------------------------------------------------------------- streaming conversion
def convert_checkpoint(
    src,
    dst,
    *,
    to: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Convert a checkpoint directory between the diffusers and native formats, tensor by tensor.

    Memory stays at one output shard plus the tensors in flight; the model is never built.
    Returns the target format. `progress(done, total)` is called after each tensor.
    """
    source_format = checkpoint_format(src)
    to = to or ("native" if source_format == "diffusers" else "diffusers")
    if to not in ("native", "diffusers"):
        raise ValueError(f"to={to!r}: expected 'native' or 'diffusers'")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory; refusing to overwrite it")
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst}: exists and is not empty; refusing to overwrite a checkpoint")
    # Everything about the source is checked before anything is written: names, shapes, dtypes.
    if source_format == "diffusers":
        config = diffusers_model_config(src)
        source: TensorSource = SafetensorsDirSource(src)
        check_source(source, config, str(src))
    else:
        config = native_model_config(src)
        source = SafetensorsDirSource(src, NATIVE_WEIGHTS_NAME, NATIVE_INDEX_NAME)
        check_shapes(source, expected_native_shapes(config), f"{src} does not match its {NATIVE_CONFIG_NAME}")
    check_floating(source, source.names(), str(src))

    if source_format == to:
        names = sorted(source.names())
        items = ((n, source.read(n)) for n in names)
    elif to == "native":
        rules = sorted(conversion_rules(config), key=lambda r: r.ours)
        names = [r.ours for r in rules]
        items = ((r.ours, read_shard(source, r, 0, 1, config.attention_head_dim)) for r in rules)
    else:
        names = sorted(expected_source_shapes(config))
        items = diffusers_tensors(source.read, config)

    # Written next to `dst` and renamed into place at the end: an interrupted or failed conversion
    # leaves no partial checkpoint behind (an empty `dst` is replaced by the rename).
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_checkpoint(
            to,
            tmp,
            items,
            config,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            progress=None if progress is None else (lambda done: progress(done, len(names))),
        )
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return to
