"""`qwenimage run`'s YAML is validated as a whole, before anything starts: one line naming the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from launch.run_config import load_run_spec, run_spec_from_dict
from megatron_qwenimage.cli import main
from megatron_qwenimage.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
LOCAL = yaml.safe_load((REPO / "examples" / "local.yaml").read_text())


def _with(path: str, value, base=LOCAL) -> dict:
    """`base` with the dotted key `path` set to `value` (``...=DELETE`` removes it)."""
    d = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value == "DELETE":
        del node[leaf]
    else:
        node[leaf] = value
    return d


def test_the_shipped_example_is_valid_and_the_run_owns_its_output_paths():
    spec = load_run_spec(REPO / "examples" / "local.yaml")
    cfg = spec.consumer.config
    assert cfg["logging"]["dir"] == spec.run_dir and cfg["checkpoint"]["dir"] == spec.checkpoint_dir
    assert cfg["schedule"]["export_diffusers"] == spec.export_dir
    assert cfg["logging"]["prometheus_sd_dir"] == spec.sd_dir and cfg["logging"]["run_label"] == "local"
    assert cfg["data"]["caches"] == [{"path": spec.cache, "mode": "tail"}]  # tails the run's own cache
    argv = spec.producer.argv(input_spec="in.jsonl", cache=spec.cache, run_label="local", sd_dir=spec.sd_dir)
    assert argv[:5] == ["produce", "--input", "in.jsonl", "--output", spec.cache]
    assert argv[argv.index("--partition-size") + 1] == "8" and argv[argv.index("--metrics-port") + 1] == "0"


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("nmae", "x", "unknown key(s) ['nmae']"),
        ("name", "two words", "name: 'two words': expected a non-empty label"),
        ("cache", "DELETE", "missing key `cache`"),
        ("producer.partition_sise", 8, "producer: unknown key(s) ['partition_sise']"),
        ("producer.partition_size", "eight", "producer.partition_size: invalid int value: 'eight'"),
        ("producer.vae_actors", "3:1", "producer.vae_actors '3:1': expected 1 <= MIN <= MAX"),
        ("producer.bundled.text_renders", -1, "producer.bundled.text_renders: expected a whole number >= 0"),
        ("producer.bundled.photos", 3, "producer.bundled: unknown key(s) ['photos']"),
        ("producer.buckets", "256,abc", "producer.buckets '256,abc': 'abc' is neither an area side"),
        ("consumer.nproc_per_node", 0, "consumer.nproc_per_node: expected a whole number >= 1"),
        ("consumer.config.optimizer.lr", "fast", "consumer.config.optimizer.lr"),
        ("consumer.config.parallel.tp", 3, "consumer.config."),
        ("consumer.config.logging.dir", "elsewhere", "consumer.config.logging.dir='elsewhere': the run puts this"),
        ("consumer.config.data.caches", [{"path": "other", "mode": "tail"}], "must read the run's cache"),
        ("consumer.config.data.stages.0.buckets", ["512x512"], "'512x512' is not a bucket the producers make"),
        ("report", "yes", "report: expected true or false"),
    ],
)
def test_bad_key_or_value_is_one_error_naming_it(path, value, expected):
    with pytest.raises(ConfigError) as info:
        run_spec_from_dict(_with(path, value), source="local.yaml")
    assert expected in str(info.value), str(info.value)


def test_cli_reports_one_line_and_starts_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    d = _with("producer.partition_size", "eight")
    d["run_dir"] = str(tmp_path / "run")
    bad.write_text(yaml.safe_dump(d))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qwenimage run: error: producer.partition_size: invalid int value: 'eight'"], err
    assert not (tmp_path / "run").exists()  # validated before anything is written


def _cli(tmp_path, capsys, d: dict) -> tuple[int, list[str]]:
    """`qwenimage run` on `d` with its run_dir and cache under `tmp_path`: (status, stderr lines)."""
    d = {**d, "run_dir": str(tmp_path / "run"), "cache": str(tmp_path / "cache")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    rc = main(["run", str(path)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_layout_error_names_nproc_per_node_and_reads_well(tmp_path, capsys):
    rc, err = _cli(tmp_path, capsys, _with("consumer.nproc_per_node", 3))
    assert rc == 2 and err == [
        "qwenimage run: error: consumer.nproc_per_node=3 does not fit consumer.config.parallel: world size 3 is not "
        "divisible by tp*pp = 2*1 = 2 (parallel.tp x parallel.pp); launch a multiple of 2 ranks (torchrun "
        "--nproc-per-node) or change them"
    ], err
    assert not (tmp_path / "run").exists()


def test_a_layout_the_model_refuses_still_names_the_config_key():
    with pytest.raises(ConfigError) as info:
        run_spec_from_dict(_with("consumer.config.parallel", {"tp": 2, "pp": 4}, _with("consumer.nproc_per_node", 8)))
    assert str(info.value).startswith("consumer.config.num_layers="), str(info.value)


def test_too_few_local_cpus_for_the_producer_is_refused_before_the_run_folder(tmp_path, capsys):
    """`producer.local_num_cpus: 1` cannot hold the encoder pools plus a read task and a writer (the
    embedded Ray would wait forever): refused with the run config, before anything is created."""
    rc, err = _cli(tmp_path, capsys, _with("producer.local_num_cpus", 1))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("qwenimage run: error: producer.local_num_cpus 1: 1 CPUs, but the encoder actor pools")
    assert "producer.cpus_per_actor" in err[0] and "1.5 CPUs in all" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    run_spec_from_dict(_with("producer.local_num_cpus", 2))  # enough: 1 for the pools, 0.5 for a read and a write


def test_a_cuda_device_this_machine_lacks_is_refused_with_the_run_config(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, err = _cli(tmp_path, capsys, _with("producer.device", "cuda"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("qwenimage run: error: producer.device cuda: torch "), err
    assert "sees no CUDA device" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("written", ["REL", "./REL/", "ABS"])
def test_the_runs_cache_is_recognised_however_its_path_is_written(tmp_path, monkeypatch, written):
    monkeypatch.chdir(tmp_path)
    d = _with("cache", "cache/local")
    path = {"REL": "cache/local", "./REL/": "./cache/local/", "ABS": str(tmp_path / "cache" / "local")}[written]
    spec = run_spec_from_dict(_with("consumer.config.data.caches", [{"path": path, "mode": "tail"}], d))
    assert spec.consumer.config["data"]["caches"] == [{"path": path, "mode": "tail"}]
    logging_dir = _with("consumer.config.logging", {"dir": str(tmp_path / "runs" / "local")}, d)
    assert run_spec_from_dict(logging_dir).consumer.config["logging"]["dir"] == "runs/local"  # the same place
