"""The web chat page in headless Chromium against a real `medtune-serve` process."""

import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, free_port

ARTIFACTS = ROOT / "test-artifacts"
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


@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    port = free_port()
    # 200 greedy tokens take long enough on CPU for the page to receive many separate chunks.
    proc = subprocess.Popen([sys.executable, "-m", "medtune.serve.app", "--model", str(tiny_model_dir),
                             "--port", str(port), "--device", "cpu", "--max-tokens", "200", "--temperature", "0"])
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


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def ask(driver, text: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 180).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        and not d.find_elements(By.CSS_SELECTOR, ".msg.assistant.pending")
        and d.find_element(By.ID, "send").is_enabled())
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


@pytest.mark.slow
def test_symptom_chat_streams_an_answer(browser, server_url):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(server_url + "/")
    disclaimer = browser.find_element(By.ID, "disclaimer")
    assert disclaimer.is_displayed()
    assert "Not a doctor" in disclaimer.text and "emergency number" in disclaimer.text
    browser.execute_script(INSTRUMENT)

    reply = ask(browser, "I have had a fever and a cough for three days.")
    assert "error" not in reply.get_attribute("class")
    assert len(reply.text) > 20
    lengths = browser.execute_script("return window.replyLengths")
    assert len(set(lengths)) > 2 and lengths == sorted(lengths)  # grew piece by piece, never shrank
    bodies = browser.execute_script("return window.sentBodies")
    assert '"stream":true' in bodies[0]
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == [
        "I have had a fever and a cough for three days."]

    ask(browser, "It gets worse at night.")  # the second request carries the whole conversation
    assert '"role":"assistant"' in browser.execute_script("return window.sentBodies")[1]
    browser.save_screenshot(str(ARTIFACTS / "webchat-desktop.png"))

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
    send = browser.find_element(By.ID, "send")
    assert send.is_displayed() and send.rect["x"] + send.rect["width"] <= 390
    assert disclaimer.is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "webchat-phone.png"))

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    reply = ask(browser, "Now a different question: my ankle is swollen.")
    assert '"role":"assistant"' not in browser.execute_script("return window.sentBodies")[2]
