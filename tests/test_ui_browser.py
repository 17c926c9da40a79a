"""`tuneforge ui` in a real browser (headless Chromium from the system's packages, driven by
Playwright): set up a LoRA run on the tiny model, see its estimate, start it, watch its loss curve
gain points, see it finish, compare it with a second run and try it. Skipped where no Chromium is
installed (`make test` installs one). With TUNEFORGE_UI_SHOTS=DIR set, each page's screenshot is
saved there (docs/ui.md shows them)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_model, make_tiny_tokenizer
from test_run import sentiment_rows, write_jsonl
from tuneforge.core import config
from tuneforge.training.estimate import estimate

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
SHOTS = os.environ.get("TUNEFORGE_UI_SHOTS")
WAIT_RUN = 120_000  # ms: a run's child process loads torch, trains for its time budget, evaluates and saves


@pytest.fixture
def served(tmp_path):
    """`tuneforge ui` in a folder holding data/ (the tiny model and a sentiment file) and runs/: its
    printed address (with the access token) and the folder."""
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(len(tokenizer)).save_pretrained(tmp_path / "data" / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "data" / "tiny-llama")
    write_jsonl(tmp_path / "data" / "reviews.jsonl", sentiment_rows(24))
    server = subprocess.Popen([sys.executable, "-m", "tuneforge", "ui", "--runs", "runs", "--data", "data",
                               "--port", "0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = server.stdout.readline()
    lines = [first]
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()  # keep the pipe drained
    match = re.search(r"http://\S+", first)
    assert match, f"the server printed no address: {first!r}"
    yield match.group(0), tmp_path
    server.send_signal(signal.SIGINT)
    server.wait(30)
    assert server.returncode == 0, "".join(lines)


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def set_up(page, method: str, name: str, fields: dict[str, str]) -> None:
    """The New run page: the tiny model, ``method``, the sentiment file as classification data."""
    page.select_option("#f-model", "data/tiny-llama")
    page.select_option("#f-method-name", method)
    page.select_option("#f-data-path", "data/reviews.jsonl")
    page.select_option("#f-data-format", "classification")
    for key, value in fields.items():
        page.fill(f"#f-{key.replace('.', '-')}", value)
    page.fill("#run-name", name)


def wait_status(page, status: str, also: str = "true") -> None:
    """Wait until the run's page shows ``status`` (and ``also`` holds), or shows it failed."""
    page.wait_for_function(f"() => {{ const s = document.querySelector('h1 [data-status]')?.dataset.status;"
                           f" return s === 'failed' || (s === '{status}' && {also}); }}", timeout=WAIT_RUN)
    shown = page.locator("h1 [data-status]").get_attribute("data-status")
    assert shown == status, page.locator("#run-log").inner_text()


def test_set_up_start_watch_compare_and_try_in_a_browser(served, monkeypatch):
    address, root = served
    url = address.split("?")[0]  # the printed address carries the token once; then the page's cookie does
    monkeypatch.chdir(root)  # the page writes paths relative to the folder it was started in
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1320, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(address)

        # New run: LoRA on the tiny model; a malformed value gets the parser's one line, on its field
        set_up(page, "lora", "lora-a", {"method.r": "4", "data.max_length": "256", "train.batch_size": "4",
                                        "train.max_steps": "100000", "train.time_budget_s": "6",
                                        "train.logging_steps": "2", "train.eval_steps": "40",
                                        "train.learning_rate": "abc"})
        error = page.locator("#form-error")
        expect(error).to_have_text("the form: key 'train.learning_rate': expected float, got 'abc'; correct the value")
        expect(page.locator("#f-train-learning_rate")).to_have_class(re.compile("invalid"))
        expect(page.locator("#start")).to_be_disabled()
        page.fill("#f-train-learning_rate", "0.002")
        expect(error).to_be_hidden()
        expect(page.locator("#yaml")).to_contain_text("output_dir: runs/lora-a")
        # the estimate shown is tuneforge.training.estimate's for the resolved config
        cfg = config.from_dict(yaml.safe_load(page.locator("#yaml").inner_text()))
        expected = estimate(cfg, flops_per_s=1e9)
        expect(page.locator('[data-figure="parameters"]')).to_contain_text(
            f"{expected.trainable_params:,} trainable of {expected.total_params:,}", timeout=60_000)  # torch loads first
        expect(page.locator('[data-figure="memory"]')).to_contain_text("about")
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "new-run")

        # Start: the run's page shows it running, and its loss curve gains points as it trains
        page.click("#start")
        page.wait_for_url(re.compile(r"/runs/lora-a$"))
        wait_status(page, "running", "+document.querySelector('#loss-chart').dataset.points >= 1")
        seen = int(page.locator("#loss-chart").get_attribute("data-points"))
        page.wait_for_function(f"() => +document.querySelector('#loss-chart').dataset.points > {seen}",
                               timeout=WAIT_RUN)
        expect(page.locator("#stop")).to_be_enabled()
        shot(page, "run-training")
        wait_status(page, "finished")
        expect(page.locator("#summary")).to_contain_text("trainable parameters")
        expect(page.locator("#accuracy-chart")).to_be_visible()
        assert (root / "runs" / "lora-a" / "summary.json").is_file()
        assert (root / "runs" / ".ui" / "lora-a" / "config.yaml").is_file()
        shot(page, "run-finished")

        # a second run, IA3, to compare with
        page.goto(url)
        set_up(page, "ia3", "ia3-b", {"data.max_length": "256", "train.batch_size": "4", "train.max_steps": "6"})
        expect(page.locator("#yaml")).to_contain_text("output_dir: runs/ia3-b")
        expect(page.locator("#start")).to_be_enabled()
        page.click("#start")
        page.wait_for_url(re.compile(r"/runs/ia3-b$"))
        wait_status(page, "finished")

        # Runs: both, finished
        page.goto(url + "runs")
        for name in ("lora-a", "ia3-b"):
            expect(page.locator(f'tr[data-run="{name}"] [data-status]')).to_have_text("finished")
        shot(page, "runs")

        # Compare: the table and chart of tuneforge compare, one row per run
        page.goto(url + "compare")
        page.check('input[value="lora-a"]')
        page.check('input[value="ia3-b"]')
        page.click("#compare")
        rows = page.locator("#compare-table tbody tr")
        expect(rows).to_have_count(2)
        firsts = [rows.nth(i).locator("td").nth(j).inner_text() for i in range(2) for j in range(2)]
        assert sorted(firsts) == ["ia3", "ia3-b", "lora", "lora-a"]
        page.wait_for_function("() => { const i = document.querySelector('#compare-chart');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        shot(page, "compare")

        # Try: a generation, streamed, and the label probabilities of a text
        page.goto(url + "try?run=lora-a")
        page.fill("#try-prompt", "Text: a lovely film")
        page.fill("#try-max-new", "8")
        page.click("#try-generate")
        page.wait_for_function("() => document.querySelector('#try-output')?.dataset.done === '1'", timeout=60_000)
        expect(page.locator("#try-error")).to_be_hidden()
        assert page.locator("#try-output").inner_text().strip()
        page.fill("#try-text", "a lovely film")
        page.click("#try-classify")
        bars = page.locator("#try-labels .bar")
        expect(bars).to_have_count(2)
        shares = [float(t.rstrip("%")) for t in bars.locator("span:last-child").all_inner_texts()]
        assert sum(shares) == pytest.approx(100, abs=0.2)
        shot(page, "try")
        assert not errors, errors
        browser.close()
