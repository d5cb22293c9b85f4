"""Tool calling end to end: the function list and tool turns in the prompt, calls parsed from the answer (whole and
streamed), tool_choice "required" / named enforced by constrained decoding, through the openai SDK, LangChain's
ChatOpenAI and `LLM.chat`."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from chat_fixtures import write_chat_checkpoint
from openai import OpenAI
from serve_fixtures import running_server

from ernie45.engine import LLM, SamplingParams
from ernie45.processing.tools import CallStream, check_tools, parse_tool_calls

ORDER = {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}},
         "required": ["order_id"]}  # fmt: skip
ORDER_ID = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
REFUND = {"type": "object", "properties": {"reason": {"enum": ["late", "broken"]}}, "required": ["reason"]}
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "description": "Look up an order",
                                           "parameters": ORDER}},
         {"type": "function", "function": {"name": "refund", "parameters": REFUND}}]  # fmt: skip
ASK = [{"role": "user", "content": "where is my order A17?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(write_chat_checkpoint(tmp_path_factory.mktemp("tools_ckpt"), endless=True))


@pytest.fixture(scope="module")
def server(llm):
    with running_server(llm, max_batch=4, max_len=2048) as (url, app):
        yield url


def _valid(call) -> None:
    schema = {"get_order_status": ORDER, "refund": REFUND}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_required_and_named_tool_choice_give_calls_that_match_their_schemas(server):
    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    whole = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0.9, seed=3)  # fmt: skip
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        _valid(call)
    refund = {"type": "function", "function": {"name": "refund"}}
    named = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=120, tool_choice=refund)
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "refund"
    _valid(call)
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=120, temperature=0.9, seed=3, stream=True)  # fmt: skip
    streamed, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                streamed.setdefault(tc.index, tc)
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    got = [(streamed[k].function.name, streamed[k].function.arguments) for k in sorted(streamed)]
    assert got == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_a_tool_result_turn_goes_into_the_prompt_and_gets_an_answer(server, llm):
    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"status": "shipped"})}]  # fmt: skip
    answer = client.chat.completions.create(model="tiny", messages=turns, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].message.content is not None
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens
    ids = httpx.post(server + "/tokenize", json={"messages": turns}).json()["tokens"]
    text = llm.processor.decode(ids)
    assert "shipped" in text and "<tool_response>" in text and call.function.name in text
    plain = httpx.post(server + "/tokenize", json={"messages": ASK}).json()["count"]
    assert (
        httpx.post(
            server + "/v1/chat/completions", json={"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 2}
        ).json()["usage"]["prompt_tokens"]
        > plain
    )


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    chat = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="tiny", max_tokens=120, max_retries=0)
    bound = chat.bind_tools([TOOLS[0]], tool_choice="required")
    message = bound.invoke("where is my order A17?")
    (call,) = message.tool_calls[:1]
    assert call["name"] == "get_order_status"
    jsonschema.validate(call["args"], ORDER)

    class Verdict(BaseModel):
        refund: bool
        reason: str = Field(max_length=16)

    verdict = chat.with_structured_output(Verdict).invoke("should we refund order A17?")
    assert isinstance(verdict, Verdict)


def test_message_fields_are_read_or_refused_by_name(server):
    """What clients send back from an answer passes (the SDK's message object, LangChain's ToolMessage with its
    name); a field the prompt would not show is a 400 naming it, not a silent drop."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from openai import BadRequestError

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120)  # fmt: skip
    message = first.choices[0].message  # passed back as the SDK's own object, with its empty fields
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "shipped"}
    again = client.chat.completions.create(model="tiny", messages=[*ASK, message, result], tools=TOOLS, max_tokens=4)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens
    for bad, named in [({"role": "user", "content": "hi", "name": "bob"}, "name is not shown"),
                       ({"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}, "cache_control"),
                       ({"role": "user", "content": "hi", "tool_call_id": "x"}, "tool_call_id belongs")]:  # fmt: skip
        with pytest.raises(BadRequestError, match=named):
            client.chat.completions.create(model="tiny", messages=[bad], max_tokens=2)
    chat = ChatOpenAI(base_url=server + "/v1", api_key="unused", model="tiny", max_tokens=120, max_retries=0)
    asked = HumanMessage("where is my order A17?")
    call = chat.bind_tools([TOOLS[0]], tool_choice="required").invoke([asked])
    answered = ToolMessage("shipped", tool_call_id=call.tool_calls[0]["id"], name="get_order_status")
    assert isinstance(chat.bind_tools([TOOLS[0]]).invoke([asked, call, answered]).content, str)


def test_an_answer_cut_at_max_tokens_after_a_call_says_length():
    """A call made, then the answer cut inside the next: finish_reason stays "length" (not "tool_calls"), in
    `LLM.chat`, the server's whole answer and its stream alike; the whole call still comes back. (The demo model
    under `required` goes on calling until max_tokens; the tiny checkpoint stops after one call.)"""
    demo, ask = LLM(), [{"role": "user", "content": "My order is 4711. Where is it?"}]
    tools = [{"type": "function", "function": {"name": "get_order_status", "parameters": ORDER_ID}}]
    full = demo.chat(ask, SamplingParams(max_tokens=120, temperature=0), tools=tools, tool_choice="required")[0]
    ends = [i + 1 for i in range(len(full.token_ids)) if demo.processor.tokenizer.decode(
        full.token_ids[: i + 1]).rstrip().endswith("</tool_call>")]  # fmt: skip
    cut = ends[0] + 3  # three tokens into whatever follows the first call
    assert cut < len(full.token_ids), "the model stopped after one call: nothing to cut"
    short = demo.chat(ask, SamplingParams(max_tokens=cut, temperature=0), tools=tools, tool_choice="required")[0]
    assert short.finish_reason == "length" and len(short.tool_calls) == 1
    kw = {"model": "tiny", "messages": ask, "tools": tools, "tool_choice": "required", "max_tokens": cut,
          "temperature": 0}  # fmt: skip
    with running_server(demo, max_batch=1, max_len=1024) as (url, _):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        whole = client.chat.completions.create(**kw).choices[0]
        finish = [c.finish_reason for chunk in client.chat.completions.create(**kw, stream=True) for c in chunk.choices]
    assert whole.finish_reason == "length" and len(whole.message.tool_calls) == 1
    assert [f for f in finish if f] == ["length"]


def test_llm_chat_returns_parsed_calls(llm):
    out = llm.chat(ASK, SamplingParams(max_tokens=120, temperature=0), tools=TOOLS, tool_choice="required")[0]
    assert out.finish_reason == "tool_calls" and out.tool_calls and out.outputs[0].tool_calls == out.tool_calls
    none = llm.chat(ASK, SamplingParams(max_tokens=4, temperature=0), tools=TOOLS, tool_choice="none")[0]
    assert none.tool_calls is None
    with pytest.raises(ValueError, match="not in tools"):
        llm.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_call_blocks_parse_whole_and_streamed_alike():
    tools = check_tools(TOOLS)
    text = ('Checking.\n<tool_call>\n{"name": "get_order_status", "arguments": {"order_id": "A17"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>')  # fmt: skip
    content, calls = parse_tool_calls(text, tools)
    assert [c["function"]["name"] for c in calls] == ["get_order_status"]
    assert content.startswith("Checking.") and '"unknown"' in content  # an unknown function stays text
    for size in (1, 5, 1000):
        stream, got, shown = CallStream(tools), [], ""
        for i in range(0, len(text), size):
            c, k = stream.feed(text[i : i + size])
            shown, got = shown + c, got + k
        c, k = stream.feed("", final=True)
        shown, got = shown + c, got + k
        assert [g["function"]["arguments"] for g in got] == [c["function"]["arguments"] for c in calls]
        assert shown.strip() == content
    with pytest.raises(ValueError, match="same name"):
        check_tools([TOOLS[0], TOOLS[0]])
