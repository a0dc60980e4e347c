"""The freshness benchmark's CPU accounting: each process's and thread's CPU is its own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from pipelines.bench_live import CpuMeter, process_threads


def _burn(cpu_seconds: float) -> None:
    """Spend at least `cpu_seconds` of this thread's CPU (counted by CPU, not by clock)."""
    until = time.thread_time() + cpu_seconds
    while time.thread_time() < until:
        sum(range(1000))


def test_a_busy_thread_is_told_apart_from_an_idle_one():
    started = threading.Event()
    release = threading.Event()

    def idle() -> None:
        started.set()
        release.wait()

    sleeper = threading.Thread(target=idle)
    sleeper.start()
    started.wait()
    before = process_threads(os.getpid())
    _burn(0.2)
    after = process_threads(os.getpid())
    release.set()
    sleeper.join()
    main = next(name for name in after if name.split()[0] == str(threading.get_native_id()))
    quiet = next(name for name in after if name.split()[0] == str(sleeper.native_id))
    assert after[main][0] - before[main][0] >= 0.2
    assert after[quiet][0] - before[quiet][0] < 0.1  # it slept on an event all along


def test_the_meter_counts_another_process_and_not_this_one():
    # A child that, once told to, spends 0.3 s of its own CPU, then waits to be told to exit.
    code = (
        "import sys, time\n"
        "sys.stdin.readline()\n"
        "until = time.process_time() + 0.3\n"
        "while time.process_time() < until: sum(range(1000))\n"
        "print('done', flush=True); sys.stdin.readline()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        meter = CpuMeter({"child": child.pid})
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"done\n"
        spent = meter.stop()
    finally:
        child.communicate(b"\n")
    assert spent["child"] >= 0.25  # its 0.3 s, counted in clock ticks
    # This process slept on the pipe meanwhile; the machine's count has the child's in it.
    assert spent["bench"] < 0.25 <= spent["machine"]
