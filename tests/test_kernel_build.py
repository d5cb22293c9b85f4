"""Kernel builds never hang: a build killed mid-way (SIGKILL: no cleanup runs) leaves nothing the next
process waits on, and a build that fails gives None with a message instead of an exception or a wait."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROBE = (
    "#include <torch/library.h>\nint64_t twice(int64_t x) { return 2 * x; }\n"
    'TORCH_LIBRARY(e45_probe, m) { m.def("twice(int x) -> int", &twice); }'
)
RUN = (
    "import sys; from ernie45.runtime.build import load_extension; "
    "m = load_extension('e45_probe', [sys.argv[1]], 'e45_probe', ['-O0'], []); "
    "print(None if m is None else m.twice(21))"
)

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")


def _env(tmp_path) -> dict:
    return {**os.environ, "ERNIE45_KERNEL_DIR": str(tmp_path)}


def test_a_build_killed_midway_does_not_hang_the_next_run(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", RUN, PROBE], env=_env(tmp_path), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("e45_probe-*.building-*/build.ninja")):  # the compiler is about to run
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)  # the whole group: python, ninja and the compiler
    first.wait()
    assert list(tmp_path.glob("e45_probe-*.building-*")), "the kill should have left a half-built folder"
    assert not list(tmp_path.glob("e45_probe-*/e45_probe.so"))
    second = subprocess.run([sys.executable, "-c", RUN, PROBE], env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "42"
    assert "compiling" in second.stderr  # said what it was doing
    assert not list(tmp_path.glob("e45_probe-*.building-*"))  # the killed build's folder was cleared
    third = subprocess.run([sys.executable, "-c", RUN, PROBE], env=_env(tmp_path), capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert third.stdout.strip() == "42" and "compiling" not in third.stderr  # built once, then reused


def _python(code: str, *args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=root)  # fmt: skip


def test_a_failing_build_reports_and_returns_none(tmp_path):
    run = _python(RUN, PROBE.replace("2 * x", "2 * "), env=_env(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "None"
    assert "did not build" in run.stderr and "torch's ops run instead" in run.stderr


def test_without_a_compiler_torchs_ops_run_and_the_runtime_report_says_why(tmp_path):
    code = (
        "import ernie45; llm = ernie45.LLM(); print(llm.report.summary()); "
        "print(llm.chat([{'role': 'user', 'content': 'What is 12 plus 7?'}])[0].text)"
    )
    run = _python(code, env={**_env(tmp_path), "CXX": "/nonexistent/c++"}, timeout=180)
    assert run.returncode == 0, run.stderr
    report, answer = run.stdout.strip().splitlines()[-2:]
    reasons = ("no C++ compiler (/nonexistent/c++ not found)", "this CPU has no AVX512-BF16")  # checked in that order
    assert any(f"CPU kernels: off: {why}" in report for why in reasons), report
    assert "19" in answer  # the same model answers, on torch's ops
    assert not list(tmp_path.iterdir())  # and nothing was built


def test_a_training_forward_never_builds_the_decode_kernels(tmp_path):
    """The model is the maths only: a training step (gradients on, no runtime prepare) touches no kernel."""
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); from chat_fixtures import tiny_chat_config; "
        "from ernie45.model import Ernie45ForConditionalGeneration; "
        "m = Ernie45ForConditionalGeneration(tiny_chat_config(300, hidden_size=64, head_dim=32)); "
        "ids = torch.randint(3, 300, (2, 9)); m(input_ids=ids, labels=ids).loss.backward(); print('ok')"
    )
    run = _python(code, env=_env(tmp_path), timeout=120)
    assert run.stdout.strip() == "ok", run.stderr
    assert not list(tmp_path.iterdir()), "a training forward started a kernel build"
    assert "compiling" not in run.stderr
