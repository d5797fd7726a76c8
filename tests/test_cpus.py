"""The CPUs a run uses by default: the affinity mask, limited by the control group's CPU quota."""

from __future__ import annotations

import os

import pytest

from m2m_app.cli.common import available_cpus, cgroup_cpu_quota


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_quota_in_the_process_group(tmp_path):
    proc = _write(tmp_path / "proc", "0::/system.slice/job.scope\n")
    _write(tmp_path / "cg/system.slice/job.scope/cpu.max", "150000 100000\n")
    _write(tmp_path / "cg/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", proc) == 1.5
    _write(tmp_path / "cg/system.slice/job.scope/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", proc) is None


def test_cgroup_v1_quota_and_no_cgroup(tmp_path):
    proc = _write(tmp_path / "proc", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    _write(tmp_path / "cg/cpu/docker/abc/cpu.cfs_quota_us", "200000\n")
    _write(tmp_path / "cg/cpu/docker/abc/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", proc) == 2.0
    _write(tmp_path / "cg/cpu/docker/abc/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(tmp_path / "cg", proc) is None
    assert cgroup_cpu_quota(tmp_path / "nothing", tmp_path / "no-proc") is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this system")
def test_available_cpus_is_the_affinity_limited_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    proc = _write(tmp_path / "proc", "0::/\n")
    assert available_cpus(tmp_path / "none", proc) == affinity
    _write(tmp_path / "cg/cpu.max", "50000 100000\n")  # half a CPU: rounded up to one
    assert available_cpus(tmp_path / "cg", proc) == 1
    _write(tmp_path / "cg/cpu.max", f"{(affinity + 4) * 100000} 100000\n")  # more than the affinity allows
    assert available_cpus(tmp_path / "cg", proc) == affinity
