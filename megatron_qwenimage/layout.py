"""How a training world is cut: `ParallelLayout` (TP x PP x DP, virtual stages, sequence
parallelism, HSDP) and `ParallelConfig`, the run YAML's ``parallel`` section.

Pure values, at the bottom of the import graph beside `megatron_qwenimage.config.MMDiTConfig`:
training (`consumers.parallel`, which builds the process groups of a layout), the accounting, the
planner and ``qwenimage model-info`` all take the same layout and its checks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_qwenimage.config import ConfigError, MMDiTConfig


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is cut: ``world = tp * pp * dp``; ``vpp`` model chunks per pipeline rank.

    Attributes:
        tp: tensor-parallel size (heads and MLP columns are split over it).
        pp: pipeline-parallel size (contiguous block ranges per stage).
        dp: data-parallel size (optimizer state sharded over it, or over `dp_shard` of it).
        vpp: virtual stages per pipeline rank (interleaved 1F1B when > 1; needs pp > 1).
        sequence_parallel: Megatron sequence parallelism inside the TP group.
        dp_shard: HSDP: the optimizer state is sharded over groups of this many consecutive DP
            ranks (a node's) and replicated across the ``dp / dp_shard`` groups, whose reduced
            gradients are all-reduced; None: sharded over the whole DP group.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    dp_shard: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "vpp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r}: expected a positive integer")
        if self.vpp > 1 and self.pp == 1:
            raise ConfigError(f"parallel.vpp={self.vpp} needs pp > 1 (virtual stages interleave pipeline ranks)")
        shard = self.dp_shard
        if shard is not None and (
            not isinstance(shard, int) or isinstance(shard, bool) or shard < 1 or self.dp % shard
        ):
            raise ConfigError(
                f"parallel.dp_shard={shard!r}: expected a positive integer dividing dp={self.dp} "
                "(HSDP shards the optimizer state over groups of dp_shard DP ranks)"
            )

    @property
    def shard_size(self) -> int:
        """DP ranks the optimizer state is sharded over (`dp_shard`, else the whole DP group)."""
        return self.dp_shard or self.dp

    @property
    def replicas(self) -> int:
        """Copies of the optimizer state over DP (HSDP's replicate dimension; 1 without HSDP)."""
        return self.dp // self.shard_size

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        """Total pipeline stages (model chunks), ``pp * vpp``."""
        return self.pp * self.vpp

    @classmethod
    def for_world(
        cls,
        world_size: int,
        *,
        tp: int = 1,
        pp: int = 1,
        vpp: int = 1,
        sequence_parallel: bool = False,
        dp: int | None = None,
        dp_shard: int | None = None,
    ) -> ParallelLayout:
        """The layout with DP filling the rest of `world_size` (or checking a given `dp`)."""
        for name, value in (("tp", tp), ("pp", pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r}: expected a positive integer")
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp} (parallel.tp x "
                f"parallel.pp); launch a multiple of {tp * pp} ranks (torchrun --nproc-per-node) or change them"
            )
        inferred = world_size // (tp * pp)
        if dp is not None and dp != inferred:
            raise ConfigError(f"parallel.dp={dp} but world size {world_size} / (tp*pp={tp * pp}) = {inferred}")
        return cls(tp=tp, pp=pp, dp=inferred, vpp=vpp, sequence_parallel=sequence_parallel, dp_shard=dp_shard)

    def validate_for(self, config: MMDiTConfig, world_size: int | None = None) -> None:
        """Raise `ConfigError` unless the layout fits `config` (and `world_size` if given).

        The one check of a layout against a model: training (`RunConfig.layout`, the pipeline
        builder) and ``qwenimage model-info`` both call it, so they refuse the same layouts with
        the same message.
        """
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"parallel layout tp={self.tp} x pp={self.pp} x dp={self.dp} = {self.world_size} ranks, "
                f"but the world has {world_size}"
            )
        if config.num_attention_heads % self.tp:
            raise ConfigError(f"parallel.tp={self.tp} does not divide num_attention_heads={config.num_attention_heads}")
        if config.num_layers % self.num_stages:
            raise ConfigError(
                f"num_layers={config.num_layers} is not divisible by pp*vpp = {self.pp}*{self.vpp} = "
                f"{self.num_stages} pipeline stages"
            )
        self.model_config(config)  # the model's own checks at this TP size (MMDiTConfig validation)

    def stage_layer_range(self, stage: int, num_layers: int) -> tuple[int, int]:
        """Global block range ``[start, end)`` of pipeline stage `stage` (0 .. pp*vpp - 1)."""
        if not 0 <= stage < self.num_stages:
            raise ConfigError(f"stage {stage} outside 0..{self.num_stages - 1}")
        per = num_layers // self.num_stages
        return stage * per, (stage + 1) * per

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """Stages held by pipeline rank `pp_rank`: interleaved, stage ``s`` lives on rank ``s % pp``."""
        return [pp_rank + v * self.pp for v in range(self.vpp)]

    def model_config(self, config: MMDiTConfig) -> MMDiTConfig:
        """`config` with this layout's TP size and sequence parallelism."""
        return config.replace(tensor_model_parallel_size=self.tp, sequence_parallel=self.sequence_parallel)


@dataclass(frozen=True)
class ParallelConfig:
    """The run YAML's ``parallel`` section: the spec of a `ParallelLayout` before the world size is known.

    Not a `ParallelLayout` itself: ``dp`` may be left out (DP fills the rest of the world), and
    the sizes are checked against the world and the model only when the world is known
    (`layout`, called by `RunConfig.layout`), so a bad size is reported at the same point as
    before, with the same ``parallel.<key>`` message.
    """

    tp: int = 1
    """Tensor-parallel size: attention heads and MLP columns are split over this many ranks."""

    pp: int = 1
    """Pipeline-parallel size: contiguous block ranges per pipeline rank."""

    dp: int | None = None
    """Data-parallel size; None (default): ``world / (tp * pp)``; when given it must equal that."""

    vpp: int = 1
    """Virtual stages per pipeline rank (interleaved 1F1B when > 1; needs pp > 1)."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group."""

    dp_shard: int | None = None
    """HSDP: shard the optimizer state over groups of this many consecutive DP ranks (a node's)
    and replicate it across the groups; None (default): shard it over the whole DP group."""

    def __post_init__(self) -> None:
        # Numeric strings become numbers (PyYAML reads `2e0` as a string); errors name parallel.<key>.
        from megatron_qwenimage.config import coerce_fields

        values = coerce_fields(ParallelConfig, {f.name: getattr(self, f.name) for f in fields(self)}, "parallel")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __getitem__(self, key: str):
        """``section["tp"]``: the field, as when the section was a plain mapping."""
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def layout(self, world_size: int) -> ParallelLayout:
        """The `ParallelLayout` of this spec on `world_size` ranks (`ParallelLayout.for_world`)."""
        return ParallelLayout.for_world(
            world_size,
            tp=self.tp,
            pp=self.pp,
            vpp=self.vpp,
            sequence_parallel=self.sequence_parallel,
            dp=self.dp,
            dp_shard=self.dp_shard,
        )
