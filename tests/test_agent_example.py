"""`examples/agent.py` runs as written against a real `ernie45 serve` of the embedded demo model: a screenshot and
a voice message in, a tool call whose arguments match the schema, the tool's result sent back, an answer out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
from serve_fixtures import running_server

from ernie45.engine import LLM

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent.py"


def _example():
    """examples/agent.py as a module, run as written."""
    spec = importlib.util.spec_from_file_location("agent_example", EXAMPLE)
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    return agent


def test_the_agent_example_calls_a_tool_and_answers():
    agent = _example()
    logged: list[str] = []
    with running_server(LLM(), max_batch=2, max_len=4096) as (url, _):
        convo = agent.run(url + "/v1", agent.HERE / "order_page.png", agent.HERE / "voice_order.wav",
                          log=logged.append)  # fmt: skip
    calls = convo[1]["tool_calls"]
    assert calls and calls[0]["function"]["name"] in agent.FUNCTIONS
    args = json.loads(calls[0]["function"]["arguments"])
    tool = next(t for t in agent.TOOLS if t["function"]["name"] == calls[0]["function"]["name"])
    jsonschema.validate(args, tool["function"]["parameters"])
    results = [m for m in convo if m["role"] == "tool"]
    assert json.loads(results[0]["content"]) == agent.FUNCTIONS[calls[0]["function"]["name"]](**args)
    assert convo[-1]["role"] == "assistant" and convo[-1]["content"] is not None
    assert any(line.startswith(f"tool call: {calls[0]['function']['name']}") for line in logged)


def test_the_example_s_tools_are_among_those_the_demo_model_learned():
    """The demo model learned to choose among `jobtasks.TOOLS` by name and description: the example's tools must be
    those, worded the same, or the example asks it to choose among tools it never saw."""
    from ernie45.demo.jobtasks import TOOLS

    agent = _example()
    for t in agent.TOOLS:
        name, fn = t["function"]["name"], t["function"]
        assert name in TOOLS and agent.FUNCTIONS[name]
        description, params = TOOLS[name]
        assert fn["description"] == description
        assert fn["parameters"]["required"] == list(params) == list(fn["parameters"]["properties"])
        assert all(fn["parameters"]["properties"][k]["type"] == v for k, v in params.items())
