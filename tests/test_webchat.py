"""The web chat page in headless Chromium against a real `medtune-serve` process with an API key."""

import contextlib
import os
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, free_port

ARTIFACTS = ROOT / "test-artifacts"
KEY = "sk-webchat-test-key"
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900"]
# Records the bodies the page POSTs and every length the newest assistant bubble's text goes through.
INSTRUMENT = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, options) => { window.sentBodies.push(options && options.body); return realFetch(url, options); };
window.replyLengths = [];
new MutationObserver(() => {
  const bubbles = document.querySelectorAll('.msg.assistant');
  if (bubbles.length) window.replyLengths.push(bubbles[bubbles.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""
# The next reply may run to 1500 tokens (the page itself leaves max_tokens to the server).
LONG_NEXT_REPLY = """
const fetchBeforeLong = window.fetch;
window.fetch = (url, options) => {
  window.fetch = fetchBeforeLong;
  return fetchBeforeLong(url, {...options, body: JSON.stringify({...JSON.parse(options.body), max_tokens: 1500})});
};
"""
# The next reply's stream ends after its second read, without [DONE]: a connection cut part way.
CUT_NEXT_STREAM = """
const fetchBeforeCut = window.fetch;
window.fetch = async (url, options) => {
  const res = await fetchBeforeCut(url, options);
  if (!String(url).includes('/chat/completions')) return res;
  window.fetch = fetchBeforeCut;
  const reader = res.body.getReader();
  let reads = 0;
  const body = new ReadableStream({async pull(c) {
    const {value, done} = await reader.read();
    if (done || ++reads > 2) { reader.cancel(); c.close(); } else { c.enqueue(value); }
  }});
  return new Response(body, {status: res.status, headers: res.headers});
};
"""


@contextlib.contextmanager
def medtune_serve(model, *options: str):
    """A `medtune-serve --model MODEL` process (the API key KEY) on a free port; yields its URL once healthy."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "medtune.serve.cli", "--model", str(model), "--port", str(port),
                             "--device", "cpu", *options], env={**os.environ, "MEDTUNE_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, "medtune-serve exited"
                time.sleep(0.5)
        else:
            raise RuntimeError("medtune-serve did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def chrome(profile_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    with medtune_serve(tiny_model_dir, "--max-tokens", "60", "--temperature", "0", "--max-tokens-limit", "1500") as url:
        yield url


@pytest.fixture()
def browser(tmp_path):
    with chrome(tmp_path / "chrome-profile") as driver:
        yield driver


def wait(driver, condition, seconds=180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(condition)


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url, key=KEY):
    """Load the page and give it the API key it asks for."""
    driver.get(url + "/")
    wait(driver, lambda d: by_id(d, "key-form").is_displayed())
    by_id(driver, "api-key").send_keys(key)
    by_id(driver, "api-key").submit()
    wait(driver, lambda d: not by_id(d, "key-form").is_displayed())


def ask(driver, text: str, typed: bool = True):
    if typed:
        by_id(driver, "input").send_keys(text)
    else:  # long messages: set the box's value rather than type thousands of keys
        driver.execute_script("document.getElementById('input').value = arguments[0]", text)
    by_id(driver, "send").click()
    wait(driver, lambda d: css(d, ".msg.assistant") and not css(d, ".msg.assistant.pending")
         and by_id(d, "send").is_displayed() and by_id(d, "send").is_enabled())
    return css(driver, ".msg.assistant")[-1]


@pytest.mark.slow
def test_symptom_chat_asks_for_the_key_once_and_streams_an_answer(browser, server_url):
    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(server_url + "/")
    disclaimer = by_id(browser, "disclaimer")
    assert disclaimer.is_displayed()
    assert "Not a doctor" in disclaimer.text and "emergency number" in disclaimer.text
    wait(browser, lambda d: by_id(d, "key-form").is_displayed())
    by_id(browser, "api-key").send_keys("wrong-key")
    by_id(browser, "api-key").submit()
    wait(browser, lambda d: "not accepted" in by_id(d, "key-error").text)
    by_id(browser, "api-key").send_keys(KEY)
    by_id(browser, "api-key").submit()
    wait(browser, lambda d: not by_id(d, "key-form").is_displayed())
    browser.refresh()  # kept for the session: not asked again
    time.sleep(1)
    assert not by_id(browser, "key-form").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('medtune-api-key')") == KEY
    browser.execute_script(INSTRUMENT)

    reply = ask(browser, "I have had a fever and a cough for three days.")
    assert "error" not in reply.get_attribute("class") and "incomplete" not in reply.get_attribute("class")
    assert len(reply.text) > 20
    assert len(set(browser.execute_script("return window.replyLengths"))) > 2  # arrived piece by piece
    bodies = browser.execute_script("return window.sentBodies")
    assert '"stream":true' in bodies[-1]
    assert [e.text for e in css(browser, ".msg.user")] == ["I have had a fever and a cough for three days."]
    assert not css(browser, ".triage-banner") and not by_id(browser, "trim-note").is_displayed()

    ask(browser, "It gets worse at night.")  # the second request carries the whole conversation
    assert '"role":"assistant"' in browser.execute_script("return window.sentBodies")[-1]
    browser.save_screenshot(str(ARTIFACTS / "webchat-desktop.png"))

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
    send = by_id(browser, "send")
    assert send.is_displayed() and send.rect["x"] + send.rect["width"] <= 390
    assert by_id(browser, "disclaimer").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "webchat-phone.png"))

    by_id(browser, "new-chat").click()
    assert css(browser, ".msg") == []
    ask(browser, "Now a different question: my ankle is swollen.")
    assert '"role":"assistant"' not in browser.execute_script("return window.sentBodies")[-1]


@pytest.mark.slow
def test_emergency_message_shows_a_banner_above_the_reply(browser, server_url):
    open_page(browser, server_url)
    reply = ask(browser, "Crushing chest pain spreading to my left arm, and I'm sweating")
    (banner,) = css(browser, ".triage-banner.emergency")
    assert banner.is_displayed() and banner.get_attribute("role") == "alert"
    assert "Possible emergency" in banner.text and "emergency number" in banner.text and "chest pain" in banner.text
    assert banner.rect["y"] + banner.rect["height"] <= reply.rect["y"]  # above the reply
    assert browser.execute_script("return arguments[0].nextElementSibling === arguments[1]", banner, reply)
    browser.save_screenshot(str(ARTIFACTS / "webchat-emergency.png"))
    ask(browser, "Thanks. Also, what helps with a blocked nose?")
    assert len(css(browser, ".triage-banner")) == 1  # only the emergency message got one


@pytest.mark.slow
def test_stop_keeps_the_partial_reply_marked_and_stops_the_generation(browser, server_url):
    open_page(browser, server_url)
    before = httpx.get(server_url + "/health").json()["requests"]
    browser.execute_script(LONG_NEXT_REPLY)
    by_id(browser, "input").send_keys("My knee is swollen after running.")
    by_id(browser, "send").click()
    wait(browser, lambda d: len(css(d, ".msg.assistant")[-1].text) > 0, 60)
    stop = by_id(browser, "stop")
    assert stop.is_displayed() and not by_id(browser, "send").is_displayed()
    stop.click()
    wait(browser, lambda d: by_id(d, "send").is_displayed(), 30)
    bubble = css(browser, ".msg.assistant")[-1]
    assert "incomplete" in bubble.get_attribute("class") and "Stopped." in bubble.text
    text = bubble.text
    wait(browser, lambda d: httpx.get(server_url + "/health").json()["running"] == 0, 60)
    after = httpx.get(server_url + "/health").json()["requests"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["finished"] == before["finished"]
    assert bubble.text == text  # nothing more arrived
    browser.execute_script(INSTRUMENT)
    ask(browser, "Should I put ice on it?")  # the stopped reply stays in the conversation
    assert '"role":"assistant"' in browser.execute_script("return window.sentBodies")[-1]


@pytest.mark.slow
def test_a_cut_stream_is_marked_incomplete(browser, server_url):
    open_page(browser, server_url)
    browser.execute_script(CUT_NEXT_STREAM)
    reply = ask(browser, "I have a headache.")
    assert "incomplete" in reply.get_attribute("class") and "Reply incomplete" in reply.text


@pytest.mark.slow
def test_long_conversations_are_trimmed_oldest_first_with_a_note(browser, server_url):
    open_page(browser, server_url)
    browser.execute_script(INSTRUMENT)
    first = "FIRST " + "my stomach hurts after meals and I feel bloated " * 60  # ~3000 characters
    ask(browser, first, typed=False)
    assert not by_id(browser, "trim-note").is_displayed()
    ask(browser, "SECOND " + "the pain is worse in the evening and at night " * 60, typed=False)
    note = by_id(browser, "trim-note")
    assert note.is_displayed() and "2 oldest messages are no longer sent" in note.text
    assert ["trimmed" in e.get_attribute("class") for e in css(browser, ".msg")][:2] == [True, True]
    last = browser.execute_script("return window.sentBodies")[-1]
    assert "FIRST" not in last and "SECOND" in last
    reply = css(browser, ".msg.assistant")[-1]
    assert "error" not in reply.get_attribute("class")


@pytest.mark.slow
def test_replies_are_rendered_as_safe_markdown(browser, server_url):
    browser.get(server_url + "/")
    html = browser.execute_script("""
        const el = document.createElement('div');
        el.append(renderMarkdown(arguments[0]));
        document.body.append(el);
        return el.innerHTML;""",
        "**Rest** and *fluids* <img src=x onerror=\"window.pwned=1\">\n\n- one\n- `two<b>`\n\n"
        "3. three\n4. four\n\n```\n<script>window.pwned=2</script>\n```")
    assert "<strong>Rest</strong>" in html and "<em>fluids</em>" in html
    assert "&lt;img" in html and "<img" not in html
    assert "<ul><li>one</li><li><code>two&lt;b&gt;</code></li></ul>" in html
    assert '<ol start="3"><li>three</li><li>four</li></ol>' in html
    assert "<pre><code>&lt;script&gt;" in html
    time.sleep(0.5)
    assert browser.execute_script("return window.pwned") is None
    sources = "".join((ROOT / "medtune/serve/static" / f).read_text() for f in ("chat.js", "markdown.js", "api.js"))
    assert "innerHTML" not in sources and "insertAdjacentHTML" not in sources
