"""Headless Chromium (Debian's chromium + chromium-driver) driving the web page of a real server on localhost."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"  # the README's screenshots, taken by these tests


@contextmanager
def chromium(*extra: str, width: int = 1200, height: int = 860):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", *extra):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_window_size(width, height)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, what, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: what(d))


def answers(driver, n: int, timeout: float = 90):
    """The first n finished answers; fails with the page's error if one is shown instead."""
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) >= n
         or d.find_elements(By.CSS_SELECTOR, ".msg.error"), timeout)  # fmt: skip
    errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert not errors, errors[0].text
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")


def page_errors(driver) -> list[str]:
    """JavaScript errors the page logged (a missing favicon or a password hint are not errors of ours)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def paste_files(driver, paths: list[Path], target_css: str = "#text") -> None:
    """A paste of files (as from a screenshot tool's clipboard) into the message box, in a real DataTransfer."""
    _hold(driver, paths)
    driver.execute_script(
        "const files = document.getElementById('test-drop').files, dt = new DataTransfer();"
        "for (const f of files) dt.items.add(f);"
        "document.querySelector(arguments[0]).dispatchEvent("
        "  new ClipboardEvent('paste', {bubbles: true, cancelable: true, clipboardData: dt}));"
        "document.getElementById('test-drop').remove();",
        target_css,
    )


def _hold(driver, paths: list[Path]) -> None:
    holder = driver.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.multiple = true; i.id = 'test-drop';"
        "i.style.display = 'none'; document.body.append(i); return i;"
    )
    holder.send_keys("\n".join(str(p) for p in paths))


def drop_files(driver, paths: list[Path], target_css: str = "#log") -> None:
    """Drag-and-drop as a person does it: the files land on the page in one drop event (Selenium cannot drag from
    the desktop, so a hidden input holds the files and the drop carries them in a real DataTransfer)."""
    from selenium.webdriver.common.by import By

    _hold(driver, paths)
    driver.execute_script(
        "const files = document.getElementById('test-drop').files, dt = new DataTransfer();"
        "for (const f of files) dt.items.add(f);"
        "const target = document.querySelector(arguments[0]);"
        "for (const type of ['dragenter', 'dragover', 'drop'])"
        "  target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));"
        "document.getElementById('test-drop').remove();",
        target_css,
    )
    driver.find_element(By.TAG_NAME, "body")  # the page is still there
