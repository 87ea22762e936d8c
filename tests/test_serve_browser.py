"""End to end through the web page in a real browser (Debian's Chromium driven by Selenium): ask, edit, undo."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Chromium and ChromeDriver are not installed: run scripts/install_browser.sh (apt chromium chromium-driver)",
)

TOKEN = "browser-test-token-0123456789"


@pytest.fixture
def server(small_world, tmp_path):
    import uvicorn

    from editbank import Editor
    from editbank.serve import ServeConfig, create_app

    ed = Editor.open(small_world.path, method="sola", store=tmp_path / "s.db")
    srv = uvicorn.Server(uvicorn.Config(create_app(ed, ServeConfig(token=TOKEN)), host="127.0.0.1", port=0,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield ed, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)
    ed.close()


@pytest.fixture
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


def shot(browser, name: str) -> None:
    """With EDITBANK_SCREENSHOTS=DIR, keep a screenshot of this state (docs/images/page-*.png come from here)."""
    folder = os.environ.get("EDITBANK_SCREENSHOTS")
    if folder:
        browser.set_window_size(1100, 1400)
        browser.save_screenshot(str(Path(folder) / f"page-{name}.png"))


def test_edit_ask_and_undo_through_the_page(server, browser, world_requests):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ed, url = server
    r = world_requests[0]
    probe, _ = r.locality[0]
    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
    el = lambda i: browser.find_element(By.ID, i)  # noqa: E731
    browser.get(url)

    def ask() -> str:
        el("ask").click()
        wait.until(lambda d: (el("answer").text not in ("", "…") and el("answer-info").text) or el("error").text)
        assert not el("error").text
        return el("answer").text.strip()

    el("prompt").send_keys(r.prompt)
    before = ask()
    assert before and not before.startswith(r.target.strip())
    assert "no edit answered" in el("answer-info").text and before in el("answer-info").text
    el("edit-prompt").send_keys(r.prompt)
    el("edit-target").send_keys(r.target.strip())
    el("edit-subject").send_keys(r.subject)
    el("edit-probes").send_keys(r.rephrases[0] + "\n" + probe)
    el("apply").click()  # no token yet: the error shows beside the button and in the banner, nothing changes
    wait.until(lambda d: el("edit-error").text)
    assert "token" in el("edit-error").text and el("error").text == el("edit-error").text and ed.edits() == []
    shot(browser, "error")
    el("token").send_keys(TOKEN)
    el("apply").click()
    wait.until(lambda d: el("took").text or el("edit-error").text)
    assert not el("error").text
    assert el("before").text.strip() == before and el("after").text.strip().startswith(r.target.strip())
    assert el("took").text.startswith("edit 1 took") and "final loss" in el("took").text
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#probe-rows tr')].map(tr => [...tr.children].map(td => td.innerText))")
    assert [row[0] for row in rows] == [r.rephrases[0], probe]
    assert rows[1][1] == rows[1][2], "the unrelated prompt answers as before"
    # the list is re-rendered on every refresh, so read it in one script call (no stale element references)
    table = lambda: browser.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#edits tr')].map(tr => tr.innerText)")
    wait.until(lambda d: len(table()) == 1 and "active" in table()[0] and "yes" in table()[0])
    assert ed.edits("active")[0].request.prompt == r.prompt
    # the shown answer followed the edit by itself, and says which edit answered it
    wait.until(lambda d: el("answer").text.strip().startswith(r.target.strip()))
    wait.until(lambda d: "answered by edit 1" in el("answer-info").text)
    assert before in el("answer-info").text, "beside the unedited model's answer"
    shot(browser, "edited")
    browser.find_element(By.CSS_SELECTOR, "button.undo").click()
    wait.until(lambda d: _alert(d))
    browser.switch_to.alert.dismiss()  # undo asks first: dismissed, nothing changes
    assert ed.edits()[0].status == "active"
    browser.find_element(By.CSS_SELECTOR, "button.undo").click()
    wait.until(lambda d: _alert(d))
    browser.switch_to.alert.accept()
    wait.until(lambda d: "reverted" in table()[0])
    assert ed.edits()[0].status == "reverted"
    wait.until(lambda d: el("answer").text.strip() == before and "no edit answered" in el("answer-info").text)
    shot(browser, "undone")
    assert ask() == before


def _alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        return driver.switch_to.alert is not None
    except NoAlertPresentException:
        return False
