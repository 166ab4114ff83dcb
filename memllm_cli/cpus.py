"""How many threads torch should compute with: the CPUs this process may use that nothing
else is using now (no torch here: model/placement.py applies the number).

PyTorch runs one thread per core by default, and its threads spin while they wait for each
other: beside other busy processes (cron runs memllm beside whatever else the machine does,
and `memllm serve` with a CLI ingest are two torch processes) a spinning thread that was
descheduled stalls every other one, and an ingest fell to 1/40 of its rate. So memllm counts

- the CPUs it may use: its affinity mask, and the cgroup's CPU quota (containers, systemd);
- the threads of other processes that are running or waiting to run now (`/proc/stat`'s
  procs_running, less this process's own running threads, the fewest of a few looks: this
  process's own threads, just done with a forward pass, may still spin and be counted once);

and computes with what is left, at least one thread. MEMLLM_THREADS (or `threads` in the config
file) sets the number instead.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

SAMPLES = 5  # looks at the run queue, SAMPLE_SECONDS apart (its count changes from moment to moment)
SAMPLE_SECONDS = 0.002


def usable() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, math.ceil(quota)) if quota else count)


def _cgroup_quota() -> float | None:
    """The CPUs a cgroup's quota allows (v2 cpu.max, v1 cfs_quota_us / cfs_period_us), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def busy_elsewhere() -> int:
    """Threads of other processes that run or wait to run now (0 where the system does not tell)."""
    looks = []
    for i in range(SAMPLES):
        if i:
            time.sleep(SAMPLE_SECONDS)
        running = _procs_running()
        if running is None:
            return 0
        looks.append(max(0, running - _own_running()))
    return min(looks)


def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _own_running() -> int:
    """This process's threads that are running now (the one reading counts)."""
    count = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                state = Path(task.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            count += state == "R"
    except OSError:
        return 1
    return max(1, count)


def threads(wanted: int | None = None) -> int:
    """The threads to compute with: `wanted` (MEMLLM_THREADS or the config's `threads`) if
    given, else the usable CPUs that nothing else is busy on, at least one."""
    if wanted is not None:
        return max(1, int(wanted))
    return max(1, usable() - busy_elsewhere())


def from_environment() -> int | None:
    """MEMLLM_THREADS, if set to a whole number >= 1 (ValueError otherwise)."""
    value = os.environ.get("MEMLLM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MEMLLM_THREADS must be a whole number >= 1, not {value!r}")
    return int(value)
