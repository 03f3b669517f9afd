"""Must show: the diffusers export at the end of a multi-rank run works for TP2 (with SP) and PP2.

torchrun, 2 gloo ranks: train 2 steps, checkpoint, export (``schedule.export_diffusers``) on rank 0.
diffusers loads the export, and its tensors (read back through `megatron_qwenimage.convert.load_diffusers`)
equal the checkpoint's full ``model/*`` tensors exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.consumers import run_config, run_train, write_cache, write_run_config


def _checkpoint_model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items() if k.startswith("model/")}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return {k[len("model/") :]: v for k, v in state.items()}


@pytest.mark.parametrize("parallel", [{"tp": 2, "sequence_parallel": True}, {"pp": 2}], ids=["tp2_sp", "pp2"])
def test_multi_rank_run_exports_to_diffusers(tmp_path, parallel):
    cache = write_cache(tmp_path / "cache", samples_per_bucket=8)
    cfg = run_config(cache, tmp_path, steps=2, global_batch=4, micro_batch=1, parallel=parallel, ckpt_interval=2)
    cfg["schedule"]["export_diffusers"] = str(tmp_path / "diffusers")
    r = run_train(write_run_config(cfg, tmp_path / "run.yaml"), nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]

    from diffusers import QwenImageTransformer2DModel

    from megatron_qwenimage.convert import load_diffusers

    exported = QwenImageTransformer2DModel.from_pretrained(tmp_path / "diffusers")
    assert exported.config.num_layers == 2
    saved = _checkpoint_model_tensors(tmp_path / "ckpt" / "step_00000002")
    model = load_diffusers(tmp_path / "diffusers")
    got = dict(model.named_model_tensors())
    assert sorted(got) == sorted(saved)
    for name, tensor in got.items():
        assert torch.equal(tensor.detach(), saved[name].to(tensor.dtype)), name
