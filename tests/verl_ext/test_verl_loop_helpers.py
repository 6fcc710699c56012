"""The CPU loop tests' failure message: a worker that dies of a signal shows its own report, not only the
driver's "the actor died" tail."""

from __future__ import annotations

import subprocess
import sys

from vlcal_verl.testing.verl_loop import crash_excerpt

# a child that dies of SIGSEGV the way a Ray worker does (faulthandler on, as Ray enables it)
CRASH = "import ctypes, faulthandler; faulthandler.enable(); print('before the crash', flush=True); ctypes.string_at(0)"


def test_crash_excerpt_finds_a_real_segfault_report():
    proc = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    noise = "\n".join(f"(TaskRunner) step line {i}" for i in range(300))
    log = f"{noise}\n{proc.stdout}{proc.stderr}\n{noise}\nActorDiedError: the actor died unexpectedly"
    excerpt = crash_excerpt(log, before=2, after=5)
    assert "Fatal Python error: Segmentation fault" in excerpt
    assert "before the crash" in excerpt  # the lines above the report come with it
    assert "ActorDiedError" not in excerpt  # a window, not the whole log
    assert excerpt.count("\n") <= 2 + 5 + 3


RAY_GENERIC = (
    "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
    "Some common causes include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray "
    "stop --force was called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected error.\n"
)


def test_crash_excerpt_is_empty_for_an_ordinary_failure():
    assert crash_excerpt("Traceback (most recent call last):\nValueError: bad config\n") == ""
    assert crash_excerpt(RAY_GENERIC) == ""  # Ray's text for any death is not a crash report
