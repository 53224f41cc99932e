"""The playground page at ``/`` in a real headless Chromium (Playwright, with Debian's ``chromium``): it lists the base
and the adapters, and streams a chat answer from the chosen adapter — the same text the API gives."""

from __future__ import annotations

import shutil

import httpx
import pytest

sync_api = pytest.importorskip("playwright.sync_api")


def test_page_lists_adapters_and_streams_a_chat(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for this test (.ci/run installs it)"
    want = httpx.post(f"{server}/v1/chat/completions", json={
        "model": "b", "messages": [{"role": "user", "content": "Tell me a story"}],
        "temperature": 0}, timeout=120).json()["choices"][0]["message"]["content"]
    assert want
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_function("document.querySelectorAll('#model option').length >= 3")
            options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
            assert {"smollm2-135m", "a", "b"} <= set(options)
            page.select_option("#model", "b")
            page.fill("#prompt", "Tell me a story")
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=120_000)
            assert page.text_content(".assistant") == want
        finally:
            browser.close()
