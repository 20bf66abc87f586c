"""CPU threads: the engine thread alone runs torch's CPU ops on several threads.

torch runs its parallel CPU ops (GEMMs, copies, our C++ kernels) as OpenMP regions. libgomp keeps a
region's helper threads spinning, ready for the next region, only while the threads it manages are
no more than the CPUs; past that they sleep, and every region pays to wake them. A decode step is
hundreds of short regions. A thread that once ran a region with helpers keeps them for its life,
so a single such region anywhere else (the main thread loading the model, a worker thread reading
an adapter) tips the count on a small machine for good. Measured on the 2-core VM, 32 rows of the
bench model: a decode step 66 -> 52 ms, the 32-adapter LoRA kernel 10.8 -> 6.7 ms (BENCHMARKS.md).

    serial()   the main thread, before the model loads: its ops on one thread; -> torch's default
    claim(n)   the engine thread, before its first op: n threads
    one()      any other thread, before its first op (the event loop's worker threads run it
               first): one thread

A thread takes its first count, at its first op, from the last `torch.set_num_threads` of any
thread, and an op that re-reads it elsewhere would undo a later change: so `claim` leaves that
last value at n, and `one` sets OpenMP's and MKL's count of its own thread directly (where torch's
OpenMP and MKL can be found; else it is a no-op).
"""
from __future__ import annotations

import ctypes
import os
from functools import cache

import torch


def serial() -> int:
    """On the main thread: its torch ops on one thread from now on; -> torch's default count."""
    default = torch.get_num_threads()
    _first_op()
    torch.set_num_threads(1)
    return default


def claim(n: int) -> None:
    """On the engine thread: its torch ops on n threads."""
    _first_op()
    torch.set_num_threads(n)


def one() -> None:
    """On a worker thread: its torch ops on one thread, the others' counts untouched."""
    _first_op()
    for set_count in _thread_setters():
        set_count(1)


def _first_op() -> None:
    """A thread takes its first count at its first `at::parallel_for`: take it now. softmax calls it
    at any size (elementwise ops below their grain do not)."""
    torch.softmax(torch.zeros(1, 1), -1)


@cache
def _thread_setters() -> tuple:
    """omp_set_num_threads of the libgomp torch loaded, MKL_Set_Num_Threads_Local of the MKL in
    libtorch_cpu: each sets the calling thread's count alone. Those not found are left out."""
    setters = []
    gomp = _loaded("libgomp")  # torch's own copy: the system's, if also loaded, counts no thread of torch's
    libtorch = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    for path, name in ((gomp, "omp_set_num_threads"), (libtorch, "MKL_Set_Num_Threads_Local")):
        if not os.path.exists(path):
            continue
        try:
            setters.append(getattr(ctypes.CDLL(path), name))
        except (OSError, AttributeError):  # not this build: that count stays torch's
            continue
    return tuple(setters)


def _loaded(name: str) -> str:
    """The path of a loaded shared library whose file name has `name` ('' where none or not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return next((line.split()[-1] for line in maps if name in line.rsplit("/", 1)[-1]), "")
    except OSError:
        return ""
