"""The web page in headless Chromium: type, click Translate, see the translation and the heatmap.

Needs the Debian package `chromium` (/usr/bin/chromium) and Playwright for Python (`pip install
playwright`, part of the `dev` extra). Playwright's own browser download is never used; the test
skips when either piece is missing. Set AIAYN_SCREENSHOT=path.png to keep a screenshot.
"""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving needs the optional extra aiayn[serve]")
httpx = pytest.importorskip("httpx", reason="the browser test needs httpx")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed"
)

from aiayn.serve.app import create_app
from aiayn.serve.http import background_server

CHROMIUM = os.environ.get("AIAYN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SENTENCE = "Zwei Hunde spielen im Schnee."


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (Debian: apt-get install chromium)")
    from aiayn.decoding.translator import Translator

    with background_server(create_app(Translator.load(tiny_model_dir))) as url:
        yield url


@pytest.mark.slow
def test_page_translates_and_draws_the_cross_attention_heatmap(
    base_url: str, tmp_path: Path
) -> None:
    requested: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(base_url + "/")
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('parameters')"
            )
            assert "de \u2192 en" in page.text_content("#model")

            page.fill("#source", SENTENCE)
            page.click("#translate")
            page.wait_for_selector("body[data-ready=true]", timeout=60_000)
            translation = page.text_content("#translation")

            with httpx.Client(base_url=base_url, timeout=60) as client:
                expected = client.post("/translate", json={"text": SENTENCE}).json()[
                    "translations"
                ][0]
                weights = client.post(
                    "/attention", json={"text": SENTENCE, "target": translation}
                ).json()
            assert translation == expected
            rows, cols = len(weights["target_tokens"]), len(weights["source_tokens"])
            assert page.locator("#heatmap td.cell").count() == rows * cols
            assert page.locator("#heatmap tbody th").all_text_contents() == weights["target_tokens"]
            assert (
                page.locator("#heatmap thead th").all_text_contents()[1:]
                == weights["source_tokens"]
            )

            # Layer and head selectors: every decoder layer, every head plus the mean.
            n_layers, n_heads = len(weights["cross"]), len(weights["cross"][0])
            assert page.locator("#layer option").count() == n_layers
            assert page.locator("#head option").count() == n_heads + 1
            page.select_option("#layer", label="layer 1")
            page.select_option("#head", label="head 2")  # labels count from 1, indices from 0
            first_row = page.locator("#heatmap tbody tr").first.locator("td.cell")
            titles = first_row.evaluate_all("cells => cells.map(c => c.title)")
            shown = [float(title.rsplit(": ", 1)[1]) for title in titles]
            assert shown == pytest.approx(weights["cross"][0][1][0], abs=1e-4)

            # Encoder self-attention is source x source.
            page.select_option("#kind", value="encoder_self")
            assert page.locator("#heatmap td.cell").count() == cols * cols

            page.select_option("#kind", value="cross")

            # The step-by-step walk of the same pair: its selectors fetch each layer; the softmax
            # step of a head shows that head's attention map.
            assert page.locator("#walk .step").count() > 10
            page.select_option("#explain-kind", "cross")
            page.select_option("#explain-layer", "1")
            page.select_option("#explain-head", "2")
            page.wait_for_selector("#explain-steps[data-kind=cross][data-layer='1'][data-head='2']")
            cells = page.locator("#walk .step").filter(has_text="10. softmax").locator("td")
            assert cells.count() == rows * cols
            titles = cells.evaluate_all("cells => cells.map(c => c.title)")
            walked = [float(title.rsplit(": ", 1)[1]) for title in titles[:cols]]
            assert walked == pytest.approx(weights["cross"][1][2][0], abs=2e-4)
            assert page.locator("#explain-next tr").count() == rows
            screenshot = page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if os.environ.get("AIAYN_SCREENSHOT"):
                Path(os.environ["AIAYN_SCREENSHOT"]).write_bytes(screenshot)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000
    outside = [url for url in requested if not url.startswith(base_url)]
    assert not outside, f"the page loaded files from outside the server: {outside}"
