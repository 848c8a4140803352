"""Memory available to this process: the machine's MemAvailable, capped by a cgroup limit.

Cluster schedulers (SLURM, Kubernetes) limit a job's memory with a cgroup, while
/proc/meminfo still reports the whole node, so both are read.
"""

from __future__ import annotations

from pathlib import Path

# cgroup v1 reports "no limit" as a number close to 2**63.
UNLIMITED_BYTES = 2**60


def meminfo_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Return MemAvailable in bytes, or None where the file or the field is missing."""
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def cgroup_limit_files(proc_cgroup: Path, cgroup_root: Path) -> list[tuple[Path, Path]]:
    """Return the (limit, usage) files of this process's memory cgroup, its own folder before the mount root.

    A line of /proc/self/cgroup is ``0::PATH`` for cgroup v2 and ``N:memory:PATH`` (among
    other controllers) for v1. Inside a container the PATH folder may not exist, and
    the mount root is then the container's own cgroup.
    """
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, names = cgroup_root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, names = cgroup_root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for folder in (base / path.lstrip("/"), base):
            candidates.append((folder / names[0], folder / names[1]))
    return candidates


def cgroup_available_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                           cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Return the first cgroup memory limit minus its usage, or None where no limit is set."""
    for limit_file, usage_file in cgroup_limit_files(proc_cgroup, cgroup_root):
        try:
            limit_text = limit_file.read_text(encoding="ascii").strip()
            limit = None if limit_text == "max" else int(limit_text)
            usage = int(usage_file.read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue
        if limit is None or limit >= UNLIMITED_BYTES:
            continue
        return max(0, limit - usage)
    return None


def available_memory_bytes() -> int | None:
    """Return the memory this process can still allocate, or None where neither source can be read."""
    known = [value for value in (meminfo_available_bytes(), cgroup_available_bytes()) if value is not None]
    return min(known) if known else None
