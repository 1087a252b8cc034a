"""Plans in and out of the wizard, both ways, through its API (gradio_client on a real `python app.py`):

- a plan file the CLI wrote (`tunewise recommend --save`, then settings no widget of step 3's main editor
  shows) loads into every widget, and "Save plan" gives back the same plan;
- the page's plan (loaded, then edited) saved and run with `tunewise train plan.yaml` is the plan the page's
  own Launch runs, and the two runs log the same losses;
- a finished run's plan, picked from the history, loads and saves back unchanged.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, start_app, stop_app, tiny_plan


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = tmp_path_factory.mktemp("plan-io-runs")
    proc, url = start_app(runs, "--no-warm-worker", log_path=runs.parent / "plan-io-app.log")
    from gradio_client import Client

    yield Client(url, verbose=False), runs
    stop_app(proc)


def _value(output):
    """A widget's value from an output (an update carries it under "value")."""
    return output["value"] if isinstance(output, dict) and "__type__" in output else output


def load_plan(client, path: Path) -> dict:
    """The widget values the page shows after loading the plan file at `path` (by widget name)."""
    from gradio_client import handle_file

    from advisor.wizard import PLAN_WIDGETS

    outputs = client.predict(handle_file(str(path)), api_name="/load_plan")
    assert len(outputs) == len(PLAN_WIDGETS) + 1 and "Loaded the plan from" in outputs[-1]
    return {name: _value(output) for name, output in zip(PLAN_WIDGETS, outputs)}


def save_plan(client, values: dict):
    from advisor.plan import Plan

    saved, note = client.predict(**values, api_name="/save_plan")
    assert Path(saved).name == "plan.yaml" and "tunewise train plan.yaml" in note
    return Plan.load(saved), Path(saved).read_text(encoding="utf-8")


def test_a_cli_plan_file_loads_into_every_widget_and_saves_back_the_same(server, tmp_path):
    from advisor.plan import Plan
    from advisor.wizard import widgets_from_plan

    client, _ = server
    written = tmp_path / "cli.yaml"
    done = subprocess.run([sys.executable, "cli.py", "recommend", "--model", "demo", "--examples", "2000", "--task",
                           "qa", "--gpu", "A100-80GB", "--seq-len", "256", "--set", "lora_rank=12", "--save",
                           str(written)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Settings from every corner, the Advanced group's included, and one no widget shows (the device).
    cli_plan = Plan.load(written).with_overrides({
        "name": "from-the-cli", "training.logging_steps": 3, "data.eval_fraction": 0.1, "data.max_examples": 500,
        "forgetting.replay_fraction": 0.05, "training.eval_steps": 7, "hardware.device": "cuda",
        "method.lora_dropout": 0.1, "training.seed": 11})
    cli_plan.save(written)
    assert Plan.load(written) == cli_plan  # what the CLI reads

    shown = load_plan(client, written)
    assert shown == widgets_from_plan(cli_plan)
    assert shown["lora_rank"] == 12 and shown["gpu"] == "A100-80GB"
    saved, text = save_plan(client, shown)
    assert saved == cli_plan
    assert text == cli_plan.to_yaml()


def test_a_bad_plan_file_is_refused_with_the_setting_named(server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _ = server
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: -1\n", encoding="utf-8")
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(str(bad)), api_name="/load_plan")
    assert "training.learning_rate" in str(refused.value) and "bad.yaml" in str(refused.value)
    assert "Traceback" not in str(refused.value)


def _losses(run_dir: Path) -> list[float]:
    from trainer.events import read_all_events

    return [e["loss"] for e in read_all_events(run_dir / "events.jsonl") if e["event"] == "log" and "loss" in e]


@pytest.mark.slow
def test_the_pages_plan_runs_the_same_from_the_cli(server, tmp_path, tiny_model_dir, tiny_data_dir):
    from advisor.plan import Plan
    from trainer import supervisor

    client, runs = server
    start = tmp_path / "tiny.yaml"
    tiny_plan(tiny_model_dir, tiny_data_dir, {"training.max_steps": 4}).save(start)
    values = {**load_plan(client, start), "learning_rate": 0.01, "lora_rank": 4}  # edited on the page
    page_plan, _ = save_plan(client, values)
    assert page_plan.training.learning_rate == 0.01 and page_plan.method.lora_rank == 4
    saved = tmp_path / "plan.yaml"
    page_plan.save(saved)

    client.predict(**values, api_name="/launch")  # the page's own Launch
    (page_run,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    assert supervisor.wait(page_run.name, timeout=300, runs_dir=runs).state == "finished"
    cli_runs = tmp_path / "cli-runs"
    done = subprocess.run([sys.executable, "cli.py", "train", str(saved), "--runs-dir", str(cli_runs), "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (cli_run,) = [p for p in cli_runs.iterdir() if (p / "run.json").is_file()]
    assert supervisor.status(cli_run.name, cli_runs).state == "finished"
    assert Plan.load(page_run / "plan.yaml") == page_plan == Plan.load(cli_run / "plan.yaml")
    assert len(_losses(page_run)) == 4 and _losses(page_run) == _losses(cli_run)

    # The finished run's plan, picked from the history, comes back into the wizard unchanged.
    from advisor.wizard import PLAN_WIDGETS

    client.predict(api_name="/runs")
    outputs = client.predict(page_run.name, api_name="/load_run_plan")
    shown = {name: _value(output) for name, output in zip(PLAN_WIDGETS, outputs)}
    assert save_plan(client, shown)[0] == page_plan
