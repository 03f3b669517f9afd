"""Kernel providers: the backend is read once (`kernel_provider`) and the model is built from it."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import megatron_qwenimage
from megatron_qwenimage import ConfigError, QwenImageMMDiT, load_config
from megatron_qwenimage.model import backends, mmdit
from megatron_qwenimage.model.backends import (
    ColumnLinear,
    KernelProvider,
    LocalProvider,
    RowLinear,
    SDPAttention,
    TransformerEngineProvider,
    kernel_provider,
)
from megatron_qwenimage.model.layers import InitRole, SingleRankGroup, init_role_of

PACKAGE = Path(megatron_qwenimage.__file__).parent
#: (file relative to the package, top-level scope) allowed to read a ``backend`` attribute: the
#: provider selection, and the config validating its own field.
ALLOWED_BACKEND_READS = {("model/backends.py", "kernel_provider"), ("config.py", "MMDiTConfig")}


class _FakeTPGroup:
    """A TP group of `size` ranks seen from `rank`, for building (not running) sharded layers."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_local_provider_builds_megatron_local_layers_with_declared_roles():
    cfg = load_config("tiny")
    provider = kernel_provider(cfg, SingleRankGroup())
    assert type(provider) is LocalProvider
    d, f = cfg.hidden_size, cfg.ffn_hidden_size

    column = provider.column_parallel_linear(d, 3 * d, weight_init=InitRole.NORMAL)
    assert type(column) is ColumnLinear
    assert column.weight.shape == (3 * d, d) and column.bias.shape == (3 * d,)
    assert column.weight.partition_dim == 0 and not column.gather_output
    assert column.weight.dtype == cfg.torch_dtype

    row = provider.row_parallel_linear(f, d, weight_init=InitRole.OUTPUT)
    assert type(row) is RowLinear
    assert row.weight.shape == (d, f) and row.bias.shape == (d,)
    assert row.weight.partition_dim == 1

    modulation = provider.modulation_linear(d, 6 * d)
    assert type(modulation) is ColumnLinear
    assert modulation.weight.shape == (6 * d, d) and modulation.gather_output

    assert type(provider.core_attention(cfg.num_attention_heads, cfg.attention_head_dim)) is SDPAttention

    # Roles are declared as the layers are built: the weight's by the caller, biases zero,
    # modulation zero (adaLN-Zero).
    assert init_role_of(column.weight) is InitRole.NORMAL and init_role_of(column.bias) is InitRole.ZERO
    assert init_role_of(row.weight) is InitRole.OUTPUT and init_role_of(row.bias) is InitRole.ZERO
    assert init_role_of(modulation.weight) is InitRole.ZERO and init_role_of(modulation.bias) is InitRole.ZERO


def test_local_provider_shards_over_tp_and_honours_sequence_parallel(monkeypatch):
    # megatron-core sizes its shards from the group only once torch.distributed is initialised.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    cfg = load_config("tiny", tensor_model_parallel_size=2, sequence_parallel=True)
    provider = kernel_provider(cfg, _FakeTPGroup(size=2, rank=1))
    d, f = cfg.hidden_size, cfg.ffn_hidden_size

    column = provider.column_parallel_linear(d, f, weight_init=InitRole.NORMAL)
    assert column.weight.shape == (f // 2, d) and column.bias.shape == (f // 2,)
    assert column.sequence_parallel

    row = provider.row_parallel_linear(f, d, weight_init=InitRole.OUTPUT)
    assert row.weight.shape == (d, f // 2) and row.bias.shape == (d,)
    assert row.sequence_parallel

    # Modulation runs on per-sample vectors: never sequence-parallel, its output gathered.
    modulation = provider.modulation_linear(d, 6 * d)
    assert modulation.weight.shape == (3 * d, d)
    assert not modulation.sequence_parallel and modulation.gather_output


def test_transformer_engine_without_transformer_engine_is_a_config_error(monkeypatch):
    monkeypatch.setattr(backends, "transformer_engine_available", lambda: False)
    cfg = load_config("tiny", backend="transformer_engine")
    with pytest.raises(ConfigError, match="backend='transformer_engine'.*not installed"):
        kernel_provider(cfg, SingleRankGroup())
    with pytest.raises(ConfigError, match="backend='transformer_engine'.*not installed"):
        QwenImageMMDiT(cfg)


def test_providers_cover_exactly_the_config_backends():
    from megatron_qwenimage.config import BACKENDS

    assert set(backends.PROVIDERS) == set(BACKENDS)
    for name, cls in backends.PROVIDERS.items():
        assert issubclass(cls, KernelProvider) and cls.name == name
    assert backends.PROVIDERS["transformer_engine"] is TransformerEngineProvider


def test_the_model_asks_for_its_provider_once_and_builds_every_kernel_from_it(monkeypatch):
    built: list[str] = []

    class RecordingProvider(LocalProvider):
        def column_parallel_linear(self, *args, **kwargs):
            built.append("column")
            return super().column_parallel_linear(*args, **kwargs)

        def row_parallel_linear(self, *args, **kwargs):
            built.append("row")
            return super().row_parallel_linear(*args, **kwargs)

        def modulation_linear(self, *args, **kwargs):
            built.append("modulation")
            return super().modulation_linear(*args, **kwargs)

        def core_attention(self, *args, **kwargs):
            built.append("attention")
            return super().core_attention(*args, **kwargs)

    calls = []

    def spy(config, tp_group):
        calls.append(config)
        return RecordingProvider(config, tp_group)

    monkeypatch.setattr(mmdit, "kernel_provider", spy)
    model = QwenImageMMDiT(load_config("tiny", num_layers=3))
    assert len(calls) == 1
    modules = list(model.modules())
    columns = [m for m in modules if type(m) is ColumnLinear]
    assert built.count("column") + built.count("modulation") == len(columns)
    assert built.count("row") == sum(type(m) is RowLinear for m in modules)
    assert built.count("attention") == sum(type(m) is SDPAttention for m in modules) == 3
    # 2 regular blocks (img, txt: qkv + fc1) + the context-only block (img qkv + fc1, txt kv).
    assert built.count("column") == 2 * 4 + 3
    # img/txt mod per block (2 x 3) + norm_out.
    assert built.count("modulation") == 7


def _backend_reads(source: str) -> list[tuple[int, str]]:
    """``(line, top-level scope)`` of each read of a ``backend`` attribute or key in `source`
    (``x.backend``, ``getattr(x, "backend")``, ``x["backend"]``)."""
    found = []

    def visit(node: ast.AST, scope: str) -> None:
        hit = False
        if isinstance(node, ast.Attribute):
            hit = node.attr == "backend" and isinstance(node.ctx, ast.Load)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            hit = len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "backend"
        elif isinstance(node, ast.Subscript):
            hit = isinstance(node.slice, ast.Constant) and node.slice.value == "backend"
        if hit:
            found.append((node.lineno, scope))
        for child in ast.iter_child_nodes(node):
            named = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, child.name if (named and not scope) else scope)

    visit(ast.parse(source), "")
    return found


def test_backend_read_detector_catches_a_reintroduced_branch():
    source = textwrap.dedent(
        """
        class Block:
            def __init__(self, config):
                if config.backend == "transformer_engine":
                    pass
                kind = getattr(config, "backend")
                other = vars(config)["backend"]
                config.backend = "local"  # a write is not a read
        """
    )
    assert _backend_reads(source) == [(4, "Block"), (6, "Block"), (7, "Block")]


def test_only_kernel_provider_reads_the_backend():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, scope in _backend_reads(path.read_text()):
            if (rel, scope) not in ALLOWED_BACKEND_READS:
                offenders.append(f"{rel}:{line} ({scope or 'module level'})")
    assert not offenders, f"choose kernels through the provider, not by reading the backend: {offenders}"
    # The selection itself is where it is expected to be.
    reads = {scope for _, scope in _backend_reads((PACKAGE / "model" / "backends.py").read_text())}
    assert reads == {"kernel_provider"}


def test_transformer_engine_is_imported_only_by_its_provider():
    # megatron-core probes for TE when it is imported; from then on, any import of TE (or of
    # megatron-core's TE layers, dropped from the module cache) is recorded and refused.
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        import torch
        from megatron_qwenimage import QwenImageMMDiT, load_config
        from megatron_qwenimage.model import backends
        from megatron_qwenimage.model.layers import SingleRankGroup

        TE_MODULES = ("transformer_engine", "megatron.core.extensions.transformer_engine")
        attempts = []

        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == TE_MODULES[0] or name == TE_MODULES[1]:
                    attempts.append(name)
                    raise ImportError("refused import of " + name)

        for name in [m for m in sys.modules if m.split(".")[0] == TE_MODULES[0] or m == TE_MODULES[1]]:
            del sys.modules[name]
        sys.meta_path.insert(0, Refuse())

        model = QwenImageMMDiT(load_config("tiny"))
        with torch.no_grad():
            model(torch.randn(1, 4, 16), torch.randn(1, 3, 16), timestep=torch.rand(1), img_shapes=[[(1, 2, 2)]])
        print("local:", attempts)
        backends.transformer_engine_available = lambda: True
        try:
            backends.kernel_provider(load_config("tiny", backend="transformer_engine"), SingleRankGroup())
        except ImportError as e:
            print("te:", e)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "local: []" in lines
    assert any(line.startswith("te: refused import of") for line in lines), result.stdout
