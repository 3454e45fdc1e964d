"""The chat page at ``/`` in a real headless browser (Debian chromium driven by Playwright)."""

from __future__ import annotations

import shutil

import httpx
import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_is_self_contained(server):
    page = httpx.get(server.url + "/").text
    assert "<script>" in page and "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: works offline


def test_typing_a_message_streams_a_reply(server):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed; run `make install` (it installs Debian's chromium).")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert page.inner_text("#model") == "tiny"
            # what kind of model talks, a hint that a base model will not converse, a welcome on the empty page
            assert page.inner_text("#kind") == "base model (pretrained only)"
            assert "not trained to answer" in page.inner_text("#hint")
            assert page.is_visible("#welcome") and "Start a conversation with tiny" in page.inner_text("#welcome")
            page.fill("#max_tokens", "20")
            page.fill("#temperature", "0")
            page.fill("#input", "To be, or not to be")
            page.keyboard.press("Enter")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20_000)
            assert page.inner_text(".msg.user") == "To be, or not to be"
            assert page.locator("#welcome").count() == 0  # gone once the conversation started
            reply = page.inner_text(".msg.assistant")
            assert len(reply) > 0
            # a second turn sends the history; the reply is the same text the API gives for that history
            page.fill("#input", "again")
            page.click("#send")
            page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-done='1']", timeout=20_000)
            assert page.locator(".msg").count() == 4
            page.click("#reset")  # a new chat: empty again, welcome back
            assert page.locator(".msg").count() == 0 and page.is_visible("#welcome")
        finally:
            browser.close()
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "To be, or not to be"}],
                                  max_tokens=20, temperature=0)
    assert r.choices[0].message.content.strip() == reply.strip()
