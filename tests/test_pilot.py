"""The learning-rate pilot: its design (pure), and real pilots on the tiny model in their own processes.

- the design: rates half a decade apart around the plan's, steps from the budget, round 2's finalists
  (the rung beyond the ladder's end when the best sits there), a clear refusal for a budget too small for
  two candidates, for data too small to hold out a split, for stages and pipelines it does not measure;
- `tunewise pilot --save` on SFT LoRA: a known-bad rate (1.0) is never chosen, the chosen rate has the
  lowest held-out loss of the last round, the run directory has the events the charts read, and the saved
  plan is one `tunewise train` runs;
- a DPO pilot with full fine-tuning;
- a stopped pilot keeps what it measured and says so, and is not resumed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advisor.errors import TunewiseError
from advisor.pilot import MIN_STEPS, choose, design_pilot, ladder, second_round
from advisor.plan import Plan
from conftest import REPO_ROOT, wait_for


def tunewise(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


# -- the design (pure) -------------------------------------------------------------------------------


def test_rates_are_half_a_decade_apart_around_the_plans():
    assert ladder(2e-4) == (3.16e-05, 1e-04, 3.16e-04, 1e-03, 3.16e-03)  # 2e-4 snaps to 3.16e-4
    assert ladder(1e-3) == (1e-04, 3.16e-04, 1e-03, 3.16e-03, 1e-02)
    plan = Plan().with_overrides({"training.max_steps": 60_000, "training.learning_rate": 1e-3})
    common = dict(params=1_585_440, train_examples=1800, tokens_per_example=35, weight_bytes=6_000_000)
    design = design_pilot(plan, share=0.1, **common)
    # 10% of the run's time buys 5 x s + 2 x 2s steps, plus each candidate's loading and evaluation.
    assert design.budget_s == pytest.approx(0.1 * 60_000 * design.step_s)
    assert design.budget_source.startswith("10% of the run's")
    assert design.keep == 2 and design.steps >= MIN_STEPS and len(design.rates) == 5
    assert design.train_steps == 5 * design.steps + 2 * 2 * design.steps
    assert design.expected_s <= design.budget_s + 1e-9
    two = design_pilot(plan, budget_minutes=2, **common)
    assert two.budget_s == 120 and two.steps < design.steps and two.budget_source == "--budget-minutes"
    # A short run's share would buy mostly loading: a minute at least.
    short = design_pilot(plan.with_overrides({"training.max_steps": 600}), share=0.1, **common)
    assert short.budget_s == 60 and "floor" in short.budget_source
    # A smaller budget drops round 2, then the outer rates, before refusing.
    lean = design_pilot(plan, budget_minutes=0.15, **common)
    assert lean.keep == 0 and len(lean.rates) in (2, 3, 5) and lean.expected_s <= 9 + 1e-9


def test_round_two_keeps_the_best_two_or_looks_past_the_end():
    rates = ladder(1e-3)
    assert second_round(rates, [5.0, 4.0, 3.0, 3.5, 9.0]) == [1e-03, 3.16e-03]
    # The best is the highest rate: the rung beyond it replaces the runner-up.
    assert second_round(rates, [5.0, 4.0, 3.0, 2.5, 2.0]) == [1e-02, 3.16e-02]
    assert second_round(rates, [1.0, 4.0, 3.0, 2.5, 2.0]) == [1e-04, 3.16e-05]
    assert second_round(rates, [math.inf] * 5) == []
    results = [{"rate": 1e-3, "round": 1, "status": "finished", "eval_loss": 1.0},
               {"rate": 3.16e-3, "round": 2, "status": "finished", "eval_loss": 1.2},
               {"rate": 1e-3, "round": 2, "status": "finished", "eval_loss": 1.1},
               {"rate": 1e-2, "round": 2, "status": "diverged", "eval_loss": None}]
    assert choose(results)["rate"] == 1e-3 and choose(results)["round"] == 2  # the last round decides
    assert choose([{"rate": 1.0, "round": 1, "status": "diverged", "eval_loss": None}]) is None


def test_refusals_name_the_problem_and_the_way_out():
    plan = Plan().with_overrides({"training.max_steps": 20})
    common = dict(params=1_585_440, train_examples=1800, tokens_per_example=35, weight_bytes=6_000_000)
    with pytest.raises(TunewiseError, match="too small for two candidates") as small:
        design_pilot(plan, budget_minutes=0.02, **common)
    assert small.value.field == "budget_minutes" and "minutes (--budget-minutes), or plan a longer run" in str(small.value)
    with pytest.raises(TunewiseError, match="not a rlhf pipeline: pilot its SFT step"):
        design_pilot(plan.with_overrides({"pipeline": "rlhf"}), **common)
    with pytest.raises(TunewiseError, match="not ppo .online RL has no held-out loss"):
        design_pilot(plan.with_overrides({"stage": "ppo"}), **common)
    with pytest.raises(TunewiseError, match="run's length is unknown"):
        design_pilot(Plan(), params=1_585_440, train_examples=None, tokens_per_example=35, weight_bytes=6_000_000)


# -- real pilots ---------------------------------------------------------------------------------------


def _plan_file(tmp_path: Path, make_plan, **overrides) -> Path:
    plan = make_plan(overrides={"data.eval_fraction": 0.25, "training.max_steps": 200, **overrides})
    return plan.save(tmp_path / "plan.yaml")


def test_sft_pilot_never_picks_a_bad_rate_writes_its_events_and_saves_a_plan_train_runs(tmp_path, make_plan, runs_dir):
    import figures
    from trainer.events import read_all_events

    # Centred on 0.1, the ladder reaches 1.0: with Adam that rate wrecks the tiny model within a few steps.
    plan_file = _plan_file(tmp_path, make_plan, **{"training.learning_rate": 0.1})
    saved = tmp_path / "tuned.yaml"
    # A minute: on busy shared cores half of it let the first candidate's measured step time trim the outer
    # rates (1.0 among them), which is the pilot's design but not what this test checks.
    result = tunewise("pilot", str(plan_file), "--budget-minutes", "1", "--save", str(saved), "--runs-dir",
                      str(runs_dir), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    pilot = out["result"]
    assert out["state"] == "finished" and pilot["status"] == "finished"
    rates = sorted({c["rate"] for c in pilot["candidates"] if c["round"] == 1})
    assert rates == [0.01, 0.0316, 0.1, 0.316, 1.0]
    chosen = pilot["chosen_rate"]
    assert chosen != 1.0
    last_round = [c for c in pilot["candidates"] if c["round"] == max(c["round"] for c in pilot["candidates"])]
    finished = [c for c in last_round if c["status"] == "finished"]
    assert chosen == min(finished, key=lambda c: c["eval_loss"])["rate"]
    worst = next(c for c in pilot["candidates"] if c["rate"] == 1.0)
    best_first = min(c["eval_loss"] for c in pilot["candidates"] if c["round"] == 1 and c["status"] == "finished")
    assert worst["status"] == "diverged" or worst["eval_loss"] > best_first
    assert pilot["reason"].startswith("pilot: 5 rates x ") and f"chosen {chosen:.1e}" in pilot["reason"]
    assert pilot["spent_s"] <= 120  # inside 1 min plus loading (the budget bounds the steps)

    # The run directory has what the charts read; the charts draw one line per candidate and the chosen star.
    run_dir = runs_dir / out["run_id"]
    events = read_all_events(run_dir / "events.jsonl")
    kinds = {e["event"] for e in events}
    assert {"started", "pilot", "train_begin", "candidate", "log", "eval", "pilot_result", "finished"} <= kinds
    logs = [e for e in events if e["event"] == "log"]
    assert all({"candidate", "rate", "round", "local_step"} <= set(e) for e in logs)
    loss_chart = figures.pilot_loss_figure(events)
    assert len(loss_chart.data) == len({e["candidate"] for e in logs if isinstance(e.get("loss"), (int, float))}) >= 5
    rate_chart = figures.pilot_rate_figure(events)
    assert rate_chart.layout.xaxis.type == "log"
    star = next(trace for trace in rate_chart.data if trace.name.startswith("chosen"))
    assert list(star.x) == [chosen]
    assert not list(run_dir.glob("candidates/*/output")) and not list(run_dir.glob("candidates/*/checkpoints"))

    # --save wrote the plan with the chosen rate, and `tunewise train` runs it.
    tuned = Plan.load(saved)
    assert tuned.training.learning_rate == chosen and tuned.training.max_steps == 200
    train = tunewise("train", str(saved), "--max-steps", "3", "--runs-dir", str(runs_dir), "--json")
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads(train.stdout)["state"] == "finished"


def test_dpo_pilot_with_full_fine_tuning(tmp_path, make_plan, runs_dir):
    plan_file = _plan_file(tmp_path, make_plan, **{
        "stage": "dpo", "data.dataset": str(Path(make_plan().data.dataset).with_name("preference.jsonl")),
        "method.method": "full", "training.learning_rate": 1e-4, "training.max_steps": 100})
    result = tunewise("pilot", str(plan_file), "--budget-minutes", "0.4", "--runs-dir", str(runs_dir), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    pilot = json.loads(result.stdout)["result"]
    assert pilot["status"] == "finished" and pilot["design"]["stage"] == "dpo"
    losses = [c["eval_loss"] for c in pilot["candidates"] if c["status"] == "finished"]
    assert len(losses) >= 5 and all(math.isfinite(loss) for loss in losses)
    assert pilot["chosen_rate"] in {c["rate"] for c in pilot["candidates"]}


def test_bad_input_gets_a_clear_message(tmp_path, make_plan, runs_dir):
    tiny = tmp_path / "ten.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    tiny.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    small = tunewise("pilot", str(_plan_file(tmp_path, make_plan, **{"data.dataset": str(tiny)})),
                     "--budget-minutes", "1", "--runs-dir", str(runs_dir))
    assert small.returncode == 2 and "10 examples are too few for the pilot" in small.stderr
    assert "Traceback" not in small.stderr
    budget = tunewise("pilot", str(_plan_file(tmp_path, make_plan)), "--budget-minutes", "0.001", "--runs-dir",
                      str(runs_dir))
    assert budget.returncode == 2 and "too small for two candidates" in budget.stderr
    assert not list(runs_dir.iterdir())  # refused before any run directory was made


def test_a_stopped_pilot_keeps_what_it_measured(tmp_path, make_plan, runs_dir):
    from trainer import supervisor
    from trainer.pilot import pilot_design, read_result

    plan = Plan.load(_plan_file(tmp_path, make_plan, **{"training.max_steps": 2000}))
    run_id = supervisor.launch(plan, runs_dir, pilot=pilot_design(plan, budget_minutes=5).to_dict())
    run_dir = runs_dir / run_id
    wait_for(lambda: any(c.get("status") == "finished" for c in read_result(run_dir).get("candidates", [])), 180,
             "the first candidate to finish")
    supervisor.stop(run_id, runs_dir=runs_dir, timeout=60)
    status = supervisor.status(run_id, runs_dir)
    result = read_result(run_dir)
    assert status.state == "stopped" and result["status"] == "stopped"
    measured = [c for c in result["candidates"] if c["status"] == "finished"]
    assert measured and all(math.isfinite(c["eval_loss"]) for c in measured)
    assert result["note"].startswith(f"stopped after {len(measured)} of 7 candidates; what was measured is kept")
    assert "stopped after" in status.reason
    with pytest.raises(TunewiseError, match="is a learning-rate pilot: it is not resumed"):
        supervisor.resume(run_id, runs_dir)


def test_the_history_names_a_pilot_as_one(tmp_path, make_plan, runs_dir):
    from advisor.wizard import run_what
    from trainer import supervisor
    from trainer.rundir import PILOT_FILE, PLAN_FILE, write_json_atomic

    run_dir = runs_dir / "20260101-000000-pilot-sft-lora-abcd"
    run_dir.mkdir()
    make_plan().save(run_dir / PLAN_FILE)
    write_json_atomic(run_dir / PILOT_FILE, {"design": {}})
    status = supervisor.status(run_dir.name, runs_dir)
    assert status.summary.startswith("learning-rate pilot: sft lora")
    assert run_what(status).startswith("learning-rate pilot of sft lora on ")
