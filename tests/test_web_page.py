"""The web chat page at `/`, driven in headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import shutil

import pytest
from chat_fixtures import write_chat_checkpoint
from serve_fixtures import running_server

from ernie45.engine import LLM, SamplingParams

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs chromium and chromium-driver (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _answers(driver, n, timeout=60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']")) >= n
            or d.find_elements(By.CSS_SELECTOR, ".error")
        )
    )
    errors = driver.find_elements(By.CSS_SELECTOR, ".error")
    assert not errors, errors[0].text
    return driver.find_elements(By.CSS_SELECTOR, ".assistant")


def test_chat_page_streams_uploads_and_thinks(browser, tmp_path_factory):
    from PIL import Image
    from selenium.webdriver.common.by import By

    path = write_chat_checkpoint(tmp_path_factory.mktemp("web_ckpt"), vision=True, endless=True)
    (path / "generation_config.json").write_text('{"do_sample": false}')  # greedy: comparable
    llm = LLM(path)
    image = tmp_path_factory.mktemp("upload") / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(image)
    with running_server(llm, max_batch=2, max_len=2048) as (url, _):
        browser.get(url + "/")
        assert browser.find_element(By.ID, "model").text == "tiny"
        box = browser.find_element(By.ID, "text")
        box.send_keys("Hello there")
        browser.find_element(By.ID, "send").click()
        first = _answers(browser, 1)[0]
        msgs = [{"role": "user", "content": "Hello there"}]
        want = llm.chat(msgs, SamplingParams(temperature=0), enable_thinking=False)[0].text
        shown = first.text.removeprefix("Model: ")
        assert shown.split() == want.split()  # the browser renders tabs and runs of spaces as one space

        browser.find_element(By.ID, "file").send_keys(str(image))  # an image upload in the second turn
        box.send_keys("What colour?")
        browser.find_element(By.ID, "send").click()
        second = _answers(browser, 2)[1]
        assert second.text.removeprefix("Model: ")
        assert "[red.png]" in browser.find_elements(By.CSS_SELECTOR, ".user")[1].text

        browser.find_element(By.ID, "thinking").click()
        box.send_keys("Think first")
        browser.find_element(By.ID, "send").click()
        third = _answers(browser, 3)[2]
        assert third.find_elements(By.TAG_NAME, "details")  # the reasoning is shown apart from the answer
