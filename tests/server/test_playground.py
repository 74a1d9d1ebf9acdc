"""The playground page in a real headless browser (Debian's chromium through chromedriver and selenium):
the rendered answers of each method equal the API's, mentions carry their verdicts, tokens their
explanations; a screenshot goes to docs/playground.png when VLM_STEER_SCREENSHOT is set."""

import os
import shutil

import httpx
import pytest

from tests.conftest import ENGINE

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900"):
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def test_playground_answers_equal_the_api(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live.url + "/playground")
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    examples = httpx.get(live.url + "/playground/examples").json()
    assert len(examples["images"]) == 6 and examples["prompt"]
    methods = ["none", "fisao"] if ENGINE == "vllm" else ["none", "tita", "vcd"]
    for box in browser.find_elements(By.CSS_SELECTOR, "#methods input"):
        if box.is_selected() != (box.get_attribute("value") in methods):
            box.click()
    browser.find_elements(By.CSS_SELECTOR, "#examples img")[1].click()
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "answers").get_attribute("data-done") == "1")
    image = examples["images"][1]["url"]
    for method in methods:
        card = browser.find_element(By.CSS_SELECTOR, f'.answer[data-method="{method}"]')
        steering = {"method": method, "explain": True}
        api = httpx.post(live.url + "/v1/chat/completions", timeout=60, json={
            "model": "shapeworld", "temperature": 0, "max_tokens": 40, "grounding": True, "steering": steering,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": examples["prompt"]}]}]}).json()
        choice = api["choices"][0]
        assert card.get_attribute("data-content") == choice["message"]["content"]
        assert card.find_element(By.CLASS_NAME, "text").text == choice["message"]["content"]
        spans = card.find_elements(By.CSS_SELECTOR, ".text .mention")
        assert [(s.text, s.get_attribute("class").split()[-1]) for s in spans] == [
            (m["text"], m["verdict"]) for m in choice["grounding"]["mentions"]]
        tokens = card.find_elements(By.CSS_SELECTOR, ".tokens span")
        assert len(tokens) == len(choice["explain"]) > 0
        assert all("contributions" in t.get_attribute("title") for t in tokens)
        assert f"arm {api['steering']['arm']}" in card.text
    if os.environ.get("VLM_STEER_SCREENSHOT"):
        browser.save_screenshot(os.environ["VLM_STEER_SCREENSHOT"])


def test_playground_asks_for_the_key_when_keys_are_set(steering_engine, browser):
    """With --api-keys the page asks for a key (a wrong one is refused on the page), then loads and answers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.server.conftest import start

    with start(steering_engine, api_keys=["sekret"]) as srv:
        browser.get(srv.url + "/playground")
        browser.execute_script("sessionStorage.clear()")
        browser.get(srv.url + "/playground")
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "keybox").is_displayed())
        for typed, ready in (("wrong", None), ("sekret", "1")):
            field = browser.find_element(By.ID, "apikey")
            field.clear()
            field.send_keys(typed)
            browser.find_element(By.ID, "usekey").click()
            if ready is None:
                WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "keyerror").text == "that key was refused")
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert not browser.find_element(By.ID, "keybox").is_displayed()
        browser.find_element(By.ID, "ask").click()
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "answers").get_attribute("data-done") == "1")
        assert not browser.find_elements(By.CSS_SELECTOR, ".answer .error")
        assert all(c.get_attribute("data-content") for c in browser.find_elements(By.CSS_SELECTOR, ".answer"))
