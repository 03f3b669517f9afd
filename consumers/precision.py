"""Compute precision of the forward pass: bf16 autocast and FP8 via Transformer Engine.

* `PrecisionConfig`: autocast, FP8 recipe and the modules kept out of FP8 (first and last block
  by default; `resolve_fp8_exclude`, `validate_fp8_exclude` against `full_model_module_names`).
* `check_fp8_available` / `FP8Unavailable`: a clear refusal naming what FP8 is missing.
* `Precision`: the forward contexts and `Precision.prepare_model` (token alignment,
  `exclude_from_fp8`).
* `begin_weight_update_window`: FP8 weights are re-cast at the first micro-batch of every step.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_qwenimage.config import ConfigError, MMDiTConfig
from megatron_qwenimage.errors import UserError
from megatron_qwenimage.model.mmdit import QwenImageMMDiT

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
        fp8_attention: run the core attention in FP8 too (Transformer Engine's ``fp8_dpa``:
            q, k, v cast to FP8, the fused cuDNN FP8 attention forward and backward, the output
            cast back; needs `fp8`). Off by default: TE marks it beta, and only its fused
            attention backend has it, which takes the no-mask and right-padded (``padding``)
            key layouts this model uses for text padded at its end, not an ``arbitrary`` mask
            (text padded elsewhere). Excluded modules (`fp8_exclude`) keep bf16 attention.
    """

    autocast: str = "none"
    fp8: str | None = None
    fp8_exclude: str | tuple[str, ...] = DEFAULT_FP8_EXCLUDE
    fp8_attention: bool = False

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
        if not isinstance(self.fp8_attention, bool):
            raise ConfigError(f"precision.fp8_attention={self.fp8_attention!r}: expected true or false")
        if self.fp8_attention and self.fp8 is None:
            raise ConfigError(
                "precision.fp8_attention=true needs FP8 GEMMs: set precision.fp8 to one of "
                f"{FP8_RECIPES} (FP8 attention runs inside the FP8 recipe)"
            )


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
    block0 = [n[len("blocks.0.") :] for n in names if n.startswith("blocks.0.")]
    only_last = [
        n[len(f"blocks.{last}.") :]
        for n in names
        if n.startswith(f"blocks.{last}.") and n[len(f"blocks.{last}.") :] not in block0
    ]
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


def fp8_recipe(te_recipe, config: PrecisionConfig):
    """The Transformer Engine recipe of `config` (``transformer_engine.common.recipe`` passed in):
    HYBRID format (E4M3 forward, E5M2 gradients), delayed or current scaling, ``fp8_dpa`` from
    ``config.fp8_attention``."""
    cls = te_recipe.DelayedScaling if config.fp8 == "delayed" else te_recipe.Float8CurrentScaling
    return cls(fp8_format=te_recipe.Format.HYBRID, fp8_dpa=config.fp8_attention)


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

    def __init__(
        self,
        config: PrecisionConfig,
        model_config: MMDiTConfig,
        device: torch.device,
        amax_group: torch.distributed.ProcessGroup | None = None,
    ):
        self.exclude_patterns = resolve_fp8_exclude(config, model_config)
        validate_fp8_exclude(self.exclude_patterns, model_config)
        check_fp8_available(config, model_config)
        self.config = config
        self.device = device
        self.amax_group = amax_group
        self._recipe = None
        if config.fp8 is not None:
            from transformer_engine.common import recipe as te_recipe

            self._recipe = fp8_recipe(te_recipe, config)

    @property
    def recipe(self):
        """The Transformer Engine FP8 recipe of the forward (None without FP8)."""
        return self._recipe

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
