"""A new user's walk through the wizard in a real browser (Debian's Chromium driven by Playwright).

Starts `python app.py` as a subprocess. First what a newcomer may get wrong:
an unknown model is named in its card and Next refuses it; a real model's
plan carries its advised length (epochs, not the demo's step cap); a
malformed upload is named in the profile and Next refuses it. Then, on the
bundled demo model: sees the data profile and the rows with their loss tokens
highlighted, the memory table and the
recommendations (and watches memory follow an edit), launches a run
with the forgetting monitor on, sees the loss chart gain points, stops it
(a checkpoint is kept), finds it in the run history and chats with it. Last, the compare
pipeline: its side-by-side table in the monitor, its final policy sampled
and exported from step 5. A screenshot of each step goes to tests/artifacts/; with
TUNEWISE_SCREENSHOTS=1 the plan, monitor and compare views are also copied to
docs/screenshots/ for the README.

Skips when /usr/bin/chromium is missing, unless TUNEWISE_REQUIRE_BROWSER=1
(CI), where a missing browser is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import start_app, stop_app
from test_app_api import DEMO_MODEL

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
DOCS_SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


def _require_browser() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("TUNEWISE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing and TUNEWISE_REQUIRE_BROWSER=1: install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); set TUNEWISE_REQUIRE_BROWSER=1 to fail instead")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if os.environ.get("TUNEWISE_REQUIRE_BROWSER") == "1":
            raise
        pytest.skip("playwright is not installed (pip install -e '.[test]')")


@contextlib.contextmanager
def _browser_page(playwright, failure_png: str):
    """A Chromium page (1360 x 1000, 60 s timeouts); on a failure a full-page screenshot in the artifacts as
    `failure_png`; the browser closed after."""
    from playwright.sync_api import expect

    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    page.set_default_timeout(60_000)
    expect.set_options(timeout=60_000)
    try:
        yield page
    except Exception:
        page.screenshot(path=str(ARTIFACTS / failure_png), full_page=True)
        raise
    finally:
        browser.close()


def _table_text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _loss_points(page) -> int:
    """Markers drawn in the loss chart's first trace (training loss)."""
    return page.locator("#loss-plot .scatterlayer .trace").first.locator(".point").count() \
        if page.locator("#loss-plot .scatterlayer .trace").count() else 0


@pytest.mark.timeout(1200)  # two trainings, a pipeline, a preview and a chat: past the suite's 600 s on a loaded machine
def _stop_runs_and_app(runs: Path, proc) -> None:
    """Stop what a walk-through left training in `runs`, then its app."""
    from trainer import supervisor

    for status in supervisor.list_runs(runs):
        if status.state in ("queued", "running"):
            supervisor.stop(status.run_id, runs_dir=runs, timeout=20)
    stop_app(proc)


def test_new_user_plans_launches_watches_stops_and_finds_the_run(tmp_path):
    _require_browser()
    assert DEMO_MODEL.is_file(), "the bundled demo model (assets/demo-model) is missing"
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runs = tmp_path / "runs"
    proc, url = start_app(runs, log_path=tmp_path / "app.log")
    shots: dict[str, Path] = {}

    began = time.time()

    def shot(page, name: str) -> None:
        print(f"{name}: {time.time() - began:.1f} s")
        path = ARTIFACTS / f"{len(shots) + 1:02d}-{name}.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(path))  # what the user sees on opening the step
        shots[name] = path

    try:
        with sync_playwright() as playwright, _browser_page(playwright, "failure.png") as page:
            def pick(elem_id: str, text: str, option: str | None = None) -> None:
                box = page.locator(f"#{elem_id} input")
                box.click()
                box.fill(text)
                page.get_by_role("option", name=option or text).first.click()  # (a substring of the option's label)

            page.goto(url)
            # An unknown model: its card says so (no stale card) and Next stays on step 1.
            model_input = page.locator("#model input")
            model_input.click()
            model_input.fill("no-such-model-xyz")
            model_input.press("Enter")
            expect(page.locator("#model-card")).to_contain_text("This model cannot be planned")
            expect(page.locator("#model-card")).to_contain_text("unknown model 'no-such-model-xyz'")
            page.locator("#next-1").click()
            time.sleep(1)
            expect(page.locator("#next-2")).to_be_hidden()

            # A real model's plan carries its advised length: epochs, not the demo's step cap.
            pick("model", "meta-llama/Llama-3.1-8B")
            expect(page.locator("#model-card")).to_contain_text("8.03B parameters")
            page.locator("#next-1").click()
            expect(page.locator("#profile-table")).to_contain_text("2,000")
            page.locator("#next-2").click()
            expect(page.locator("#recommendations")).to_contain_text("LoRA rank")
            page.locator("#show-yaml").get_by_text("Show as YAML / CLI").click()
            expect(page.locator("#cli-text")).to_contain_text("tunewise train --model meta-llama/Llama-3.1-8B")
            expect(page.locator("#cli-text")).to_contain_text("--epochs")
            expect(page.locator("#cli-text")).not_to_contain_text("--max-steps")
            page.locator("#show-yaml").get_by_text("Show as YAML / CLI").click()  # closed again
            # The step bar: back to step 1, then straight to the plan again (Gradio's own stepper opens only
            # the steps before the current one); step 4 is not reached yet.
            page.locator("#step-bar-1").click()
            expect(page.locator("#next-1")).to_be_visible()
            expect(page.locator("#step-bar-4")).to_be_disabled()
            page.locator("#step-bar-3").click()
            expect(page.locator("#launch")).to_be_visible()
            expect(page.locator("#step-bar-3")).to_have_class(re.compile("primary"))
            expect(page.locator("#recommendations")).to_contain_text("LoRA rank")
            page.locator("#step-bar-2").click()

            # A malformed upload: the profile names the row, and Next stays on step 2.
            bad = tmp_path / "broken.jsonl"
            bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n', encoding="utf-8")
            page.locator("#upload input[type=file]").set_input_files(str(bad))
            expect(page.locator("#profile-table")).to_contain_text("problem", timeout=60_000)
            expect(page.locator("#profile-table")).to_contain_text("broken.jsonl")
            page.locator("#next-2").click()
            time.sleep(1)
            expect(page.locator("#launch")).to_be_hidden()
            page.locator("#step-bar-3").click()  # the step bar checks what Next checks
            time.sleep(1)
            expect(page.locator("#launch")).to_be_hidden()
            pick("dataset", "demo-sft")
            page.locator("#back-2").click()

            # Step 1: pick the demo model from the catalogue menu; its card shows the parameter count.
            model_input.click()
            model_input.fill("demo")
            page.get_by_role("option", name=re.compile("demo")).first.click()
            expect(page.locator("#model-card")).to_contain_text("parameters")
            expect(page.locator("#model-card")).to_contain_text("llama")
            shot(page, "model")

            # Step 2: the bundled SFT set is profiled (format, examples, histogram).
            page.locator("#next-1").click()
            expect(page.locator("#profile-table")).to_contain_text("2,000")
            expect(page.locator("#profile-table")).to_contain_text("messages")
            expect(page.locator("#histogram .main-svg").first).to_be_visible()
            shot(page, "data")
            # What the model will be trained on: rows through the chat template, the loss tokens highlighted.
            page.locator("#loss-preview").get_by_text("What the model will be trained on").click()
            page.locator("#preview-btn").click()
            expect(page.locator("#preview-html .tw-loss").first).to_be_visible(timeout=120_000)
            expect(page.locator("#preview-note")).to_contain_text("assistant tokens only")
            expect(page.locator("#preview-html")).to_contain_text("with loss")

            # Step 3: recommendations with reasons, the memory table, and memory following an edit.
            page.locator("#next-2").click()
            # The demo's advice was measured on it (assets/demo-model/measured_advice.json: full fine-tuning).
            expect(page.locator("#recommendations")).to_contain_text("measured on this model and data")
            expect(page.locator("#recommendations")).to_contain_text("guide:")
            expect(page.locator("#memory-table")).to_contain_text("total on the GPU")
            before = _table_text(page, "memory-table")
            seq = page.locator("#seq-len input")
            seq.fill("256" if seq.input_value() != "256" else "128")
            seq.press("Enter")
            expect(page.locator("#memory-table")).not_to_have_text(before)
            expect(page.locator("#recommendations")).to_contain_text("set by you")
            steps = page.locator("#max-steps input")
            steps.fill("200")
            steps.press("Enter")
            # LoRA instead of the measured full fine-tuning: the advice follows the method (a rank, its rate).
            page.locator("#method").get_by_label("LoRA", exact=True).check()
            expect(page.locator("#recommendations")).to_contain_text("LoRA rank")
            page.locator("#show-yaml").get_by_text("Show as YAML / CLI").click()
            expect(page.locator("#cli-text")).to_contain_text("tunewise train --model demo")
            expect(page.locator("#cli-text")).to_contain_text("--method lora")
            expect(page.locator("#cli-text")).to_contain_text("--max-steps 200")
            expect(page.locator("#yaml-text")).to_contain_text("stage: sft")
            shot(page, "plan")
            # Advanced settings hold DoRA, the experiment logger and early stopping.
            advanced = page.locator("#advanced")
            advanced.get_by_text("Advanced settings").first.click()
            expect(advanced).to_contain_text("DoRA (weight-decomposed LoRA)")
            expect(advanced).to_contain_text("Experiment logger")
            expect(advanced).to_contain_text("Early stopping patience")
            advanced.get_by_text("Advanced settings").first.click()

            # A reload finds the wizard as it was: step 3, the edits, marked as the user's own.
            edited_seq = seq.input_value()
            page.reload()
            expect(page.locator("#launch")).to_be_visible()
            expect(page.locator("#max-steps input")).to_have_value("200")
            expect(page.locator("#seq-len input")).to_have_value(edited_seq)
            expect(page.locator("#recommendations")).to_contain_text("set by you")
            expect(page.locator("#memory-table")).to_contain_text("total on the GPU")

            # Step 4: launch; the loss chart gains points while the run trains.
            page.locator("#launch").click()
            expect(page.locator("#run-header .tw-badge")).to_have_text(re.compile("running|starting|queued"))
            deadline = time.time() + 240
            while _loss_points(page) < 3 and time.time() < deadline:
                time.sleep(1)
            assert _loss_points(page) >= 3, "the loss chart did not gain points within 240 s"
            expect(page.locator("#run-header")).to_contain_text("step")
            # The measured peak of each log against the plan's estimate (on the CPU: RSS and host RAM).
            expect(page.locator("#memory-run-plot")).to_contain_text("host RAM (peak RSS)")
            expect(page.locator("#memory-run-plot")).to_contain_text("host RAM estimate")
            shot(page, "monitor")

            # Stop, with the forgetting monitor measuring as it trains: the run saves first and ends stopped.
            page.locator("#stop").click()
            expect(page.locator("#run-header .tw-badge")).to_have_text("stopped", timeout=90_000)
            from trainer import rundir

            stopped_id = page.locator("#run-header code").inner_text()
            assert rundir.last_checkpoint(runs / stopped_id) is not None, "the stop kept no checkpoint"
            expect(page.locator("#run-header")).not_to_contain_text("killed")

            # Step 5: the run is in the history with its status.
            page.locator("#next-4").click()
            run_id = page.locator("#run-header code").inner_text()
            expect(page.locator("#runs-table")).to_contain_text(run_id)
            expect(page.locator("#runs-table")).to_contain_text("stopped")
            expect(page.locator("#runs-table")).to_contain_text(re.compile(r"\d+\.\d\d / \d+\.\d\d [MG]B \([+-]\d+%\)"))
            expect(page.locator("#overlay-plot .main-svg").first).to_be_visible()
            time.sleep(1)  # let the tables finish their fade-in before the screenshot
            shot(page, "results")
            # Chat with the tuned model (the stopped run's saved adapter): the reply streams into the chat.
            question = "Please spell out the date 2016-05-11."
            page.locator("#chat-message textarea").fill(question)
            page.locator("#chat-send").click()
            expect(page.locator("#chat-note")).to_contain_text("new tokens", timeout=120_000)
            expect(page.locator("#chat-tuned")).to_contain_text(question)
            assert len(page.locator("#chat-tuned").inner_text()) > len(question) + 3, "no reply in the chat"
            # Tag the run: the history shows the tag; the adapter alone downloads beside the merged export.
            page.locator("#tag-box textarea, #tag-box input").first.fill("baseline")
            page.locator("#tag-run").click()
            expect(page.locator("#runs-table")).to_contain_text("#baseline")
            page.locator("#export").get_by_text("Merge / export").click()
            page.locator("#adapter-btn").click()
            expect(page.locator("#export")).to_contain_text("adapter alone")
            expect(page.locator("#export")).to_contain_text(f"{run_id}-adapter")  # the download link

            # The compare pipeline: RLHF beside DPO, its table in the monitor, its final policy in step 5.
            page.locator("#start-over").click()  # a fresh wizard on step 1 (the demo model is the default)
            expect(page.locator("#next-1")).to_be_visible()
            expect(page.locator("#model input")).to_have_value(re.compile("demo"))
            page.locator("#next-1").click()
            pick("dataset", "demo-preference")
            pick("goal", "Compare both", "Compare both pipelines")
            page.locator("#next-2").click()
            expect(page.locator("#recommendations")).to_contain_text("beta")
            steps = page.locator("#max-steps input")
            steps.fill("3")
            steps.press("Enter")
            page.locator("#launch").click()
            expect(page.locator("#run-header")).to_contain_text("stage", timeout=120_000)
            expect(page.locator("#run-header .tw-badge")).to_have_text("finished", timeout=480_000)
            expect(page.locator("#comparison")).to_contain_text("RLHF (SFT -> RM -> PPO)")
            expect(page.locator("#comparison")).to_contain_text("held-out preference accuracy")
            shot(page, "compare")
            page.locator("#next-4").click()
            expect(page.locator("#open-step")).to_be_visible()
            expect(page.locator("#open-step input")).to_have_value("4-dpo")
            page.locator("#samples").get_by_text("Base vs tuned").click()
            page.locator("#generate").click()
            expect(page.locator("#samples-table")).to_contain_text("Convert 2011-09-24", timeout=240_000)
            page.locator("#export").get_by_text("Merge / export").click()
            page.locator("#export-btn").click()
            expect(page.locator("#export")).to_contain_text("4-dpo: merged into", timeout=240_000)
            expect(page.locator("#export")).to_contain_text("4-dpo-merged")  # the download link

            # The server goes away: the page says so (the runs are not the page's: they would keep going).
            stop_app(proc)
            expect(page.locator("#tw-connection")).to_contain_text("Lost the connection", timeout=30_000)
    finally:
        _stop_runs_and_app(runs, proc)

    if os.environ.get("TUNEWISE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots["plan"], DOCS_SCREENSHOTS / "plan.png")
        shutil.copyfile(shots["monitor"], DOCS_SCREENSHOTS / "monitor.png")
        shutil.copyfile(shots["compare"], DOCS_SCREENSHOTS / "compare.png")


def _forgetting_points(page) -> int:
    """Markers of the forgetting chart's measured line (the first trace)."""
    traces = page.locator("#forgetting-plot .scatterlayer .trace")
    return traces.first.locator(".point").count() if traces.count() else 0


@pytest.mark.timeout(1800)  # the 600-step run: ~2 min on idle cores, up to 20 when they are shared
def test_the_demo_learns_visibly_on_the_wizards_defaults(tmp_path):
    """A newcomer on the public demo clicks Next, Next, Launch without changing anything: the run trains in
    about two minutes on 2 CPU cores, the forgetting chart gets at least 4 points at under 10% of the run's time,
    and the base-vs-tuned table shows the tuned model writing the dates right where the base model does not."""
    _require_browser()
    assert DEMO_MODEL.is_file(), "the bundled demo model (assets/demo-model) is missing"
    from playwright.sync_api import expect, sync_playwright

    from trainer.events import read_all_events

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    runs = tmp_path / "runs"
    proc, url = start_app(runs, "--demo-mode", log_path=tmp_path / "app.log")
    try:
        with sync_playwright() as playwright, _browser_page(playwright, "failure-demo.png") as page:
            page.goto(url)
            expect(page.locator("#model-card")).to_contain_text("parameters")
            page.locator("#next-1").click()
            expect(page.locator("#profile-table")).to_contain_text("2,000")
            page.locator("#next-2").click()
            # The advice for the demo says it was measured on this model and data.
            expect(page.locator("#recommendations")).to_contain_text("measured on this model and data")
            # The learning-rate check's cost is shown before any click on it (its panel opened, nothing started).
            page.locator("#pilot").get_by_text("Check the learning rate on my data").first.click()
            expect(page.locator("#pilot-cost")).to_contain_text("Expected cost")
            # Its budget box: the cost shown follows what is typed (the demo's cap is 3 minutes).
            box = page.locator("#pilot-budget textarea, #pilot-budget input").first
            box.click()
            box.press_sequentially("2")  # (typed: Gradio's input event does not fire on a programmatic fill)
            expect(page.locator("#pilot-cost")).to_contain_text('budget 2.0 min ("Check budget (minutes)")')
            page.locator("#launch").click()
            expect(page.locator("#run-header .tw-badge")).to_have_text("finished", timeout=1_200_000)  # ~2 min idle
            launched = time.time()
            page.wait_for_timeout(2_000)  # the last poll redraws the charts
            assert _forgetting_points(page) >= 4, "the forgetting chart has fewer than 4 points"
            run_id = page.locator("#run-header code").inner_text()
            page.screenshot(path=str(ARTIFACTS / "demo-defaults-monitor.png"))

            page.locator("#next-4").click()
            expect(page.locator("#runs-table")).to_contain_text(run_id)
            page.locator("#samples").get_by_text("Base vs tuned").click()
            page.locator("#generate").click()
            samples = page.locator("#samples-table")
            expect(samples).to_contain_text("24 September 2011", timeout=240_000)
            expect(samples).to_contain_text("11 May 2016")
            # (Both right dates are in the base-vs-tuned table; the base model's answers are prose, see the
            # screenshot. Gradio's virtualised table gives no per-cell text to read row by row.)
            page.screenshot(path=str(ARTIFACTS / "demo-defaults-samples.png"))
            print(f"generated {time.time() - launched:.0f} s after the run finished")
    finally:
        _stop_runs_and_app(runs, proc)

    # The numbers behind what the page showed: the run's own time and the monitor's share of it.
    events = read_all_events(runs / run_id / "events.jsonl")
    end = next(e for e in events if e["event"] == "train_end")
    measured = [e for e in events if e["event"] == "forgetting"]
    print(f"demo run: {end['train_runtime']:.0f} s of training, forgetting monitor "
          f"{measured[-1]['monitor_cost_pct']}% of it, {len(measured)} measurements")
    assert len(measured) >= 4 and measured[-1]["monitor_cost_pct"] < 10
