"""``qwenimage launch BACKEND job.yaml``: submit both sides of a job spec to a cluster.

Each backend module (`launch.slurm`, `launch.ray_jobs`, `launch.k8s`) provides
``add_<name>_arguments(parser)`` for its flags and ``run_<name>(args) -> int``; ``status`` and ``cancel`` follow
and stop what ``launch slurm`` submitted (the job ids are in ``run_dir/launch.json``).
"""

from __future__ import annotations

import importlib

#: ``qwenimage launch <name>`` -> (module, help).
BACKENDS = {
    "slurm": ("launch.slurm", "render and submit the producer and consumer Slurm jobs (sbatch --parsable)"),
    "status": ("launch.slurm_status", "state of the jobs `launch slurm` submitted, restarts and the run's latest step"),
    "cancel": ("launch.slurm_status", "cancel the jobs `launch slurm` submitted for a job spec (scancel)"),
    "ray": ("launch.ray_jobs", "submit the producer side as a Ray Job to an existing cluster (its Jobs API)"),
    "autoscale": (
        "launch.autoscale_cli",
        "keep the producers' lead time (backlog / consumer rate) in a band by resizing their encoder capacity",
    ),
    "k8s": ("launch.k8s", "render Kubernetes manifests (KubeRay RayJob, Kubeflow TrainJob) for both sides"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "launch",
        help="submit a job spec (job.yaml: producer and consumer sections) to Slurm, Ray or Kubernetes",
        description=(
            "Validate a job spec (docs/launch.md) and submit its producers and consumers to a cluster. Every "
            "fault of the spec (unknown keys, a layout that does not match the consumer GPUs, a cache that does "
            "not exist, an unreachable Ray address, a time limit shorter than one checkpoint interval) is one "
            "line naming the key, before anything is submitted."
        ),
    )
    sub = p.add_subparsers(dest="launch_command", metavar="BACKEND", required=True)
    for name, (module, help_text) in BACKENDS.items():
        q = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        getattr(mod, f"add_{name}_arguments")(q)
        q.set_defaults(func=getattr(mod, f"run_{name}"))
