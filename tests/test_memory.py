"""Available memory: MemAvailable and cgroup v1 and v2 limits, read from fake trees."""

from pathlib import Path

import pytest

from crop_accel.memory import available_memory_bytes, cgroup_available_bytes, meminfo_available_bytes

GIB = 2**30


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_meminfo_available(tmp_path):
    meminfo = write(tmp_path / "meminfo", "MemTotal:       32000000 kB\nMemAvailable:   2048 kB\n")
    assert meminfo_available_bytes(meminfo) == 2048 * 1024


def test_meminfo_missing(tmp_path):
    assert meminfo_available_bytes(tmp_path / "missing") is None
    assert meminfo_available_bytes(write(tmp_path / "meminfo", "MemTotal: 10 kB\n")) is None


def test_cgroup_v2_limit(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/slurm/job_7\n")
    write(tmp_path / "sys/slurm/job_7/memory.max", f"{8 * GIB}\n")
    write(tmp_path / "sys/slurm/job_7/memory.current", f"{3 * GIB}\n")
    assert cgroup_available_bytes(proc, tmp_path / "sys") == 5 * GIB


def test_cgroup_v2_without_limit(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/user.slice\n")
    write(tmp_path / "sys/user.slice/memory.max", "max\n")
    write(tmp_path / "sys/user.slice/memory.current", "100\n")
    assert cgroup_available_bytes(proc, tmp_path / "sys") is None


def test_cgroup_v1_limit(tmp_path):
    proc = write(tmp_path / "cgroup", "5:cpu,cpuacct:/job\n4:memory:/job\n0::/\n")
    write(tmp_path / "sys/memory/job/memory.limit_in_bytes", f"{4 * GIB}\n")
    write(tmp_path / "sys/memory/job/memory.usage_in_bytes", f"{GIB}\n")
    assert cgroup_available_bytes(proc, tmp_path / "sys") == 3 * GIB


def test_cgroup_v1_unlimited(tmp_path):
    proc = write(tmp_path / "cgroup", "4:memory:/\n")
    write(tmp_path / "sys/memory/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path / "sys/memory/memory.usage_in_bytes", "4096\n")
    assert cgroup_available_bytes(proc, tmp_path / "sys") is None


def test_cgroup_in_container_uses_mount_root(tmp_path):
    # Inside a container the host's cgroup path is listed but only the mount root exists.
    proc = write(tmp_path / "cgroup", "0::/kubepods/pod1/container\n")
    write(tmp_path / "sys/memory.max", f"{2 * GIB}\n")
    write(tmp_path / "sys/memory.current", f"{GIB // 2}\n")
    assert cgroup_available_bytes(proc, tmp_path / "sys") == GIB + GIB // 2


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc/meminfo")
def test_available_memory_on_this_machine():
    total_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    available = available_memory_bytes()
    assert available is not None
    assert 0 < available <= total_kib * 1024
