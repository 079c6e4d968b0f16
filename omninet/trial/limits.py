"""Resource limits of a trial: the run-time memory budget, threads and CPU-core pinning, and
the allocator helpers the memory measurements use to start from a clean state.

Memory budget: on CUDA the caching allocator is capped (``set_per_process_memory_fraction``);
on Linux CPUs the kernel caps the process's data segment (``RLIMIT_DATA`` = data size now -
memory glibc holds free for reuse + budget), so an allocation past the budget really fails
(``oom``). The CPU limit covers the whole process while the trial runs and is lifted after.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
from collections.abc import Iterator

import torch

from omninet.hardware.guard import is_oom as allocation_failed
from omninet.hardware.monitor import clear_data_budget, register_data_budget

__all__ = ["memory_limit", "pinned", "clean_state", "malloc_free_bytes", "is_oom", "MB"]

MB = 2**20


def _vm_data_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def malloc_free_bytes() -> int:
    """Bytes glibc malloc holds free for reuse, after returning what it can to the kernel
    (``malloc_trim``). 0 where that is not glibc >= 2.33."""
    try:
        class _MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        libc.mallinfo2.restype = _MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError, TypeError):  # not glibc >= 2.33: nothing to trim or count
        return 0


def clean_state(backend=None, index: int = 0) -> None:
    """Frees what earlier work left behind before a memory measurement: Python garbage, the
    C allocator's free lists, and the accelerator allocator's cached blocks (through the
    hardware backend's ``empty_cache`` when it has one)."""
    gc.collect()
    malloc_free_bytes()
    if backend is not None:
        empty = getattr(backend, "empty_cache", None)
        if empty is not None:
            empty(index)
        elif backend.device_type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_limit(device: torch.device, budget_mb: float | None, notes: list[str]) -> Iterator[None]:
    """Makes allocations beyond ``budget_mb`` (counted from now) fail for real."""
    if budget_mb is None:
        yield
        return
    budget = int(budget_mb * MB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(device) + budget) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    free = malloc_free_bytes() if device.type == "cpu" else 0  # first: it returns what it can to the kernel
    base = _vm_data_bytes() if device.type == "cpu" else None
    if base is not None:
        base -= free
    if base is None:  # no VmData here (not Linux)
        notes.append(f"memory budget not enforced at run time on {device.type} here (estimate check only)")
        yield
        return
    # Start torch's intra-op thread pool first: its threads' stacks must not be refused later.
    torch.ones(64, 64) @ torch.ones(64, 64)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = base + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    register_data_budget(base, limit)  # the memory monitor reads the budget's use, not the whole process's
    try:
        yield
    finally:
        clear_data_budget()
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@contextlib.contextmanager
def pinned(cores: list[int] | None, num_threads: int | None) -> Iterator[tuple[list[int] | None, int]]:
    """Pins this process to ``cores`` (``sched_setaffinity``) and torch's intra-op pool to
    ``num_threads`` (default: one thread per pinned core) for the duration; both restored
    after, since a Ray worker process runs many trials. Yields (cores, threads) in effect."""
    before_threads = torch.get_num_threads()
    before_cores = None
    if cores and hasattr(os, "sched_setaffinity"):
        before_cores = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cores)
    threads = num_threads or (len(cores) if cores else None)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield (sorted(cores) if cores else None), torch.get_num_threads()
    finally:
        torch.set_num_threads(before_threads)
        if before_cores is not None:
            os.sched_setaffinity(0, before_cores)


def is_oom(exc: BaseException) -> bool:
    return allocation_failed(exc)
