"""The Qwen-Image MMDiT on megatron-core: tensor + sequence parallel, pipeline-stage aware.

A `QwenImageMMDiT` holds a contiguous range of the double-stream blocks, and optionally the
input embedders (``pre_process``) and the output head (``post_process``); the full model is the
case ``pre_process = post_process = True`` with all blocks, and a pipeline stage is any other
choice. Blocks are keyed by their *global* index (``blocks.17.img_qkv.weight``), so parameter names
do not depend on the pipeline layout, and a TP-sharded tensor is a contiguous split of its full
tensor along the dim megatron-core records on it (``partition_dim``): a checkpoint can be
re-sharded for any TP/PP layout by name and dim alone.

Two ways in:

* `forward` takes exactly the arguments of diffusers' ``QwenImageTransformer2DModel.forward``
  (``[B, N, 64]`` packed latents, ``[B, T, 3584]`` text states, mask, σ timestep, ``img_shapes``)
  and returns the target image's tokens ``[B, N_target, 64]``, so it can stand in for the diffusers
  transformer in a diffusers pipeline.
* `embed` / `run_blocks` / `head` are the stage pieces in Megatron's ``[s, b, h]`` layout, which the
  training loop and the pipeline schedules compose.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_qwenimage.config import ConfigError, MMDiTConfig, validate_text_length
from megatron_qwenimage.model.backends import JointKeys, kernel_provider
from megatron_qwenimage.model.block import CarriedTextWeights, MMDiTBlock
from megatron_qwenimage.model.layers import (
    InitRole,
    RMSNorm,
    TimestepEmbedder,
    TPContext,
    declare_linear,
    layer_norm,
    module_tensor_init_roles,
    tp_partition_dim,
)
from megatron_qwenimage.model.mappings import gather_from_seq, scatter_to_seq
from megatron_qwenimage.model.rope import MSRoPE, normalize_img_shapes, pad_rotations

INIT_STD = 0.02


def default_tp_group() -> torch.distributed.ProcessGroup | None:
    """megatron-core's TP group when its parallel state is initialised, else None (TP = 1)."""
    from megatron.core import parallel_state

    if torch.distributed.is_available() and torch.distributed.is_initialized() and parallel_state.is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


class QwenImageMMDiT(torch.nn.Module):
    """Qwen-Image MMDiT (or one pipeline stage of it).

    Args:
        config: validated `MMDiTConfig`; its ``tensor_model_parallel_size`` must equal the size of
            `tp_group`.
        tp_group: tensor-parallel process group; None means megatron-core's TP group when its
            parallel state is initialised, else a single rank.
        pre_process: hold the input embedders (``img_in``, ``txt_norm``, ``txt_in``, timestep).
        post_process: hold the output head (``norm_out``, ``proj_out``).
        layer_range: ``(start, end)`` global block indices held by this object (default: all).
        init_seed: seed of `init_weights`; ignored when the model is built on the meta device.
    """

    def __init__(
        self,
        config: MMDiTConfig,
        *,
        tp_group: torch.distributed.ProcessGroup | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
        init_seed: int = 0,
    ):
        super().__init__()
        if tp_group is None:
            tp_group = default_tp_group()
        self.tp = TPContext(tp_group, config.sequence_parallel)
        if self.tp.size != config.tensor_model_parallel_size:
            raise ConfigError(
                f"MMDiTConfig.tensor_model_parallel_size={config.tensor_model_parallel_size} but the "
                f"tensor-parallel group has {self.tp.size} ranks"
            )
        start, end = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= start <= end <= config.num_layers:
            raise ConfigError(f"layer_range=({start}, {end}) is not a sub-range of the {config.num_layers} blocks")
        self.config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.layer_range = (start, end)
        self.rope = MSRoPE(config.axes_dims_rope, config.rope_theta)

        d, dtype = config.hidden_size, config.torch_dtype
        # The backend is chosen here, once: blocks only call the provider's builders.
        kernels = kernel_provider(config, self.tp.group)
        if pre_process:
            self.time_embedder = TimestepEmbedder(d, dtype)
            self.txt_norm = RMSNorm(config.joint_attention_dim, config.norm_eps, dtype)
            self.txt_in = declare_linear(torch.nn.Linear(config.joint_attention_dim, d, dtype=dtype), InitRole.NORMAL)
            self.img_in = declare_linear(torch.nn.Linear(config.in_channels, d, dtype=dtype), InitRole.NORMAL)
        self.blocks = torch.nn.ModuleDict(
            {
                str(i): MMDiTBlock(config, kernels, self.tp, context_only=(i == config.num_layers - 1))
                for i in range(start, end)
            }
        )
        if post_process:
            self.norm_out = kernels.modulation_linear(d, 2 * d)  # scale, shift
            out_features = config.patch_size * config.patch_size * config.out_channels
            # adaLN-Zero: the head starts at zero, so does the whole model's output.
            self.proj_out = declare_linear(torch.nn.Linear(d, out_features, dtype=dtype), InitRole.ZERO)
        #: Global indices of the blocks recomputed whole in backward (`configure_recompute`).
        self.recomputed_blocks: frozenset[int] = frozenset()
        #: Each stream's sequence is zero-padded to a multiple of this inside `run_blocks` (padded
        #: rows are masked keys); FP8 GEMMs need row counts divisible by 16 (`configure_token_alignment`).
        self.token_alignment = 1
        #: Canonical tensor name -> TP partition dim (None: replicated), for params and buffers.
        self.partition_dims = self._collect_partition_dims()
        #: Canonical tensor name -> `InitRole` declared where its layer was built (None: none
        #: declared, which `init_weights` refuses); collected now, as `partition_dims`, so that
        #: ``.to()`` / ``to_empty`` replacing tensors cannot lose it.
        self.init_roles = module_tensor_init_roles(self)
        if next(self.parameters()).device.type != "meta":
            self.init_weights(init_seed)

    def _collect_partition_dims(self) -> dict[str, int | None]:
        dims = {name: tp_partition_dim(p) for name, p in self.named_parameters()}
        for module_name, module in self.named_modules():
            if not isinstance(module, CarriedTextWeights):
                continue
            for buffer_name, dim in getattr(module, "partition_dims", {}).items():
                dims[f"{module_name}.{buffer_name}"] = dim
        return dims

    # ------------------------------------------------------------------ construction helpers
    # Loading and saving checkpoints: `megatron_qwenimage.convert` (`load_diffusers`,
    # `load_native`, `save_diffusers`, `save_native`); the tensor-name rules they follow are
    # `megatron_qwenimage.model.state_dict_names`.
    def named_model_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters and carried buffers by canonical name (this rank's shards)."""
        yield from self.named_parameters()
        # Only the carried weights: kernel libraries (TE) may keep buffers of their own.
        yield from ((n, b) for n, b in self.named_buffers() if n in self.partition_dims)

    def full_shape(self, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
        """Shape of the unsharded tensor behind this rank's shard `tensor` (named `name`)."""
        shape = list(tensor.shape)
        dim = self.partition_dims[name]
        if dim is not None:
            shape[dim] *= self.tp.size
        return tuple(shape)

    def num_parameters(self) -> dict[str, int]:
        """Element counts of the *full* (unsharded) tensors this object holds.

        ``trainable``: parameters; ``carried``: the last block's never-used text weights held as
        buffers; ``total``: both, i.e. the size of the released checkpoint for the full model.
        """
        params = dict(self.named_parameters())
        trainable = sum(prod(self.full_shape(n, p)) for n, p in params.items())
        carried = sum(prod(self.full_shape(n, t)) for n, t in self.named_model_tensors() if n not in params)
        return {"trainable": trainable, "carried": carried, "total": trainable + carried}

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every tensor by the `InitRole` its layer declared, identically for any TP size.

        ``NORMAL``: normal(0, 0.02) (linears); ``OUTPUT``: normal(0, 0.02/sqrt(2·num_layers))
        (attention output and MLP down projections); ``ZERO``: biases, and the AdaLN modulation,
        ``norm_out`` and ``proj_out`` (adaLN-Zero, as DiT: every block starts as the identity);
        ``ONE``: RMSNorm weights. Each full normal tensor is drawn from a generator seeded by
        ``(seed, name)`` and this rank copies its shard, so a TP=4 model equals a TP=1 model built
        with the same seed.

        Raises:
            ValueError: a tensor has no declared role (nothing is changed then).
        """
        tensors = list(self.named_model_tensors())
        undeclared = [name for name, _ in tensors if self.init_roles.get(name) is None]
        if undeclared:
            raise ValueError(
                f"no init role declared for {undeclared}: declare one where the layer is built "
                "(megatron_qwenimage.model.layers.set_init_role / declare_linear)"
            )
        stds = {InitRole.NORMAL: INIT_STD, InitRole.OUTPUT: INIT_STD / math.sqrt(2 * self.config.num_layers)}
        for name, tensor in tensors:
            role = self.init_roles[name]
            if role is InitRole.ZERO:
                tensor.zero_()
            elif role is InitRole.ONE:
                tensor.fill_(1.0)
            else:
                gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                full = torch.empty(self.full_shape(name, tensor), dtype=torch.float32, device="cpu")
                full.normal_(0.0, stds[role], generator=gen)
                tensor.copy_(self.shard_of(name, full))

    def shard_of(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the full tensor `full` of the model tensor called `name`."""
        dim = self.partition_dims[name]
        if dim is None:
            return full
        return full.chunk(self.tp.size, dim=dim)[self.tp.rank]

    def configure_token_alignment(self, multiple: int) -> None:
        """Pad the image and text streams to a multiple of `multiple` tokens inside the blocks.

        Transformer Engine's FP8 GEMMs need row counts divisible by 16, and odd buckets (1328 px
        = 83² patches) are not; the padded rows are masked as keys and cut off afterwards, so
        the output is unchanged. 1 (the default) pads nothing beyond what sequence parallelism
        needs.
        """
        if not isinstance(multiple, int) or multiple < 1:
            raise ConfigError(f"token alignment {multiple!r}: expected a positive integer")
        self.token_alignment = multiple

    RECOMPUTE_MODES = ("none", "selective", "full")

    def configure_recompute(self, mode: str, every_n: int = 1) -> list[str]:
        """Activation recompute (torch.utils.checkpoint, non-reentrant).

        ``none``: keep all activations (the report's choice: recompute cost it 3.75x step time
        for 11 % memory). ``selective``: recompute every block's core attention (Megatron's
        selective recompute). ``full``: recompute whole blocks whose global index is a multiple
        of `every_n`. Returns the names of what is recomputed.
        """
        if mode not in self.RECOMPUTE_MODES:
            raise ConfigError(f"recompute mode {mode!r}: expected one of {self.RECOMPUTE_MODES}")
        if not isinstance(every_n, int) or every_n < 1:
            raise ConfigError(f"recompute every_n={every_n!r}: expected a positive integer")
        indices = [int(i) for i in self.blocks]
        self.recomputed_blocks = frozenset(i for i in indices if mode == "full" and i % every_n == 0)
        for i, block in self.blocks.items():
            block.recompute_core_attention = mode == "selective"
        if mode == "selective":
            return [f"blocks.{i}.attention" for i in indices]
        return [f"blocks.{i}" for i in sorted(self.recomputed_blocks)]

    # ------------------------------------------------------------------ diffusers-compatible API
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers pipelines wrap each call in ``transformer.cache_context(...)``; this model keeps
        no step cache, so the context only marks the call."""
        yield

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes=None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool | None = None,
        **unsupported: Any,
    ):
        """Denoise packed latents, with diffusers' argument names and layouts.

        Args:
            hidden_states: ``[B, N, in_channels]`` packed latents: the target image's tokens,
                then the condition images' tokens (editing), row-major per image.
            encoder_hidden_states: ``[B, T, joint_attention_dim]`` text-encoder states (T <= 1024).
            encoder_hidden_states_mask: ``[B, T]`` 1/True for valid text tokens, or None.
            timestep: ``[B]`` σ in [0, 1] (σ = 1 is pure noise).
            img_shapes: per sample, a list of ``(frames, h, w)`` patch grids, target first.
            guidance: must be None (Qwen-Image has no guidance embedding).
            attention_kwargs: accepted for pipeline compatibility; must be empty.
            return_dict: None -> the tensor; False -> ``(tensor,)``; True -> an object with
                ``.sample`` (diffusers' ``Transformer2DModelOutput``).
        Returns:
            ``[B, N_target, patch^2 * out_channels]`` predicted velocity for the target tokens.
        """
        if unsupported:
            raise TypeError(f"QwenImageMMDiT.forward got unsupported argument(s) {sorted(unsupported)}")
        if guidance is not None:
            raise ValueError("guidance must be None: Qwen-Image has no guidance embedding")
        if attention_kwargs:
            raise ValueError(f"attention_kwargs {sorted(attention_kwargs)} are not supported (LoRA scales etc.)")
        if not (self.pre_process and self.post_process and self.layer_range == (0, self.config.num_layers)):
            raise RuntimeError(
                "forward() needs the whole model; this object is a pipeline stage "
                f"(layers {self.layer_range}, pre_process={self.pre_process}, post_process={self.post_process})"
            )
        shapes, text_mask, n_target = self.check_inputs(
            hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes
        )
        img, txt, temb = self.embed(hidden_states.transpose(0, 1), encoder_hidden_states.transpose(0, 1), timestep)
        img, _ = self.run_blocks(img, txt, temb, shapes, text_mask)
        out = self.head(img, temb, n_target).transpose(0, 1)
        if return_dict is None:
            return out
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def check_inputs(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes):
        """Validate diffusers-layout inputs; returns (shapes per sample, bool mask or None, N_target)."""
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; expected [B, N, {cfg.in_channels}] "
                "packed latent tokens"
            )
        b, n, _ = hidden_states.shape
        if (
            encoder_hidden_states is None
            or encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim
        ):
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states has shape {got}; expected [{b}, T, {cfg.joint_attention_dim}]")
        t = encoder_hidden_states.shape[1]
        validate_text_length(t, limit=cfg.max_text_tokens, what="encoder_hidden_states")
        if timestep is None or timestep.ndim != 1 or timestep.shape[0] != b:
            got = None if timestep is None else tuple(timestep.shape)
            raise ValueError(f"timestep has shape {got}; expected [{b}] (σ in [0, 1] per sample)")
        text_mask = None
        if encoder_hidden_states_mask is not None:
            if tuple(encoder_hidden_states_mask.shape) != (b, t):
                raise ValueError(
                    f"encoder_hidden_states_mask has shape {tuple(encoder_hidden_states_mask.shape)}; "
                    f"expected [{b}, {t}]"
                )
            text_mask = encoder_hidden_states_mask.to(torch.bool)
        shapes = normalize_img_shapes(img_shapes, b)
        for i, sample in enumerate(shapes):
            total = sum(prod(s) for s in sample)
            if total != n:
                raise ValueError(f"img_shapes[{i}]={sample} describes {total} image tokens but hidden_states has {n}")
        targets = {prod(sample[0]) for sample in shapes}
        if len(targets) != 1:
            raise ValueError(f"img_shapes: target images of one batch must have equal token counts, got {targets}")
        return shapes, text_mask, targets.pop()

    # ------------------------------------------------------------------ stage pieces, [s, b, h]
    def embed(
        self, img_tokens: torch.Tensor, text_states: torch.Tensor, timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input embedders.

        Args: img_tokens ``[n, b, in_channels]``; text_states ``[t, b, joint_dim]``; timestep ``[b]`` σ.
        Returns: ``img [n, b, D]``, ``txt [t, b, D]``, ``temb [b, D]``.
        """
        temb = self.time_embedder(timestep)
        txt = self.txt_in(self.txt_norm(text_states))
        img = self.img_in(img_tokens)
        return img, txt, temb

    def run_blocks(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        shapes: list,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run this object's blocks on full-sequence streams ``img [n, b, D]``, ``txt [t, b, D]``.

        The streams are zero-padded to a multiple of the TP size under sequence parallelism and
        of `token_alignment` (padded tokens are masked out as keys), split over the TP ranks for
        the blocks under sequence parallelism and gathered back afterwards; the result always has
        the input's full sequence length. ``text_mask`` is ``[b, t]`` bool (True = valid) or None. Returns ``(img, txt)``, txt None after the last block.
        """
        t, n, b = txt.shape[0], img.shape[0], img.shape[1]
        txt_rot, img_rot = self.rope.tables(shapes, t, img.device)
        sp = self.tp.sequence_parallel
        multiple = math.lcm(self.tp.size if sp else 1, self.token_alignment)
        pad_t, pad_n = (-t) % multiple, (-n) % multiple
        keys = joint_keys(
            text_mask, batch=b, text_tokens=t, image_tokens=n, pad_image=pad_n, pad_text=pad_t, device=img.device
        )
        if pad_t or pad_n:
            txt, txt_rot = _pad_seq(txt, pad_t), pad_rotations(txt_rot, pad_t)
            img, img_rot = _pad_seq(img, pad_n), pad_rotations(img_rot, pad_n)
        if sp:
            txt = scatter_to_seq(txt, self.tp.group)
            img = scatter_to_seq(img, self.tp.group)
        for index, block in self.blocks.items():
            if int(index) in self.recomputed_blocks and torch.is_grad_enabled():
                img, txt = checkpoint(block, img, txt, temb, (txt_rot, img_rot), keys, use_reentrant=False)
            else:
                img, txt = block(img, txt, temb, (txt_rot, img_rot), keys)
        if sp:
            img = gather_from_seq(img, self.tp.group, tensor_parallel_output_grad=False)
            if txt is not None:
                txt = gather_from_seq(txt, self.tp.group, tensor_parallel_output_grad=False)
        img = img[:n] if pad_n else img
        txt = txt[:t] if (txt is not None and pad_t) else txt
        return img, txt

    def head(self, img: torch.Tensor, temb: torch.Tensor, num_target_tokens: int) -> torch.Tensor:
        """Output head on the target tokens: ``img [n, b, D]`` -> ``[n_target, b, patch^2·C]``."""
        img = img[:num_target_tokens]
        emb, _ = self.norm_out(F.silu(temb)[None])  # [1, b, 2D], gathered over TP
        scale, shift = emb.chunk(2, dim=-1)
        return self.proj_out(layer_norm(img, self.config.norm_eps) * (1 + scale) + shift)


def joint_keys(
    text_mask: torch.Tensor | None,
    *,
    batch: int,
    text_tokens: int,
    image_tokens: int,
    pad_image: int = 0,
    pad_text: int = 0,
    device: torch.device | None = None,
) -> JointKeys:
    """The joint key layout of one forward (`JointKeys`), shared by all blocks.

    Keys are ordered ``[image (n); text (t); sequence-parallel pad rows]``.

    Args:
        text_mask: ``[b, t]`` bool (True = valid text token) or None (all valid).
        batch, text_tokens, image_tokens: ``b``, ``t`` and ``n`` (valid image tokens per sample).
        pad_image, pad_text: sequence-parallel zero rows appended to each stream (masked keys).
        device: device of the mask tensors.

    A text mask costs one host sync (a two-element read) that classifies it: all valid
    (dropped), a valid prefix per sample (right padding: TE's fused ``padding`` kernels), or
    anything else (a plain key mask).
    """
    kv_lengths = None
    if text_mask is not None:
        lengths = text_mask.sum(dim=1, dtype=torch.int32)
        prefix = torch.arange(text_tokens, device=text_mask.device)[None, :] < lengths[:, None]
        all_valid, is_prefix = torch.stack([(lengths == text_tokens).all(), (text_mask == prefix).all()]).tolist()
        if all_valid:
            text_mask = None
        elif is_prefix:
            kv_lengths = lengths + image_tokens
    if text_mask is None:
        if not (pad_image or pad_text):
            return JointKeys(image_tokens)
        kv_lengths = torch.full((batch,), image_tokens + text_tokens, dtype=torch.int32, device=device)
        text_mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
    pads = torch.zeros(batch, pad_image + pad_text, dtype=torch.bool, device=text_mask.device)
    images = torch.ones(batch, image_tokens, dtype=torch.bool, device=text_mask.device)
    return JointKeys(image_tokens, torch.cat([images, text_mask, pads], dim=1), kv_lengths)


def _pad_seq(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Append `pad` zero rows along dim 0."""
    if not pad:
        return x
    return torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0)
