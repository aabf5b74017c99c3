"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright for Python): a system message and
a question typed, the answer seen streaming in, stopped, and a new chat. Set GPTSTACK_SCREENSHOT=PATH to keep a
screenshot of the page."""
import json
import os
import shutil
import time
import urllib.request

import pytest

from conftest import serving, slowed
from gptstack.checkpoint import find_tokenizer, load_model
from gptstack.serve.app import create_app
from gptstack.tokenizer import Tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MISSING = "" if os.path.exists(CHROMIUM) else "Debian's chromium is not installed (apt-get install chromium)"
pytestmark = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"), reason=MISSING)  # CI installs it (.ci/run)


def test_the_page_streams_an_answer_and_stops_it(random_model_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    model, tok = load_model(random_model_dir), Tokenizer.load(find_tokenizer(random_model_dir))
    with serving(create_app(slowed(model, 0.1), tok, "tiny", max_batch=4)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        page.goto(url + "/")
        expect(page.locator("#model")).to_have_text("tiny")
        page.fill("#system", "You are terse.")
        page.fill("#max-tokens", "30")
        page.fill("#prompt", "What is 1 plus 2?")
        page.press("#prompt", "Enter")
        expect(page.locator(".message.user")).to_have_text("What is 1 plus 2?")
        answer = page.locator(".message.assistant")
        seen = set()
        deadline = time.time() + 20
        while len(seen) < 3 and time.time() < deadline:  # the answer grows while we watch: it streams
            text = answer.inner_text()
            if text:
                seen.add(text)
            time.sleep(0.05)
        assert len(seen) >= 3 and all(a.startswith(b) or b.startswith(a) for a in seen for b in seen)
        expect(page.locator("#stop")).to_be_enabled()
        page.click("#stop")
        expect(answer.locator(".note")).to_have_text("(stopped)")
        expect(page.locator("#send")).to_be_enabled()
        page.screenshot(path=os.environ.get("GPTSTACK_SCREENSHOT") or str(tmp_path / "page.png"))
        deadline = time.time() + 10
        while json.load(urllib.request.urlopen(url + "/health"))["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert json.load(urllib.request.urlopen(url + "/health"))["running"] == 0  # the stop freed the slot
        page.click("#new-chat")
        expect(page.locator(".message")).to_have_count(0)
        browser.close()
