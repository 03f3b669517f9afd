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
