"""Every tensor handed to the model sits on the training device (``pstate.device``), on every rank.

On GPUs the collective that carries a replica's micro-batches runs on the GPU (NCCL) while the
reading rank holds CPU tensors; σ and noise were drawn on the CPU. Mixed up, only the receiving
peers crashed, and only on GPUs: under gloo every device is the CPU. Here the training device is
``meta`` (a device that is not the CPU, so a tensor left on the CPU cannot pass for one on it,
and an op that mixes the two raises as CUDA does), while the collective runs on gloo:

* two ranks (TP=2): the reading rank and its peer get `broadcast_micro_batches`' micro-batches,
  `step_batches`' batches and `make_inputs`' model inputs on the training device, t2i and edit
  (condition latents), and σ and noise are on it where `flow_matching_inputs` mixes them with
  the latents;
* one rank (no broadcast) and validation batches read on the CPU end up there too.
"""

from __future__ import annotations

import pytest
import torch

import consumers.batch
from consumers.batch import Batch, make_inputs
from consumers.data import broadcast_micro_batches
from megatron_qwenimage.flow_matching import LogitNormalSigmaSampler, ShiftedSigmaSampler
from tests.consumers.broadcast_workers import placement_worker, synthetic_micro_batches
from tests.helpers.consumers import spawn

TRAINING_DEVICE = "meta"


def test_reader_and_peer_hand_the_model_tensors_on_the_training_device(tmp_path):
    results = spawn(placement_worker, 2, tmp_path / "out", TRAINING_DEVICE)
    assert results[0]["reads"] and not results[1]["reads"]
    for rank, got in results.items():
        # 2 t2i micro-batches (latents, text, mask), then 2 edit ones (and a condition image)
        assert [len(devices) for devices in got["micro_batches"]] == [3, 3, 4, 4], (rank, got)
        for key in ("micro_batches", "batches", "inputs"):
            assert {d for devices in got[key] for d in devices} == {TRAINING_DEVICE}, (rank, key, got[key])
        assert len(got["inputs"]) == 4, (rank, got)
        assert got["mixed"] == [{"x0": TRAINING_DEVICE, "noise": TRAINING_DEVICE, "sigma": TRAINING_DEVICE}] * 4


@pytest.fixture
def mixed_devices(monkeypatch) -> list[dict]:
    """The devices of ``x0``, ``noise`` and ``sigma`` at each `flow_matching_inputs` call of `make_inputs`."""
    mixed = []
    flow_matching_inputs = consumers.batch.flow_matching_inputs

    def recording(x0, noise, sigma):
        mixed.append({"x0": str(x0.device), "noise": str(noise.device), "sigma": str(sigma.device)})
        return flow_matching_inputs(x0, noise, sigma)

    monkeypatch.setattr(consumers.batch, "flow_matching_inputs", recording)
    return mixed


def test_one_rank_and_cpu_validation_batches_reach_the_training_device(mixed_devices):
    device = torch.device(TRAINING_DEVICE)
    for step in range(2):  # t2i, edit
        (mb, *_) = broadcast_micro_batches(synthetic_micro_batches(step), group=None, src=0, device=device)
        assert {t.device for t in (mb.latents, mb.text, mb.text_mask, *mb.condition_latents)} == {device}
    on_cpu = synthetic_micro_batches(1)[0]  # what a validation reader hands each rank
    batch = Batch(
        latents=on_cpu.latents,
        text=on_cpu.text,
        text_mask=on_cpu.text_mask,
        sample_index=torch.arange(2),
        condition_latents=on_cpu.condition_latents,
        task=on_cpu.task,
    )
    inputs = make_inputs(
        batch,
        step=-1,
        seed=0,
        sigma_sampler=ShiftedSigmaSampler(LogitNormalSigmaSampler()),
        patch_size=2,
        dtype=torch.bfloat16,
        device=device,
    )
    for name in ("hidden_states", "text", "text_mask", "sigma", "target"):
        assert getattr(inputs, name).device == device, name
    assert mixed_devices == [{"x0": TRAINING_DEVICE, "noise": TRAINING_DEVICE, "sigma": TRAINING_DEVICE}]
