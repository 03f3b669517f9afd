"""Producer building blocks without Ray: tokenizer prefix, image modes, buckets, metrics, config."""

from __future__ import annotations

import io
import os
import urllib.request

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from megatron_qwenimage.cache.shard_format import Bucket
from megatron_qwenimage.config import ConfigError
from producers.config import FaultConfig, PoolConfig, ProducerConfig, buckets_for_area, parse_buckets
from producers.encoders import T2I_TEMPLATE, TextEncoder, default_tiny_dir
from producers.images import Rejected, decode_caption, decode_image, nearest_bucket, resize_center_crop
from producers.metrics import ProducerMetrics


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_template_prefix_lengths_come_from_the_real_qwen_vocabulary(producer_env):
    text = TextEncoder(default_tiny_dir(), device="cpu", max_text_tokens=8)
    assert (text.drop_idx_t2i, text.drop_idx_edit) == (34, 64)
    assert text.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    short, long = text.encode_t2i(["a cat", "a very long caption " * 20])
    assert short.embedding.shape == (short.num_tokens_before_truncation, 32) and not short.truncated
    assert long.embedding.shape == (8, 32) and long.truncated and long.num_tokens_before_truncation > 8


def test_text_encoder_reads_the_last_hidden_state_without_the_vocabulary_projection(producer_env):
    """The encodings equal the full model's ``hidden_states[-1]`` (what the producer read before),
    and the output layer (the vocabulary projection) never runs."""
    text = TextEncoder(default_tiny_dir(), device="cpu")
    calls = []
    text.model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    captions = ["a cat", "two dogs on a long red sofa"]
    t2i = text.encode_t2i(captions)
    pixels = np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8)
    edit = text.encode_edit("make it blue", pixels)
    assert not calls
    enc = text.tokenizer([T2I_TEMPLATE.format(c) for c in captions], padding=True, return_tensors="pt")
    with torch.no_grad():
        full = text.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    assert calls  # the reference ran the whole model, output layer included
    for i, got in enumerate(t2i):
        want = full.hidden_states[-1][i][enc.attention_mask[i].bool()][text.drop_idx_t2i :].to(torch.bfloat16)
        assert torch.equal(got.embedding, want)
    assert edit.embedding.shape[1] == text.text_dim and torch.isfinite(edit.embedding.float()).all()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_mode_becomes_rgb(mode):
    img = Image.new("RGB", (40, 30), (200, 30, 10)).convert(mode)
    if mode == "I;16":
        img = Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16))
    out = decode_image(
        encode(img, "TIFF" if mode in ("CMYK", "I;16") else "PNG"), uri="x", min_side_px=8, max_pixels=10**6
    )
    assert out.pixels.shape == (30, 40, 3) and out.pixels.dtype == np.uint8
    if mode == "I;16":
        assert out.pixels.min() == 255  # full-scale 16-bit is white


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    out = decode_image(encode(img, transparency=0), uri="x", min_side_px=8, max_pixels=10**6)
    assert out.pixels.min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif), uri="x", min_side_px=8, max_pixels=10**6)
    assert out.pixels.shape[:2] == (60, 20)


def test_rejections_name_the_input():
    with pytest.raises(Rejected, match="img.png: file is empty") as e:
        decode_image(b"", uri="img.png", min_side_px=8, max_pixels=10**6)
    assert e.value.reason == "zero_bytes"
    with pytest.raises(Rejected) as e:
        decode_image(encode(Image.new("L", (100, 100))), uri="big.png", min_side_px=8, max_pixels=9_999)
    assert e.value.reason == "decompression_bomb"
    for raw, reason in ((None, "missing_caption"), (" \n", "empty_caption"), (b"\xff\xfe", "undecodable_caption")):
        with pytest.raises(Rejected) as e:
            decode_caption(raw, uri="c.png")
        assert e.value.reason == reason
    assert decode_caption("\ufeff  hello \n".encode(), uri="c.png") == "hello"


def test_buckets_are_16px_multiples_and_nearest_by_aspect():
    table = buckets_for_area(1328)
    assert Bucket(1328, 1328) in table
    assert all(b.height_px % 16 == 0 and b.width_px % 16 == 0 for a in (256, 640, 1328) for b in buckets_for_area(a))
    assert (
        nearest_bucket(1000, 1500, buckets_for_area(640)).width_px
        > nearest_bucket(1000, 1500, buckets_for_area(640)).height_px
    )
    crop = resize_center_crop(np.zeros((300, 500, 3), np.uint8), Bucket(256, 384))
    assert crop.pixels.shape == (256, 384, 3) and crop.crop_top == 0
    assert list(parse_buckets("256,640")) == ["256", "640"]
    assert parse_buckets("64x128") == {"custom": [Bucket(64, 128)]}
    with pytest.raises(ConfigError):
        parse_buckets("256,64x64")


def test_config_validation():
    with pytest.raises(ConfigError, match="min_actors"):
        PoolConfig(min_actors=3, max_actors=2)
    with pytest.raises(ConfigError, match="overlong_caption"):
        ProducerConfig(overlong_caption="drop")
    with pytest.raises(ConfigError, match="once_marker"):
        FaultConfig(kill_writer_at="shard_written", kill_scope="worker")
    with pytest.raises(ConfigError, match="max_text_tokens"):
        ProducerConfig(max_text_tokens=2048)


def test_prometheus_exporter_serves_on_localhost():
    metrics = ProducerMetrics(port=0, run_label="u")
    try:
        metrics.images_quarantined.labels("zero_bytes").inc(2)
        metrics.stage_latency.labels("vae").observe(0.2)
        metrics.queue_depth.labels("writes_inflight").set(3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10).read().decode()
        # A scrape of 127.0.0.1 also succeeds on a 0.0.0.0 bind: check what the socket is bound to.
        me = psutil.Process(os.getpid())
        conns = (me.net_connections if hasattr(me, "net_connections") else me.connections)(kind="inet")
        bound = [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == metrics.port]
    finally:
        metrics.close()
    assert bound == ["127.0.0.1"], bound
    assert 'qwenimage_producer_images_quarantined_total{reason="zero_bytes",run="u"} 2.0' in body
    assert 'qwenimage_producer_stage_seconds_count{run="u",stage="vae"} 1.0' in body
    assert 'qwenimage_producer_queue_depth{queue="writes_inflight",run="u"} 3.0' in body
