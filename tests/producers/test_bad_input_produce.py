"""Bad input to ``qwenimage produce``: one clear line, a non-zero exit, nothing lost.

Every case runs the real command line in a subprocess (``python -m megatron_qwenimage.cli
produce ... --encoders tiny --metrics-port -1 --no-progress``). Hard errors must be ONE line on
stderr, ``qwenimage produce: error: ...``, naming the input, with the documented exit status,
and must leave an earlier cache exactly as it was (same files, same bytes, `cache verify` ok)
or create no output at all. Per-input faults are quarantined with a reason and never cost the
good inputs of their partition.

Cost control (2-core CI): the up-front cases stop before Ray starts; the runs that need Ray join
the session's local Ray (`ray_cluster`) and share module-scoped fixtures.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_qwenimage.cache import open_cache, verify_cache
from megatron_qwenimage.cache.writer import read_quarantine
from tests.helpers.producers import SKIMAGE_DATA, run_cli

PREFIX = "qwenimage produce: error: "
#: The shared base cache: 4 synthetic inputs in 2 partitions, 64 px buckets.
BASE_INPUT = "synthetic:text?n=4&seed=7"
BASE_FLAGS = ["--buckets", "64", "--partition-size", "2"]


def produce_argv(*args: str) -> list[str]:
    return ["produce", "--encoders", "tiny", "--metrics-port", "-1", "--no-progress", *args]


def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `path` (a directory) or of `path` itself."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_one_error_line(proc: subprocess.CompletedProcess, rc: int, needles: list[str], *, only_line: bool) -> str:
    """The exit status is `rc`; stderr holds exactly one error line naming every needle, no traceback.
    `only_line`: nothing else on stderr either (errors found before Ray starts)."""
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, proc.stderr[-3000:]
    if only_line:
        assert proc.stderr.strip() == lines[0], proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_verifies(cache_dir: Path) -> None:
    """What `qwenimage cache verify` checks (the same function, in process)."""
    report = verify_cache(open_cache(str(cache_dir)))
    assert report.ok, report.bad_shards


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"buckets"')))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_cache(ray_cluster, producer_env, tmp_path_factory) -> Path:
    """A committed cache that the up-front cases write into (and must leave untouched)."""
    cache = tmp_path_factory.mktemp("bad-input-base") / "cache"
    proc = run_cli(
        produce_argv(
            "--input", BASE_INPUT, "--output", str(cache), *BASE_FLAGS, "--json", "--ray-address", ray_cluster
        ),
        producer_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary_of(proc)["committed"] == 4
    assert (cache / "producer_settings.json").exists()
    return cache


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad and good inputs for the up-front cases (each case names the one it uses)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty").mkdir()
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.md").write_text("no pictures here")
    write_jsonl(root / "no_caption.jsonl", [{"image": "a.png", "text": "a caption under the wrong name"}])
    write_jsonl(root / "no_image.jsonl", [{"file": "a.png", "caption": "x"}])
    (root / "header_only.csv").write_text("image,caption\n")
    (root / "not_objects.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n["a.png", "a list"]\n')
    (root / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    (root / "not_a.tar").write_bytes(b"just some bytes, no tar header " * 20)
    (root / "latin1.csv").write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    index_dir = root / "bad_index"
    index_dir.mkdir()
    shutil.copy(SKIMAGE_DATA / "coffee.png", index_dir / "coffee.png")
    write_jsonl(index_dir / "captions.jsonl", [{"path": "coffee.png", "text": "coffee"}])
    (root / "a_file").write_text("I am a regular file, not a cache\n")
    (root / "occupied").mkdir()
    (root / "occupied" / "thesis.tex").write_text("do not touch")
    return root


@pytest.fixture(scope="module")
def other_encoders(producer_env, tmp_path_factory) -> Path:
    """A copy of the tiny encoders with one config value changed: another encoder version."""
    from producers.encoders import default_tiny_dir

    enc = tmp_path_factory.mktemp("other-encoders") / "enc"
    shutil.copytree(default_tiny_dir(), enc)
    cfg = json.loads((enc / "vae" / "config.json").read_text())
    cfg["scaling_note"] = "changed"
    (enc / "vae" / "config.json").write_text(json.dumps(cfg))
    return enc


@pytest.fixture()
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


# --- hard errors found before anything is written -------------------------------------------------
# (case id, argv builder (inputs dir, base cache, extra) -> (argv, needles), exit status, output)
# output: "base" = the shared cache, which must stay byte-identical; "new" = a fresh path, which
# must not be created; "given" = the argv names an existing non-cache path, which must not change.
UPFRONT = [
    (
        "synthetic-negative-n",
        lambda d, b, x: (["--input", "synthetic:text?n=-1"], ["synthetic:text?n=-1", "expected an integer >= 1"]),
        2,
        "base",
    ),
    (
        "synthetic-unknown-key",
        lambda d, b, x: (["--input", "synthetic:text?sede=5"], ["'sede'", "known keys: n, seed"]),
        2,
        "new",
    ),
    (
        "synthetic-n-not-int",
        lambda d, b, x: (["--input", "synthetic:text?n=ten"], ["n='ten'", "not an integer"]),
        2,
        "new",
    ),
    ("empty-folder", lambda d, b, x: (["--input", str(d / "empty")], [str(d / "empty"), "empty"]), 2, "base"),
    (
        "folder-without-images",
        lambda d, b, x: (["--input", str(d / "no_images")], [str(d / "no_images"), "no inputs", "1 files"]),
        2,
        "new",
    ),
    (
        "manifest-no-caption-column",
        lambda d, b, x: (
            ["--input", str(d / "no_caption.jsonl")],
            ["no_caption.jsonl", "no caption column", "columns found: image, text"],
        ),
        2,
        "base",
    ),
    (
        "manifest-no-image-column",
        lambda d, b, x: (
            ["--input", str(d / "no_image.jsonl")],
            ["no_image.jsonl", "no image column", "columns found: file, caption"],
        ),
        2,
        "new",
    ),
    (
        "manifest-no-rows",
        lambda d, b, x: (["--input", str(d / "header_only.csv")], ["header_only.csv", "no rows"]),
        2,
        "new",
    ),
    (
        "jsonl-line-not-an-object",
        lambda d, b, x: (["--input", str(d / "not_objects.jsonl")], ["not_objects.jsonl:2", "JSON object"]),
        2,
        "new",
    ),
    (
        "parquet-not-parquet",
        lambda d, b, x: (["--input", str(d / "broken.parquet")], ["broken.parquet", "not a readable Parquet file"]),
        2,
        "base",
    ),
    (
        "tar-not-a-tar",
        lambda d, b, x: (["--input", str(d / "not_a.tar")], ["not_a.tar", "not a readable tar"]),
        2,
        "new",
    ),
    ("csv-not-utf8", lambda d, b, x: (["--input", str(d / "latin1.csv")], ["latin1.csv:2", "not UTF-8"]), 2, "new"),
    (
        "caption-index-no-caption-column",
        lambda d, b, x: (
            ["--input", str(d / "bad_index")],
            ["captions.jsonl", "'caption'", "columns found: path, text"],
        ),
        2,
        "new",
    ),
    ("input-missing", lambda d, b, x: (["--input", str(d / "nope")], [str(d / "nope"), "does not exist"]), 2, "new"),
    (
        "output-is-a-file",
        lambda d, b, x: (["--input", BASE_INPUT, "--output", str(d / "a_file")], [str(d / "a_file"), "existing file"]),
        2,
        "given",
    ),
    (
        "output-non-empty-non-cache-dir",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--output", str(d / "occupied")],
            [str(d / "occupied"), "not a latent cache"],
        ),
        2,
        "given",
    ),
    (
        "negative-sweep-grace",
        lambda d, b, x: (["--input", BASE_INPUT, "--sweep-grace", "-5"], ["--sweep-grace", "-5"]),
        2,
        "base",
    ),
    (
        "vae-actors-zero",
        lambda d, b, x: (["--input", BASE_INPUT, "--vae-actors", "0:2"], ["--vae-actors", "'0:2'"]),
        2,
        "new",
    ),
    (
        "local-num-cpus-1-would-hang",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--local-num-cpus", "1"],
            ["--local-num-cpus 1", "--cpus-per-actor", "--vae-actors", "--text-actors", "1.5 CPUs"],
        ),
        2,
        "new",
    ),
    (
        "local-num-cpus-fractional",
        lambda d, b, x: (["--input", BASE_INPUT, "--local-num-cpus", "2.5"], ["--local-num-cpus 2.5", "whole number"]),
        2,
        "new",
    ),
    # An actor pool that can never be placed would keep the run pending forever.
    (
        "gpus-the-machine-lacks",
        lambda d, b, x: (["--input", BASE_INPUT, "--gpus-per-actor", "64"], ["--gpus-per-actor 64", "reserve 128"]),
        2,
        "new",
    ),
    (
        "missing-encoders-dir",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--encoders", str(d / "no-encoders")],
            [str(d / "no-encoders"), "vae/"],
        ),
        2,
        "new",
    ),
    (
        "metrics-port-in-use",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--metrics-port", str(x["port"])],
            [f"--metrics-port {x['port']}", f"127.0.0.1:{x['port']}"],
        ),
        2,
        "base",
    ),
    # The base cache was made with the defaults below: each flag that shapes samples is compared.
    (
        "settings-max-text-tokens",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--max-text-tokens", "512"],
            ["max_text_tokens 1024 -> 512 (--max-text-tokens)", "--new-settings-version", str(b)],
        ),
        2,
        "base",
    ),
    (
        "settings-buckets",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--buckets", "64,128"],
            ["buckets ", "(--buckets)", "--new-settings-version"],
        ),
        2,
        "base",
    ),
    (
        "settings-min-side-and-overlong",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--min-side", "16", "--overlong-caption", "reject"],
            ["min_side_px 32 -> 16 (--min-side)", "overlong_caption truncate -> reject (--overlong-caption)"],
        ),
        2,
        "base",
    ),
    (
        "settings-encoders",
        lambda d, b, x: (
            ["--input", BASE_INPUT, "--encoders", str(x["encoders"])],
            ["encoder_version ", "(--encoders)"],
        ),
        2,
        "base",
    ),
]


@pytest.mark.parametrize("case_id,build,rc,output", UPFRONT, ids=[c[0] for c in UPFRONT])
def test_upfront_error_is_one_line_and_writes_nothing(
    case_id, build, rc, output, inputs, base_cache, other_encoders, busy_port, producer_env, tmp_path
):
    argv, needles = build(inputs, base_cache, {"port": busy_port, "encoders": other_encoders})
    if "--output" not in argv:
        target = base_cache if output == "base" else tmp_path / "new-cache"
        argv = [*argv, "--output", str(target)]
    else:
        target = Path(argv[argv.index("--output") + 1])
    if "--buckets" not in argv:
        argv = [*argv, *BASE_FLAGS]
    before = tree(target) if target.exists() else None
    proc = run_cli(produce_argv(*argv), producer_env, timeout=120)
    assert_one_error_line(proc, rc, needles, only_line=True)
    if output == "new":
        assert not target.exists(), f"{target} was created by a refused run"
    else:
        assert tree(target) == before, f"{target} changed"
    if output == "base":
        assert_verifies(target)


# --- where the output goes and what the encoders run on: checked before the cache folder exists ------
def _uninstalled_protocol() -> tuple[str, str]:
    """(protocol, package) of an fsspec protocol whose package is not installed here."""
    import importlib.util

    from fsspec.registry import known_implementations

    for protocol in ("s3", "gcs", "abfs", "oci", "adl", "oss"):
        package = known_implementations[protocol]["class"].split(".")[0]
        if importlib.util.find_spec(package) is None:
            return protocol, package
    pytest.skip("every cloud file system package is installed here")


@pytest.fixture()
def unwritable_dir(tmp_path):
    """An empty directory this user cannot create entries in: chmod for a normal user; root ignores
    permission bits, so the directory is made immutable (chattr +i) instead."""
    d = tmp_path / "read-only"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("root, and chattr +i is not available on this file system")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_unknown_input_protocol_is_one_line(producer_env, tmp_path):
    out = tmp_path / "cache"
    proc = run_cli(produce_argv("--input", "foo://bucket/data", "--output", str(out), *BASE_FLAGS), producer_env)
    assert_one_error_line(proc, 2, ["--input foo://bucket/data: unknown protocol foo://", "fsspec"], only_line=True)
    assert not out.exists()


def test_output_url_without_its_package_names_the_package(producer_env, tmp_path):
    protocol, package = _uninstalled_protocol()
    url = f"{protocol}://bucket/cache"
    proc = run_cli(produce_argv("--input", BASE_INPUT, "--output", url, *BASE_FLAGS), producer_env)
    assert_one_error_line(proc, 2, [f"--output {url}", f"pip install {package}"], only_line=True)
    assert not (Path.cwd() / "bucket").exists()


def test_cuda_device_on_a_machine_without_cuda_is_one_line_before_ray(producer_env, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "cache"
    t0 = time.monotonic()
    proc = run_cli(
        produce_argv("--input", BASE_INPUT, "--output", str(out), "--device", "cuda", *BASE_FLAGS), producer_env
    )
    assert_one_error_line(proc, 2, ["--device cuda", "torch.cuda.is_available() is False"], only_line=True)
    assert not out.exists() and time.monotonic() - t0 < 60  # before Ray: no actor ever tried CUDA


def test_output_under_an_unwritable_directory_is_one_line(producer_env, unwritable_dir):
    out = unwritable_dir / "cache"
    proc = run_cli(produce_argv("--input", BASE_INPUT, "--output", str(out), *BASE_FLAGS), producer_env)
    assert_one_error_line(proc, 2, [f"--output {out}", f"{unwritable_dir} is not writable"], only_line=True)
    assert list(unwritable_dir.iterdir()) == []


def test_unreachable_ray_address_times_out_naming_it(producer_env, tmp_path):
    """127.0.0.1:1 never answers: Ray would retry for many minutes; the producer gives up after
    --ray-connect-timeout and creates nothing."""
    t0 = time.monotonic()
    proc = run_cli(
        produce_argv(
            "--input",
            BASE_INPUT,
            "--output",
            str(tmp_path / "cache"),
            *BASE_FLAGS,
            "--ray-address",
            "127.0.0.1:1",
            "--ray-connect-timeout",
            "2",
            "--json",
        ),
        producer_env,
        timeout=120,
    )
    assert time.monotonic() - t0 < 60
    assert_one_error_line(proc, 2, ["--ray-address 127.0.0.1:1", "2 s (--ray-connect-timeout)"], only_line=False)
    error = json.loads(proc.stdout.strip().splitlines()[-1])
    assert error["type"] == "RayConnectError" and "127.0.0.1:1" in error["error"]
    assert not (tmp_path / "cache").exists()


# --- resume and settings versions -----------------------------------------------------------------
def test_rerun_on_a_fully_committed_cache_is_a_resume(base_cache, producer_env):
    """Every partition skipped: exit 0 with the cache's counts, no Ray needed, nothing rewritten
    but status.json and the run's own telemetry history. Flags that do not shape samples may
    change (they are not compared)."""
    before = {k: v for k, v in tree(base_cache).items() if k != "status.json" and not k.startswith("telemetry/")}
    proc = run_cli(
        produce_argv(
            "--input",
            BASE_INPUT,
            "--output",
            str(base_cache),
            *BASE_FLAGS,
            "--json",
            "--batch-size",
            "3",
            "--cpus-per-actor",
            "0.25",
            "--text-actors",
            "1:2",
            "--sweep-grace",
            "7200",
            "--ray-address",
            "127.0.0.1:1",
        ),
        producer_env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["inputs"], summary["committed"], summary["partitions"], summary["partitions_skipped"]) == (
        4,
        4,
        2,
        2,
    )
    after = {k: v for k, v in tree(base_cache).items() if k != "status.json" and not k.startswith("telemetry/")}
    assert after == before


def test_new_settings_version_adds_samples_and_becomes_current(base_cache, ray_cluster, producer_env, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base_cache, cache)
    committed_before = tree(cache / "commits")
    new = produce_argv(
        "--input",
        BASE_INPUT,
        "--output",
        str(cache),
        *BASE_FLAGS,
        "--max-text-tokens",
        "512",
        "--ray-address",
        ray_cluster,
        "--json",
    )
    proc = run_cli([*new, "--new-settings-version"], producer_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary_of(proc)["committed"] == 4
    doc = json.loads((cache / "producer_settings.json").read_text())
    assert doc["current"] == 2 and [v["version"] for v in doc["versions"]] == [1, 2]
    assert [v["settings"]["max_text_tokens"] for v in doc["versions"]] == [1024, 512]
    assert tree(cache / "commits").items() >= committed_before.items()  # earlier commits untouched
    snap = open_cache(str(cache)).snapshot()
    assert sum(s.num_samples for s in snap.shards) == 8  # 4 per settings version
    assert_verifies(cache)
    # The new version is current: the same command (without the flag) resumes, the old settings are refused.
    again = run_cli(new, producer_env, timeout=120)
    assert again.returncode == 0 and summary_of(again)["partitions_skipped"] == 2, again.stderr[-3000:]
    old = run_cli(produce_argv("--input", BASE_INPUT, "--output", str(cache), *BASE_FLAGS), producer_env, timeout=120)
    assert_one_error_line(old, 2, ["max_text_tokens 512 -> 1024", "version 2"], only_line=True)


# --- per-input faults: quarantined with a reason, the good inputs committed ----------------------------
def _quarantine(cache_dir: Path) -> dict[str, tuple[str, str]]:
    cache = open_cache(str(cache_dir))
    return {
        r["input_id"]: (r["reason"], r["detail"])
        for rec in cache.snapshot().records
        for r in read_quarantine(cache.storage, rec).to_pylist()
    }


def _samples(cache_dir: Path) -> list[dict]:
    return [row for s in open_cache(str(cache_dir)).snapshot().shards for row in s.samples.to_pylist()]


@pytest.fixture(scope="module")
def mixed_runs(ray_cluster, producer_env, tmp_path_factory) -> dict:
    """One manifest, one folder and one WebDataset run with good and bad inputs mixed in one
    partition each (started together: they share the session's Ray)."""
    root = tmp_path_factory.mktemp("mixed")
    coffee, rocket, horse = (str(SKIMAGE_DATA / n) for n in ("coffee.png", "rocket.jpg", "horse.png"))
    manifest = write_jsonl(
        root / "mixed.jsonl",
        [
            {"image": coffee, "caption": "a cup of coffee"},  # 0 committed
            {"image": rocket, "caption": "a\x00 red\x07 rocket\r\nat night\x1b"},  # 1 committed, cleaned
            {"image": horse, "caption": 42},  # 2 caption_not_text
            {"image": horse, "caption": ["two", "captions"]},  # 3 caption_not_text
            {"image": 7, "caption": "an image path that is a number"},  # 4 invalid_image_ref
            {"image": None, "caption": "no image at all"},  # 5 invalid_image_ref
            {"image": horse, "caption": "\x00\x01\x02 \x1b"},  # 6 empty_caption
            {"image": horse, "source_image": 3.5, "caption": "edit with a bad source"},  # 7 invalid_image_ref
        ],
    )
    folder = root / "folder"
    folder.mkdir()
    for name, sidecar in (("good", "a horse"), ("nul", "\x00\x00\x00"), ("sidedir", None)):
        shutil.copy(SKIMAGE_DATA / "horse.png", folder / f"{name}.png")
        if sidecar is None:
            (folder / f"{name}.txt").mkdir()  # a sidecar that is a directory
        else:
            (folder / f"{name}.txt").write_text(sidecar)
    tar = root / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        add_member(tf, "a.png", (SKIMAGE_DATA / "coffee.png").read_bytes())
        add_member(tf, "a.txt", b"coffee from a tar")
        add_member(tf, "b.png", (SKIMAGE_DATA / "horse.png").read_bytes())
        add_member(tf, "b.jpg", (SKIMAGE_DATA / "rocket.jpg").read_bytes())
        add_member(tf, "b.txt", b"a horse from a tar")
        add_member(tf, "c.txt", b"a caption without an image")
    runs = {"manifest": manifest, "folder": folder, "tar": tar}
    procs = {}
    for name, src in runs.items():
        argv = produce_argv(
            "--input",
            str(src),
            "--output",
            str(root / f"cache-{name}"),
            "--buckets",
            "64",
            "--ray-address",
            ray_cluster,
            "--json",
        )
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "megatron_qwenimage.cli", *argv],
            env=producer_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=400)
        out[name] = (
            subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr),
            runs[name],
            root / f"cache-{name}",
        )
    return out


def test_manifest_cells_of_the_wrong_type_are_quarantined(mixed_runs):
    proc, manifest, cache = mixed_runs["manifest"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["inputs"], summary["committed"]) == (8, 2)
    assert summary["quarantined"] == {"caption_not_text": 2, "invalid_image_ref": 3, "empty_caption": 1}
    reasons = {input_id.split(":", 1)[0]: r for input_id, r in _quarantine(cache).items()}
    for row in (2, 3, 4, 5, 7):
        reason, detail = reasons[f"{row:09d}"]
        assert f"{manifest}#row={row}" in detail, detail
    assert "column 'image' is an int (7)" in reasons["000000004"][1]
    assert "column 'source_image' is a float" in reasons["000000007"][1]
    assert "caption is a list" in reasons["000000003"][1]
    assert reasons["000000006"][0] == "empty_caption" and "control characters" in reasons["000000006"][1]
    captions = sorted(r["caption"] for r in _samples(cache))
    assert captions == ["a cup of coffee", "a red rocket\nat night"]  # NUL, BEL, ESC removed; CR LF -> LF
    assert_verifies(cache)


def test_unreadable_sidecars_are_quarantined_not_fatal(mixed_runs):
    proc, folder, cache = mixed_runs["folder"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["inputs"], summary["committed"]) == (3, 1)
    assert summary["quarantined"] == {"unreadable_caption": 1, "empty_caption": 1}
    quarantined = _quarantine(cache)
    reason, detail = quarantined["sidedir.png"]
    assert reason == "unreadable_caption" and str(folder / "sidedir.txt") in detail and "is a directory" in detail
    assert quarantined["nul.png"][0] == "empty_caption"
    assert [r["caption"] for r in _samples(cache)] == ["a horse"]


def test_webdataset_names_tar_and_key_and_counts_a_second_image(mixed_runs):
    proc, tar, cache = mixed_runs["tar"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    assert (summary["inputs"], summary["committed"]) == (4, 2)
    assert summary["quarantined"] == {"extra_image": 1, "missing_file": 1}
    assert sorted(r["source_uri"] for r in _samples(cache)) == [f"{tar}#a", f"{tar}#b"]
    reasons = {reason: detail for reason, detail in _quarantine(cache).values()}
    assert f"{tar}#b.jpg" in reasons["extra_image"] and "second image" in reasons["extra_image"]
    assert f"{tar}#c" in reasons["missing_file"]


def test_nothing_committed_fails_unless_allow_empty(ray_cluster, producer_env, tmp_path):
    manifest = write_jsonl(tmp_path / "all_bad.jsonl", [{"image": 1, "caption": "x"}, {"image": [2], "caption": "y"}])
    argv = produce_argv(
        "--input", str(manifest), "--output", str(tmp_path / "cache"), "--buckets", "64", "--ray-address", ray_cluster
    )
    proc = run_cli(argv, producer_env)
    line = assert_one_error_line(
        proc, 1, [str(manifest), "none of its 2 inputs", "invalid_image_ref 2", "--allow-empty"], only_line=False
    )
    assert "2 inputs: 0 committed" in proc.stdout  # the summary is still printed
    assert line
    assert_verifies(tmp_path / "cache")  # the quarantine is committed: a rerun resumes
    allowed = run_cli([*argv, "--allow-empty", "--json"], producer_env, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert summary_of(allowed)["quarantined"] == {"invalid_image_ref": 2}


# --- SIGTERM ---------------------------------------------------------------------------------------
def test_sigterm_stops_quickly_keeps_commits_and_leaves_no_ray(base_cache, producer_env, tmp_path):
    """The embedded Ray is shut down, exit 143, and the commits made before are intact."""
    cache = tmp_path / "cache"
    shutil.copytree(base_cache, cache)
    committed = tree(cache / "commits")
    env = {k: v for k, v in producer_env.items() if k != "RAY_ADDRESS"}
    # The same first 4 inputs (the base cache's 2 partitions, skipped) and 36 more to encode.
    argv = [
        sys.executable,
        "-m",
        "megatron_qwenimage.cli",
        *produce_argv("--input", "synthetic:text?n=40&seed=7", "--output", str(cache), *BASE_FLAGS),
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    actors = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            seen.update(c.pid for c in children)
            names = []
            for c in children:
                try:
                    names.append(" ".join(c.cmdline()))
                except psutil.Error:
                    pass
            actors = sum("MapWorker" in n for n in names)
            if actors and any("raylet" in n for n in names):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert actors, "the pipeline's actors never started"
        time.sleep(2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr, stderr[-3000:]
    time.sleep(1)
    alive = []
    for pid in seen:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, p.name()))
        except psutil.Error:
            pass
    assert not alive, f"Ray processes of the stopped run are still alive: {alive}"
    assert tree(cache / "commits").items() >= committed.items()
    verify = run_cli(["cache", "verify", str(cache), "--json"], producer_env, timeout=120)
    assert verify.returncode == 0, verify.stderr[-3000:]
    assert json.loads(verify.stdout.strip().splitlines()[-1])["ok"]


# --- pieces without a subprocess -------------------------------------------------------------------
def test_parquet_caption_types_are_checked_at_listing(tmp_path):
    from producers.sources import list_inputs

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png", "b.png", "c.png"], "caption": [b"bytes ok", b"\xff\xfe", None]}), path)
    items = list_inputs(str(path))
    assert items[0].caption == "bytes ok" and items[0].rejected is None
    assert items[1].rejected[0] == "undecodable_caption" and f"{path}#row=1" in items[1].rejected[1]
    assert items[2].caption is None and items[2].rejected is None  # missing_caption when read


def test_sample_settings_cover_the_content_hash_fingerprint():
    """Every config value that salts a content hash is a recorded setting, and nothing else is."""
    from producers.config import ProducerConfig, buckets_for_area
    from producers.settings import sample_settings, settings_diff

    base = ProducerConfig()
    for change in (
        {"buckets": {"128": buckets_for_area(128)}},
        {"min_side_px": 8},
        {"max_pixels": 10},
        {"max_text_tokens": 77},
        {"overlong_caption": "reject"},
        {"edit_vl_area_px": 64},
    ):
        other = ProducerConfig(**change)
        assert other.fingerprint() != base.fingerprint()
        assert settings_diff(sample_settings(base, "v"), sample_settings(other, "v")), change
    for change in ({"partition_size": 3}, {"sweep_grace_s": 5.0}, {"max_inflight_partitions": 2}):
        assert not settings_diff(sample_settings(base, "v"), sample_settings(ProducerConfig(**change), "v")), change
