"""How the model's tensors are named and laid out in checkpoints: the one rules table.

Two naming schemes hold a whole model:

* ``"native"``: our canonical names (``blocks.17.img_qkv.weight``, the last block's
  ``blocks.59.carried.*`` buffers), one full (unsharded) tensor each, as
  ``QwenImageMMDiT.named_model_tensors`` names them;
* ``"diffusers"``: the tensors of diffusers' ``QwenImageTransformer2DModel``.

The mapping between them is a list of `Rule` s, one per tensor of ours. A rule names the diffusers
tensor(s) it is made from, the TP partition dim (shared by our tensor and its sources), an
optional row range of the source (the last block's ``txt_mod`` is split into the used shift/scale
rows and the carried tail), and whether several sources are fused per attention head
(``[heads, (q, k, v), head_dim]``, so that a contiguous TP split gives each rank whole heads).
The native rules are the same table with each tensor read from its own name.

Both directions live here: `read_shard` makes one TP rank's shard of our tensor from a source in
either scheme, and `checkpoint_tensors` turns our full tensors into a whole checkpoint of either
scheme. Reading and writing files is `megatron_qwenimage.convert`'s job; this module is plain
torch and the config, and imports nothing of the conversion or training code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_qwenimage.config import MMDiTConfig

DIFFUSERS = "diffusers"
NATIVE = "native"
#: The naming schemes a checkpoint can use.
SCHEMES = (DIFFUSERS, NATIVE)


@dataclass(frozen=True)
class Rule:
    """How one of our tensors is made from the tensors of a checkpoint.

    Attributes:
        ours: our canonical tensor name.
        sources: the checkpoint's tensor names, fused in this order.
        dim: TP partition dim of ours and of every source, None if replicated.
        rows: ``(start, stop)`` along dim 0 of the (single) source, None for the whole tensor.
        fuse_heads: interleave the sources per attention head (fused QKV / KV projections).
        carried: ours is one of the last block's carried buffers (not a parameter: never trained,
            no optimizer state).
    """

    ours: str
    sources: tuple[str, ...]
    dim: int | None
    rows: tuple[int, int] | None = None
    fuse_heads: bool = False
    carried: bool = False


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


def _carried(ours: str, theirs: str, dim: int | None, rows: tuple[int, int] | None = None) -> Rule:
    return Rule(ours, (theirs,), dim, rows=rows, carried=True)


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
        _carried(f"{c}.mod_tail_weight", f"{t}.txt_mod.1.weight", 0, rows=(2 * d, 6 * d)),
        _carried(f"{c}.mod_tail_bias", f"{t}.txt_mod.1.bias", 0, rows=(2 * d, 6 * d)),
        *_fused(f"{o}.txt_kv", (f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")),
        _carried(f"{c}.q_weight", f"{t}.attn.add_q_proj.weight", 0),
        _carried(f"{c}.q_bias", f"{t}.attn.add_q_proj.bias", 0),
        _carried(f"{c}.q_norm_weight", f"{t}.attn.norm_added_q.weight", None),
        _carried(f"{c}.out_weight", f"{t}.attn.to_add_out.weight", 1),
        _carried(f"{c}.out_bias", f"{t}.attn.to_add_out.bias", None),
        _carried(f"{c}.fc1_weight", f"{t}.txt_mlp.net.0.proj.weight", 0),
        _carried(f"{c}.fc1_bias", f"{t}.txt_mlp.net.0.proj.bias", 0),
        _carried(f"{c}.fc2_weight", f"{t}.txt_mlp.net.2.weight", 1),
        _carried(f"{c}.fc2_bias", f"{t}.txt_mlp.net.2.bias", None),
    ]


def diffusers_rules(
    config: MMDiTConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    layer_range: tuple[int, int] | None = None,
) -> list[Rule]:
    """The rules table: every tensor of a model object holding the given stage pieces, from
    diffusers tensors (the defaults: the whole model)."""
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


def checkpoint_rules(scheme: str, config: MMDiTConfig, **pieces) -> list[Rule]:
    """The rules reading the tensors of a model object (`pieces`: ``pre_process``,
    ``post_process``, ``layer_range`` as in `diffusers_rules`) from a checkpoint named by
    `scheme`: `diffusers_rules`, or for ``"native"`` the same table with every tensor read from
    the full tensor of its own name."""
    rules = diffusers_rules(config, **pieces)
    if scheme == DIFFUSERS:
        return rules
    _check_scheme(scheme)
    return [Rule(r.ours, (r.ours,), r.dim, carried=r.carried) for r in rules]


def diffusers_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of a diffusers checkpoint for `config` (the whole model)."""
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


def native_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every (full) tensor of a native checkpoint for `config`, by canonical name."""
    theirs = diffusers_shapes(config)
    shapes = {}
    for rule in diffusers_rules(config):
        sources = [theirs[name] for name in rule.sources]
        if rule.rows is not None:
            shapes[rule.ours] = (rule.rows[1] - rule.rows[0], *sources[0][1:])
        elif rule.fuse_heads:
            shapes[rule.ours] = (sum(s[0] for s in sources), *sources[0][1:])
        else:
            shapes[rule.ours] = sources[0]
    return shapes


def checkpoint_shapes(scheme: str, config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of a whole-model checkpoint named by `scheme`."""
    if scheme == DIFFUSERS:
        return diffusers_shapes(config)
    _check_scheme(scheme)
    return native_shapes(config)


# ----------------------------------------------------------------------------- reading: rule -> shard
class SliceReader(Protocol):
    """What `read_shard` needs of a checkpoint (`megatron_qwenimage.convert.TensorSource`)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor: ...


def read_shard(source: SliceReader, rule: Rule, tp_rank: int, tp_size: int, head_dim: int) -> torch.Tensor:
    """This TP rank's shard of the tensor described by `rule`, read from `source` (only the
    rows of this rank leave the source)."""
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


# ----------------------------------------------------------------------------- writing: ours -> checkpoint
def diffusers_tensors(get: Callable[[str], torch.Tensor], config: MMDiTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Invert the rules: yield every diffusers tensor, reading our full tensors through `get`.

    Tensors are produced one diffusers name at a time (sorted), so a caller can stream them to
    disk; a fused tensor is read once per diffusers tensor it feeds (q, k, v), which is cheap.
    """
    shapes = diffusers_shapes(config)
    producers: dict[str, list[tuple[Rule, int]]] = {}
    for rule in diffusers_rules(config):
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


def checkpoint_tensors(
    scheme: str, get: Callable[[str], torch.Tensor], config: MMDiTConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a whole-model checkpoint named by `scheme`, sorted by name, from our full
    tensors read through `get` (by canonical name) one at a time."""
    if scheme == DIFFUSERS:
        return diffusers_tensors(get, config)
    _check_scheme(scheme)
    return ((name, get(name)) for name in sorted(native_shapes(config)))


def to_diffusers_state(full: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Our full tensors (a dict) -> the diffusers state dict of the whole model."""
    return dict(diffusers_tensors(full.__getitem__, config))


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"checkpoint naming scheme {scheme!r}: expected one of {SCHEMES}")
