"""The API fields agents and evaluators send: log-probabilities (chat and completions, streamed and whole), prompt
scoring as lm-evaluation-harness asks for it, logit_bias / min_tokens / stop_token_ids, the routes clients probe,
and every field the server does not implement refused by name."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
from chat_fixtures import write_chat_checkpoint
from openai import OpenAI
from serve_fixtures import running_server

from ernie45.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(write_chat_checkpoint(tmp_path_factory.mktemp("api_ckpt"), endless=True))


@pytest.fixture(scope="module")
def server(llm):
    with running_server(llm, max_batch=4, max_len=256) as (url, app):
        yield url


def _log_softmax(llm: LLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_lm_eval_loglikelihood_requests_score_as_the_model_does(server, llm):
    """The body lm-evaluation-harness's `local-completions` sends for loglikelihood, parsed as it parses it."""
    tok = llm.processor.tokenizer
    pairs = [("The capital of France is", " Paris"), ("Two plus two equals", " four")]
    prompts, ctxlens = [], []
    for ctx, cont in pairs:
        c, x = tok.encode(ctx, add_special_tokens=False), tok.encode(cont, add_special_tokens=False)
        prompts.append(c + x)
        ctxlens.append(len(c))
    body = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # fmt: skip
    out = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    assert len(out["choices"]) == 2
    for choice, ids, ctxlen in zip(out["choices"], prompts, ctxlens, strict=True):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 1
        got = sum(lp["token_logprobs"][ctxlen:-1])
        ref = _log_softmax(llm, ids)
        want = sum(float(ref[i - 1, ids[i]]) for i in range(ctxlen, len(ids)))
        assert math.isclose(got, want, abs_tol=1e-4), (got, want)
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                               lp["top_logprobs"][ctxlen:-1], strict=True))  # fmt: skip
        assert greedy == all(int(ref[i - 1].argmax()) == ids[i] for i in range(ctxlen, len(ids)))
    scored = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hello world", "max_tokens": 0,
                                                          "echo": True, "logprobs": 0}, timeout=60).json()  # fmt: skip
    choice = scored["choices"][0]
    assert choice["text"] == "hello world" and choice["finish_reason"] == "length"
    assert scored["usage"]["completion_tokens"] == 0


def test_chat_logprobs_whole_and_streamed_equal_the_engine(server, llm):
    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "say something"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3)  # fmt: skip
    content = whole.choices[0].logprobs.content
    mine = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    assert len(content) == len(mine.token_ids) > 0
    for entry, tok, ref in zip(content, mine.token_ids, mine.logprobs, strict=True):
        assert math.isclose(entry.logprob, ref[tok].logprob, abs_tol=1e-5)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)  # fmt: skip
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) for a, b in zip(streamed, content, strict=True))


def test_logit_bias_min_tokens_and_stop_token_ids_do_what_they_say(server, llm):
    def post(body: dict) -> dict:
        base = {"model": "tiny", "prompt": "hello", "temperature": 0}
        return httpx.post(server + "/v1/completions", json={**base, **body}, timeout=60).json()

    first = llm.generate("hello", SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    target = (first + 7) % llm.model.config.vocab_size
    biased = post({"max_tokens": 1, "logit_bias": {str(target): 100}, "logprobs": 0})
    assert biased["choices"][0]["logprobs"]["tokens"] == [llm.processor.tokenizer.decode([target])]
    stopped = post({"max_tokens": 5, "stop_token_ids": [first]})
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 0
    held = post({"max_tokens": 5, "stop_token_ids": [first], "min_tokens": 3})
    assert held["usage"]["completion_tokens"] >= 3
    for bias in ({"a": 1}, {str(llm.model.config.vocab_size + 5): 1}):
        bad = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "x", "logit_bias": bias})
        assert bad.status_code == 400 and "logit_bias" in bad.json()["error"]["message"]


@pytest.mark.parametrize("field, value", [("audio", {"voice": "alloy"}),
                                          ("modalities", ["text"]), ("functions", []),
                                          ("best_of", 2), ("stream_options", {"include_usage": True})])  # fmt: skip
def test_fields_the_server_does_not_implement_are_refused_by_name(server, field, value):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    without = {k: v for k, v in body.items() if k != field}
    ok = httpx.post(server + "/v1/chat/completions", json={**without, "user": "u-1"}, timeout=60)
    assert ok.status_code == 200


def test_the_routes_clients_probe(server, llm):
    assert httpx.get(server + "/v1/models/tiny").json()["id"] == "tiny"
    missing = httpx.get(server + "/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    ids = httpx.post(server + "/tokenize", json={"prompt": "hello there"}).json()
    assert ids["tokens"] == llm.processor.encode("hello there")["input_ids"] and ids["count"] == len(ids["tokens"])
    chat = httpx.post(server + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.processor.encode_chat([{"role": "user", "content": "hi"}])["input_ids"]
    assert httpx.post(server + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "hello there"
    for r in (httpx.get(server + "/nowhere"), httpx.get(server + "/v1/chat/completions")):
        assert r.status_code in (404, 405) and r.json()["error"]["message"]


def test_structured_outputs_follow_the_schema_whatever_the_model(server, llm):
    """The openai SDK's parse() with a pydantic model, a json_schema that validates, vLLM's choice and regex; a
    constrained request and a free one in the same batch, the free one answering as it does alone."""
    import concurrent.futures
    import json
    import re

    import jsonschema
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=150)

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "describe a person"}]
    parsed = client.chat.completions.parse(model="tiny", messages=messages, response_format=Person, max_tokens=60,
                                           temperature=0.8, seed=1)  # fmt: skip
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 150
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer",
              "minimum": 1, "maximum": 9}}, "required": ["colour", "n"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}}
    free_body = {"model": "tiny", "prompt": "hello there", "max_tokens": 12, "temperature": 0}
    alone = httpx.post(server + "/v1/completions", json=free_body, timeout=60).json()["choices"][0]["text"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        constrained = pool.submit(client.chat.completions.create, model="tiny", messages=messages, max_tokens=40,
                                  response_format=fmt, temperature=1.0, seed=2)  # fmt: skip
        free = pool.submit(httpx.post, server + "/v1/completions", json=free_body, timeout=60)
        answer = constrained.result().choices[0].message.content
        assert free.result().json()["choices"][0]["text"] == alone
    jsonschema.validate(json.loads(answer), schema)

    def post(so: dict) -> dict:
        body = {"model": "tiny", "prompt": "pick", "max_tokens": 20, "temperature": 1.0, "structured_outputs": so}
        return httpx.post(server + "/v1/completions", timeout=60, json=body).json()

    assert post({"choice": ["yes", "no"]})["choices"][0]["text"] in ("yes", "no")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", post({"regex": "[0-9]{3}-[a-z]{2}"})["choices"][0]["text"])
    bad = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                       "structured_outputs": {"regex": "(unclosed"}})  # fmt: skip
    assert bad.status_code == 400
