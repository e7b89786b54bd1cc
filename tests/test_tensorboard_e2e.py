"""End to end: short real trainings, `python -m tools.plot` on them, and
`tensorboard` (finding the plugin through its setup.py entry point) opened in
headless Chromium on the Memorization tab; saves a screenshot to
test-artifacts/memorization_tab.png."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
from conftest import REPO, no_write_permission, run_main

from cg_tf.measure import report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.path.join(REPO, "test-artifacts", "memorization_tab.png")
EXAMPLES_SCREENSHOT = os.path.join(REPO, "test-artifacts", "memorization_examples.png")
# A run's name may hold a comma: the tab asks for its runs one parameter each.
RUNS = {"mean": ["--aggregator=mean"], "winsorized, c=4": ["--aggregator=winsorized:4"]}


@pytest.fixture(scope="module")
def logdir(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logdir")
    for name, flags in RUNS.items():
        done = run_main("cg_tf.train", f"--data_dir={digits_dir}", f"--model_dir={root / name}",
                        "--fc_widths=64", "--batch_size=50", "--epochs=4",
                        "--learning_rate=0.5", "--eval_sample_size=200", *flags)
        assert done.returncode == 0, done.stderr[-2000:]
    return root


def test_plot_draws_the_figure_and_exports_every_metric(logdir, tmp_path):
    out, table = tmp_path / "figs" / "figure.png", tmp_path / "tables" / "metrics.csv"
    done = run_main("tools.plot", f"--logdir={logdir}", f"--out={out}", f"--csv={table}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    pdf = tmp_path / "figs" / "figure.pdf"  # the vector copy, beside it
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 5_000
    assert f"figure: {out}\nfigure_pdf: {pdf}" in done.stdout
    assert "| mean | plain SGD |" in done.stdout
    assert "| winsorized, c=4 | winsorized:4 |" in done.stdout
    with open(table) as f:
        rows = list(csv.DictReader(f))
    configs = {r.name: r.config for r in report.load_runs(str(logdir))}
    for run in RUNS:
        summary = json.loads((logdir / run / "summary.json").read_text())
        # What the figure's caption and epoch axis read from the run's config.
        assert configs[run]["source"] == "digits"
        assert configs[run]["steps_per_epoch"] == summary["steps_per_epoch"] > 0
        last = [r for r in rows if r["run"] == run and r["tag"] == "eval/test/accuracy"][-1]
        assert int(last["step"]) == summary["steps"]
        assert float(last["value"]) == pytest.approx(summary["test_accuracy"], abs=1e-6)
        assert any(r["run"] == run and r["tag"] == "coherence/model" for r in rows)
    bad = run_main("tools.plot", f"--logdir={tmp_path}", f"--out={tmp_path / 'x.png'}")
    assert bad.returncode != 0 and "no cg_tf runs" in bad.stderr
    # A folder that cannot be made: one line, before any work.
    bad = run_main("tools.plot", f"--logdir={logdir}", f"--out={table}/x.png")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
        f"error: --out={table}/x.png: cannot make its folder: File exists"), bad.stderr[-2000:]
    # A folder it may not write to: one line.
    with no_write_permission(tmp_path / "ro") as (folder, prefix):
        bad = run_main("tools.plot", f"--logdir={logdir}", f"--out={folder / 'x.png'}",
                       prefix=prefix)
        assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
            "error: cannot write the figure or the table: Permission denied (make it writable "
            "for you)"), bad.stderr[-2000:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tensorboard(logdir):
    port = free_port()
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    proc = subprocess.Popen([tb, f"--logdir={logdir}", "--host=127.0.0.1", f"--port={port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            listing = json.load(urllib.request.urlopen(url + "/data/plugins_listing"))
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"tensorboard did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    yield url, listing
    proc.terminate()
    proc.wait(timeout=30)


def test_the_examples_agree_with_the_runs_learning_events(tensorboard, logdir):
    """The examples route of a real run, through TensorBoard: at the last
    evaluation, each shown example's learning steps are the run's own
    (learning_events.csv), and its prediction is its label where the final
    evaluation counted it learned."""
    url, _ = tensorboard
    for run in RUNS:
        data = json.load(urllib.request.urlopen(
            f"{url}/data/plugin/memorization/examples?run={urllib.parse.quote(run)}"))
        steps = json.loads((logdir / run / "summary.json").read_text())["steps"]
        assert data["step"] == steps == data["steps"][-1]
        shown = data["examples"]
        assert [r["group"] for r in shown] == ["pristine"] * 64 + ["corrupt"] * 64
        with open(logdir / run / "learning_events.csv") as f:
            events = {r["example_id"]: r for r in csv.DictReader(f)}
        for r in shown:
            e = events[r["id"]]
            assert e["group"] == r["group"]
            for key, column in (("first_learned", "first_learned_step"),
                                ("learned_for_good", "learned_for_good_step")):
                assert (r[key] if r[key] is not None else -1) == int(e[column]), (r, e)
            if r["learned_for_good"] is not None:  # learned at every evaluation since
                assert r["prediction"] == r["label"]
            assert r["thumbnail"].startswith("data:image/png;base64,")


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_memorization_tab_in_headless_chromium(tensorboard, logdir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    url, listing = tensorboard
    assert listing["memorization"]["enabled"], listing  # found through the entry point
    profile = tempfile.mkdtemp()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,2300",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url + "/#memorization")
        wait = WebDriverWait(driver, 90)
        frame = wait.until(lambda d: d.find_elements(By.TAG_NAME, "iframe"))[0]
        driver.switch_to.frame(frame)
        # Three accuracy charts with a curve per run, plus the probe panels.
        curves = wait.until(lambda d: (lambda c: c if len(c) >= 3 * len(RUNS) + 2 else None)(
            d.find_elements(By.CSS_SELECTOR, "path.curve")))
        assert {c.get_attribute("data-run") for c in curves} == set(RUNS)
        for c in curves:
            assert c.get_attribute("d").count("L") >= 3, "a curve with fewer than 4 points"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.runs tbody tr"))
        # The panels arrive one by one: read the page once the last is drawn.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "div[data-drawn='true']"))
        text = driver.find_element(By.ID, "memorization").text
        for run in RUNS:
            assert run in text
        rows = driver.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == sorted(RUNS)
        assert len(driver.find_elements(By.CSS_SELECTOR, "path.histogram")) == 2 * len(RUNS)
        # Every panel explains itself: a whole title, both axes labelled, a caption.
        charts = driver.find_elements(By.CSS_SELECTOR, "div.chart")
        assert len(charts) >= 3 + len(RUNS) + 2
        for chart in charts:
            title = chart.find_element(By.CLASS_NAME, "chart-title").text
            labels = [a.text for a in chart.find_elements(By.CSS_SELECTOR, "text.axis-label")]
            caption = chart.find_element(By.CLASS_NAME, "caption").text
            assert title and len(labels) == 2 and all(labels) and len(caption) > 40, title
            assert "step" in labels[0], labels
        text = driver.find_element(By.ID, "memorization").text
        for phrase in ("memorization", "generalization", "learned for good",
                       "training step (log scale)", "% of tracked examples", "m-coherence",
                       "Network health", "Weight growth since the start", "Dead hidden units"):
            assert phrase in text, phrase
        # The learning-time plot spans each run's length and explains its legend.
        for run in RUNS:
            length = json.loads((logdir / run / "summary.json").read_text())["steps"]
            assert f"learned for good by step {length}" in text
            assert re.search(r"pristine: \d+ of 200 tracked \(\d+%\)", text)
        # The two f_p panels share their y range; log-scale steps redraw every
        # line chart on a log axis.
        def ticks(title):
            chart = next(c for c in driver.find_elements(By.CSS_SELECTOR, "div.chart")
                         if c.find_element(By.CLASS_NAME, "chart-title").text == title)
            return [t.text for t in chart.find_elements(By.CSS_SELECTOR, "text.tick")]
        fp = [ticks("Pristine share of the robust update (f_p)"),
              ticks("Pristine share of the plain SGD update (f_p)")]
        assert fp[0] and fp[0] == fp[1], fp
        driver.find_element(By.CSS_SELECTOR, "label.log-steps input").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "div[data-drawn='true']"))
        labels = driver.find_elements(By.CSS_SELECTOR, "text.axis-label.x")
        assert len(labels) >= 3 + len(RUNS) + 2
        assert all(a.text == "training step (log scale)" for a in labels)
        # The examples themselves: a card and a thumbnail per shown example,
        # then the memorized corrupt ones alone, as the route says they are.
        view = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                                    "div[data-examples='drawn']"))[0]
        cards = view.find_elements(By.CSS_SELECTOR, "div.example")
        assert len(cards) == 128
        images = view.find_elements(By.CSS_SELECTOR, "div.example img")
        assert len(images) == 128 and all(
            driver.execute_script("return arguments[0].naturalWidth", i) == 8 for i in images)
        run = view.find_elements(By.TAG_NAME, "select")[0].get_attribute("value")
        data = json.load(urllib.request.urlopen(
            f"{url}/data/plugin/memorization/examples?run={urllib.parse.quote(run)}"))
        def show(option, count):  # the filter's cards, once drawn
            Select(driver.find_elements(By.CSS_SELECTOR, "div.examples-view select")[2]
                   ).select_by_visible_text(option)
            wait.until(lambda d: f"{count} of 128 shown" in d.find_element(
                By.CSS_SELECTOR, "div.examples-view").text)
            return driver.find_elements(By.CSS_SELECTOR, "div.examples-view div.example")

        learned = sorted(r["learned_for_good"] for r in data["examples"]
                         if r["learned_for_good"] is not None)
        cards = show("earliest learned for good", len(learned))
        assert learned and [int(c.get_attribute("data-learned")) for c in cards] == learned
        memorized = [r for r in data["examples"]
                     if r["group"] == "corrupt" and r["learned_for_good"] is not None]
        cards = show("memorized corrupt examples (learned for good, noisy label)", len(memorized))
        assert len(cards) == len(memorized)
        assert all(c.get_attribute("data-group") == "corrupt" for c in cards)
        text = driver.find_element(By.CSS_SELECTOR, "div.examples-view").text
        assert text.count(": the noisy label") == len(memorized)
        show("all shown", 128)
        driver.execute_script("arguments[0].scrollIntoView()",
                              driver.find_element(By.CSS_SELECTOR, "div.examples-view"))
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        assert driver.find_element(By.CSS_SELECTOR, "div.examples-view").screenshot(
            EXAMPLES_SCREENSHOT)
        driver.switch_to.default_content()
        assert "MEMORIZATION" in driver.find_element(By.TAG_NAME, "body").text.upper()
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(SCREENSHOT)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
