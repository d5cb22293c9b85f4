"""The web page at `/`, one test per flow, driven in headless Chromium against a real server running the embedded
demo model. Each flow leaves its screenshot in docs/images/ (the README shows them)."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest
from serve_fixtures import running_server
from web_fixtures import CHROMIUM, DRIVER, SHOTS, answers, chromium, drop_files, page_errors, paste_files, wait

from ernie45.engine import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromium-driver (.ci/run installs them)"
)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def served():
    llm = LLM()  # the embedded demo model: it sees, hears and reads documents
    with running_server(llm, max_batch=2, max_len=4096) as (url, _):
        yield llm, url


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def _fresh(browser, url):
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    wait(browser, lambda d: d.execute_script("return window.ernie45 && window.ernie45.ready"), 20)


def _ask(browser, text: str, n: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "text")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)  # Enter sends; Shift+Enter would be a new line
    return answers(browser, n)[n - 1]


def _greedy(llm, messages):
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=256), enable_thinking=False)[0].text


def test_conversation_survives_reload_and_is_kept_renamed_searched_edited(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    llm, url = served
    _fresh(browser, url)
    first = _ask(browser, "Who are you?", 1).find_element(By.CSS_SELECTOR, ".body").text
    second = _ask(browser, "What is 23 plus 48?", 2)  # (the log is drawn anew after each answer: read it now)
    turns = [{"role": "user", "content": "Who are you?"}]
    assert first.split() == _greedy(llm, turns).split()
    turns += [{"role": "assistant", "content": _greedy(llm, turns)}, {"role": "user", "content": "What is 23 plus 48?"}]
    want = second.find_element(By.CSS_SELECTOR, ".body").text
    assert want.split() == _greedy(llm, turns).split()  # the second turn was asked with the first one's history
    assert "tok/s" in second.find_element(By.CSS_SELECTOR, ".stats").text  # usage and speed under each answer

    browser.refresh()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2, 20)
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[1].text == want
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#conversations .open")] == ["Who are you?"]

    browser.find_element(By.CSS_SELECTOR, "#conversations .rename").click()
    alert = browser.switch_to.alert
    alert.send_keys("Sums")
    alert.accept()
    browser.find_element(By.ID, "new-chat").click()
    _ask(browser, "Hello", 1)
    titles = lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#conversations .open")]  # noqa: E731
    assert sorted(titles()) == ["Hello", "Sums"]
    browser.find_element(By.ID, "search").send_keys("plus 48")  # searches the messages, not only the titles
    assert titles() == ["Sums"]
    browser.find_element(By.CSS_SELECTOR, "#conversations .open").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2

    browser.find_elements(By.CSS_SELECTOR, ".msg.user .edit")[1].click()  # edit the second question: asked anew
    box = browser.find_element(By.CSS_SELECTOR, ".edit-box")
    box.clear()
    box.send_keys("What is 12 plus 7?")
    browser.find_element(By.CSS_SELECTOR, ".save-edit").click()
    wait(browser, lambda d: "12 plus 7" in d.find_elements(By.CSS_SELECTOR, ".msg.user")[1].text)
    edited = answers(browser, 2)[1].find_element(By.CSS_SELECTOR, ".body").text
    turns[-1]["content"] = "What is 12 plus 7?"
    assert edited.split() == _greedy(llm, turns).split()
    browser.find_element(By.CSS_SELECTOR, ".regenerate").click()
    assert answers(browser, 2)[1].find_element(By.CSS_SELECTOR, ".body").text == edited  # greedy: the same again
    browser.save_screenshot(str(SHOTS / "web-chat.png"))

    browser.set_window_size(390, 800)  # a phone: the list folds away behind a button
    assert not browser.find_element(By.ID, "sidebar").is_displayed()
    browser.find_element(By.ID, "open-sidebar").click()
    assert browser.find_element(By.ID, "sidebar").is_displayed()
    browser.find_element(By.ID, "close-sidebar").click()
    assert browser.find_element(By.ID, "text").is_displayed()
    browser.set_window_size(1200, 860)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')].filter(e => e.id !== 'test-drop'"
        " && !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.id)"
    )
    assert unlabelled == []  # every control has a label a screen reader can say

    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    browser.find_element(By.ID, "search").clear()
    browser.find_element(By.ID, "export").click()
    saved = wait(browser, lambda d: list(tmp_path.glob("ernie45-conversations*.json")), 20)[0]
    exported = json.loads(wait(browser, lambda d: saved.read_text() if saved.stat().st_size else None, 20))
    assert sorted(c["title"] for c in exported["conversations"]) == ["Hello", "Sums"]
    browser.execute_script("localStorage.clear()")  # a new browser: nothing kept, until the file comes back
    browser.refresh()
    wait(browser, lambda d: d.execute_script("return window.ernie45 && window.ernie45.ready"), 20)
    assert titles() == []
    browser.find_element(By.ID, "import").send_keys(str(saved))
    wait(browser, lambda d: sorted(titles()) == ["Hello", "Sums"], 20)
    browser.find_element(By.XPATH, "//ul[@id='conversations']//button[text()='Sums']").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user .body")[1].text == "What is 12 plus 7?"
    browser.find_element(By.CSS_SELECTOR, "#conversations .delete[aria-label='Delete Hello']").click()
    browser.switch_to.alert.accept()
    assert titles() == ["Sums"]
    assert page_errors(browser) == []


def test_markdown_and_code_render_and_a_script_in_an_answer_stays_inert(served, browser):
    from selenium.webdriver.common.by import By

    _, url = served
    _fresh(browser, url)
    answer = ("**Bold** and a list:\n\n- one\n- two\n\n```python\ndef f(x):\n    return x + 1\n```\n\n"
              "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
              "[link](javascript:window.pwned=3)\n\n"
              "Math: $$x^2 + 1$$ and $a_i$, $\\href{javascript:window.pwned=4}{x}$; "
              "prices $5 and $6 stay text.")  # fmt: skip
    messages = [
        {"role": "user", "content": "<b>not bold</b>"},
        {"role": "assistant", "content": answer, "reasoning": "First, think."},
    ]
    conv = {"id": "md", "title": "Markdown", "created": 1, "updated": 2, "messages": messages}
    browser.execute_script("localStorage.setItem('ernie45-conversations', arguments[0]);"
                           "localStorage.setItem('ernie45-current', 'md');", json.dumps([conv]))  # fmt: skip
    browser.refresh()
    body = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body"), 20)[0]
    assert body.find_element(By.TAG_NAME, "strong").text == "Bold"
    assert len(body.find_elements(By.CSS_SELECTOR, "ul li")) == 2
    code = body.find_element(By.CSS_SELECTOR, "pre code")
    assert "hljs" in code.get_attribute("class") and code.find_elements(By.CSS_SELECTOR, ".hljs-keyword")
    assert not body.find_elements(By.TAG_NAME, "script")
    assert body.find_element(By.TAG_NAME, "img").get_attribute("onerror") is None
    assert not body.find_elements(By.CSS_SELECTOR, "[href^='javascript'], [src^='javascript']")
    assert len(body.find_elements(By.CSS_SELECTOR, ".katex")) == 3  # typeset by the bundled KaTeX
    assert body.find_elements(By.CSS_SELECTOR, ".katex-display") and "$5 and $6" in body.text
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user .body").text == "<b>not bold</b>"  # the user's text is text
    reasoning = browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.reasoning")
    thought = reasoning.find_element(By.CSS_SELECTOR, ".thought")
    assert reasoning.get_attribute("open") is None and not thought.is_displayed()
    reasoning.find_element(By.TAG_NAME, "summary").click()  # the reasoning folds out on demand
    assert thought.text == "First, think."
    browser.find_element(By.CSS_SELECTOR, "#theme option[value=dark]").click()
    assert browser.execute_script("return document.documentElement.dataset.theme") == "dark"
    browser.save_screenshot(str(SHOTS / "web-markdown-dark.png"))
    browser.find_element(By.CSS_SELECTOR, "#theme option[value=light]").click()


def test_an_image_a_pdf_and_a_csv_dropped_on_the_page_reach_the_model_and_a_paste_attaches(served, browser):
    from selenium.webdriver.common.by import By

    llm, url = served
    _fresh(browser, url)
    paste_files(browser, [EXAMPLES / "shapes.png"])  # a pasted screenshot becomes an attachment, and can go again
    pasted = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments .chip[data-kind=image]"), 20)
    pasted[0].find_element(By.CSS_SELECTOR, "button[aria-label='Remove shapes.png']").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#attachments .chip")
    files = [EXAMPLES / "chart.png", EXAMPLES / "report.pdf", EXAMPLES / "sales.csv"]
    drop_files(browser, files)
    chips = wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments .chip")) == 3
                 and d.find_elements(By.CSS_SELECTOR, "#attachments .chip"))  # fmt: skip
    assert chips[0].find_element(By.TAG_NAME, "img")  # a thumbnail
    assert "page" in chips[1].text and "tokens" in chips[1].text  # the PDF's page count, measured by the server
    shown = _ask(browser, "Which quarter is the highest?", 1)
    import base64

    def url_of(p, mime):
        return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode()

    parts = [{"type": "image", "image": url_of(files[0], "image/png")},
             {"type": "file", "file": {"file_data": url_of(files[1], "application/pdf"), "filename": "report.pdf"}},
             {"type": "file", "file": {"file_data": url_of(files[2], "text/csv"), "filename": "sales.csv"}},
             {"type": "text", "text": "Which quarter is the highest?"}]  # fmt: skip
    want = llm.processor.encode_chat([{"role": "user", "content": parts}], enable_thinking=False)["input_ids"]
    stats = shown.find_element(By.CSS_SELECTOR, ".stats").text
    assert stats.startswith(f"{len(want)} prompt tokens")  # all three parts arrived, as the model reads them
    assert (
        shown.find_element(By.CSS_SELECTOR, ".body").text.split()
        == _greedy(llm, [{"role": "user", "content": parts}]).split()
    )
    browser.save_screenshot(str(SHOTS / "web-documents.png"))


def test_a_recorded_voice_message_is_sent_as_audio_and_transcribed(served, tmp_path):
    from selenium.webdriver.common.by import By

    llm, url = served
    clip = EXAMPLES / "digits.wav"
    with wave.open(str(clip)) as w:
        seconds = w.getnframes() / w.getframerate()
    fake = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={clip}%noloop")  # fmt: skip
    with chromium(*fake) as browser:
        _fresh(browser, url)
        mic = browser.find_element(By.ID, "mic")
        mic.click()
        wait(browser, lambda d: mic.get_attribute("aria-pressed") == "true", 10)
        import time

        time.sleep(seconds + 1.5)  # the clip, and the silence after it
        mic.click()
        chip = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments .chip[data-kind=audio]"), 20)[0]
        assert "voice message" in chip.text
        shown = _ask(browser, "Transcribe the audio.", 1)
        heard = shown.find_element(By.CSS_SELECTOR, ".body").text
        direct = _greedy(
            llm,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "audio", "audio": str(clip)},
                        {"type": "text", "text": "Transcribe the audio."},
                    ],
                }
            ],
        )
        assert heard.split() == direct.split(), (heard, direct)  # the recording says what the file says
        browser.save_screenshot(str(SHOTS / "web-voice.png"))
        assert page_errors(browser) == []


def test_an_agent_turn_shows_its_tool_call_and_goes_on_after_the_result(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _, url = served
    _fresh(browser, url)
    browser.find_element(By.ID, "agent").click()
    browser.find_element(By.ID, "example-tools").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tool-list li code")) == 3
    Select(browser.find_element(By.ID, "tool-choice")).select_by_visible_text("required")
    drop_files(browser, [EXAMPLES / "order_page.png", EXAMPLES / "voice_order.wav"])
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments .chip")) == 2)
    first = _ask(browser, "Can you help?", 1)
    card = first.find_element(By.CSS_SELECTOR, ".tool-card")
    name = card.find_element(By.TAG_NAME, "h3").text.removesuffix("(…)")
    assert name in ("get_order_status", "cancel_order", "report_problem")
    args = json.loads(card.find_element(By.CSS_SELECTOR, ".args").text)
    assert set(args) == {"order_id"} and args["order_id"].isdigit()  # the schema holds whatever the model
    calls = len(first.find_elements(By.CSS_SELECTOR, ".tool-card"))  # `required` may give parallel calls: answer each
    for left in range(calls, 0, -1):
        browser.find_elements(By.CSS_SELECTOR, ".tool-card .run-mock")[0].click()
        wait(browser, lambda d, left=left: len(d.find_elements(By.CSS_SELECTOR, ".tool-card .run-mock")) < left)
    answers(browser, 2)  # the model went on from the tools' results
    assert len(browser.find_elements(By.CSS_SELECTOR, ".tool-card")) <= calls + 1  # "required" held for one answer
    result = json.loads(browser.find_element(By.CSS_SELECTOR, ".tool-card .result").text.removeprefix("Result: "))
    assert result.get("order_id", args["order_id"]) == args["order_id"]
    browser.save_screenshot(str(SHOTS / "web-agent.png"))
    browser.find_element(By.ID, "agent").click()


def test_the_page_s_example_tools_and_back_office_are_the_agent_example_s(served, browser):
    """The page cannot read examples/, so it keeps its own copy of the three tools and their mock back office: they
    must say what `examples/tools.json` and `examples/agent.py` say, or the page and the example drift apart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("agent_example", EXAMPLES / "agent.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    _, url = served
    _fresh(browser, url)
    ids = ["4711", "1234", "999", "31415"]
    page = browser.execute_async_script(
        """const [ids, done] = [arguments[0], arguments[arguments.length - 1]];
        import("/static/js/agent.js").then((a) => done({
          tools: a.EXAMPLE_TOOLS.map(({name, description, parameters}) => ({name, description, parameters})),
          results: a.EXAMPLE_TOOLS.map((t) => ids.map((id) => a.mock(t.name, {order_id: id}))),
        }), (e) => done({error: String(e)}));""",
        ids,
    )
    assert "error" not in page, page
    assert page["tools"] == [t["function"] for t in example.TOOLS]
    assert page["results"] == [[example.FUNCTIONS[t["name"]](order_id=i) for i in ids] for t in page["tools"]]


def test_a_moderation_run_lays_its_windows_on_the_timeline(served, browser):
    from selenium.webdriver.common.by import By

    llm, url = served
    _fresh(browser, url)
    browser.find_element(By.ID, "tab-moderate").click()
    browser.find_element(By.ID, "mod-video").send_keys(str(EXAMPLES / "screened.mp4"))
    browser.find_element(By.ID, "mod-policy-file").send_keys(str(EXAMPLES / "policy.yaml"))
    wait(browser, lambda d: "red_x" in d.find_element(By.ID, "mod-policy").get_attribute("value"))
    window = browser.find_element(By.ID, "mod-window")
    window.clear()
    window.send_keys("2")
    browser.find_element(By.ID, "mod-start").click()
    wait(browser, lambda d: d.find_element(By.ID, "mod-status").text.startswith(("Done", "Error")), 180)
    assert browser.find_element(By.ID, "mod-status").text.startswith("Done")
    from ernie45.jobs.moderate import load_policy, moderate

    want = list(moderate(EXAMPLES / "screened.mp4", load_policy(EXAMPLES / "policy.yaml"), llm, length=2))
    shown = browser.find_elements(By.CSS_SELECTOR, "#timeline .window")
    assert [float(w.get_attribute("data-start")) for w in shown] == [v["start"] for v in want]
    labels = [w.find_element(By.CSS_SELECTOR, ".labels").text for w in shown]
    assert labels == [", ".join(v["labels"]) or "clear" for v in want]
    assert all(w.find_elements(By.TAG_NAME, "img") for w in shown)  # each window's thumbnail
    shown[-1].click()
    at = browser.execute_script("return document.getElementById('mod-player').currentTime")
    assert abs(at - want[-1]["start"]) < 0.05  # clicking a window seeks the player there
    assert browser.find_element(By.ID, "mod-export").is_enabled()
    browser.execute_script("document.getElementById('timeline').scrollIntoView({block: 'end'})")
    browser.save_screenshot(str(SHOTS / "web-moderation.png"))


def test_esc_stops_a_streaming_answer_and_keeps_what_came(browser, tmp_path):
    """A model that never ends its answer (a tiny random one): Esc stops the stream, the partial answer stays
    with "stopped by you", and the next question can be asked at once."""
    from chat_fixtures import write_chat_checkpoint
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path = write_chat_checkpoint(tmp_path / "endless", endless=True)
    (path / "generation_config.json").write_text('{"do_sample": false, "max_new_tokens": 4000}')
    llm = LLM(path)
    assert llm.default_sampling.max_tokens == 4000  # the checkpoint's answer length is the default (was 256)
    with running_server(llm, max_batch=2, max_len=4096) as (url, _):
        _fresh(browser, url)
        box = browser.find_element(By.ID, "text")
        box.send_keys("Hello there")
        box.send_keys(Keys.ENTER)
        wait(
            browser,
            lambda d: any(len(b.text) > 20 for b in d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")),
            60,
        )  # streaming
        assert browser.find_element(By.ID, "stop").is_displayed()
        box.send_keys(Keys.ESCAPE)
        done = answers(browser, 1)[0]
        assert "stopped by you" in done.find_element(By.CSS_SELECTOR, ".stats").text
        assert not browser.find_element(By.ID, "stop").is_displayed()
        kept = done.find_element(By.CSS_SELECTOR, ".body").text
        assert len(kept) > 20
        browser.refresh()  # the partial answer was kept with the conversation
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .body"), 20)
        assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .body").text == kept
