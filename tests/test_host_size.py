"""The CPUs a process may use (affinity, cgroup quota) and what is sized from them: the default
process counts and the GPU worker's torch threads.  The cgroup files are a directory the test
makes (the only way to give a quota without a container)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared import host_size
from tests.stack import REPO, ProcessGroup, stack_env, wait_for

def test_usable_cpus_follow_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    no_cgroup = tmp_path / "none"
    no_cgroup.write_text("")
    (tmp_path / "cpu.max").write_text("max 100000\n")  # cgroup v2, no limit
    assert host_size.usable_cpus(tmp_path, no_cgroup) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: rounds up to one
    assert host_size.cgroup_cpu_limit(tmp_path, no_cgroup) == 0.5
    assert host_size.usable_cpus(tmp_path, no_cgroup) == 1
    # cgroup v2 with the process's own group below the mount (what /proc/self/cgroup names);
    # the mount's own quota lifted, since the tightest level binds (next test)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "cpu.max").write_text("250000 100000\n")
    own = tmp_path / "own"
    own.write_text("0::/svc\n")
    assert host_size.cgroup_cpu_limit(tmp_path, own) == 2.5
    assert host_size.usable_cpus(tmp_path, own) == min(affinity, 3)
    # cgroup v1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert host_size.cgroup_cpu_limit(v1, no_cgroup) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    assert host_size.cgroup_cpu_limit(v1, no_cgroup) == 1.5


def test_default_process_counts_leave_cores_for_the_broker_and_gpu_worker():
    assert (host_size.default_frontend_workers(2), host_size.default_preprocess_workers(2)) == (1, 2)
    assert (host_size.default_frontend_workers(16), host_size.default_preprocess_workers(16)) == (2, 12)
    for cpus in range(4, 65):
        used = host_size.default_frontend_workers(cpus) + host_size.default_preprocess_workers(cpus)
        assert used == max(cpus - host_size.RESERVED_CPUS, 3), cpus
    assert host_size.default_torch_threads(16, 2, 12, on_cpu=False) == 16  # on a GPU: threads matter little


def test_with_the_model_on_the_cpu_the_model_gets_the_spare_cores():
    assert (host_size.default_frontend_workers(16, on_cpu=True), host_size.default_preprocess_workers(16, on_cpu=True)) == (1, 2)
    assert host_size.default_torch_threads(16, 1, 2, on_cpu=True) == 12
    # A busy 2-core stack: one thread, never two fighting the decoders for the same cores.
    assert host_size.default_torch_threads(2, 1, 2, on_cpu=True) == 1
    for cpus in range(1, 65):
        others = host_size.default_frontend_workers(cpus, True) + host_size.default_preprocess_workers(cpus, True) + 1
        assert host_size.default_torch_threads(cpus, 1, 2, on_cpu=True) == max(1, cpus - others), cpus


def test_auto_means_the_cpu_only_without_a_gpu_device_file(tmp_path):
    assert host_size.model_on_cpu("cpu") and not host_size.model_on_cpu("cuda:1")
    assert host_size.model_on_cpu("auto", gpu_device_files=(str(tmp_path / "nvidiactl"),))
    (tmp_path / "nvidiactl").touch()
    assert not host_size.model_on_cpu("auto", gpu_device_files=(str(tmp_path / "nvidiactl"),))


@pytest.mark.timeout(120)
def test_the_gpu_worker_sizes_its_torch_threads(tmp_path):
    group = ProcessGroup(stack_env(tmp_path), tmp_path)
    try:
        sized = group.start("gpu_worker", "sized")
        chosen = group.start("gpu_worker", "chosen", TORCH_THREADS=3)
        wait_for(lambda: "torch uses" in sized.log_path.read_text() and "torch uses" in chosen.log_path.read_text(),
                 60, "the torch threads lines")
    finally:
        group.stop_all()
    cpus = host_size.usable_cpus()  # the test stack runs the model on the CPU with 2 preprocess workers
    expected = host_size.default_torch_threads(cpus, host_size.default_frontend_workers(cpus, True), 2, on_cpu=True)
    assert f"torch uses {expected} CPU threads (TORCH_THREADS=0: sized from the CPUs)" in sized.log_path.read_text()
    assert "torch uses 3 CPU threads (TORCH_THREADS=3)" in chosen.log_path.read_text()


def test_the_exports_serve_sh_evaluates(tmp_path):
    env = {**os.environ, "MOONDREAM_DEVICE": "cpu", "PREPROCESS_WORKERS": "0", "FRONTEND_WORKERS": "0", "TORCH_THREADS": "0"}
    out = subprocess.run([sys.executable, "-m", "shared.sizes"], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    cpus = host_size.usable_cpus()
    threads = host_size.default_torch_threads(cpus, 1, 2, on_cpu=True)
    assert out == ["export", "FRONTEND_WORKERS=1", "PREPROCESS_WORKERS=2", f"TORCH_THREADS={threads}"]
    env["TORCH_THREADS"] = "5"
    out = subprocess.run([sys.executable, "-m", "shared.sizes"], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    assert out[-1] == "TORCH_THREADS=5"


def test_a_quota_above_our_own_cgroup_binds_too(tmp_path):
    """A pod's limit sits on the pod's group, the container's group below it says "max": the
    tightest quota on the path from our group up to the mount binds (not just the leaf's)."""
    leaf = tmp_path / "kubepods" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("max 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "kubepods" / "cpu.max").write_text("400000 100000\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    own = tmp_path / "own"
    own.write_text("0::/kubepods/pod1/ctr\n")
    assert host_size.cgroup_cpu_limit(tmp_path, own) == 1.5
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert host_size.cgroup_cpu_limit(tmp_path, own) == 4.0
    (tmp_path / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert host_size.cgroup_cpu_limit(tmp_path, own) is None
