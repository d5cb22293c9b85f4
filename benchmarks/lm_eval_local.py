"""lm-evaluation-harness against `ernie45 serve`: a loglikelihood (multiple-choice) task from a local file, through
lm-eval's own `local-completions` client, offline.

    pip install "lm-eval>=0.4"             # not a dependency of ernie45: only this script needs it
    python benchmarks/lm_eval_local.py     # the embedded demo model; --model DIR for another checkpoint

It writes a small task (yaml + jsonl) to a temporary folder, starts the server, runs `lm_eval --model
local-completions ... --tasks demo_colours --include_path ...` and prints lm-eval's table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROWS = [("tomato", 0), ("leaf", 1), ("sky", 2), ("banana", 3), ("strawberry", 0), ("frog", 1), ("sea", 2), ("lemon", 3)]
TASK = """task: demo_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    higher_is_better: true
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    args = p.parse_args()
    from ernie45.embedded import default_model_path

    model = args.model or str(default_model_path())
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        data = Path(tmp) / "colours.jsonl"
        choices = [" red", " green", " blue", " yellow"]
        docs = [{"question": f"Q: What colour is a {x}?\nA:", "choices": choices, "answer": a} for x, a in ROWS]
        data.write_text("\n".join(json.dumps(d) for d in docs))
        (Path(tmp) / "demo_colours.yaml").write_text(TASK.format(data=data))
        server = subprocess.Popen([sys.executable, "-m", "ernie45", "serve", model, "--port", str(port),
                                   "--served-model-name", "demo"], stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            model_args = (f"model=demo,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                          f"tokenizer={model},num_concurrent=1,max_retries=1")  # fmt: skip
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
            run = subprocess.run(["lm_eval", "--model", "local-completions", "--model_args", model_args, "--tasks",
                                  "demo_colours", "--include_path", tmp], env=env)  # fmt: skip
            sys.exit(run.returncode)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
