"""The engine thread alone runs torch's CPU ops on several threads (server/engine/threads.py).

Run in a fresh interpreter: the counts are per process and per thread, and pytest's own threads
have taken theirs long before.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.engine import threads

SCRIPT = textwrap.dedent("""
    import ctypes, json, threading, torch
    from server.engine import threads

    gomp = ctypes.CDLL(threads._loaded("libgomp"))
    counts = {}
    default = threads.serial()

    def engine():
        threads.claim(2)
        (torch.randn(1_000_000) * 2).sum()
        counts["engine"] = gomp.omp_get_max_threads()

    def worker():  # started after the engine's claim, like the event loop's worker threads
        threads.one()
        (torch.randn(1_000_000) * 2).sum()  # above every grain: would take a thread count of its own
        counts["worker"] = gomp.omp_get_max_threads()

    for target in (engine, worker):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    (torch.randn(1_000_000) * 2).sum()
    counts["main"] = gomp.omp_get_max_threads()
    counts["default"] = default
    print(json.dumps(counts))
""")


@pytest.mark.skipif(not threads._loaded("libgomp") or len(threads._thread_setters()) == 0,
                    reason="torch without libgomp: the counts are torch's own")
def test_only_the_engine_thread_runs_several_threads():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         timeout=120, cwd=Path(__file__).parents[2])
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["engine"] == 2
    assert counts["worker"] == 1, "a worker thread's op took the engine's count"
    assert counts["main"] == 1
    assert counts["default"] >= 1
