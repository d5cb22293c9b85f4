"""`ernie45 generate` and `ernie45 chat`, run as a user runs them (a real process, a real terminal)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pexpect
import pytest
from chat_fixtures import write_chat_checkpoint
from PIL import Image


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("endless"), endless=True)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("cli_vl"), vision=True)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "ernie45", *args], capture_output=True, text=True, timeout=120)


def test_generate_json_and_media(vl_dir, tmp_path):
    img = tmp_path / "cat.png"
    Image.fromarray((np.random.RandomState(0).rand(50, 70, 3) * 255).astype(np.uint8)).save(img)
    r = _run(
        "generate",
        "What is this?",
        "--model",
        str(vl_dir),
        "--image",
        str(img),
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] <= 6 and out["prompt_tokens"] > 20  # the image's placeholders count
    again = _run(
        "generate", "What is this?", "--model", str(vl_dir), "--max-tokens", "6", "--temperature", "0", "--json"
    )
    assert json.loads(again.stdout)["prompt_tokens"] < out["prompt_tokens"]


def test_generate_errors_are_one_line(vl_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases = [
        (["generate", "hi", "--model", str(tmp_path / "nope")], "is not a checkpoint directory"),
        (["generate", "hi", "--model", str(vl_dir), "--image", str(tmp_path / "bad.png")], "not a readable image"),
        (["generate", "hi", "--model", str(vl_dir), "--image", str(tmp_path / "x.png")], "no such file"),
        (["generate", "hi", "--model", str(vl_dir), "--top-p", "0"], "top_p must be in"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ernie45", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args, _ in cases
    ]  # fmt: skip  (side by side: each start imports torch)
    for (args, message), proc in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and message in err and "Traceback" not in err, (args, err)
        assert err.count("\n") == 1


def test_chat_in_a_terminal(endless_dir):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ernie45", "chat", "--model", str(endless_dir), "--max-tokens", "3000", "--temperature", "0"],
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
        # Ctrl-C as in a terminal even where the suite was started in the background: a shell's background job
        # inherits SIGINT ignored, and a Python started with SIGINT ignored never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        child.expect("you> ")
        child.sendline("Hello")
        child.expect("ernie> ")
        child.expect(r"\S{3}")  # the answer is streaming ...
        child.sendintr()  # ... Ctrl-C stops it, not the program
        child.expect(r"\[stopped\]")
        child.expect("you> ")
        child.sendline("/image /no/such/file.png")
        child.expect("no such file")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("How are you?")  # and the conversation goes on
        child.expect("ernie> ")
        child.expect(r"\S{3}")
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_generate_with_tools_prints_calls_that_match_the_schema(tmp_path):
    import jsonschema

    params = {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}},
              "required": ["order_id"]}  # fmt: skip
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_order_status", "parameters": params}}]))
    r = _run("generate", "where is order A17?", "--tools", str(tools), "--tool-choice", "get_order_status", "--json",
             "--max-tokens", "120")  # fmt: skip
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "tool_calls" and len(out["tool_calls"]) == 1
    jsonschema.validate(json.loads(out["tool_calls"][0]["function"]["arguments"]), params)
    bad = _run("generate", "hi", "--tool-choice", "required")
    assert bad.returncode == 2 and "--tools" in bad.stderr and "Traceback" not in bad.stderr
