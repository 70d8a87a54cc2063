"""The playground (GET /) in a real browser: headless Chromium driven by Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``;
or $LMLAB_CHROMIUM / $LMLAB_CHROMEDRIVER) and the ``selenium`` package (the dev extra). Without
them these tests skip — except under CI (``$CI`` set), where they fail: CI installs them (.ci/run).

The texts are checked against ``Model.generate`` / ``lmlab.pipeline`` on the same checkpoint, as
in test_openai_api.py. The engine's forward step is slowed (``slow_engine``) so that a reply
arrives token by token and a long one is still running when Stop is pressed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # openai 3 ships httpx2 (the same API)
    import httpx2 as httpx
import pytest
from conftest import running

import lmlab

WAIT = 60  # seconds: the longest any one wait may take (a busy CI machine)
KEY = "sekret"
HOW = ("no browser for the playground tests: apt-get install chromium chromium-driver, and pip install selenium "
       "(lmlab's dev extra); or set LMLAB_CHROMIUM and LMLAB_CHROMEDRIVER")  # fmt: skip


def _find(env: str, names: tuple[str, ...]) -> str | None:
    given = os.environ.get(env)
    if given:
        return given if Path(given).is_file() else None
    return next((p for p in map(shutil.which, names) if p), None)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


try:
    import selenium
except ImportError:
    selenium = None
CHROMIUM = _find("LMLAB_CHROMIUM", ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
CHROMEDRIVER = _find("LMLAB_CHROMEDRIVER", ("chromedriver",))
MISSING = ", ".join(n for n, v in (("selenium", selenium), ("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
                    if v is None)  # fmt: skip
if MISSING and not _ci():  # one skip for the module; under CI the fixture fails each test instead
    pytest.skip(f"{HOW} (missing: {MISSING})", allow_module_level=True)

# the chat template's markers (<|im_start|>...) are not in the char-level vocabulary: they become <unk>
pytestmark = pytest.mark.filterwarnings("ignore:the text contains characters the tokenizer never saw")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium."""
    if MISSING:
        pytest.fail(f"{HOW} (missing: {MISSING}); CI runs these tests, it never skips them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--window-size=1280,1000", "--lang=en-US"):  # fmt: skip
        opts.add_argument(arg)
    # the driver given explicitly: Selenium Manager (which would download one) never runs
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(lm_dir):
    with running(lm_dir, model_id="tiny-lm", api_key=KEY) as url:
        yield url


@pytest.fixture(scope="module")
def model(lm_dir):
    return lmlab.load(lm_dir)


@pytest.fixture
def slow_engine(monkeypatch):
    """Each decoding step of the (in-process) server's engine takes ≥ 30 ms."""
    from lmlab.serve.engine import Engine

    step = Engine._step

    def slow(self, tokens):
        time.sleep(0.03)
        return step(self, tokens)

    monkeypatch.setattr(Engine, "_step", slow)


# ---------------------------------------------------------------------- helpers
def wait_for(driver, what: str, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.05)
    return wait.until(lambda d: condition(), message=f"waiting for {what}")


def by_id(driver, name: str):
    return driver.find_element("id", name)


def text_of(driver, selector: str) -> str:
    """The exact text (textContent: whitespace kept) of the last element matching ``selector``."""
    return driver.execute_script("const e = document.querySelectorAll(arguments[0]); "
                                 "return e.length ? e[e.length - 1].textContent : null;", selector)  # fmt: skip


def fill(driver, name: str, value: str) -> None:
    el = by_id(driver, name)
    el.clear()
    el.send_keys(value)


def open_page(driver, url: str, key: str | None = KEY, model_id: str = "tiny-lm") -> None:
    """Load the playground; type ``key`` (if any) and wait until the model line starts with ``model_id``."""
    driver.get(url + "/")
    if key is not None and by_id(driver, "api-key").get_attribute("value") != key:
        fill(driver, "api-key", key)
        driver.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
    line = by_id(driver, "model-id")
    wait_for(driver, f"the model id {model_id!r}", lambda: line.text.startswith(model_id))


def watch(driver, selector: str) -> None:
    """Record each text the last ``selector`` element shows as the page changes (window.__seen)."""
    driver.execute_script("""
        window.__seen = [];
        new MutationObserver(() => {
            const e = document.querySelectorAll(arguments[0]);
            if (e.length) window.__seen.push(e[e.length - 1].textContent);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    """, selector)  # fmt: skip


def chatml(system: str | None, user: str) -> str:
    """The prompt the server renders (lmlab's default template, ChatML); the page sends no empty system."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------- tests
def test_chat_streams_the_reply_of_generate(browser, server, model, slow_engine):
    browser.get(server + "/")
    browser.execute_script("localStorage.clear()")
    # nothing typed yet: the 401's message is shown
    open_page(browser, server, key=None, model_id="(no API key was given")
    assert "Authorization: Bearer KEY" in by_id(browser, "model-id").text
    open_page(browser, server)
    assert browser.execute_script("return localStorage.getItem('lmlab-api-key')") == KEY

    system, user, n = "Whither goest thou.", "学而时习之，不亦说乎？", 24
    want = model.generate(chatml(system, user), max_new_tokens=n, temperature=0, stop=["<|im_end|>"])
    assert len(want) >= 4, want
    fill(browser, "opt-temperature", "0")
    fill(browser, "opt-max-tokens", str(n))
    fill(browser, "chat-system", system)
    fill(browser, "chat-input", user)
    watch(browser, "#chat-log .msg.assistant")
    by_id(browser, "chat-send").click()
    wait_for(browser, "the reply to finish", lambda: "done" in by_id(browser, "chat-status").text)

    assert text_of(browser, "#chat-log .msg.user") == user  # UTF-8 both ways
    assert text_of(browser, "#chat-log .msg.assistant") == want
    seen = [s for s in browser.execute_script("return window.__seen") if s]
    assert len(set(seen)) >= 3, seen  # streamed: prefix after prefix
    assert all(want.startswith(s) for s in seen), seen
    assert by_id(browser, "chat-send").is_enabled() and not by_id(browser, "chat-stop").is_enabled()


def test_completion_with_token_probabilities(browser, server, model):
    open_page(browser, server)
    by_id(browser, "tab-completion").click()
    assert by_id(browser, "completion-prompt").is_displayed()
    assert not by_id(browser, "chat-input").is_displayed()
    prompt, n = "To be, or not", 8
    want = model.generate(prompt, max_new_tokens=n, temperature=0)
    fill(browser, "opt-temperature", "0")
    fill(browser, "opt-max-tokens", str(n))
    fill(browser, "completion-prompt", prompt)
    if not by_id(browser, "show-probs").is_selected():
        by_id(browser, "show-probs").click()
    by_id(browser, "completion-run").click()
    wait_for(browser, "the completion to finish", lambda: "done" in by_id(browser, "completion-status").text)

    assert text_of(browser, "#completion-text") == want
    spans = browser.find_elements("css selector", "#completion-text span.tok")
    titles = [s.get_attribute("title") for s in spans]
    assert spans and "".join(s.get_attribute("textContent") for s in spans) == want
    assert all("logprob -" in t or "logprob 0" in t for t in titles), titles
    assert all(t.count("\n  ") >= 5 for t in titles), titles  # the 5 best alternatives


def test_stop_aborts_a_long_generation(browser, server, model, slow_engine):
    open_page(browser, server)
    by_id(browser, "tab-chat").click()
    if by_id(browser, "show-probs").is_selected():
        by_id(browser, "show-probs").click()
    n = 150
    assert len(model.generate(chatml(None, "a"), max_new_tokens=n, temperature=0, stop=["<|im_end|>"])) > 100
    fill(browser, "opt-temperature", "0")
    fill(browser, "opt-max-tokens", str(n))
    fill(browser, "chat-system", "")
    fill(browser, "chat-input", "a")
    by_id(browser, "chat-send").click()
    wait_for(browser, "a few tokens", lambda: len(text_of(browser, "#chat-log .msg.assistant") or "") >= 3)
    by_id(browser, "chat-stop").click()
    wait_for(browser, "the page to stop", lambda: "stopped" in by_id(browser, "chat-status").text, timeout=10)

    shown = text_of(browser, "#chat-log .msg.assistant")
    bubble = browser.find_elements("css selector", "#chat-log .msg.assistant")[-1]
    assert "stopped" in bubble.get_attribute("class")
    assert by_id(browser, "chat-send").is_enabled() and not by_id(browser, "chat-stop").is_enabled()
    time.sleep(0.5)
    assert text_of(browser, "#chat-log .msg.assistant") == shown and len(shown) < 100  # no more tokens arrive
    assert httpx.get(server + "/health", timeout=10).status_code == 200
    deadline = time.monotonic() + 10  # the server dropped the request: no row left in the batch
    while "lmlab_running 0" not in httpx.get(server + "/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the engine still runs the stopped request"
        time.sleep(0.05)


def test_translate_form_and_a_wrong_kind_error(browser, tmp_path_factory):
    from helpers import tiny_seq2seq_checkpoint

    folder = tiny_seq2seq_checkpoint(tmp_path_factory.mktemp("playground") / "mt")
    text = "To be, or not to be 学而时习之"
    want = lmlab.pipeline("translation", folder)(text)[0]["translation_text"]
    with running(folder, model_id="tiny-mt") as url:
        open_page(browser, url, key=None, model_id="tiny-mt")
        by_id(browser, "tab-translate").click()
        fill(browser, "translate-input", text)
        by_id(browser, "translate-run").click()
        wait_for(browser, "the translation", lambda: "done" in by_id(browser, "translate-status").text)
        assert text_of(browser, "#translate-output .result") == want
        assert len(browser.find_elements("css selector", "#translate-output .result")) == 1

        by_id(browser, "tab-chat").click()  # an encoder-decoder answers no chat: the server's 400 is shown
        fill(browser, "chat-input", "hi")
        by_id(browser, "chat-send").click()
        wait_for(browser, "the error", lambda: "error" in by_id(browser, "chat-status").text)
        assert "is an encoder-decoder" in text_of(browser, "#chat-log .msg.assistant.error")


def test_inspect_tab_shows_surprisal_and_the_attention_grid(browser, server, model):
    text = "the sea and the sky"
    lp = model.token_logprobs(text)
    open_page(browser, server)
    by_id(browser, "tab-inspect").click()
    fill(browser, "inspect-input", text)
    by_id(browser, "inspect-run").click()
    wait_for(browser, "the inspection", lambda: "done" in by_id(browser, "inspect-status").text)
    spans = browser.find_elements("css selector", "#inspect-tokens .tok")
    assert [s.get_attribute("textContent") for s in spans] == model.tokens(text)
    titles = [s.get_attribute("title") for s in spans]
    assert "first token" in titles[0]
    assert all(f"{float(v):.4f}" in t for v, t in zip(lp, titles[1:]))  # each token's log-probability on hover
    layers = browser.find_elements("css selector", "#inspect-layer option")
    assert len(layers) == model.attention(text).shape[0]
    size = browser.execute_script("const c = document.getElementById('inspect-canvas'); return [c.width, c.height];")
    assert size[0] > 0 and size[0] == size[1]
    logs = browser.get_log("browser") if hasattr(browser, "get_log") else []
    assert [e for e in logs if e["level"] == "SEVERE" and e.get("source") != "network"] == []  # no script errors
