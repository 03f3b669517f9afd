"""QwenImageMMDiT stands in for the diffusers transformer inside diffusers' QwenImagePipeline."""

from __future__ import annotations

import torch

from megatron_qwenimage.convert import load_diffusers
from tests.helpers.mmdit import make_diffusers_transformer


def test_sampling_through_diffusers_pipeline_matches():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from producers.encoders import build_tiny_encoders

    encoders = build_tiny_encoders()  # built once per machine: real Qwen BPE tokenizer, tiny VL + VAE
    reference = make_diffusers_transformer(
        in_channels=64, out_channels=16, joint_attention_dim=32, axes_dims_rope=(8, 4, 4)
    )
    ours = load_diffusers(reference)
    scheduler = FlowMatchEulerDiscreteScheduler(  # the Qwen-Image scheduler config (spec 6.3)
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    components = dict(
        scheduler=scheduler,
        vae=AutoencoderKLQwenImage.from_pretrained(encoders / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(encoders / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(encoders / "tokenizer"),
    )
    images = []
    for transformer in (reference, ours):
        pipe = QwenImagePipeline(transformer=transformer, **components)
        pipe.set_progress_bar_config(disable=True)
        images.append(
            pipe(
                prompt=["a red fox reading a newspaper", "two words"],  # different lengths: padded text
                negative_prompt=[" ", " "],
                true_cfg_scale=4.0,
                height=64,
                width=96,
                num_inference_steps=3,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images
        )
    assert images[0].shape == (2, 3, 64, 96)
    assert images[0].std() > 0
    assert (images[0] - images[1]).abs().max().item() <= 1e-4
