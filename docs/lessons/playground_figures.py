"""Regenerate the screenshots of lesson 22 (the decoding playground). From the repository root:

    .venv/bin/python docs/lessons/playground_figures.py [--model smollm2]

It serves the playground for the model on 127.0.0.1 (a free port, in a thread), drives
Debian's chromium with Playwright through the page as the lesson does, and writes
docs/lessons/figures/22-*.png. Needs the dev extra (playwright) and chromium
(``apt-get install chromium``; ``make test`` installs it).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from fastapi import FastAPI
from playwright.sync_api import sync_playwright

import lmlab
from lmlab.serve.playground import mount_playground, serve_in_thread

FIGURES = Path(__file__).resolve().parent / "figures"
PROMPT = "The capital of France is"
WAIT_MS = 120_000


def shoot(page, selector: str, name: str) -> None:
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / name
    page.locator(selector).screenshot(path=str(path))
    print("wrote", path, f"{path.stat().st_size // 1024} KB")


def sliders(page, temperature, top_k, top_p) -> None:
    page.fill("#temperature", str(temperature))
    page.fill("#top-k", str(top_k))
    page.fill("#top-p", str(top_p))
    page.wait_for_selector(
        f"#bars[data-ready='1'][data-temperature='{temperature}']"
        f"[data-top-k='{top_k}'][data-top-p='{top_p}']"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium on PATH: apt-get install chromium")
    start = time.monotonic()
    app = FastAPI()
    mount_playground(app, lmlab.load(args.model))
    with serve_in_thread(app) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900}, device_scale_factor=1)
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{base}/playground/")
        page.fill("#prompt", PROMPT)
        page.fill("#top-n", "12")
        sliders(page, 1, 0, 0.9)
        shoot(page, "#left", "22-next-token.png")
        sliders(page, 0.5, 0, 0.9)
        shoot(page, "#left", "22-cold.png")
        sliders(page, 1.5, 0, 0.9)
        shoot(page, "#left", "22-hot.png")

        sliders(page, 1, 0, 0.9)
        page.fill("#tree-samples", "10")
        page.fill("#tree-depth", "4")
        page.click("#tree-run")
        page.wait_for_selector("#tree .node[data-count]")
        shoot(page, "#right", "22-tree.png")

        page.click("#tabs [data-tab=beams]")
        page.fill("#beams-n", "3")
        page.fill("#beams-steps", "4")
        page.click("#beams-run")
        page.wait_for_selector("#beams .best")
        shoot(page, "#right", "22-beams.png")

        page.click("#tabs [data-tab=chat]")
        sliders(page, 0, 0, 1)
        page.fill("#chat-input", "What is the capital of France?")
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant")
        shoot(page, "#right", "22-chat.png")

        page.click("#tabs [data-tab=attention]")
        page.select_option("#att-layer", "3")
        page.click("#att-run")
        page.wait_for_selector("#att-tokens .tok.query")
        shoot(page, "#right", "22-attention.png")
        browser.close()
    print(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
