"""How many CPUs this process may really use, and the process counts that follow from it.

`usable_cpus()` is the smaller of the CPUs the scheduler lets us run on (affinity, e.g.
`taskset` or a cpuset) and the cgroup CPU quota (a container's `--cpus`, a Kubernetes CPU
limit), rounded up.  `os.cpu_count()` sees neither: in a 2-CPU container on a 64-core host
it says 64.

shared/config.py sizes unset counts with these functions; `python -m shared.sizes` prints
them for supervisord.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

# Cores kept for the processes that are not sized here: the broker and the GPU worker's own thread.
RESERVED_CPUS = 2
# Per request, a front end spends about a tenth of the CPU time of image decoding (docs/performance.md,
# "The CPU ceiling"), so it gets one core in PREPROCESS_PER_FRONTEND + 1 of the spare ones.
PREPROCESS_PER_FRONTEND = 6
MIN_PREPROCESS_WORKERS = 2  # one large image must not stall every other one


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 for `--cpus 1.5`), or None when unlimited.

    With cgroup v2 every level from our own group up to the mount may set a quota (a pod's limit sits
    on the pod's group, a container's on its own group below it): the tightest one binds."""
    v2_dirs = [cgroup_root]
    for line in (_read(proc_self_cgroup) or "").splitlines():
        if line.startswith("0::") and line[3:].strip("/"):  # cgroup v2: our group below the mount
            parts = line[3:].strip("/").split("/")
            v2_dirs = [cgroup_root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    limits = []
    for directory in v2_dirs:
        raw = _read(directory / "cpu.max")  # "max 100000" or "<quota> <period>"
        if raw:
            quota, _, period = raw.partition(" ")
            if quota != "max":
                limits.append(int(quota) / int(period or 100000))
    if limits or any((d / "cpu.max").exists() for d in v2_dirs):
        return min(limits) if limits else None
    for v1 in ("cpu", "cpu,cpuacct"):  # cgroup v1: -1 is no quota
        quota, period = _read(cgroup_root / v1 / "cpu.cfs_quota_us"), _read(cgroup_root / v1 / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            return int(quota) / int(period)
    return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may use: affinity, capped by the cgroup quota (rounded up); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


# Device files whose presence says a GPU is there (NVIDIA's driver, AMD's ROCm), read without importing torch.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")


def model_on_cpu(device: str, gpu_device_files=GPU_DEVICE_FILES) -> bool:
    """Whether the model will run on the CPU: MOONDREAM_DEVICE=cpu, or auto on a host without a GPU."""
    if device == "auto":
        return not any(os.path.exists(path) for path in gpu_device_files)
    return device == "cpu"


def default_frontend_workers(cpus: int, on_cpu: bool = False) -> int:
    if on_cpu:  # the model serves a request in seconds there: one front end keeps up with it
        return 1
    return max(1, (cpus - RESERVED_CPUS) // (PREPROCESS_PER_FRONTEND + 1))


def default_preprocess_workers(cpus: int, on_cpu: bool = False) -> int:
    if on_cpu:  # an image encode takes seconds on the CPU: two decoders stay ahead of it, the model gets the rest
        return MIN_PREPROCESS_WORKERS
    return max(MIN_PREPROCESS_WORKERS, cpus - RESERVED_CPUS - default_frontend_workers(cpus))


def default_torch_threads(cpus: int, frontend_workers: int, preprocess_workers: int, on_cpu: bool) -> int:
    """torch's threads for the GPU worker.  On a GPU they matter little: the CPUs it may use.  On the
    CPU they are the model's speed, and more threads than the cores left free make each step wait
    for whichever thread the OS has put aside (a busy stack on 2 cores ran its decode steps 30x
    slower with 2 threads than with 1): the CPUs less one per front end, preprocess worker and the
    broker, at least 1."""
    if not on_cpu:
        return cpus
    return max(1, cpus - frontend_workers - preprocess_workers - 1)
