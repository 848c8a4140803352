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


CGROUP_CASES = {
    "v2 limit": ("0::/slurm/job_7\n", {"slurm/job_7/memory.max": 8 * GIB, "slurm/job_7/memory.current": 3 * GIB}, 5 * GIB),
    "v2 without limit": ("0::/user.slice\n", {"user.slice/memory.max": "max", "user.slice/memory.current": 100}, None),
    "v1 limit": (
        "5:cpu,cpuacct:/job\n4:memory:/job\n0::/\n",
        {"memory/job/memory.limit_in_bytes": 4 * GIB, "memory/job/memory.usage_in_bytes": GIB},
        3 * GIB,
    ),
    "v1 unlimited": (
        "4:memory:/\n",
        {"memory/memory.limit_in_bytes": 9223372036854771712, "memory/memory.usage_in_bytes": 4096},
        None,
    ),
    # Inside a container the host's cgroup path is listed but only the mount root exists.
    "container mount root": (
        "0::/kubepods/pod1/container\n", {"memory.max": 2 * GIB, "memory.current": GIB // 2}, GIB + GIB // 2
    ),
}


@pytest.mark.parametrize(("proc_text", "files", "expected"), CGROUP_CASES.values(), ids=CGROUP_CASES.keys())
def test_cgroup_available(tmp_path, proc_text, files, expected):
    proc = write(tmp_path / "cgroup", proc_text)
    for relative, value in files.items():
        write(tmp_path / "sys" / relative, f"{value}\n")
    assert cgroup_available_bytes(proc, tmp_path / "sys") == expected


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc/meminfo")
def test_available_memory_on_this_machine():
    total_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    available = available_memory_bytes()
    assert available is not None
    assert 0 < available <= total_kib * 1024
