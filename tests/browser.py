"""Open a report in headless Chromium (through Playwright, which downloads no browser here) and read what loaded."""

from dataclasses import dataclass
from pathlib import Path

# Flags the machine needs: root (no sandbox), no GPU, and no background connections (the network is closed).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@dataclass
class Rendered:
    images: list[dict]  # alt, naturalWidth, naturalHeight of every <img>
    captions: list[str]  # every figcaption, in page order
    requests: list[str]  # every URL the page asked for
    text: str  # the page's visible text


def render(browser: Path, page_path: Path, screenshot: Path) -> Rendered:
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(browser), args=ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
            images = page.evaluate("Array.from(document.images).map(i => ({alt: i.alt, width: i.naturalWidth, "
                                   "height: i.naturalHeight}))")
            captions = page.evaluate("Array.from(document.querySelectorAll('figcaption')).map(c => c.innerText)")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            chromium.close()
    return Rendered(images, captions, requests, text)
