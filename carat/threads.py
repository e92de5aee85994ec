"""CPU threading defaults that must be in place before torch loads its OpenMP runtime.

libgomp (torch's OpenMP on Linux) lets idle threads spin by default (``OMP_WAIT_POLICY=ACTIVE``). On a machine
whose cores other jobs also use, the spinning threads and the jobs' threads take turns on the cores, and each
parallel region waits for a thread that is not running. Measured with bench/bench_threads.py (BENCHMARKS.md,
Training): a 2-thread tiny-preset step beside 2 busy processes ran at 16% of its speed alone with libgomp's
default and at 68% with PASSIVE; alone, PASSIVE costs 32%. carat's training processes default to PASSIVE, for
throughput that holds up on shared machines; a value the user (or a cluster's environment) sets is kept
(``OMP_WAIT_POLICY=ACTIVE`` on a dedicated machine). The thread *count* is Ray's or the user's ``OMP_NUM_THREADS``
(see :func:`carat.train.launch.prepare_worker_env`), else the CPUs this process may use
(:func:`available_cpus`) shared between the node's ranks.
"""

from __future__ import annotations

import os

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"


def wait_policy() -> str:
    """The policy carat's processes run with: the environment's, else :data:`DEFAULT_WAIT_POLICY`."""
    return os.environ.get(WAIT_POLICY_ENV) or DEFAULT_WAIT_POLICY


def set_default_wait_policy() -> None:
    """Call before the first ``import torch`` of the process (libgomp reads the variable once, when it loads);
    later it changes nothing in this process, only in the processes it starts."""
    os.environ.setdefault(WAIT_POLICY_ENV, DEFAULT_WAIT_POLICY)


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask (SLURM cpusets, ``taskset``, ``docker --cpuset-cpus``),
    capped by a cgroup v2 CPU quota (``docker --cpus``, Kubernetes limits), rounded up. ``os.cpu_count()``
    counts the whole host: a 4-CPU SLURM task on a 128-core node would start 128 threads per rank."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one this code does not understand: no cap
        pass
    return max(1, cpus)
