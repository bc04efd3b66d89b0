"""The try-it page at GET /, in a real headless Chromium against the real stack
(supervisord, broker, workers and the tiny random-weight test model).

Needs Debian's chromium and chromium-driver (scripts/test.sh installs them);
skipped with a clear reason when they are missing.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.engine_helpers import VARIANTS_DIR
from tests.frontend_helpers import warm_up
from tests.stack import running_stack

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "tests/conformance/variants"  # main's weights plus two fine-tuned variants
PHOTO = MODEL / "images/photo_773x767.jpg"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only needed when chromium is there)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Counts the canvas pixels that something was drawn on.
DRAWN_PIXELS_JS = """
const c = document.getElementById('overlay');
const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
return n;
"""

# Records the output's length at every change, to see text arrive in pieces.
WATCH_OUTPUT_JS = """
window.__outputLengths = [];
const out = document.getElementById('output');
new MutationObserver(() => window.__outputLengths.push(out.textContent.length))
  .observe(out, {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def browser():
    user_data = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={user_data}", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(user_data, ignore_errors=True)


@pytest.fixture(scope="module")
def stack():
    with running_stack(MOONDREAM_MODEL=str(MODEL), VARIANT_DIR=VARIANTS_DIR) as s:
        yield s


@pytest.fixture(scope="module")
def page(stack, browser):
    """The page loaded, its health check done, an image chosen."""
    warm_up(stack)
    browser.get(stack.url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: d.find_element(By.ID, "health").get_attribute("data-status") == "ok")
    # Before any upload the image area is hidden (no broken-image icon), whatever the CSS says.
    assert not browser.find_element(By.ID, "image-stage").is_displayed()
    assert not browser.find_element(By.ID, "preview").is_displayed()
    browser.find_element(By.ID, "image-input").send_keys(str(PHOTO))
    wait.until(lambda d: d.find_element(By.ID, "image-stage").get_attribute("data-loaded") == "true")
    return browser


def run_and_wait(driver, timeout=60) -> str:
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "result").get_attribute("data-state") in ("done", "error"))
    return driver.find_element(By.ID, "result").get_attribute("data-state")


def test_page_shows_health_and_test_model_banner(page):
    assert page.find_element(By.ID, "health-status").text == "ok"
    assert "conformance/variants" in page.find_element(By.ID, "health-model").text
    assert page.find_element(By.ID, "test-model-banner").is_displayed()
    assert not page.find_element(By.ID, "model-field").is_displayed()  # one model: nothing to pick
    canvas = page.find_element(By.ID, "overlay")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("773", "767")


def test_caption_streams_into_the_page(page):
    page.find_element(By.ID, "tab-caption").click()
    page.find_element(By.CSS_SELECTOR, "#settings summary").click()
    max_tokens = page.find_element(By.ID, "setting-max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("40")
    page.execute_script(WATCH_OUTPUT_JS)

    assert run_and_wait(page) == "done", page.find_element(By.ID, "error").text
    text = page.find_element(By.ID, "output").get_attribute("textContent")
    assert text
    # Several SSE events, each one drawn as it came: the text grew in steps.
    assert int(page.find_element(By.ID, "result").get_attribute("data-chunks")) >= 2
    lengths = [n for n in page.execute_script("return window.__outputLengths") if n > 0]
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths) and lengths[-1] == len(text)
    assert "tokens" in page.find_element(By.ID, "metrics").text


def test_detect_draws_boxes(page, tmp_path):
    page.find_element(By.ID, "tab-detect").click()
    field = page.find_element(By.ID, "detect-object")
    field.clear()
    field.send_keys("face")

    assert run_and_wait(page) == "done", page.find_element(By.ID, "error").text
    boxes = int(page.find_element(By.ID, "overlay").get_attribute("data-boxes"))
    assert boxes > 0
    assert page.find_element(By.ID, "output").text == f"{boxes} object(s) found"
    assert page.execute_script(DRAWN_PIXELS_JS) > 0

    # One screenshot of the finished page, for a person to look at when it fails.
    shot = tmp_path / "webpage.png"
    assert page.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_point_draws_points(page):
    page.find_element(By.ID, "tab-point").click()
    field = page.find_element(By.ID, "point-object")
    field.clear()
    field.send_keys("eye")

    assert run_and_wait(page) == "done", page.find_element(By.ID, "error").text
    canvas = page.find_element(By.ID, "overlay")
    assert canvas.get_attribute("data-boxes") == "0"  # the boxes from before were cleared
    assert int(canvas.get_attribute("data-points")) > 0
    assert page.execute_script(DRAWN_PIXELS_JS) > 0


def test_stop_cancels_the_request(page, stack):
    page.find_element(By.ID, "tab-caption").click()
    max_tokens = page.find_element(By.ID, "setting-max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("2048")  # seconds of decoding unless stopped
    page.find_element(By.ID, "run").click()
    wait = WebDriverWait(page, 30)
    wait.until(lambda d: int(d.find_element(By.ID, "result").get_attribute("data-chunks")) > 0)
    page.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") == "stopped")
    assert page.find_element(By.ID, "run").is_enabled()

    request_id = page.find_element(By.ID, "result").get_attribute("data-request-id")
    assert request_id
    wait.until(lambda d: f"request_id={request_id} outcome=" in stack.log("broker"))
    line = next(li for li in stack.log("broker").splitlines() if f"request_id={request_id} outcome=" in li)
    assert "code=cancelled" in line, line
    max_tokens.clear()


# Records the body of every chat request the page sends.
WATCH_CHAT_REQUESTS_JS = """
window.__chatBodies = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (String(url).endsWith('/v1/chat/completions')) window.__chatBodies.push(JSON.parse(init.body));
  return realFetch(url, init);
};
"""


def test_chat_holds_a_short_conversation(page):
    """Two turns in the chat tab: the second request carries the first exchange, the image rides
    with the first user message, and the transcript shows all four messages."""
    page.find_element(By.ID, "tab-chat").click()
    max_tokens = page.find_element(By.ID, "setting-max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("8")
    page.execute_script(WATCH_CHAT_REQUESTS_JS)
    for turn, text in enumerate(["What is in the picture?", "And what colour is it?"], start=1):
        message = page.find_element(By.ID, "chat-message")
        message.clear()
        message.send_keys(text)
        assert run_and_wait(page) == "done", page.find_element(By.ID, "error").text
        assert page.find_element(By.ID, "chat-log").get_attribute("data-turns") == str(turn)
        assert "tokens" in page.find_element(By.ID, "metrics").text
        # The reply shows once, in the transcript, not also in the output box below the form.
        assert page.find_element(By.ID, "output").get_attribute("textContent") == ""
    log = page.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    assert [m.get_attribute("class") for m in log] == ["msg user", "msg assistant"] * 2
    assert log[2].text == "And what colour is it?" and log[1].get_attribute("textContent")
    first, second = page.execute_script("return window.__chatBodies")
    assert first["messages"][0]["content"][0]["type"] == "image_url" and first["stream"] is True
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][:1] == first["messages"]
    assert second["messages"][1]["content"] == log[1].get_attribute("textContent")
    new_chat = page.find_element(By.ID, "chat-new")
    assert new_chat.value_of_css_property("border-top-style") == "solid"  # styled like Stop, not the browser's
    new_chat.click()
    assert page.find_element(By.ID, "chat-log").get_attribute("data-turns") == "0"
    max_tokens.clear()


def test_errors_are_shown(page):
    # An empty question is refused (422) and the page says why.
    page.find_element(By.ID, "tab-query").click()
    page.find_element(By.ID, "query-question").clear()
    assert run_and_wait(page) == "error"
    assert "question" in page.find_element(By.ID, "error").text


def test_variant_field_offers_and_uses_variants(page):
    """The field suggests the server's variants; a run with one gets that variant's answer
    (the reference's, from the variants fixture: the page sends the file's own bytes)."""
    options = page.find_elements(By.CSS_SELECTOR, "#variant-list option")
    assert [o.get_attribute("value") for o in options] == ["ft-alpha@100", "ft-beta@7"]
    page.find_element(By.ID, "tab-caption").click()
    page.find_element(By.CSS_SELECTOR, "#caption-length option[value=short]").click()
    for name, value in (("temperature", "0"), ("top_p", "0"), ("max_tokens", "24")):
        field = page.find_element(By.ID, f"setting-{name}")
        field.clear()
        field.send_keys(value)
    variant = page.find_element(By.ID, "variant")
    variant.send_keys("ft-beta@7")
    try:
        assert run_and_wait(page) == "done", page.find_element(By.ID, "error").text
        assert page.find_element(By.ID, "output").get_attribute("textContent") == VARIANT_CAPTION
        variant.clear()
        assert run_and_wait(page) == "done"
        assert page.find_element(By.ID, "output").get_attribute("textContent") != VARIANT_CAPTION
    finally:
        variant.clear()
        for name in ("temperature", "top_p", "max_tokens"):
            page.find_element(By.ID, f"setting-{name}").clear()
        page.find_element(By.CSS_SELECTOR, "#caption-length option[value=normal]").click()


# tests/conformance/variants/expected.json: the photo, caption "short", variant ft-beta@7, greedy, 24 tokens
VARIANT_CAPTION = "cuivivivivPcuivivivivivivivivivivivivPcuivPcu"

def test_batch_panel_lists_jobs_with_progress_and_a_download_link(page, stack):
    import io
    import json
    import urllib.request

    from batch_cli.cli import BatchClient  # the CLI's client: upload, poll

    source = Path(tempfile.mkdtemp(prefix="batch-")) / "in.jsonl"
    line = {"skill": "query", "question": "hi", "settings": {"max_tokens": 2, "temperature": 0}}
    source.write_text(json.dumps(line) + "\n" + json.dumps({**line, "skill": "nope"}) + "\n")
    client = BatchClient(stack.url, None)
    job_id = client.submit(str(source), 1 << 20)["id"]
    client.wait(job_id, 0.3, out=io.StringIO())
    page.refresh()
    row = f'#batch-jobs tr[data-job-id="{job_id}"]'
    WebDriverWait(page, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, row + '[data-status="completed"]'))
    bar = page.find_element(By.CSS_SELECTOR, row + " progress")
    assert (bar.get_attribute("value"), bar.get_attribute("max")) == ("2", "2")
    assert "1 failed" in page.find_element(By.CSS_SELECTOR, row).text
    link = page.find_element(By.CSS_SELECTOR, row + " a.batch-download").get_attribute("href")
    with urllib.request.urlopen(link, timeout=10) as resp:
        assert len(resp.read().splitlines()) == 2
    # The last row keeps clear of the panel's bottom border.
    assert float(page.find_element(By.ID, "batch-panel").value_of_css_property("padding-bottom").rstrip("px")) > 0

    # A job that fails as a whole (not JSONL) says why under its status.
    source.write_text('{"skill": "caption", \n')
    failed_id = client.submit(str(source), 1 << 20)["id"]
    client.wait(failed_id, 0.3, out=io.StringIO())
    page.refresh()
    failed_row = f'#batch-jobs tr[data-job-id="{failed_id}"][data-status="failed"]'
    WebDriverWait(page, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, failed_row))
    assert page.find_element(By.CSS_SELECTOR, failed_row + " .batch-reason").text.startswith("validation_error: ")


# Records the JSON body of every POST the page sends.
RECORD_BODIES_JS = """
window.__bodies = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body && typeof init.body === 'string') window.__bodies.push(JSON.parse(init.body));
  return realFetch(url, init);
};
"""


def test_model_picker_sends_the_chosen_model(browser):
    """With MOONDREAM_MODELS the page offers the models and a run goes to the one picked."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import Select

    conformance = REPO / "tests/conformance"
    models = f"moondream2={conformance / 'main'},moondream3-preview={conformance / 'md3-main'}"
    with running_stack(MOONDREAM_MODELS=models, preprocess_workers=1, TORCH_THREADS=1) as two:
        warm_up(two)
        browser.get(two.url + "/")
        # the page refills the picker from /health now and then: an option read at that moment is
        # stale, so each look (and the choice) is retried until it holds
        wait = WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException])
        wait.until(lambda d: [o.text for o in Select(d.find_element(By.ID, "model")).options]
                   == ["moondream2", "moondream3-preview"])
        assert browser.find_element(By.ID, "model-field").is_displayed()

        def choose(d):
            Select(d.find_element(By.ID, "model")).select_by_value("moondream3-preview")
            return d.find_element(By.ID, "model").get_attribute("value") == "moondream3-preview"
        wait.until(choose)
        browser.execute_script(RECORD_BODIES_JS)
        browser.find_element(By.ID, "image-input").send_keys(str(PHOTO))
        wait.until(lambda d: d.find_element(By.ID, "image-stage").get_attribute("data-loaded") == "true")
        browser.find_element(By.ID, "tab-point").click()
        browser.find_element(By.ID, "point-object").clear()
        browser.find_element(By.ID, "point-object").send_keys("cat")
        state = run_and_wait(browser, 120)
        assert state == "done", browser.find_element(By.ID, "output").text
        bodies = browser.execute_script("return window.__bodies")
        assert bodies and bodies[-1]["model"] == "moondream3-preview"
