"""`qwenimage launch k8s`: the manifests rendered from examples/job.yaml parse and carry the spec."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import pytest
import yaml

from launch.job_spec import EXIT_MARGIN_S, job_spec_from_dict
from launch.k8s import (
    ANCESTOR_LABEL,
    CONFIG_MOUNT,
    FILES,
    add_k8s_arguments,
    k8s_name,
    label_value,
    render_manifests,
    render_ray_job,
    render_train_job,
    render_training_runtime,
    run_k8s,
    unmounted_paths,
)
from megatron_qwenimage.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
JOB = yaml.safe_load((REPO / "examples" / "job.yaml").read_text())
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the example names its consumer config relative to the repository


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_k8s_arguments(parser)
    return parser.parse_args(list(argv))


def _pod_template_labels(obj) -> list[dict]:
    spec = obj["spec"]
    if obj["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [g["template"]["metadata"]["labels"] for g in groups]
    if obj["kind"] == "TrainingRuntime":
        return [
            j["template"]["spec"]["template"]["metadata"]["labels"] for j in spec["template"]["spec"]["replicatedJobs"]
        ]
    return [o["metadata"]["labels"] for o in spec["podTemplateOverrides"]]


def test_example_renders_four_valid_manifests(tmp_path, capsys):
    assert run_k8s(_args("examples/job.yaml", "--output", str(tmp_path / "k8s"))) == 0
    written = capsys.readouterr()
    files = sorted((tmp_path / "k8s").iterdir())
    assert [f.name for f in files] == sorted(FILES.values())
    assert written.out.split() == [str(f) for f in files]
    docs = {f.name: yaml.safe_load(f.read_text()) for f in files}
    config_map, ray_job, runtime, train_job = (docs[FILES[k]] for k in ("config", "producer", "runtime", "consumer"))

    for obj, api, kind in (
        (config_map, "v1", "ConfigMap"),
        (ray_job, "ray.io/v1", "RayJob"),
        (runtime, "trainer.kubeflow.org/v1alpha1", "TrainingRuntime"),
        (train_job, "trainer.kubeflow.org/v1alpha1", "TrainJob"),
    ):
        assert obj["apiVersion"] == api and obj["kind"] == kind
        name = obj["metadata"]["name"]
        assert DNS_1035.match(name) and len(name) <= 47, name
        assert obj["metadata"]["labels"]["qwenimage/run"] == "exp1"
        assert obj["metadata"]["annotations"]["qwenimage/run-name"] == "exp1"
        assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in obj["metadata"]["labels"].values())

    # The producers: head + (nodes - 1) workers, 8 GPUs and 64 CPUs per pod, the spec's image.
    spec = ray_job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] == 8 * 3600  # producer.time "08:00:00"
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["qwenimage", "produce"]
    assert entry[entry.index("--input") + 1] == "/lustre/raw/laion-aesthetic"
    assert entry[entry.index("--output") + 1] == "/data/qwen-image/t2i-latents"
    assert entry[entry.index("--vae-actors") + 1] == "8:16" and entry[entry.index("--run-label") + 1] == "exp1"
    assert entry[-2:] == ["--ray-address", "auto"] and entry.count("--ray-address") == 1
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] and "enableInTreeAutoscaling" not in cluster
    [workers] = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2 - 1
    for group in (cluster["headGroupSpec"], workers):
        [container] = group["template"]["spec"]["containers"]
        assert container["image"] == "nvcr.io/acme/qwenimage:latest"
        assert container["resources"]["limits"] == {"cpu": 64, "nvidia.com/gpu": 8}
        assert container["resources"]["requests"] == container["resources"]["limits"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes[mounts["/lustre"]]["hostPath"]["path"] == "/lustre"  # container.mounts
        assert set(mounts.values()) <= set(volumes)

    # The consumers: numNodes and GPUs from the spec, torchrun of `qwenimage train` on the mounted config.
    trainer = train_job["spec"]["trainer"]
    assert train_job["spec"]["runtimeRef"] == {
        "name": runtime["metadata"]["name"],
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
    }
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8}
    assert trainer["image"] == "nvcr.io/acme/qwenimage:latest"
    command = trainer["command"]
    assert command[0] == "torchrun" and command[command.index("-m") + 1] == "megatron_qwenimage.cli"
    config_path = command[command.index("train") + 2]
    assert command[command.index("train") + 1] == "--config" and config_path == f"{CONFIG_MOUNT}/train.yaml"
    [override] = train_job["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    volumes = {v["name"]: v for v in override["spec"]["volumes"]}
    [node] = override["spec"]["containers"]
    assert node["name"] == "node"
    mount = next(m for m in node["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT)
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    # ... and that ConfigMap holds the run config qwenimage train reads, the run owning its paths.
    train_config = yaml.safe_load(config_map["data"][Path(config_path).name])
    assert train_config["parallel"]["tp"] == 4 and train_config["model"] == "qwen-image-20b"
    assert train_config["logging"]["dir"] == "/lustre/qwenimage/runs/exp1"
    assert train_config["checkpoint"]["dir"] == "/lustre/qwenimage/runs/exp1/checkpoints"

    for obj in (ray_job, runtime, train_job):  # the pods carry the run's labels too
        for pod_labels in _pod_template_labels(obj):
            assert pod_labels["qwenimage/run"] == "exp1"
            assert pod_labels["qwenimage/side"] == obj["metadata"]["labels"]["qwenimage/side"]
    # The example mounts /data, where its cache lives: no warning.
    assert "is on no volume mounted" not in written.err


def test_a_cache_on_no_mounted_volume_is_said_not_refused(tmp_path, capsys):
    d = copy.deepcopy(JOB)
    for side in ("producer", "consumer"):
        d[side]["container"]["mounts"] = ["/lustre:/lustre"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    assert run_k8s(_args(str(path), "--output", str(tmp_path / "out"))) == 0
    assert "cache=/data/qwen-image/t2i-latents is on no volume mounted in the producer pods" in capsys.readouterr().err


def test_without_output_prints_the_same_documents(capsys):
    assert run_k8s(_args("examples/job.yaml", "--namespace", "ml")) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob", "TrainingRuntime", "TrainJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}


@pytest.mark.parametrize("signal_before_s", [180, 1200])
def test_consumer_pods_get_signal_before_s_to_checkpoint_before_the_kill(signal_before_s, tmp_path, capsys):
    """The run's own runtime gives the consumer pods a termination grace of consumer.signal_before_s
    (Kubernetes' default 30 s is too short to save a 20B checkpoint), and torchrun gives the
    training processes that less EXIT_MARGIN_S to finish their step and save."""
    d = copy.deepcopy(JOB)
    d["consumer"]["signal_before_s"] = signal_before_s
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    assert run_k8s(_args(str(path), "--output", str(tmp_path / "out"))) == 0
    runtime = yaml.safe_load((tmp_path / "out" / FILES["runtime"]).read_text())
    train_job = yaml.safe_load((tmp_path / "out" / FILES["consumer"]).read_text())
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node" and node["template"]["metadata"]["labels"] == {ANCESTOR_LABEL: "trainer"}
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == signal_before_s
    assert [c["name"] for c in pod["containers"]] == ["node"]
    assert "torch" in runtime["spec"]["mlPolicy"]
    command = train_job["spec"]["trainer"]["command"]
    timeout = int(next(a for a in command if a.startswith("--shutdown-timeout=")).split("=")[1])
    assert timeout == signal_before_s - EXIT_MARGIN_S and 0 < timeout < pod["terminationGracePeriodSeconds"]
    assert train_job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert "terminationGracePeriodSeconds" not in capsys.readouterr().err  # no warning: the grace is set


def test_an_existing_runtime_is_used_as_named_and_its_grace_is_warned_about(tmp_path, capsys):
    assert run_k8s(_args("examples/job.yaml", "--runtime", "torch-distributed", "--output", str(tmp_path / "k8s"))) == 0
    assert not (tmp_path / "k8s" / FILES["runtime"]).exists()
    train_job = yaml.safe_load((tmp_path / "k8s" / FILES["consumer"]).read_text())
    assert train_job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert train_job["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"
    err = capsys.readouterr().err
    assert "terminationGracePeriodSeconds" in err and "consumer.signal_before_s=180" in err


def test_the_runtime_renders_from_the_spec_alone():
    spec = job_spec_from_dict(copy.deepcopy(JOB), source="job.yaml", check_paths=False, check_ray=False)
    runtime = render_training_runtime(spec, namespace="ml")
    assert runtime["metadata"]["namespace"] == "ml" and DNS_1035.match(runtime["metadata"]["name"])
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    [container] = node["template"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "nvcr.io/acme/qwenimage:latest"


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_a_side_without_container_is_one_line_naming_it(side, tmp_path, capsys):
    d = copy.deepcopy(JOB)
    del d[side]["container"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as info:
        run_k8s(_args(str(path), "--output", str(tmp_path / "out")))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{side}.container.image: missing"), message
    assert "Kubernetes" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_autoscaling_pvcs_and_node_counts_follow_the_flags():
    d = copy.deepcopy(JOB)
    d["producer"]["nodes"], d["consumer"]["nodes"] = 3, 1
    d["consumer"]["config"] = yaml.safe_load((REPO / "examples" / "train-qwen-image-20b.yaml").read_text())
    d["consumer"]["config"]["parallel"] = {"tp": 8, "pp": 1, "sequence_parallel": True}
    d["consumer"]["config"]["checkpoint"]["interval"] = 10  # one node: ~10 min a step at 1328 px
    d["consumer"]["signal_before_s"] = 900  # so the stop signal leaves time to finish such a step and save
    spec = job_spec_from_dict(d, source="job.yaml", check_paths=False, check_ray=False)
    ray_job = render_ray_job(spec, max_producer_nodes=6, pvcs=["datasets:/data"], ray_version="2.60.0")
    cluster = ray_job["spec"]["rayClusterSpec"]
    [workers] = cluster["workerGroupSpecs"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (2, 2, 5)
    [container] = workers["template"]["spec"]["containers"]
    pvc = next(v for v in workers["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert pvc["persistentVolumeClaim"]["claimName"] == "datasets"
    assert {"name": pvc["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert unmounted_paths(spec, ["datasets:/data"]) == []  # /data now mounted
    train_job = render_train_job(spec, patches="runtime-patches", runtime="my-torch", runtime_kind="TrainingRuntime")
    assert train_job["spec"]["trainer"]["numNodes"] == 1
    assert train_job["spec"]["runtimeRef"]["name"] == "my-torch"
    [patch] = train_job["spec"]["runtimePatches"]
    [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]
    assert job["name"] == "node" and pod["metadata"]["labels"]["qwenimage/run"] == "exp1"
    assert any(v.get("configMap") for v in pod["spec"]["volumes"])
    with pytest.raises(ConfigError, match="--max-producer-nodes 2: expected at least producer.nodes"):
        render_ray_job(spec, max_producer_nodes=2)
    with pytest.raises(ConfigError, match="--pvc 'nocolon'"):
        render_ray_job(spec, pvcs=["nocolon"])


def test_names_and_labels_are_valid_for_any_run_name():
    assert k8s_name("Exp_1.big", "producer") == "exp-1-big-producer"
    assert k8s_name("7up", "consumer") == "q-7up-consumer"
    long = k8s_name("x" * 100, "producer")
    assert len(long) <= 47 and DNS_1035.match(long) and long.endswith("-producer")
    assert label_value("team/exp:1") == "team-exp-1"
    assert LABEL_VALUE.match(label_value("-" + "a" * 80 + "-"))


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"run_dir": "runs/exp1"}, "run_dir='runs/exp1': a relative path means nothing inside a pod"),
        ({"producer__options__input": "bundled"}, "producer.options.input: 'bundled' is written on the submitting"),
    ],
)
def test_what_a_pod_cannot_use_is_refused(change, expected):
    d = copy.deepcopy(JOB)
    for dotted, value in change.items():
        *parents, leaf = dotted.split("__")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    spec = job_spec_from_dict(d, source="job.yaml", check_paths=False, check_ray=False)
    with pytest.raises(ConfigError) as info:
        render_manifests(spec)
    assert expected in str(info.value), str(info.value)
