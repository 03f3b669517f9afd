"""The VAE speed knobs (`VaeEncoder(channels_last=..., compile_mode=..., conv2d=...)`,
--vae-channels-last, --vae-compile, --vae-conv2d) on the tiny random VAE, fp32 on the CPU.

TorchDynamo's capture is tested with a counting backend (QWENIMAGE_VAE_COMPILE_BACKEND), which
runs the captured graph as it is: inductor's code generation takes ~20 s per input shape on a
2-core CPU, so it runs once, at one shape (`test_inductor_compiles_the_encoder_at_one_shape`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_qwenimage.config import ConfigError
from producers.config import VAE_COMPILE_MODES, ProducerConfig
from producers.encoders import VAE_COMPILE_BACKEND_ENV, SingleFrameConv, VaeEncoder, default_tiny_dir
from producers.settings import sample_settings

#: fp32 latents of another kernel path differ by rounding: ~4e-7 measured on values of order 1.
ATOL = 1e-5


@pytest.fixture(scope="module")
def enc_dir(producer_env):
    return default_tiny_dir()


def images(batch: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (batch, side, side, 3), dtype=np.uint8)


def posterior(vae: VaeEncoder, pixels: np.ndarray) -> torch.Tensor:
    """fp32 [B, z, 1, H/8, W/8]: the encoder's output before normalisation and the bf16 cast."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).unsqueeze(2)
    with torch.no_grad():
        return vae.posterior_mode(x)


_graphs: list[int] = []


def _counting_backend(gm, example_inputs):
    """A torch.compile backend that records each captured graph's node count and runs it as is."""
    _graphs.append(len(gm.graph.nodes))
    return gm.forward


torch._dynamo.register_backend(_counting_backend, name="qwenimage_test_count")


def test_the_default_path_is_diffusers_posterior_mode_bit_for_bit(enc_dir):
    vae = VaeEncoder(enc_dir, device="cpu")
    x = torch.from_numpy(images(2)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).unsqueeze(2)
    with torch.no_grad():
        ref = vae.model.encode(x).latent_dist.mode()
    assert torch.equal(posterior(vae, images(2)), ref)


def test_channels_last_matches_the_default_and_every_conv_runs_channels_last(enc_dir):
    ref = VaeEncoder(enc_dir, device="cpu")
    vae = VaeEncoder(enc_dir, device="cpu", channels_last=True)
    layouts = []

    def record(module, inputs, output):
        x = inputs[0]
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        layouts.append(x.is_contiguous(memory_format=fmt))

    for m in vae.model.encoder.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            m.register_forward_hook(record)
    torch.testing.assert_close(posterior(vae, images(2)), posterior(ref, images(2)), atol=ATOL, rtol=ATOL)
    assert layouts and all(layouts), layouts
    out = vae.encode(images(2))
    assert out.dtype == torch.bfloat16 and out.shape == (2, vae.z_dim, 4, 4)


def test_conv2d_folds_every_causal_conv_a_frame_meets_and_matches_the_default(enc_dir):
    ref = VaeEncoder(enc_dir, device="cpu")
    for channels_last in (False, True):
        vae = VaeEncoder(enc_dir, device="cpu", conv2d=True, channels_last=channels_last)
        torch.testing.assert_close(posterior(vae, images(2)), posterior(ref, images(2)), atol=ATOL, rtol=ATOL)
        folded = [m for m in vae.model.encoder.modules() if isinstance(m, SingleFrameConv)]
        left = [m for m in vae.model.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
        # what is left: the temporal downsamplers (stride 2 in time), which one frame never reaches
        assert len(folded) > 10 and all(m.stride[0] == 2 for m in left), left
        assert isinstance(vae.model.quant_conv, SingleFrameConv)
        assert all(m.weight.dim() == 4 for m in folded)
        with pytest.raises(RuntimeError, match="one frame"):
            folded[0](torch.zeros(1, folded[0].weight.shape[1], 2, 8, 8))


def test_compile_captures_the_encoder_in_one_graph_per_batch_size(enc_dir, monkeypatch):
    monkeypatch.setenv(VAE_COMPILE_BACKEND_ENV, "qwenimage_test_count")
    ref = VaeEncoder(enc_dir, device="cpu")
    for channels_last, conv2d in ((False, False), (True, False), (True, True)):
        torch._dynamo.reset()
        _graphs.clear()
        vae = VaeEncoder(enc_dir, device="cpu", channels_last=channels_last, compile_mode="default", conv2d=conv2d)
        for batch in (2, 2, 1):
            torch.testing.assert_close(
                posterior(vae, images(batch)), posterior(ref, images(batch)), atol=ATOL, rtol=ATOL
            )
        # one graph (no graph break) for batch 2, reused; one more for batch 1
        assert len(_graphs) == 2 and _graphs[0] > 50, _graphs
    torch._dynamo.reset()


def test_inductor_compiles_the_encoder_at_one_shape(enc_dir, monkeypatch):
    """The real backend once (about 15-20 s on 2 cores with a cold inductor cache)."""
    monkeypatch.delenv(VAE_COMPILE_BACKEND_ENV, raising=False)
    torch._dynamo.reset()
    ref = VaeEncoder(enc_dir, device="cpu")
    vae = VaeEncoder(enc_dir, device="cpu", compile_mode="default")
    torch.testing.assert_close(posterior(vae, images(1)), posterior(ref, images(1)), atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"compile_mode": "fast"}, "--vae-compile"),
        ({"compile_mode": True}, "--vae-compile"),
        ({"channels_last": "yes"}, "--vae-channels-last"),
        ({"conv2d": 1}, "--vae-conv2d"),
    ],
)
def test_bad_knob_values_name_their_flag(kwargs, flag, tmp_path):
    config_kwargs = {"vae_" + {"compile_mode": "compile"}.get(k, k): v for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=flag) as err:
        ProducerConfig(**config_kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=flag):  # refused before anything is loaded from the directory
        VaeEncoder(tmp_path / "no-such-encoders", device="cpu", **kwargs)


def test_the_knobs_are_not_sample_settings():
    plain = ProducerConfig()
    knobs = ProducerConfig(vae_channels_last=True, vae_compile="max-autotune", vae_conv2d=True)
    assert plain.fingerprint() == knobs.fingerprint()
    assert sample_settings(plain, "v") == sample_settings(knobs, "v")


def test_the_cli_threads_the_knobs_and_refuses_a_bad_mode_in_one_line(capsys, tmp_path):
    from megatron_qwenimage.cli import build_parser, main
    from producers.cli import config_from_args

    argv = ["produce", "--input", str(tmp_path), "--output", str(tmp_path / "cache")]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.vae_channels_last, cfg.vae_compile, cfg.vae_conv2d) == (False, "off", False)
    knobs = ["--vae-channels-last", "--vae-compile", "max-autotune", "--vae-conv2d"]
    cfg = config_from_args(build_parser().parse_args([*argv, *knobs]))
    assert (cfg.vae_channels_last, cfg.vae_compile, cfg.vae_conv2d) == (True, "max-autotune", True)
    assert main([*argv, "--vae-compile", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vae-compile" in err[0] and all(m in err[0] for m in VAE_COMPILE_MODES), err
    assert not (tmp_path / "cache").exists()


def test_the_pipeline_hands_the_knobs_to_the_vae_actors(enc_dir, monkeypatch):
    """`_build_dataset` constructs each VAE actor (`VaeStage`) with the config's knobs."""
    import ray.data

    from producers.pipeline import ProduceRequest, _build_dataset
    from producers.pool_control import WindowPools
    from producers.stages import TextStage, VaeStage

    stages = {}

    class FakeDataset:
        def flat_map(self, *args, **kwargs):
            return self

        def map_batches(self, fn, **kwargs):
            stages[fn] = kwargs["fn_constructor_kwargs"]
            return self

    monkeypatch.setattr(ray.data, "from_items", lambda *args, **kwargs: FakeDataset())
    cfg = ProducerConfig(vae_channels_last=True, vae_compile="reduce-overhead", vae_conv2d=True)
    req = ProduceRequest("in", "out", config=cfg, device="cpu")
    _build_dataset([], req, cfg, "ENC", "v", WindowPools(bounds={"vae": (1, 1), "text": (1, 1)}))
    assert stages[VaeStage] == {
        "encoders_dir": "ENC",
        "device": "cpu",
        "channels_last": True,
        "compile_mode": "reduce-overhead",
        "conv2d": True,
    }
    assert "compile_mode" not in stages[TextStage]
    stage = VaeStage(str(enc_dir), device="cpu", channels_last=True, conv2d=True)
    assert (stage.encoder.channels_last, stage.encoder.compile_mode, stage.encoder.conv2d) == (True, "off", True)
