"""``qwenimage launch k8s job.yaml [--output DIR]``: Kubernetes manifests for both sides of a job spec.

Rendered from the same `launch.job_spec.JobSpec` as the Slurm and Ray backends; nothing is applied
(``kubectl apply -f DIR`` does that, in file order):

* ``01-train-config.yaml``, a ``ConfigMap`` holding the consumer's run config (``train.yaml``,
  exactly what ``qwenimage train --config`` reads), mounted read-only at ``/etc/qwenimage``;
* ``02-producer-rayjob.yaml``, a KubeRay ``RayJob`` (``ray.io/v1``): a Ray cluster of
  ``producer.nodes`` pods (the head + a worker group of ``nodes - 1`` replicas, each with
  ``producer.gpus_per_node`` ``nvidia.com/gpu`` and ``cpus_per_task`` CPUs), the entrypoint
  ``qwenimage produce ... --ray-address auto``, ``shutdownAfterJobFinishes`` (the cluster goes
  away when the job ends) and ``activeDeadlineSeconds`` from ``producer.time``. With
  ``--max-producer-nodes N`` the worker group may grow to ``N - 1`` replicas and KubeRay's in-tree
  autoscaler is enabled (what `launch.autoscale.RayAutoscalerActuator` drives);
* ``03-consumer-runtime.yaml``, the run's own Kubeflow Trainer ``TrainingRuntime`` (a torch
  runtime like the stock ``torch-distributed``: ``mlPolicy.torch``, one replicated job ``node``)
  whose pods have ``terminationGracePeriodSeconds`` = ``consumer.signal_before_s``. A deletion,
  preemption or eviction sends SIGTERM to torchrun, which passes it to the training processes
  and gives them ``--shutdown-timeout`` (`launch.job_spec.ConsumerJob.shutdown_timeout_s`) to finish
  their step and save before the kubelet's SIGKILL; Kubernetes' default grace, 30 s, is too short
  to checkpoint a real model. The TrainJob's own fields cannot set it (``podTemplateOverrides`` and
  ``runtimePatches`` admit no termination grace), hence the runtime. With ``--runtime NAME`` the
  TrainJob uses that runtime instead (its grace applies; a warning says so) and this file is left out;
* ``04-consumer-trainjob.yaml``, a Kubeflow Trainer v2 ``TrainJob``
  (``trainer.kubeflow.org/v1alpha1``) on that runtime: ``numNodes`` = ``consumer.nodes``,
  ``numProcPerNode`` and ``resourcesPerNode`` = ``consumer.gpus_per_node`` GPUs, the command
  ``torchrun --shutdown-timeout=S -m megatron_qwenimage.cli train --config /etc/qwenimage/train.yaml``
  (the runtime's torch plugin gives torchrun its ``PET_NNODES``, ``PET_NODE_RANK``,
  ``PET_MASTER_ADDR`` ...).

Why a TrainJob and not a hand-written JobSet: the TrainJob's runtime (installed once per cluster by
its administrators) owns the rendezvous (headless service, master address, node ranks), the
failure policy and the queueing integration (Kueue); a JobSet would duplicate all of it here. The
Trainer's pod-customisation field has been renamed across releases: ``podTemplateOverrides``
(v2.1, v2.2; the default here) became ``runtimePatches`` later (``--trainer-patches
runtime-patches``).

Both sides need ``container.image`` (a Kubernetes pod runs an image: a spec without one is one
line naming the key). ``container.mounts`` (``SRC:DST[:ro]``) become ``hostPath`` volumes (the
nodes' shared file system, as Slurm's container mounts); ``--pvc CLAIM:DST`` adds a
PersistentVolumeClaim to both sides instead. ``env.vars`` are the containers' environment. Every
object carries the labels ``app.kubernetes.io/name: qwenimage``, ``qwenimage/run: <name>`` and
``qwenimage/side: producer|consumer`` (also on the pods), and the exact run name as the annotation
``qwenimage/run-name``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron_qwenimage.config import ConfigError

CONFIG_MOUNT = "/etc/qwenimage"
CONFIG_KEY = "train.yaml"
TRAINER_API = "trainer.kubeflow.org"
PATCH_MANAGER = "qwenimage/launch-k8s"
FILES = {
    "config": "01-train-config.yaml",
    "producer": "02-producer-rayjob.yaml",
    "runtime": "03-consumer-runtime.yaml",
    "consumer": "04-consumer-trainjob.yaml",
}
#: The Kubeflow Trainer label that makes a runtime's replicated job the one the TrainJob's
#: ``trainer`` (image, command, resources, nodes) applies to.
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"


def add_k8s_arguments(parser) -> None:
    parser.add_argument("job_spec", metavar="JOB_YAML", help="the job spec (docs/launch.md) to render")
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="write the manifests as YAML files into DIR (created) instead of printing them",
    )
    parser.add_argument("--namespace", default=None, help="metadata.namespace of every object (default: none)")
    parser.add_argument(
        "--runtime",
        default=None,
        metavar="NAME",
        help="run the TrainJob on this existing torch runtime (runtimeRef.name, e.g. torch-distributed; its pods' "
        "termination grace applies) instead of the run's own TrainingRuntime, whose grace is consumer.signal_before_s",
    )
    parser.add_argument(
        "--runtime-kind",
        choices=("ClusterTrainingRuntime", "TrainingRuntime"),
        default="ClusterTrainingRuntime",
        help="runtimeRef.kind of --runtime (default ClusterTrainingRuntime)",
    )
    parser.add_argument(
        "--trainer-patches",
        choices=("pod-template-overrides", "runtime-patches"),
        default="pod-template-overrides",
        help="how the TrainJob adds volumes and pod labels: podTemplateOverrides (Trainer v2.1/v2.2, default) or "
        "runtimePatches (later releases)",
    )
    parser.add_argument(
        "--ray-version",
        default=None,
        metavar="X.Y.Z",
        help="rayClusterSpec.rayVersion: the Ray of the image (default: the Ray installed here)",
    )
    parser.add_argument(
        "--max-producer-nodes",
        type=int,
        default=None,
        metavar="N",
        help="let the producer cluster grow to N nodes (KubeRay in-tree autoscaling; default: fixed at producer.nodes)",
    )
    parser.add_argument(
        "--pvc",
        action="append",
        default=[],
        metavar="CLAIM:DST",
        help="mount PersistentVolumeClaim CLAIM at DST in every pod of both sides (repeatable)",
    )


# --- names and labels ------------------------------------------------------------------------------
#: KubeRay refuses RayJob names over 47 characters (it appends to them for the cluster and its
#: services); the same bound keeps every name here short enough for the pods' host names too.
MAX_NAME = 47


def k8s_name(run: str, suffix: str, max_len: int = MAX_NAME) -> str:
    """An RFC 1035 label (lower case, digits, '-', starts with a letter) of at most `max_len`
    characters for `run`-`suffix`."""
    base = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-") or "run"
    if not base[0].isalpha():
        base = f"q-{base}"
    base = base[: max_len - 1 - len(suffix)].rstrip("-")
    return f"{base}-{suffix}"


def label_value(text: str) -> str:
    """`text` as a label value: [A-Za-z0-9_.-], starting and ending alphanumeric, <= 63 chars."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value) or "run"


def labels(spec, side: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "qwenimage",
        "app.kubernetes.io/component": side,
        "qwenimage/run": label_value(spec.name),
        "qwenimage/side": side,
    }


def _metadata(spec, name: str, side: str, namespace: str | None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = labels(spec, side)
    meta["annotations"] = {"qwenimage/run-name": spec.name, "qwenimage/job-spec": str(spec.source)}
    return meta


# --- what the pods need ---------------------------------------------------------------------------
def _image(spec, side: str) -> str:
    container = getattr(spec, side).resources.container
    if not container or not container.get("image"):
        raise ConfigError(
            f"{side}.container.image: missing; Kubernetes runs containers, so give {side}.container: "
            "{image: REGISTRY/IMAGE:TAG} (the image with this package installed)"
        )
    return container["image"]


def _check_absolute(path: str, key: str) -> None:
    if "://" not in path and not path.startswith("/"):
        raise ConfigError(
            f"{key}={path!r}: a relative path means nothing inside a pod; give an absolute path on a mounted "
            "volume (container.mounts, --pvc) or a URL"
        )


def _resources(res) -> dict:
    amounts: dict[str, Any] = {}
    if res.cpus_per_task:
        amounts["cpu"] = res.cpus_per_task
    if res.gpus_per_node:
        amounts["nvidia.com/gpu"] = res.gpus_per_node
    return {"limits": dict(amounts), "requests": dict(amounts)} if amounts else {}


def _env(res) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in (res.env.get("vars") or {}).items()]


def _volumes(res, pvcs: list[str]) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts): a shared-memory /dev/shm, the container's host mounts, the PVCs."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for i, m in enumerate((res.container or {}).get("mounts") or []):
        parts = m.split(":")
        src, dst = parts[0], parts[1]
        name = f"host-{i}"
        volumes.append({"name": name, "hostPath": {"path": src}})
        mount = {"name": name, "mountPath": dst}
        if len(parts) > 2 and "ro" in parts[2].split(","):
            mount["readOnly"] = True
        mounts.append(mount)
    for i, p in enumerate(pvcs):
        claim, _, dst = p.partition(":")
        if not claim or not dst.startswith("/"):
            raise ConfigError(f"--pvc {p!r}: expected CLAIM:/absolute/mount/path")
        name = f"pvc-{i}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": name, "mountPath": dst})
    return volumes, mounts


def _container(spec, side: str, name: str, pvcs: list[str]) -> tuple[dict, list[dict]]:
    res = getattr(spec, side).resources
    volumes, mounts = _volumes(res, pvcs)
    container: dict[str, Any] = {"name": name, "image": _image(spec, side)}
    workdir = (res.container or {}).get("workdir")
    if workdir:
        container["workingDir"] = workdir
    resources = _resources(res)
    if resources:
        container["resources"] = resources
    env = _env(res)
    if env:
        container["env"] = env
    container["volumeMounts"] = mounts
    return container, volumes


# --- the manifests --------------------------------------------------------------------------------
def producer_entrypoint(spec) -> str:
    """``qwenimage produce ...`` joining the RayJob's own cluster (``--ray-address auto``)."""
    import shlex

    from launch.ray_jobs import producer_argv

    if spec.run.producer.uses_bundled_input:
        raise ConfigError(
            "producer.options.input: 'bundled' is written on the submitting machine; on Kubernetes give an input "
            "the pods can read (a path on a mounted volume, a URL)"
        )
    for value, key in ((spec.run.cache, "cache"), (spec.run.run_dir, "run_dir")):
        _check_absolute(value, key)
    return shlex.join(["qwenimage", *producer_argv(spec)])


def render_ray_job(
    spec,
    *,
    namespace: str | None = None,
    ray_version: str | None = None,
    max_producer_nodes: int | None = None,
    pvcs: list[str] | None = None,
) -> dict:
    """The producers' KubeRay ``RayJob``."""
    pvcs = list(pvcs or [])
    res = spec.producer.resources
    nodes = res.nodes
    if max_producer_nodes is not None and max_producer_nodes < nodes:
        raise ConfigError(
            f"--max-producer-nodes {max_producer_nodes}: expected at least producer.nodes ({nodes}); the cluster "
            "starts with producer.nodes and may only grow"
        )
    max_nodes = max_producer_nodes or nodes
    pod_labels = labels(spec, "producer")
    head, head_volumes = _container(spec, "producer", "ray-head", pvcs)
    worker, worker_volumes = _container(spec, "producer", "ray-worker", pvcs)
    cluster: dict[str, Any] = {"rayVersion": ray_version or _installed_ray()}
    if max_nodes > nodes:
        cluster["enableInTreeAutoscaling"] = True
    cluster["headGroupSpec"] = {
        "rayStartParams": {"dashboard-host": "0.0.0.0"},
        "template": {"metadata": {"labels": pod_labels}, "spec": {"containers": [head], "volumes": head_volumes}},
    }
    cluster["workerGroupSpecs"] = [
        {
            "groupName": "encoders",
            "replicas": nodes - 1,
            "minReplicas": nodes - 1,
            "maxReplicas": max_nodes - 1,
            "rayStartParams": {},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {"containers": [worker], "volumes": worker_volumes},
            },
        }
    ]
    job_spec: dict[str, Any] = {
        "entrypoint": producer_entrypoint(spec),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "metadata": {"qwenimage_run": label_value(spec.name), "side": "producer"},
    }
    if res.time_s:
        job_spec["activeDeadlineSeconds"] = res.time_s
    job_spec["rayClusterSpec"] = cluster
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(spec, k8s_name(spec.name, "producer"), "producer", namespace),
        "spec": job_spec,
    }


def render_config_map(spec, *, namespace: str | None = None) -> dict:
    """The ``ConfigMap`` with the consumer's run config (``train.yaml``)."""
    text = f"# The consumer's run config, rendered by `qwenimage launch k8s` from {spec.source}.\n" + yaml.safe_dump(
        spec.run.consumer.config, sort_keys=False
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, k8s_name(spec.name, "train-config"), "consumer", namespace),
        "data": {CONFIG_KEY: text},
    }


def train_command(spec) -> list[str]:
    """torchrun of ``qwenimage train``; the training processes get `shutdown_timeout_s` from a SIGTERM."""
    return [
        "torchrun",
        f"--shutdown-timeout={spec.consumer.shutdown_timeout_s}",
        "-m",
        "megatron_qwenimage.cli",
        "train",
        "--config",
        f"{CONFIG_MOUNT}/{CONFIG_KEY}",
    ]


def runtime_name(spec) -> str:
    return k8s_name(spec.name, "runtime")


def render_training_runtime(spec, *, namespace: str | None = None) -> dict:
    """The run's own torch ``TrainingRuntime``: the stock ``torch-distributed`` runtime's shape, its
    pods' termination grace = ``consumer.signal_before_s`` (see the module docstring)."""
    container = {"name": "node", "image": _image(spec, "consumer")}
    pod_spec = {"terminationGracePeriodSeconds": spec.consumer.signal_before_s, "containers": [container]}
    node_job = {
        "name": "node",
        "template": {
            "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
            "spec": {"template": {"metadata": {"labels": labels(spec, "consumer")}, "spec": pod_spec}},
        },
    }
    return {
        "apiVersion": f"{TRAINER_API}/v1alpha1",
        "kind": "TrainingRuntime",
        "metadata": _metadata(spec, runtime_name(spec), "consumer", namespace),
        "spec": {
            "mlPolicy": {"numNodes": spec.consumer.resources.nodes, "torch": {"numProcPerNode": "auto"}},
            "template": {"spec": {"replicatedJobs": [node_job]}},
        },
    }


def render_train_job(
    spec,
    *,
    namespace: str | None = None,
    runtime: str | None = None,
    runtime_kind: str = "ClusterTrainingRuntime",
    patches: str = "pod-template-overrides",
    pvcs: list[str] | None = None,
) -> dict:
    """The consumers' Kubeflow Trainer ``TrainJob`` (its config from `render_config_map`) on `runtime`
    (None: the run's own, `render_training_runtime`)."""
    res = spec.consumer.resources
    if runtime is None:
        runtime, runtime_kind = runtime_name(spec), "TrainingRuntime"
    for value, key in ((spec.run.cache, "cache"), (spec.run.run_dir, "run_dir")):
        _check_absolute(value, key)
    container, volumes = _container(spec, "consumer", "node", list(pvcs or []))
    config_volume = {"name": "train-config", "configMap": {"name": k8s_name(spec.name, "train-config")}}
    volumes = [config_volume, *volumes]
    mounts = [{"name": "train-config", "mountPath": CONFIG_MOUNT, "readOnly": True}, *container["volumeMounts"]]
    trainer: dict[str, Any] = {
        "image": container["image"],
        "command": train_command(spec),
        "numNodes": res.nodes,
        "numProcPerNode": max(1, res.gpus_per_node),
    }
    if "resources" in container:
        trainer["resourcesPerNode"] = container["resources"]
    if "env" in container:
        trainer["env"] = container["env"]
    pod_spec: dict[str, Any] = {"volumes": volumes, "containers": [{"name": "node", "volumeMounts": mounts}]}
    pod_meta = {"labels": labels(spec, "consumer")}
    job_spec: dict[str, Any] = {
        "runtimeRef": {"name": runtime, "apiGroup": TRAINER_API, "kind": runtime_kind},
        "trainer": trainer,
    }
    if patches == "pod-template-overrides":
        job_spec["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}], "metadata": pod_meta, "spec": pod_spec}]
    elif patches == "runtime-patches":
        job_spec["runtimePatches"] = [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": "node",
                                    "template": {"spec": {"template": {"metadata": pod_meta, "spec": pod_spec}}},
                                }
                            ]
                        }
                    }
                },
            }
        ]
    else:
        raise ConfigError(f"--trainer-patches {patches!r}: expected pod-template-overrides or runtime-patches")
    return {
        "apiVersion": f"{TRAINER_API}/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(spec, k8s_name(spec.name, "consumer"), "consumer", namespace),
        "spec": job_spec,
    }


def render_manifests(
    spec,
    *,
    namespace: str | None = None,
    runtime: str | None = None,
    runtime_kind: str = "ClusterTrainingRuntime",
    patches: str = "pod-template-overrides",
    ray_version: str | None = None,
    max_producer_nodes: int | None = None,
    pvcs: list[str] | None = None,
) -> dict[str, dict]:
    """File name -> manifest, in the order to apply them (`FILES`; the run's own runtime only
    without `runtime`)."""
    manifests = {
        FILES["config"]: render_config_map(spec, namespace=namespace),
        FILES["producer"]: render_ray_job(
            spec, namespace=namespace, ray_version=ray_version, max_producer_nodes=max_producer_nodes, pvcs=pvcs
        ),
    }
    if runtime is None:
        manifests[FILES["runtime"]] = render_training_runtime(spec, namespace=namespace)
    manifests[FILES["consumer"]] = render_train_job(
        spec, namespace=namespace, runtime=runtime, runtime_kind=runtime_kind, patches=patches, pvcs=pvcs
    )
    return manifests


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &id001 anchors: each manifest reads on its own
        return True


def _str(dumper: yaml.SafeDumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)


def unmounted_paths(spec, pvcs: list[str] | None = None) -> list[str]:
    """Warnings for the run's local paths (cache, run directory, the caches the consumer reads)
    that no volume of their side's pods holds: the pods would not see them."""
    out = []
    for side, paths in (
        ("producer", [("cache", spec.run.cache), ("run_dir", spec.run.run_dir)]),
        (
            "consumer",
            [("run_dir", spec.run.run_dir)]
            + [
                (f"consumer.config.data.caches[{i}].path", str(c.get("path", "")))
                for i, c in enumerate(spec.run.consumer.config.get("data", {}).get("caches") or [])
                if isinstance(c, dict)
            ],
        ),
    ):
        res = getattr(spec, side).resources
        _, mounts = _volumes(res, list(pvcs or []))
        roots = [m["mountPath"].rstrip("/") + "/" for m in mounts]
        for key, path in paths:
            if "://" in path or not path.startswith("/"):
                continue
            if not any((path.rstrip("/") + "/").startswith(root) for root in roots):
                where = ", ".join(m["mountPath"] for m in mounts)
                out.append(
                    f"{key}={path} is on no volume mounted in the {side} pods ({where}); add it to "
                    f"{side}.container.mounts or give --pvc CLAIM:DST"
                )
    return out


def _installed_ray() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        raise ConfigError("--ray-version: Ray is not installed here; give the Ray version of the image") from None


def run_k8s(args) -> int:
    from launch.job_spec import load_job_spec

    if args.max_producer_nodes is not None and args.max_producer_nodes < 1:
        raise ConfigError(f"--max-producer-nodes {args.max_producer_nodes}: expected a whole number >= 1")
    # The paths are the pods' (a cluster file system, URLs): nothing to check on this machine.
    spec = load_job_spec(args.job_spec, check_paths=False, check_ray=False)
    manifests = render_manifests(
        spec,
        namespace=args.namespace,
        runtime=args.runtime,
        runtime_kind=args.runtime_kind,
        patches=args.trainer_patches,
        ray_version=args.ray_version,
        max_producer_nodes=args.max_producer_nodes,
        pvcs=args.pvc,
    )
    warnings = unmounted_paths(spec, args.pvc)
    if args.runtime is not None:
        warnings.append(
            f"the TrainJob runs on the {args.runtime_kind} {args.runtime}: its pods' terminationGracePeriodSeconds "
            "(Kubernetes' default 30 s) is the training's time from SIGTERM to save; give it consumer.signal_before_s="
            f"{spec.consumer.signal_before_s} there, or leave out --runtime for the run's own runtime with that grace"
        )
    for warning in warnings:
        print(f"qwenimage launch k8s: warning: {warning}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write("---\n".join(to_yaml(m) for m in manifests.values()))
        return 0
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: is a file; give a directory for the manifests")
    out.mkdir(parents=True, exist_ok=True)
    for name, manifest in manifests.items():
        path = out / name
        path.write_text(f"# Rendered by `qwenimage launch k8s` from {spec.source}.\n" + to_yaml(manifest))
        print(path)
    return 0
