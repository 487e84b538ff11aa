"""The playground page in a real headless browser: Playwright driving Debian's chromium
(``/usr/bin/chromium``; Playwright's own browser downloads are not possible here). The
server runs on 127.0.0.1 on a free port, in a thread; every wait is bounded.

What is drawn is read back from the DOM (each bar carries its numbers in data-*
attributes) and compared with the library's computation on the model's own logits.
Without chromium (``make test`` installs it with apt-get when it can) these tests skip,
saying so.
"""

import random
import shutil

import pytest
import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from playwright.sync_api import sync_playwright

from builders import tiny_chat_lm
from lmlab.generate import SamplingParams, generate, process_logits
from lmlab.generate.chat import ChatSession
from lmlab.interp import attention_maps
from lmlab.serve.playground import STATIC, labels, mount_playground, serve_in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: apt-get install chromium (make test does it as root)",
)
WAIT_MS = 15_000  # the longest any one thing may take to appear
PROMPT = "hello there, how can"


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm(sharpen=8.0)


@pytest.fixture(scope="module")
def url(lm):
    app = FastAPI()
    mount_playground(app, lm)
    app.mount("/static", StaticFiles(directory=STATIC))  # where lmlab serve's app puts it
    with serve_in_thread(app) as base:
        assert base.startswith("http://127.0.0.1:")
        yield f"{base}/playground/"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.fill("#prompt", PROMPT)
    page.wait_for_selector("#bars[data-ready='1'] .bar")
    yield page
    page.close()
    assert not errors, errors


def set_sliders(page, temperature, top_k, top_p):
    """Move the three sliders and wait until the bars drawn are those of these settings."""
    page.fill("#temperature", str(temperature))
    page.fill("#top-k", str(top_k))
    page.fill("#top-p", str(top_p))
    page.wait_for_selector(
        f"#bars[data-ready='1'][data-temperature='{temperature}']"
        f"[data-top-k='{top_k}'][data-top-p='{top_p}']"
    )


def read_bars(page):
    """-> (ids, raw, processed, kept) of the drawn bars, and the kept count shown."""
    rows = page.eval_on_selector_all(
        "#bars .bar",
        "bars => bars.map(b => [+b.dataset.id, +b.dataset.raw, +b.dataset.processed,"
        " b.dataset.kept === '1'])",
    )
    kept_count = int(page.get_attribute("#bars", "data-kept-count"))
    return [list(column) for column in zip(*rows)], kept_count


def library(lm, temperature, top_k, top_p):
    """Raw and processed next-token probabilities of PROMPT, computed here: [V] each."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([lm.tokenizer.encode(PROMPT)]))[0, -1:].float()
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    return logits.softmax(-1)[0], process_logits(logits, params).softmax(-1)[0]


def test_the_bars_show_the_librarys_probabilities(page, lm):
    set_sliders(page, 0.7, 0, 0.8)
    (ids, raw, processed, kept), _ = read_bars(page)
    expected_raw, expected_processed = library(lm, 0.7, 0, 0.8)
    assert len(ids) == 20
    assert ids == torch.sort(-expected_raw, stable=True).indices[:20].tolist()
    torch.testing.assert_close(torch.tensor(raw), expected_raw[ids], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(processed), expected_processed[ids], atol=1e-4, rtol=0)


def test_moving_the_sliders_changes_the_kept_set_as_the_library_computes(page, lm):
    rng = random.Random(0)
    seen = set()
    for _ in range(5):
        temperature = rng.choice([0.5, 1, 1.5])
        top_k, top_p = rng.choice([0, 3, 12]), rng.choice([0.3, 0.6, 0.95, 1])
        set_sliders(page, temperature, top_k, top_p)
        (ids, _, _, kept), kept_count = read_bars(page)
        _, processed = library(lm, temperature, top_k, top_p)
        assert kept == (processed[ids] > 0).tolist()
        assert kept_count == int((processed > 0).sum())
        seen.add(kept_count)
    assert len(seen) > 2  # the sliders really moved the kept set


def test_sampling_appends_the_token_generate_samples(page, lm):
    set_sliders(page, 1, 0, 0.9)
    page.fill("#seed", "4")
    page.click("#sample")
    page.wait_for_selector("#path .tok.generated")
    ids = lm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=1, top_p=0.9, seed=4)
    token = generate(lm.model, [ids], params).ids[0][0]
    assert page.inner_text("#path .tok.generated") == labels(lm, [token])[0]
    page.click("#undo")
    page.wait_for_selector("#path .tok.generated", state="detached")


def test_the_tree_beams_and_attention_panels_draw_the_routes_answers(page, lm):
    ids = lm.tokenizer.encode(PROMPT)
    page.fill("#tree-samples", "5")
    page.fill("#tree-depth", "2")
    page.click("#tree-run")
    page.wait_for_selector("#tree .node[data-count]")
    firsts = page.eval_on_selector_all(
        "#tree ul.tree > li > ul > li > .node", "ns => ns.map(n => +n.dataset.count)"
    )
    assert sum(firsts) == 5

    page.click("#tabs [data-tab=beams]")
    page.fill("#beams-n", "3")
    page.fill("#beams-steps", "3")
    page.click("#beams-run")
    best = page.get_attribute("#beams .best", "data-ids", timeout=WAIT_MS)
    expected = generate(lm.model, [ids], SamplingParams(max_new_tokens=3, num_beams=3)).ids[0]
    assert [int(i) for i in best.split(",")] == expected

    page.click("#tabs [data-tab=attention]")
    page.select_option("#att-head", "1")
    page.click("#att-run")
    page.wait_for_selector("#att-tokens .tok.query")
    weights = page.eval_on_selector_all("#att-tokens .tok", "ts => ts.map(t => +t.dataset.weight)")
    row = attention_maps(lm.model, torch.tensor(ids))[0, 1, -1]  # the last token's query row
    torch.testing.assert_close(torch.tensor(weights), row, atol=1e-4, rtol=0)


def test_the_chat_round_trips(page, lm):
    set_sliders(page, 0.8, 10, 1)
    page.fill("#seed", "2")
    page.click("#tabs [data-tab=chat]")
    page.fill("#chat-max", "6")
    page.fill("#chat-input", "hello")
    page.click("#chat-send")
    reply = page.wait_for_selector(".msg.assistant")
    params = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=10, seed=2)
    expected = ChatSession(lm, params=params).ask("hello")
    assert reply.evaluate("m => m.textContent") == expected
    assert page.inner_text(".msg.user") == "hello"


def test_a_bad_setting_shows_the_servers_message(page):
    page.fill("#top-n", "0")
    page.wait_for_selector("#error:not([hidden])")
    assert "top_n" in page.inner_text("#error")


def test_the_page_finds_its_routes_wherever_it_is_served_from(browser, url):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url.replace("/playground/", "/static/index.html"))
    page.wait_for_selector("#bars[data-ready='1'] .bar")
    assert page.is_hidden("#error")
    page.close()
