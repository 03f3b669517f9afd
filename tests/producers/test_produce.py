"""End-to-end producer runs on local Ray (CPU, tiny encoders): accounting, faults, concurrency."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from megatron_qwenimage.cache import open_cache
from megatron_qwenimage.cache.writer import read_duplicates, read_quarantine
from producers.config import FaultConfig, ProducerConfig, buckets_for_area
from producers.encoders import TextEncoder, VaeEncoder, default_tiny_dir
from producers.images import decode_image, nearest_bucket, resize_center_crop
from producers.pipeline import ProduceRequest, produce
from tests.helpers.producers import SKIMAGE_DATA, assert_complete_once, fault_input, run_cli

SKIMAGE_FILES = sorted(p for p in SKIMAGE_DATA.iterdir() if p.suffix in (".png", ".jpg", ".tif"))


def small_config(**kw) -> ProducerConfig:
    base = dict(
        buckets={"64": buckets_for_area(64), "128": buckets_for_area(128)},
        partition_size=8,
        max_pixels=5_000_000,
        min_side_px=8,
    )
    base.update(kw)
    return ProducerConfig(**base)


def png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def make_broken_folder(root: Path) -> dict[str, str]:
    """scikit-image samples with captions plus deliberately broken inputs; returns the expected
    reason (or "committed"/"duplicate") per input id."""
    root.mkdir()
    expected = {}
    for src in SKIMAGE_FILES:
        shutil.copy(src, root / src.name)
        (root / f"{src.stem}.txt").write_text(f"scikit-image sample {src.stem}")
        expected[src.name] = "committed"
    shutil.copy(SKIMAGE_DATA / "astronaut.png", root / "astronaut_copy.png")
    (root / "astronaut_copy.txt").write_text("scikit-image sample astronaut")
    expected["astronaut_copy.png"] = "duplicate"
    shutil.copy(SKIMAGE_DATA / "camera.png", root / "no_caption.png")
    expected["no_caption.png"] = "missing_caption"
    shutil.copy(SKIMAGE_DATA / "coins.png", root / "blank_caption.png")
    (root / "blank_caption.txt").write_text("  \n\t ")
    expected["blank_caption.png"] = "empty_caption"
    shutil.copy(SKIMAGE_DATA / "moon.png", root / "bad_utf8.png")
    (root / "bad_utf8.txt").write_bytes(b"caption \xff\xfe \xc3\x28")
    expected["bad_utf8.png"] = "undecodable_caption"
    broken = {
        "zero.png": (b"", "zero_bytes"),
        "truncated.png": ((SKIMAGE_DATA / "astronaut.png").read_bytes()[:40_000], "corrupt_image"),
        "not_image.png": (b"this is a text file, not a picture\n" * 10, "not_an_image"),
        "download.bin": (b"<html>404 not found</html>", "not_an_image"),
        "tiny.png": (png_bytes(4, 6), "too_small"),
        "bomb.png": (png_bytes(2600, 2000, "L"), "decompression_bomb"),
    }
    for name, (data, reason) in broken.items():
        (root / name).write_bytes(data)
        (root / f"{Path(name).stem}.txt").write_text(f"broken input {name}")
        expected[name] = reason
    return expected


@pytest.fixture(scope="module")
def skimage_run(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skimage-run")
    expected = make_broken_folder(tmp / "input")
    req = ProduceRequest(
        str(tmp / "input"), str(tmp / "cache"), config=small_config(), ray_address=ray_cluster, metrics_port=0
    )
    counts = produce(req)
    return expected, counts, tmp / "cache"


def test_every_input_is_committed_quarantined_or_duplicate(skimage_run):
    expected, counts, cache_dir = skimage_run
    want = Counter(expected.values())
    assert counts.inputs == len(expected)
    assert counts.committed == want["committed"] == len(SKIMAGE_FILES)
    assert counts.duplicates == want["duplicate"] == 1
    assert counts.committed + counts.duplicates + counts.quarantined_total == counts.inputs
    assert counts.quarantined == {r: n for r, n in want.items() if r not in ("committed", "duplicate")}

    cache = open_cache(str(cache_dir))
    snap = cache.snapshot()
    reasons = {}
    for rec in snap.records:
        for row in read_quarantine(cache.storage, rec).to_pylist():
            reasons[row["input_id"]] = row["reason"]
            assert row["input_id"] in row["source_uri"] and row["detail"]
        for row in read_duplicates(cache.storage, rec).to_pylist():
            reasons[row["input_id"]] = "duplicate"
    committed_uris = {Path(u).name for s in snap.shards for u in s.samples.column("source_uri").to_pylist()}
    for name in committed_uris:
        reasons[name] = "committed"
    assert reasons == expected
    # each committed input is encoded once per area: two samples per input
    assert sum(counts.buckets.values()) == 2 * counts.committed
    assert {Bucket_area(b) for b in counts.buckets} == {"64", "128"}


def Bucket_area(name: str) -> str:
    h, w = (int(x) for x in name.split("x"))
    return "64" if h * w < 96 * 96 else "128"


def test_cache_verify_json_counts_per_bucket(skimage_run, producer_env):
    expected, counts, cache_dir = skimage_run
    proc = run_cli(["cache", "verify", str(cache_dir), "--json"], producer_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["inputs"] == len(expected)
    assert report["committed"] == counts.committed and report["duplicates"] == 1
    assert report["quarantined"] == counts.quarantined and report["buckets"] == counts.buckets
    status = json.loads((cache_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["committed"] == counts.committed


def test_read_back_matches_the_encoders(skimage_run, producer_env):
    """Latents and text embeddings in the cache equal what the encoders give for the same pixels."""
    _, _, cache_dir = skimage_run
    snap = open_cache(str(cache_dir)).snapshot()
    shard = max(snap.shards, key=lambda s: s.num_samples)
    batch = shard.read_all()
    enc_dir = default_tiny_dir()
    vae, text = VaeEncoder(enc_dir, device="cpu"), TextEncoder(enc_dir, device="cpu")
    cfg = small_config()
    area = "64" if shard.bucket.height_px * shard.bucket.width_px < 96 * 96 else "128"
    for i, row in enumerate(shard.samples.to_pylist()[:3]):
        decoded = decode_image(
            Path(row["source_uri"]).read_bytes(), uri=row["source_uri"], min_side_px=8, max_pixels=5_000_000
        )
        assert nearest_bucket(decoded.height, decoded.width, cfg.buckets[area]) == shard.bucket
        pixels = resize_center_crop(decoded.pixels, shard.bucket).pixels
        torch.testing.assert_close(batch.latents[i].float(), vae.encode(pixels[None])[0].float(), atol=2e-2, rtol=2e-2)
        (emb,) = text.encode_t2i([row["caption"]])
        assert emb.embedding.shape[0] == row["text_len"] == int(batch.text_lengths[i])
        torch.testing.assert_close(batch.tensors.text_embedding(i).float(), emb.embedding.float(), atol=2e-2, rtol=2e-2)
    assert batch.latents.shape[1] == 16 and batch.text_embeddings.shape[1] == 32


def test_manifest_edit_pairs_missing_files_and_overlong_captions(ray_cluster, tmp_path):
    rows = [
        {"image": str(SKIMAGE_DATA / "coffee.png"), "caption": "a cup of coffee"},
        {"image": str(tmp_path / "gone.png"), "caption": "this file was deleted"},
        {
            "image": str(SKIMAGE_DATA / "chelsea.png"),
            "source_image": str(SKIMAGE_DATA / "astronaut.png"),
            "caption": "turn the astronaut into a cat",
        },
        {"image": str(SKIMAGE_DATA / "rocket.jpg"), "caption": " ".join(["very long caption"] * 80)},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = small_config(
        buckets={"64": buckets_for_area(64)}, overlong_caption="reject", max_text_tokens=64, edit_vl_area_px=64
    )
    counts = produce(ProduceRequest(str(manifest), str(tmp_path / "cache"), config=cfg, ray_address=ray_cluster))
    assert (counts.inputs, counts.committed) == (4, 2)
    assert counts.quarantined == {"missing_file": 1, "caption_too_long": 1}
    (shard,) = open_cache(str(tmp_path / "cache")).snapshot().shards
    tasks = {r["task"]: i for i, r in enumerate(shard.samples.to_pylist())}
    edit = shard.read_sample(tasks["edit"])
    assert edit.condition_latents is not None and edit.condition_latents.shape == edit.latents.shape
    assert edit.metadata["condition_uri"].endswith("astronaut.png")
    assert shard.read_sample(tasks["t2i"]).condition_latents is None


def test_webdataset_tar_source(ray_cluster, tmp_path):
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for key, image, caption in (
            ("a", "coffee.png", b"coffee"),
            ("b", "horse.png", b"a horse"),
            ("c", "coins.png", None),
        ):
            data = (SKIMAGE_DATA / image).read_bytes()
            for name, payload in ((f"{key}.png", data), (f"{key}.txt", caption)):
                if payload is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    cfg = small_config(buckets={"64": buckets_for_area(64)})
    counts = produce(ProduceRequest(str(tar_path), str(tmp_path / "cache"), config=cfg, ray_address=ray_cluster))
    assert (counts.inputs, counts.committed, counts.quarantined) == (3, 2, {"missing_caption": 1})
    captions = {
        c
        for s in open_cache(str(tmp_path / "cache")).snapshot().shards
        for c in s.samples.column("caption").to_pylist()
    }
    assert captions == {"coffee", "a horse"}


def test_worker_killed_mid_shard_is_retried_without_duplicates(ray_cluster, tmp_path):
    src = fault_input(tmp_path / "in")
    fault = FaultConfig(kill_writer_at="shard_written", kill_scope="worker", once_marker=str(tmp_path / "fired"))
    cfg = ProducerConfig(buckets={"64": buckets_for_area(64)}, partition_size=2, fault=fault)
    counts = produce(ProduceRequest(str(src), str(tmp_path / "cache"), config=cfg, ray_address=ray_cluster))
    assert (tmp_path / "fired").exists(), "the fault did not fire"
    assert counts.committed == 6
    assert_complete_once(tmp_path / "cache", 6)


def _fault_run_args(src: Path, cache: Path, ray_address: str, *extra: str) -> list[str]:
    """``qwenimage produce`` arguments of a fault run from the command line: `src` into `cache`,
    64 px buckets, partitions of 2, on `ray_address`, a JSON summary, no progress bar; then `extra`."""
    return [
        "produce",
        "--input",
        str(src),
        "--output",
        str(cache),
        "--buckets",
        "64",
        "--partition-size",
        "2",
        "--ray-address",
        ray_address,
        "--json",
        "--no-progress",
        *extra,
    ]


def test_producer_killed_then_rerun_resumes(ray_cluster, producer_env, tmp_path):
    src = fault_input(tmp_path / "in")
    # One write in flight at a time: the driver dies while accounting the first commit. The
    # second write may already be out (handed out once the first is claimed, which comes just
    # before its accounting) but not the third, so 1 or 2 of the 3 partitions are committed; with
    # eight in flight all three could commit before the driver looked.
    extra = ("--metrics-port", "-1", "--sweep-grace", "0", "--max-inflight-partitions", "1")
    args = _fault_run_args(src, tmp_path / "cache", ray_cluster, *extra)
    env = dict(producer_env, QWENIMAGE_FAULT="kill_writer_at=before_commit,kill_scope=driver,after_partitions=1")
    crashed = run_cli(args, env)
    assert crashed.returncode != 0
    committed_before = len(list((tmp_path / "cache" / "commits").glob("*.json")))
    assert committed_before in (1, 2)
    rerun = run_cli(args, producer_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["inputs"], summary["committed"], summary["partitions_skipped"]) == (6, 6, committed_before)
    assert_complete_once(tmp_path / "cache", 6)


def test_two_concurrent_producers_publish_each_sample_once(ray_cluster, producer_env, tmp_path):
    import subprocess
    import sys

    src = fault_input(tmp_path / "in")
    args = _fault_run_args(src, tmp_path / "cache", ray_cluster, "--metrics-port", "0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "megatron_qwenimage.cli", *args],
            env=producer_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert (summary["inputs"], summary["committed"], summary["duplicates"]) == (6, 6, 0)
    assert_complete_once(tmp_path / "cache", 6)


def test_embedded_local_ray_default_makes_progress(producer_env, tmp_path):
    """No --ray-address: the producer starts its own local Ray and finishes (no pending actor pool)."""
    env = {k: v for k, v in producer_env.items() if k != "RAY_ADDRESS"}
    proc = run_cli(
        [
            "produce",
            "--input",
            "synthetic:text?n=3&seed=1",
            "--output",
            str(tmp_path / "cache"),
            "--buckets",
            "64",
            "--json",
            "--no-progress",
            "--metrics-port",
            "0",
        ],
        env,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["inputs"], summary["committed"]) == (3, 3)
    captions = [
        c
        for s in open_cache(str(tmp_path / "cache")).snapshot().shards
        for c in s.samples.column("caption").to_pylist()
    ]
    assert all(c.startswith('The text "') for c in captions)
