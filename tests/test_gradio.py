"""The Gradio pages: gradio_client against both, soft share failure, and a real browser."""

import os
import shutil

import httpx
import pytest


@pytest.fixture(scope="module")
def urls(server):
    return server.launch(share_chat=False, share_inst=False)


def test_pages_are_mounted(server, urls):
    assert urls == {"chat": f"{server.url}/gradio_chat/", "inst": f"{server.url}/gradio_instruct/"}
    for url in urls.values():
        assert httpx.get(url, timeout=30).status_code == 200


def test_gradio_client_instruct(urls):
    from gradio_client import Client

    client = Client(urls["inst"], verbose=False)
    out = client.predict("write a loop", "", 0.0, 0.9, 12, api_name="/instruct")
    assert isinstance(out, str) and out
    with pytest.raises(Exception, match="instruction"):
        client.predict("   ", "", 0.0, 0.9, 12, api_name="/instruct")


def test_gradio_client_chat(urls):
    from gradio_client import Client

    client = Client(urls["chat"], verbose=False)
    history = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]  # Gradio 6 message parts
    out = client.predict(history, "be brief", 0.0, 0.9, 10, api_name="/chat")
    assert [m["role"] for m in out] == ["user", "assistant"]
    from easympt.serve.gradio_ui import _text
    assert _text(out[0]["content"]) == "hello" and _text(out[1]["content"])


def test_share_without_internet_fails_softly(server, urls, caplog):
    got = server.launch(share_chat=True, share_inst=True)
    assert got == urls  # the local pages, still working
    assert httpx.get(got["chat"], timeout=30).status_code == 200


needs_browser = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                   reason="Debian chromium + chromium-driver not installed (.ci/run installs them)")


def _browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,1300", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _keep_screenshot(driver, path, env: str) -> None:
    """Saved with the test's files; copied where $`env` says (to look at it)."""
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get(env):
        shutil.copy(path, os.environ[env])


@needs_browser
def test_browser_home_page_links_the_gradio_pages(server, urls, tmp_path):
    """The page at / in headless Chromium: the model named, the Gradio pages linked (they are mounted
    here), and following the chat link opens the chat page; a screenshot is kept with the test."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        driver.get(server.url + "/")
        assert driver.title == f"easympt · {server.config.model_name}"
        assert driver.find_element(By.TAG_NAME, "h1").text == server.config.model_name
        assert driver.find_element(By.ID, "curl").text.startswith(f"curl {server.url}/v1/chat/completions")
        _keep_screenshot(driver, tmp_path / "home.png", "EASYMPT_KEEP_HOME_SCREENSHOT")
        driver.find_element(By.LINK_TEXT, "Chat").click()
        WebDriverWait(driver, 90).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input textarea")))
        assert driver.current_url == urls["chat"]
    finally:
        driver.quit()


@needs_browser
def test_browser_chat(urls, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        driver.get(urls["chat"])
        wait = WebDriverWait(driver, 90)
        box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#chat-input textarea")))
        box.send_keys("hello from a browser")
        box.send_keys(Keys.ENTER)

        def bot_replied(d):
            bots = d.find_elements(By.CSS_SELECTOR, "#chatbot .bot, #chatbot [data-testid='bot']")
            return bots and any(b.text.strip() for b in bots)
        wait.until(bot_replied)
        page = driver.find_element(By.CSS_SELECTOR, "#chatbot").text
        assert "hello from a browser" in page
        _keep_screenshot(driver, tmp_path / "chat.png", "EASYMPT_KEEP_SCREENSHOT")
    finally:
        driver.quit()
