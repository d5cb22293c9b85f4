"""`ernie45 serve`: the OpenAI SDK as client, streaming, media parts, errors, load with disconnects."""

from __future__ import annotations

import json
import random
import re
import threading
import time

import httpx
import pytest
from chat_fixtures import write_chat_checkpoint
from openai import APIStatusError, OpenAI
from serve_fixtures import MediaPolicy, png_data_url, running_server, wav_base64

from ernie45.engine import LLM, SamplingParams
from ernie45.serve.protocol import ReasoningSplit, split_answer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(write_chat_checkpoint(tmp_path_factory.mktemp("serve_ckpt"), audio=True, endless=True))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.png").write_bytes(_png_bytes())
    return d


def _png_bytes() -> bytes:
    import base64

    return base64.b64decode(png_data_url().split(",", 1)[1])


@pytest.fixture(scope="module")
def server(llm, media_dir):
    policy = MediaPolicy(media_dir)
    with running_server(llm, media=policy, max_batch=8, max_len=256, max_body_bytes=1 << 20) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ernie45_[a-z_]+) ([0-9.e+-]+)$", text, re.M)}


def test_chat_through_the_openai_sdk_matches_the_engine(client, llm):
    messages = [{"role": "user", "content": "Say something."}]
    want = llm.chat(messages, SamplingParams(max_tokens=12, temperature=0))[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == 12


def test_stream_gives_the_same_text_and_ends_with_done(client, server):
    messages = [{"role": "user", "content": "Stream it."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    body = {"model": "tiny", "messages": messages, "max_tokens": 3, "stream": True}
    lines = [ln for ln in httpx.post(server + "/v1/chat/completions", json=body).text.splitlines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_image_and_audio_parts(client, llm):
    parts = [{"type": "image_url", "image_url": {"url": png_data_url()}},
             {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
             {"type": "text", "text": "What is this?"}]  # fmt: skip
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                         temperature=0)  # fmt: skip
    native = [{"type": "image", "image": png_data_url()},
              {"type": "audio", "audio": "data:audio/wav;base64," + wav_base64()},
              {"type": "text", "text": "What is this?"}]  # fmt: skip
    want = llm.chat([{"role": "user", "content": native}], SamplingParams(max_tokens=8, temperature=0))[0]
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.prompt_tokens > 30  # the media placeholders are in the prompt


def test_image_detail_low_scales_down_and_an_unknown_part_field_is_refused(client, llm, server):
    import base64
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:100, 0:900]
    big = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))  # small as a PNG
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def ask(image_url):
        parts = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": "What is this?"}]
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                              max_tokens=4, temperature=0)  # fmt: skip

    def engine(image):
        parts = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
        return llm.chat([{"role": "user", "content": parts}], SamplingParams(max_tokens=4, temperature=0))[0]

    small = big.resize((512, 57))  # what OpenAI's "low" sends: the picture fitted into 512 x 512
    low, high = ask({"url": url, "detail": "low"}), ask({"url": url, "detail": "high"})
    assert low.usage.prompt_tokens == engine(small).prompt_tokens
    assert high.usage.prompt_tokens == engine(big).prompt_tokens == ask({"url": url}).usage.prompt_tokens
    assert low.usage.prompt_tokens < high.usage.prompt_tokens
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ=", "detail": "low"}}]
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    r = httpx.post(server + "/v1/chat/completions", json=body)
    assert r.status_code == 422 and "not a readable image" in r.json()["error"]["message"], r.text
    for part, field in (
        ({"type": "image_url", "image_url": {"url": url, "detial": "low"}}, "detial"),
        ({"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}, "cache_control"),
    ):
        body = {"model": "tiny", "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
        r = httpx.post(server + "/v1/chat/completions", json=body)
        assert r.status_code in (400, 422) and field in r.json()["error"]["message"], r.text


def test_local_media_only_inside_the_allowed_dir(server, media_dir):
    def ask(url):
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
        body = {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
        return httpx.post(server + "/v1/chat/completions", json=body)

    assert ask("ok.png").status_code == 200
    assert ask(f"file://{media_dir}/ok.png").status_code == 200
    for bad in ("../../../../etc/passwd", "/etc/passwd", f"file://{media_dir}/../../etc/hosts", "ok.png/../../x"):
        r = ask(bad)
        assert r.status_code == 400 and ("outside" in r.text or "no such file" in r.text), bad
    r = ask("https://example.com/cat.png")
    assert r.status_code == 400 and "--allow-remote-media" in r.json()["error"]["message"]


def test_completions_models_n_and_seed(client, llm):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = llm.generate("Once upon", SamplingParams(max_tokens=6, temperature=0))[0].text
    got = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert got.choices[0].text == want
    a = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3, seed=7,
                                       max_tokens=6, temperature=1.0)  # fmt: skip
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=3, seed=7,
                                       max_tokens=6, temperature=1.0)  # fmt: skip
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice has its own seed


def test_thinking_goes_to_reasoning_content(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Think."}], "max_tokens": 6, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": True}}  # fmt: skip
    msg = httpx.post(server + "/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert msg["reasoning_content"] and msg["content"] == ""  # the tiny model never closes its thought


def test_reasoning_split_across_deltas():
    split = ReasoningSplit(thinking=True)
    pieces = [split.feed(t) for t in ["I wei", "gh it.</th", "ink>\n\nThe ans", "wer."]]
    pieces.append(split.feed("", final=True))
    assert "".join(r for r, _ in pieces) == "I weigh it." and "".join(c for _, c in pieces) == "The answer."
    assert split_answer("a</think>\n\nb", True) == ("a", "b")
    assert split_answer("a</think>b", False) == (None, "a</think>b")


def _post(url, data=None, **kw):
    return httpx.post(url + "/v1/chat/completions", content=data, headers={"content-type": "application/json"}, **kw)


def test_hostile_inputs_get_4xx_and_the_server_lives(server):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = {
        "malformed json": (b'{"model": "tiny", "messages": [', 400),
        "not an object": (b"[1, 2, 3]", 400),
        "wrong types": (json.dumps({**ok, "messages": "hi"}).encode(), 400),
        "no model": (json.dumps({"messages": ok["messages"]}).encode(), 400),
        "bad temperature": (json.dumps({**ok, "temperature": -1}).encode(), 400),
        "unknown part": (json.dumps({**ok, "messages": [{"role": "user", "content": [{"type": "gif"}]}]}).encode(),
                         400),
        "unknown model": (json.dumps({**ok, "model": "gpt-9"}).encode(), 404),
        "too long": (json.dumps({**ok, "max_tokens": 100_000}).encode(), 400),
        "huge body": (b'{"model": "tiny", "x": "' + b"a" * (2 << 20) + b'"}', 413),
        "not base64": (json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}).encode(), 422),
        "corrupt image": (json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]}).encode(), 422),
        "corrupt audio": (json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "aGVsbG8gd29ybGQ=", "format": "wav"}}]}]}).encode(), 422),
    }  # fmt: skip
    for name, (data, status) in cases.items():
        r = _post(server, data)
        assert r.status_code == status, (name, r.status_code, r.text[:200])
        assert r.json()["error"]["message"], name
    chunked = _post(server, iter([b'{"model": "tiny", "x": "', b"a" * (2 << 20), b'"}']))  # no Content-Length
    assert chunked.status_code == 413
    assert httpx.get(server + "/health").json()["status"] == "ok"
    assert _post(server, json.dumps(ok).encode()).status_code == 200


def test_api_key_is_enforced(llm):
    with running_server(llm, api_key="s3cret", max_batch=2, max_len=128) as (url, _):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(APIStatusError) as e:
            OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        assert e.value.status_code == 401
        good = OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=2).choices
        assert httpx.get(url + "/health").status_code == 200  # health and the page stay open


def test_full_queue_answers_429(llm):
    with running_server(llm, max_batch=1, max_len=512, max_waiting=1) as (url, app):
        engine = app.state.server.engine
        enc = llm.processor.encode_chat([{"role": "user", "content": "long"}])
        held = [engine.submit(enc, SamplingParams(max_tokens=400, temperature=0))]
        deadline = time.time() + 10
        while engine.usage()["running"] < 1 and time.time() < deadline:  # the first takes the only slot
            time.sleep(0.01)
        held.append(engine.submit(enc, SamplingParams(max_tokens=400, temperature=0)))  # the second waits
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        for h in held:
            h.abort()


def test_32_concurrent_streams_with_disconnects(server):
    rng = random.Random(0)
    plan = [(i, rng.random() < 0.35, rng.randint(1, 4)) for i in range(32)]
    results: dict[int, tuple[str, int]] = {}

    def client(i, leave, after):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"Client {i} here."}], "max_tokens": 24,
                "temperature": 0, "stream": True}  # fmt: skip
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as r:
            n, finish = 0, None
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                n += bool(choice["delta"].get("content"))
                finish = choice["finish_reason"] or finish
                if leave and n >= after:
                    results[i] = ("left", n)
                    return  # closes the connection mid-stream
            results[i] = (finish, n)

    threads = [threading.Thread(target=client, args=p) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    stayed = [i for i, leave, _ in plan if not leave]
    assert all(results[i][0] == "length" for i in stayed), {i: results.get(i) for i in stayed}
    deadline = time.time() + 20
    while time.time() < deadline:
        m = _metrics(server)
        if m["ernie45_cache_slots_used"] == 0 and m["ernie45_queue_depth"] == 0:
            break
        time.sleep(0.2)
    assert m["ernie45_cache_slots_used"] == 0 and m["ernie45_cache_tokens_used"] == 0 and m["ernie45_queue_depth"] == 0
    assert m["ernie45_engine_aborted_total"] >= 1  # the clients that left were aborted, not decoded to the end
    assert httpx.get(server + "/health").json()["running"] == 0


def test_generated_requests_never_break_the_server(llm):
    """Schemathesis cases (valid and not) for every operation of the server's OpenAPI: never a 5xx, always an
    error object on 4xx, and the server stays healthy."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with running_server(llm, max_batch=4, max_len=128, max_body_bytes=1 << 20) as (url, app):
        schema = schemathesis.openapi.from_dict(app.openapi())
        operations = [r.ok() for r in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
        seen = []
        for op in operations:

            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(), served=st.booleans())
            def check(case, served):
                if served and isinstance(case.body, dict):  # half the bodies name the served model: deeper paths
                    case.body["model"] = "tiny"
                response = case.call(base_url=url, timeout=60)
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
                if response.status_code >= 400:
                    assert response.json()["error"]["message"]

            check()
        assert httpx.get(url + "/health").status_code == 200
        assert any(400 <= s < 500 for s in seen) and any(s == 200 for s in seen)


def test_engine_reuses_a_cached_prompt_prefix(llm):
    from ernie45.engine.batcher import BatchEngine

    history = [{"role": "user", "content": "Tell me a long story about a cat and a dog and a bird."}]
    params = SamplingParams(max_tokens=20, temperature=0)
    engine = BatchEngine(llm, max_batch=2, max_len=256)
    try:
        first = "".join(d.text for d in engine.submit(llm.processor.encode_chat(history), params))
        follow = [*history, {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
        enc = llm.processor.encode_chat(follow)
        got = "".join(d.text for d in engine.submit(enc, params))
        reused = engine.stats["prefix_cached_tokens"]
        assert reused >= 16  # the second turn started from the first turn's cache
        assert got == llm.chat(follow, params)[0].text  # and answers exactly as if computed afresh
        fresh = llm.processor.encode_chat([{"role": "user", "content": "x"}])
        other = "".join(d.text for d in engine.submit(fresh, params))
        assert engine.stats["prefix_cached_tokens"] == reused and other  # nothing shared, nothing reused
    finally:
        engine.shutdown()


def test_the_serve_command_answers_and_stops_on_a_signal():
    """`ernie45 serve DIR`: the engine steps on the main thread, HTTP on another; a request is answered, and
    Ctrl-C or SIGTERM ends the process (it must not hang). One server per signal, side by side."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from ernie45.demo import default_model_path

    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731  (a background suite ignores it)
    servers = {}
    for sig in ("SIGINT", "SIGTERM"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "ernie45", "serve", str(default_model_path()), "--port", str(port)]
        servers[sig] = (f"http://127.0.0.1:{port}", subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                                     stderr=subprocess.PIPE, text=True,
                                                                     preexec_fn=restore))  # fmt: skip
    try:
        for sig, (url, proc) in servers.items():
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
            body = {"model": "demo-omni", "messages": [{"role": "user", "content": "What is 12 plus 7?"}],
                    "max_tokens": 40}  # fmt: skip
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
            assert "19" in reply["choices"][0]["message"]["content"]
            proc.send_signal(getattr(signal, sig))
        for sig, (_, proc) in servers.items():
            out, err = proc.communicate(timeout=30)
            assert proc.returncode in (0, 130), (sig, err)
            assert "runtime:" in err and "Traceback" not in err, sig
    finally:
        for _, proc in servers.values():
            if proc.poll() is None:
                proc.kill()


def test_fresh_prompts_prefill_together_and_answer_as_alone(llm):
    """Prompts that arrive together start from empty slots: one right-padded forward prefills them all, and each
    answers exactly as it does alone (greedy), penalties and all."""
    from ernie45.engine.batcher import BatchEngine

    prompts = [[300, 301, 302, 303, 304, 305, 306, 307, 308], [310, 311], [320, 321, 322, 323, 324]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    engine = BatchEngine(llm, max_batch=3, max_len=64, thread=False)
    together = engine._prefill_together
    seen = []
    engine._prefill_together = lambda reqs: seen.append(len(reqs)) or together(reqs)
    handles = [engine.submit({"input_ids": p}, params) for p in prompts]
    while not all(h.request.finished for h in handles):
        engine.step()
    assert seen == [3]  # one forward for the three prompts
    assert [[t for d in _drain(h) for t in d.token_ids] for h in handles] == alone


def _drain(handle):
    q = handle.request.out
    while not q.empty():
        yield q.get()


def test_the_server_decodes_through_the_compiled_step_with_the_same_answers(llm, tmp_path):
    """An `LLM` built with compile=True serves through the same scheduler: its decode steps run the compiled
    fixed-shape step over every slot, and the answers are the eager ones."""
    compiled = LLM(write_chat_checkpoint(tmp_path / "c", audio=True, endless=True), compile=True)
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0}
              for text in ("hello there", "a longer question about the weather")]  # fmt: skip
    answers = []
    for model in (llm, compiled):
        with running_server(model, max_batch=2, max_len=128) as (url, app):
            from concurrent.futures import ThreadPoolExecutor

            with httpx.Client(timeout=120) as c, ThreadPoolExecutor(2) as pool:
                post = lambda b: c.post(url + "/v1/chat/completions", json=b).json()["choices"][0]["message"]  # noqa: E731,B023
                answers.append(list(pool.map(post, bodies)))
            if model is compiled:
                assert app.state.engine.decoder is compiled.decoder and compiled.decoder.failed is None
                assert len(compiled.decoder.caches) == 1
    assert answers[0] == answers[1]
