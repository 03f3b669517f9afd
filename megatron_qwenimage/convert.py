"""Weight conversion between diffusers' ``QwenImageTransformer2DModel`` and `QwenImageMMDiT`.

The mapping is a list of `Rule` s, one per tensor of ours. A rule names the diffusers tensor(s)
it is made from, the TP partition dim (shared by our tensor and its sources), an optional row range
of the source (the last block's ``txt_mod`` is split into the used shift/scale rows and the carried
tail), and whether several sources are fused per attention head (``[heads, (q, k, v), head_dim]``).

Import reads, for every tensor, only this TP rank's slice of each source (``safe_open().get_slice``),
so a rank never holds another rank's weights. Export gathers the shards over TP, inverts each rule
and writes a diffusers directory (``config.json`` + safetensors, sharded with an index when large)
that ``QwenImageTransformer2DModel.from_pretrained`` loads.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from megatron_qwenimage.config import ConfigError, MMDiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
DIFFUSERS_VERSION = "0.42.1"


class CheckpointError(ValueError):
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
    dim: Optional[int]
    rows: Optional[tuple[int, int]] = None
    fuse_heads: bool = False


def _linear(ours: str, theirs: str, dim: Optional[int], bias_dim: Optional[int]) -> list[Rule]:
    return [Rule(f"{ours}.weight", (f"{theirs}.weight",), dim), Rule(f"{ours}.bias", (f"{theirs}.bias",), bias_dim)]


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
    layer_range: Optional[tuple[int, int]] = None,
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
    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The tensor `name`, or its ``[start:stop]`` slice along `dim`."""


class StateDictSource(TensorSource):
    """A diffusers model instance's (or any) in-memory state dict."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> set[str]:
        return set(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.state[name].detach()
        if dim is None:
            return t.clone()
        return t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start).clone()


class SafetensorsDirSource(TensorSource):
    """A diffusers directory: one ``diffusion_pytorch_model.safetensors`` or shards + index.

    Slices are read with ``safe_open(...).get_slice`` so only the requested rows leave the disk.
    """

    def __init__(self, directory: Union[str, os.PathLike]):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / WEIGHTS_NAME
        if index.exists():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [WEIGHTS_NAME]
        else:
            raise CheckpointError(
                f"{self.directory}: no {WEIGHTS_NAME} or {INDEX_NAME}; expected a diffusers "
                "QwenImageTransformer2DModel directory (as written by save_pretrained)"
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{self.directory}: the index names {name}, which does not exist")
            handle = safe_open(str(path), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self._file_of[key] = name

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def read(self, name, dim=None, start=0, stop=None):
        sl = self._handles[self._file_of[name]].get_slice(name)
        if dim is None:
            return sl[:]
        stop = self.shape(name)[dim] if stop is None else stop
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]


def read_diffusers_config(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; expected a diffusers transformer directory")
    with open(path) as f:
        return json.load(f)


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


def check_source(source: TensorSource, config: MMDiTConfig, where: str) -> None:
    """Raise `CheckpointError` naming every missing, unexpected or mis-shaped tensor."""
    expected = expected_source_shapes(config)
    present = source.names()
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
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
        raise CheckpointError(f"{where} does not match the model config ({config.name}): " + "; ".join(problems))


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


@torch.no_grad()
def load_from_diffusers(cls, path_or_model, **overrides: Any):
    """`QwenImageMMDiT.from_diffusers`: build a model (this rank's TP shard) and load it."""
    from megatron_qwenimage.model.mmdit import default_tp_group

    model_kwargs = {k: overrides.pop(k) for k in _MODEL_KWARGS if k in overrides}
    device = torch.device(overrides.pop("device", "cpu"))
    if isinstance(path_or_model, (str, os.PathLike)):
        where = str(path_or_model)
        diffusers_config = read_diffusers_config(path_or_model)
        source: TensorSource = SafetensorsDirSource(path_or_model)
    else:
        where = f"{type(path_or_model).__name__} instance"
        diffusers_config = dict(path_or_model.config)
        source = StateDictSource(path_or_model.state_dict())
    tp_group = model_kwargs.get("tp_group") or default_tp_group()
    model_kwargs["tp_group"] = tp_group
    tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    overrides.setdefault("tensor_model_parallel_size", tp_size)
    config = MMDiTConfig.from_diffusers_config(diffusers_config, **overrides)
    check_source(source, config, where)

    with torch.device("meta"):
        model = cls(config, **model_kwargs)
    model.to_empty(device=device)
    tensors = dict(model.named_model_tensors())
    rules = conversion_rules(
        config, pre_process=model.pre_process, post_process=model.post_process, layer_range=model.layer_range
    )
    covered = {r.ours for r in rules}
    if covered != set(tensors):
        raise RuntimeError(f"conversion rules do not cover the model: {sorted(set(tensors) ^ covered)}")
    for rule in rules:
        shard = read_shard(source, rule, model.tp.rank, model.tp.size, config.attention_head_dim)
        target = tensors[rule.ours]
        if tuple(shard.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{where}: {rule.sources} gives a shard of shape {tuple(shard.shape)} for {rule.ours}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(shard.to(target.dtype))
    return model


# ----------------------------------------------------------------------------- export
def gather_full_state(model) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) tensors of `model` by canonical name, on CPU."""
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


def to_diffusers_state(full: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Invert the rules: our full tensors -> diffusers state dict (the whole model)."""
    shapes = expected_source_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for rule in conversion_rules(config):
        tensor = full[rule.ours]
        parts = (
            split_heads(tensor, len(rule.sources), config.attention_head_dim) if rule.fuse_heads else [tensor]
        )
        for name, part in zip(rule.sources, parts):
            if rule.rows is None:
                out[name] = part.contiguous()
                continue
            if name not in out:
                out[name] = torch.empty(shapes[name], dtype=part.dtype)
            out[name][rule.rows[0] : rule.rows[1]] = part
    return out


def export_to_diffusers(
    model,
    directory: Union[str, os.PathLike],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: Optional[torch.dtype] = None,
    write: Optional[bool] = None,
) -> None:
    """Write `model` as a diffusers ``QwenImageTransformer2DModel`` directory.

    Collective over the TP group when TP > 1 (every TP rank must call it); only TP rank 0 writes
    unless `write` says otherwise. Tensors larger than `max_shard_bytes` in total are split into
    ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` files with an index, as diffusers does.
    """
    from safetensors.torch import save_file

    if not (model.pre_process and model.post_process and model.layer_range == (0, model.config.num_layers)):
        raise ValueError("export_to_diffusers needs the whole model (not one pipeline stage)")
    full = gather_full_state(model)
    if write is None:
        write = model.tp.rank == 0
    if not write:
        return
    state = to_diffusers_state(full, model.config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        total = sum(v.numel() * v.element_size() for v in state.values())
        for k, shard in enumerate(shards, start=1):
            fname = f"diffusion_pytorch_model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        with open(directory / INDEX_NAME, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = dict(model.config.to_diffusers_config(), _diffusers_version=DIFFUSERS_VERSION)
    with open(directory / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2)
