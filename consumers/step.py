"""One training step: batch -> packed noisy latents -> model -> flow-matching loss -> grads.

The pieces:

* `Batch`: one micro-batch of one bucket (target latents, condition latents, padded text + mask).
* `FlowMatchingStepInputs` / `make_inputs`: pack latents, draw σ and noise per *sample* from a
  generator seeded by ``(seed, step, global sample index)``: the draws do not depend on the
  parallel layout, the micro-batch split or the rank that holds the sample.
* `MMDiTStage`: a pipeline stage (or the whole model) as one ``nn.Module`` whose forward maps
  stage inputs to stage outputs; the same module runs under the local micro-batch loop (PP = 1)
  and under ``torch.distributed.pipelining`` (PP > 1).
* `Precision` (bf16 autocast, FP8 via Transformer Engine or a clear refusal; first and last
  block kept in bf16 by default) and `RecomputeConfig`
  (none / selective / full every N blocks via ``torch.utils.checkpoint``).
* `run_local_microbatches`: gradient accumulation over micro-batches without a pipeline.

Loss convention: each micro-batch contributes ``sum(per-sample loss) / global_batch_size`` and
backward runs on that, so after accumulation (and the DP *sum* in the optimizer) the gradient is
the gradient of the mean per-sample loss over the global batch, for any layout.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F  # noqa: F401  (kept for users extending stages)

from megatron_qwenimage.config import ConfigError, MMDiTConfig
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.flow_matching import (
    SigmaSampler,
    flow_matching_loss,
    pack_latents,
)
from megatron_qwenimage.model.mmdit import QwenImageMMDiT

TASKS = ("t2i", "edit", "i2i")


# ---------------------------------------------------------------------------------------- batch
@dataclass
class Batch:
    """One micro-batch; every sample has the same bucket (static shapes).

    Attributes:
        latents: ``[b, C, h, w]`` target latents (normalised VAE latents, any float dtype).
        text: ``[b, T, D_txt]`` text embeddings, zero-padded to the step's text length T.
        text_mask: ``[b, T]`` bool, True for real text tokens.
        sample_index: ``[b]`` int64 index of each sample in the step's *global* batch (seeds σ/noise).
        condition_latents: per condition image, ``[b, C, hc, wc]`` clean latents (edit: the
            source image; i2i reconstruction: the target itself); empty for t2i.
        task: "t2i", "edit" or "i2i".
    """

    latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    sample_index: torch.Tensor
    condition_latents: list[torch.Tensor] = field(default_factory=list)
    task: str = "t2i"

    def __post_init__(self) -> None:
        if self.latents.dim() != 4:
            raise ValueError(f"Batch.latents must be [b, C, h, w], got shape {tuple(self.latents.shape)}")
        b = self.latents.shape[0]
        if self.text.dim() != 3 or self.text.shape[0] != b:
            raise ValueError(f"Batch.text must be [{b}, T, D_txt], got shape {tuple(self.text.shape)}")
        if tuple(self.text_mask.shape) != tuple(self.text.shape[:2]) or self.text_mask.dtype != torch.bool:
            raise ValueError(
                f"Batch.text_mask must be bool [{b}, {self.text.shape[1]}], got {self.text_mask.dtype} "
                f"{tuple(self.text_mask.shape)}"
            )
        if tuple(self.sample_index.shape) != (b,):
            raise ValueError(f"Batch.sample_index must be [{b}], got shape {tuple(self.sample_index.shape)}")
        if self.task not in TASKS:
            raise ValueError(f"Batch.task={self.task!r}: expected one of {TASKS}")
        if self.task == "t2i" and self.condition_latents:
            raise ValueError("Batch.task='t2i' must not carry condition_latents")
        if self.task != "t2i" and not self.condition_latents:
            raise ValueError(f"Batch.task={self.task!r} needs condition_latents")
        for i, c in enumerate(self.condition_latents):
            if c.dim() != 4 or c.shape[:2] != self.latents.shape[:2]:
                raise ValueError(
                    f"Batch.condition_latents[{i}] must be [{b}, {self.latents.shape[1]}, hc, wc], "
                    f"got shape {tuple(c.shape)}"
                )

    @property
    def size(self) -> int:
        return int(self.latents.shape[0])

    def patch_grids(self, patch_size: int) -> list[tuple[int, int, int]]:
        """``(frames, h, w)`` patch grids of one sample: target first, then the conditions."""
        grids = []
        for lat in [self.latents, *self.condition_latents]:
            h, w = lat.shape[-2:]
            grids.append((1, h // patch_size, w // patch_size))
        return grids

    def shape_key(self) -> tuple:
        """Everything that fixes the tensor shapes of a step (for caching pipeline schedules)."""
        return (self.task, tuple(self.latents.shape), tuple(self.text.shape),
                tuple(tuple(c.shape) for c in self.condition_latents))


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class StepInputs:
    """Model inputs and loss target of a micro-batch (diffusers layout, batch first).

    Attributes:
        hidden_states: ``[b, N_target + N_cond, 4C]`` noisy target tokens, then clean condition tokens.
        text: ``[b, T, D_txt]``. text_mask: ``[b, T]`` bool. sigma: ``[b]`` fp32 σ.
        target: ``[b, N_target, 4C]`` fp32 velocity target ε − x₀.
        img_shapes: per sample, the patch grids (target first).
    """

    hidden_states: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    sigma: torch.Tensor
    target: torch.Tensor
    img_shapes: list

    @property
    def num_target_tokens(self) -> int:
        return int(self.target.shape[1])


def sample_generator(seed: int, step: int, sample_index: int) -> torch.Generator:
    """CPU generator for one sample of one step, independent of the layout."""
    key = zlib.crc32(f"{seed}/{step}/{sample_index}".encode())
    return torch.Generator().manual_seed((seed * 1_000_003 + key) % 2**63)


def make_inputs(
    batch: Batch,
    *,
    step: int,
    seed: int,
    sigma_sampler: SigmaSampler,
    patch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> StepInputs:
    """Pack latents and draw σ and ε per sample; noise is fp32 then cast to `dtype`."""
    x0 = pack_latents(batch.latents.float())  # [b, N, 4C]
    n_tokens = x0.shape[1]
    sigmas, noises = [], []
    for i in batch.sample_index.tolist():
        gen = sample_generator(seed, step, int(i))
        sigmas.append(sigma_sampler.sample(1, generator=gen, image_tokens=n_tokens)[0].float())
        noises.append(torch.randn(x0.shape[1:], generator=gen, dtype=torch.float32))
    sigma = torch.stack(sigmas)
    noise = torch.stack(noises)
    s = sigma.view(-1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    cond = [pack_latents(c.float()) for c in batch.condition_latents]
    hidden = torch.cat([noisy, *cond], dim=1)
    grids = batch.patch_grids(patch_size)
    return StepInputs(
        hidden_states=hidden.to(device=device, dtype=dtype),
        text=batch.text.to(device=device, dtype=dtype),
        text_mask=batch.text_mask.to(device),
        sigma=sigma.to(device),
        target=(noise - x0).to(device),
        img_shapes=[list(grids)] * batch.size,
    )


def loss_sum_over_global(prediction: torch.Tensor, target: torch.Tensor, global_batch_size: int) -> torch.Tensor:
    """``sum(per-sample masked MSE) / global_batch_size`` (fp32 scalar); prediction ``[b, n, c]``."""
    return flow_matching_loss(prediction, target).per_sample.sum() / global_batch_size


# ---------------------------------------------------------------------------------------- precision
FP8_RECIPES = ("delayed", "current")
#: `PrecisionConfig.fp8_exclude` keyword: keep the first and the last block in bf16.
FP8_EXCLUDE_FIRST_LAST = "first_last"
#: Default FP8 exclusion (see `PrecisionConfig`).
DEFAULT_FP8_EXCLUDE = FP8_EXCLUDE_FIRST_LAST


@dataclass(frozen=True)
class PrecisionConfig:
    """Compute precision.

    Attributes:
        autocast: "none" or "bf16" (torch.autocast around forward; params/master stay as built).
        fp8: None, "delayed" or "current" (Transformer Engine recipes; needs backend
            'transformer_engine', TE importable and CUDA).
        fp8_exclude: modules run with FP8 off (bf16 GEMMs) inside the FP8 forward: either
            ``"first_last"`` (the default) or a list of fnmatch patterns over canonical module
            names of the *full* model (``blocks.0``, ``blocks.59.img_mlp.fc2``, ``blocks.*.txt_qkv``;
            block indices are global, so a pattern means the same under every pipeline layout).
            ``[]`` runs every TE module in FP8.

            ``"first_last"`` keeps the first and the last double-stream block whole in bf16
            (resolved to ``blocks.0`` and ``blocks.{num_layers-1}`` from the model config). This
            is Megatron-LM's ``--first-last-layers-bf16`` (``num_layers_at_start_in_bf16 =
            num_layers_at_end_in_bf16 = 1``), which NeMo's FP8 recipes expose for the layers most
            sensitive to quantisation: the first block reads the raw embeddings, the last one
            writes the features the output head projects, and neither has later blocks to damp
            its error. With 60 blocks the other ~97 % of the block GEMMs stay in FP8 (a model of
            one or two blocks then runs no FP8 GEMM at all: pass explicit patterns). Nothing else needs
            excluding: the embedders (``img_in``, ``txt_in``, ``time_embedder``), the head
            (``norm_out``, ``proj_out``) and the AdaLN modulations (``*_mod``) are plain torch /
            local megatron-core layers under every backend and never run in FP8; the TE modules
            are the blocks' ``*_qkv`` / ``txt_kv`` column linears, ``*_out`` row linears,
            ``*_mlp.fc1`` / ``fc2`` and the core attention (whose FP8 path TE's recipes leave off).
            A pattern that matches no module of the full model is a `ConfigError`.
    """

    autocast: str = "none"
    fp8: str | None = None
    fp8_exclude: str | tuple[str, ...] = DEFAULT_FP8_EXCLUDE

    def __post_init__(self) -> None:
        exclude = self.fp8_exclude
        if isinstance(exclude, str):
            if exclude != FP8_EXCLUDE_FIRST_LAST:
                raise ConfigError(
                    f"precision.fp8_exclude={exclude!r}: expected {FP8_EXCLUDE_FIRST_LAST!r} or a list of "
                    "module-name patterns (e.g. ['blocks.0', 'blocks.*.img_mlp.fc2']; [] for none)"
                )
        else:
            if exclude is None:
                exclude = ()
            exclude = tuple(exclude)
            bad = [p for p in exclude if not isinstance(p, str) or not p]
            if bad:
                raise ConfigError(f"precision.fp8_exclude: patterns must be non-empty strings, got {bad!r}")
            object.__setattr__(self, "fp8_exclude", exclude)
        if self.autocast not in ("none", "bf16"):
            raise ConfigError(f"precision.autocast={self.autocast!r}: expected 'none' or 'bf16'")
        if self.fp8 is not None and self.fp8 not in FP8_RECIPES:
            raise ConfigError(f"precision.fp8={self.fp8!r}: expected null or one of {FP8_RECIPES}")


def resolve_fp8_exclude(config: PrecisionConfig, model_config: MMDiTConfig) -> tuple[str, ...]:
    """The exclusion patterns of `config` for this model (``"first_last"`` -> two block names)."""
    if config.fp8_exclude == FP8_EXCLUDE_FIRST_LAST:
        return tuple(dict.fromkeys(("blocks.0", f"blocks.{model_config.num_layers - 1}")))
    return tuple(config.fp8_exclude)


@functools.lru_cache(maxsize=8)
def full_model_module_names(model_config: MMDiTConfig) -> tuple[str, ...]:
    """Canonical module names of the *full* model (all blocks, embedders and head) for `model_config`.

    Built on the meta device (nothing allocated) with one TP rank and the ``local`` backend, so the
    names are those of the model's own modules, the same under every layout and backend (kernel
    library internals such as TE's attention sub-modules are not listed).
    """
    from megatron_qwenimage.model.layers import SingleRankGroup

    neutral = model_config.replace(tensor_model_parallel_size=1, sequence_parallel=False, backend="local")
    with torch.device("meta"):
        model = QwenImageMMDiT(neutral, tp_group=SingleRankGroup())
    return tuple(name for name, _ in model.named_modules() if name)


def validate_fp8_exclude(patterns: Sequence[str], model_config: MMDiTConfig) -> None:
    """`ConfigError` naming every pattern that matches no module of the full model.

    Checked against the full model (`full_model_module_names`), not the modules of one pipeline
    stage: under PP a pattern may match blocks another stage holds only.
    """
    names = full_model_module_names(model_config)
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if not unknown:
        return
    last = model_config.num_layers - 1
    top = [n for n in names if not n.startswith("blocks")]
    block0 = [n[len("blocks.0."):] for n in names if n.startswith("blocks.0.")]
    only_last = [n[len(f"blocks.{last}."):] for n in names
                 if n.startswith(f"blocks.{last}.") and n[len(f"blocks.{last}."):] not in block0]
    raise ConfigError(
        f"precision.fp8_exclude pattern(s) {unknown} match no module of the model; module names are "
        f"{', '.join(top)}, blocks.0 .. blocks.{last} and, inside a block, blocks.<i>.<name> with <name> one of "
        f"{', '.join(block0)} (the last block has {', '.join(only_last)} instead of the text query/output/MLP); "
        f"e.g. 'blocks.0', 'blocks.{last}.img_mlp.fc2', 'blocks.*.img_qkv'"
    )


class FP8Unavailable(UserError, RuntimeError):
    """FP8 was requested where it cannot run; the message names what is missing."""


def check_fp8_available(config: PrecisionConfig, model_config: MMDiTConfig) -> None:
    """Raise `FP8Unavailable` naming every missing piece (backend, Transformer Engine, CUDA)."""
    if config.fp8 is None:
        return
    missing = []
    if model_config.backend != "transformer_engine":
        missing.append(f"model backend is {model_config.backend!r} (FP8 needs backend: transformer_engine)")
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or TE failing to load its CUDA libraries
        missing.append(f"transformer_engine cannot be imported ({type(exc).__name__}: {exc})")
    if not torch.cuda.is_available():
        missing.append("no CUDA device (torch.cuda.is_available() is False)")
    if missing:
        raise FP8Unavailable(f"precision.fp8={config.fp8!r} refused: " + "; ".join(missing))


class Precision:
    """Contexts for the forward pass: bf16 autocast and/or TE ``fp8_autocast``.

    Args:
        config: `PrecisionConfig`; its ``fp8_exclude`` patterns are checked against the full
            model's module names here (`ConfigError`), whether or not FP8 is on.
        model_config: the model. device: the compute device.
        amax_group: group over which FP8 amax statistics are reduced (``fp8_group`` of
            ``te.fp8_autocast``); the engine passes megatron-core's amax reduction group, the
            data-parallel x tensor-parallel group (`consumers.engine.amax_reduction_group`).
    """

    def __init__(self, config: PrecisionConfig, model_config: MMDiTConfig, device: torch.device,
                 amax_group: torch.distributed.ProcessGroup | None = None):
        self.exclude_patterns = resolve_fp8_exclude(config, model_config)
        validate_fp8_exclude(self.exclude_patterns, model_config)
        check_fp8_available(config, model_config)
        self.config = config
        self.device = device
        self.amax_group = amax_group
        self._recipe = None
        if config.fp8 is not None:
            from transformer_engine.common import recipe as te_recipe

            if config.fp8 == "delayed":
                self._recipe = te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID)
            else:
                self._recipe = te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)

    def forward_context(self):
        stack = contextlib.ExitStack()
        if self.config.autocast == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self._recipe is not None:
            import transformer_engine.pytorch as te

            stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=self._recipe, fp8_group=self.amax_group))
        return stack

    #: FP8 GEMMs need row counts divisible by 16 (Transformer Engine checks the flattened input).
    FP8_TOKEN_ALIGNMENT = 16

    def prepare_model(self, model: QwenImageMMDiT) -> list[str]:
        """Make `model` (a whole model or a stage) run in this precision.

        Under FP8: the streams are padded to a multiple of 16 tokens inside the blocks (odd
        buckets such as 1328 px = 83² patches), and the outermost modules of this stage matching
        the exclusion patterns run with FP8 disabled (`exclude_from_fp8`). Returns their names
        (a stage may hold none of them).
        """
        if self._recipe is None:
            return []
        import transformer_engine.pytorch as te

        model.configure_token_alignment(self.FP8_TOKEN_ALIGNMENT)
        return exclude_from_fp8(model, self.exclude_patterns, lambda: te.fp8_autocast(enabled=False))


def begin_weight_update_window(modules: Sequence[torch.nn.Module]) -> int:
    """Mark the next forward of every megatron-core TE linear in `modules` as a step's first
    micro-batch; returns how many were marked. Call once per optimizer step, before its forwards.

    megatron-core's TE linears pass ``is_first_microbatch`` to Transformer Engine and set it to
    False after each forward; TE casts the weight to FP8 when it is True and reuses that cached
    FP8 copy when it is False. megatron-core's pipeline schedules set it back to True at every
    step; a loop that does not would train on the FP8 weights of its first step forever. Here the
    first micro-batch of each step (and of each evaluation) casts, the rest of the step reuses
    the cast, as in Megatron. Without FP8 the flag changes nothing.
    """
    marked = 0
    for root in modules:
        for module in root.modules():
            if hasattr(module, "is_first_microbatch") and hasattr(module, "disable_parameter_transpose_cache"):
                module.is_first_microbatch = True
                marked += 1
    return marked


def exclude_from_fp8(model: torch.nn.Module, patterns: Sequence[str], context_factory) -> list[str]:
    """Run the forward of every module of `model` whose name matches a pattern inside ``context_factory()``.

    Only the outermost matches get the scope (a matching module inside an excluded one is
    already covered). The scope is a forward pre-hook that enters the context and a forward hook
    (``always_call=True``: also when the forward raises) that leaves it; ``module.forward`` is not
    rebound. The entered contexts live in an ExitStack per call, kept on the module in
    ``_fp8_off_stacks`` (a stack of them: re-entrant calls and activation recompute nest).

    Forward-only scoping is enough for backward: Transformer Engine modules record in their
    autograd context whether the forward ran in FP8 and the backward GEMMs follow that record
    (not the autocast state at backward time), so an excluded module's backward is bf16 too.

    Returns the names of the scoped modules (canonical, as in ``named_modules``).
    """
    excluded: list[str] = []
    for name, module in model.named_modules():
        if not name or not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if any(name.startswith(outer + ".") for outer in excluded):
            continue
        _scope_forward(module, context_factory)
        excluded.append(name)
    return excluded


def _scope_forward(module: torch.nn.Module, context_factory) -> None:
    """Hook pair running `module`'s forward inside ``context_factory()`` (idempotent per module)."""
    for handle in getattr(module, "_fp8_off_hooks", ()):
        handle.remove()
    stacks: list[contextlib.ExitStack] = []

    def enter(mod, args):
        stack = contextlib.ExitStack()
        stack.enter_context(context_factory())
        stacks.append(stack)

    def leave(mod, args, output):
        if stacks:
            stacks.pop().close()

    module._fp8_off_stacks = stacks
    module._fp8_off_hooks = (
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),
    )


# ---------------------------------------------------------------------------------------- recompute
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recompute.

    Attributes:
        mode: "none" (the report's choice); "selective": recompute the core attention of every
            block (Megatron's selective recompute); "full": recompute whole blocks.
        every_n: with "full", blocks whose global index is a multiple of `every_n` are recomputed
            (1 = every block).
    """

    mode: str = "none"
    every_n: int = 1

    def __post_init__(self) -> None:
        if self.mode not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute.mode={self.mode!r}: expected one of {RECOMPUTE_MODES}")
        if not isinstance(self.every_n, int) or self.every_n < 1:
            raise ConfigError(f"recompute.every_n={self.every_n!r}: expected a positive integer")


def apply_recompute(model: QwenImageMMDiT, config: RecomputeConfig) -> list[str]:
    """Set the model's activation recompute policy; returns what is recomputed."""
    return model.configure_recompute(config.mode, config.every_n)


# ---------------------------------------------------------------------------------------- stage
class MMDiTStage(torch.nn.Module):
    """One pipeline stage (or the whole model) with stage-to-stage tensors as plain args.

    First stage inputs: ``hidden_states [b, N, 4C]``, ``text [b, T, D_txt]``, ``sigma [b]``;
    other stages: ``img [n, b, D]``, ``txt [t, b, D]``, ``temb [b, D]`` from the previous stage.
    Every stage gets ``text_mask [b, T]`` as a keyword. The last stage returns the prediction
    ``[b, N_target, 4C]``; others return ``(img, txt, temb)``. Patch grids and the target token
    count are static per step and set with `set_shapes`.
    """

    def __init__(self, model: QwenImageMMDiT, precision: Precision):
        super().__init__()
        self.model = model
        self.precision = precision
        self._shapes: list | None = None
        self._num_target: int | None = None

    def set_shapes(self, img_shapes: list, num_target_tokens: int) -> None:
        self._shapes = img_shapes
        self._num_target = num_target_tokens

    def forward(self, *inputs: torch.Tensor, text_mask: torch.Tensor):
        if self._shapes is None:
            raise RuntimeError("MMDiTStage.set_shapes must be called before forward")
        m = self.model
        b = text_mask.shape[0]
        shapes = self._shapes[:1] * b
        with self.precision.forward_context():
            if m.pre_process:
                hidden, text, sigma = inputs
                img, txt, temb = m.embed(hidden.transpose(0, 1), text.transpose(0, 1), sigma)
            else:
                img, txt, temb = inputs
            img, txt = m.run_blocks(img, txt, temb, shapes, text_mask)
            if m.post_process:
                return m.head(img, temb, self._num_target).transpose(0, 1).float()
        return img, txt, temb


def run_local_microbatches(
    stage: MMDiTStage, inputs: Sequence[StepInputs], global_batch_size: int
) -> torch.Tensor:
    """Forward + backward of every micro-batch on a whole-model stage; returns the summed loss.

    Each micro-batch's loss is ``sum(per-sample loss) / global_batch_size``; gradients accumulate.
    """
    if not (stage.model.pre_process and stage.model.post_process):
        raise RuntimeError("run_local_microbatches needs the whole model (PP = 1)")
    total = torch.zeros((), dtype=torch.float32)
    for mb in inputs:
        stage.set_shapes(mb.img_shapes, mb.num_target_tokens)
        pred = stage(mb.hidden_states, mb.text, mb.sigma, text_mask=mb.text_mask)
        loss = loss_sum_over_global(pred, mb.target, global_batch_size)
        loss.backward()
        total += loss.detach().cpu()
    return total


def count_image_tokens(inputs: Sequence[StepInputs]) -> int:
    """Target image tokens in `inputs` (what "image tokens/s" counts)."""
    return sum(int(prod(mb.target.shape[:2])) for mb in inputs)
