"""The learning-rate pilot: its design (pure), and real pilots on the tiny model in their own processes.

- the design: rates half a decade apart around the plan's, steps from the budget, round 2's finalists
  (the best and its neighbours, the rung beyond the ladder's end when the best sits there), a clear refusal
  for a budget too small for two candidates, for data too small to hold out a split, for stages and
  pipelines it does not measure;
- the horizon transfer (pure): the best rate of a round as a vertex in log(rate), moved to the run's length
  by (pilot steps / run steps) ** 0.32 (nothing for a pilot as long as the run), and an exponent fitted on
  the pilot's own rounds only when they are far enough apart and it is plausible;
- `tunewise pilot --save` on SFT LoRA: a known-bad rate (1.0) is never chosen, the chosen rate is the best
  of the last round moved to the run's length (never above the best candidate's bracket), the run directory
  has the events the charts read, and the saved plan is one `tunewise train` runs;
- a DPO pilot with full fine-tuning;
- a stopped pilot keeps what it measured and says so, and is not resumed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.errors import TunewiseError
from advisor.pilot import (HORIZON_EXPONENT, MIN_STEPS, choose, design_pilot, fit_exponent, horizon_optimum, ladder,
                           second_round, transfer, transfer_choice)
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
    # 10% of the run's time buys 5 x s + 3 x 2s steps, plus each candidate's loading and evaluation.
    assert design.budget_s == pytest.approx(0.1 * 60_000 * design.step_s)
    assert design.budget_source.startswith("10% of the run's")
    assert design.keep == 3 and design.steps >= MIN_STEPS and len(design.rates) == 5
    assert design.train_steps == 5 * design.steps + 3 * 2 * design.steps
    assert design.expected_s <= design.budget_s + 1e-9
    two = design_pilot(plan, budget_minutes=2, **common)
    assert two.budget_s == 120 and two.steps < design.steps and two.budget_source == "--budget-minutes"
    # A short run's share would buy mostly loading: a minute at least.
    short = design_pilot(plan.with_overrides({"training.max_steps": 600}), share=0.1, **common)
    assert short.budget_s == 60 and "floor" in short.budget_source
    # A smaller budget drops round 2, then the outer rates, before refusing.
    lean = design_pilot(plan, budget_minutes=0.15, **common)
    assert lean.keep == 0 and len(lean.rates) in (2, 3, 5) and lean.expected_s <= 9 + 1e-9


def test_round_two_keeps_the_best_and_its_neighbours_or_looks_past_the_end():
    rates = ladder(1e-3)
    assert second_round(rates, [5.0, 4.0, 3.0, 3.5, 9.0]) == [1e-03, 3.16e-03, 3.16e-04]  # lower loss first
    # The best is the highest rate: the rung beyond it comes first.
    assert second_round(rates, [5.0, 4.0, 3.0, 2.5, 2.0]) == [1e-02, 3.16e-02, 3.16e-03]
    assert second_round(rates, [1.0, 4.0, 3.0, 2.5, 2.0]) == [1e-04, 3.16e-05, 3.16e-04]
    # A neighbour that diverged is not trained again; a trimmed round keeps the better neighbour.
    assert second_round(rates, [5.0, 4.0, 3.0, math.inf, 9.0]) == [1e-03, 3.16e-04]
    assert second_round(rates, [5.0, 4.0, 3.0, 3.5, 9.0], keep=2) == [1e-03, 3.16e-03]
    assert second_round(rates, [math.inf] * 5) == []
    results = [{"rate": 1e-3, "round": 1, "status": "finished", "eval_loss": 1.0},
               {"rate": 3.16e-3, "round": 2, "status": "finished", "eval_loss": 1.2},
               {"rate": 1e-3, "round": 2, "status": "finished", "eval_loss": 1.1},
               {"rate": 1e-2, "round": 2, "status": "diverged", "eval_loss": None}]
    assert choose(results)["rate"] == 1e-3 and choose(results)["round"] == 2  # the last round decides
    assert choose([{"rate": 1.0, "round": 1, "status": "diverged", "eval_loss": None}]) is None


def _round(number: int, steps: int, points) -> list[dict]:
    return [{"rate": rate, "round": number, "steps": steps, "eval_loss": None if loss is None else loss,
             "status": "diverged" if loss is None else "finished"} for rate, loss in points]


#: Full fine-tuning of the demo model at 17 and 34 steps (bench/RESULTS.md, horizon table): the best rate is
#: ~2e-3 at both, and ~1e-3 after 600 steps.
DEMO_17 = [(3.16e-4, 2.2149), (1e-3, 1.7906), (3.16e-3, 1.7363), (1e-2, 2.3824), (3.16e-2, None)]
DEMO_34 = [(1e-3, 1.4342), (3.16e-3, 1.354), (1e-2, 1.9045)]


def test_the_best_rate_of_a_round_is_the_vertex_between_worse_neighbours():
    # Symmetric neighbours: the middle; a worse right neighbour pulls the vertex left, inside the bracket.
    assert horizon_optimum([(1e-4, 2.0), (1e-3, 1.0), (1e-2, 2.0)]) == (1e-3, True)
    rate, bracketed = horizon_optimum([(p, loss) for p, loss in DEMO_17 if loss is not None])
    assert bracketed and rate == pytest.approx(1.94e-3) and 1e-3 < rate < 3.16e-3
    # A neighbour tying the best while the other rises: the optimum lies between the two that tie, not on the one
    # noise made best (a pilot's round 2 on the demo: 1e-3: 1.269, 3.16e-3: 1.268, 1e-2: 1.534 -> 1.8e-3).
    rate, bracketed = horizon_optimum([(1e-3, 1.2690), (3.16e-3, 1.2682), (1e-2, 1.5342)])
    assert bracketed and 1.6e-3 < rate < 2.0e-3
    rate, bracketed = horizon_optimum([(1e-4, 1.001), (1e-3, 1.0), (1e-2, 2.0)])
    assert bracketed and 2.8e-4 < rate < 3.6e-4  # (about the geometric middle of 1e-4 and 1e-3)
    # The best at an end, next to a failed rate, or on a bottom flat on both sides: the best candidate itself.
    assert horizon_optimum([(1e-4, 1.0), (1e-3, 2.0), (1e-2, 3.0)]) == (1e-4, False)
    assert horizon_optimum([(1e-4, 2.0), (1e-3, 1.0), (1e-2, math.inf)]) == (1e-3, False)
    assert horizon_optimum([(1e-4, 1.001), (1e-3, 1.0), (1e-2, 1.002)]) == (1e-3, False)


def test_transfer_moves_the_rate_by_the_horizon_and_a_pilot_as_long_as_the_run_moves_nothing():
    assert HORIZON_EXPONENT == 0.32  # Bjorck et al. 2025: LR* = C N^-0.23 D^-0.32
    assert transfer(2e-3, 600, 600) == 2e-3 and transfer(2e-3, 900, 600) == 2e-3
    assert transfer(2e-3, 34, 600) == pytest.approx(2e-3 * (34 / 600) ** 0.32, rel=1e-3)  # 8.0e-4
    assert transfer(2e-3, 60, 600, exponent=0.5) == pytest.approx(2e-3 / math.sqrt(10), rel=1e-3)
    results = _round(1, 17, DEMO_17) + _round(2, 34, DEMO_34)
    moved = transfer_choice(results, 600)
    assert (moved.measured_rate, moved.measured_steps, moved.bracketed) == (2.06e-3, 34, True)
    assert moved.measured_loss == 1.354 and moved.exponent == 0.32 and moved.rate == 8.22e-4
    text = moved.text()
    assert "best at 34 steps 2.1e-03" in text and "(34/600)^0.32 (Bjorck et al. 2025" in text and text.endswith("-> 8.2e-04")
    assert "own rounds (1.9e-03 at 17 steps, 2.1e-03 at 34) give -0.09, 2x apart, too close to fit one" in text
    same = transfer_choice(results, 34)
    assert same.rate == same.measured_rate == 2.06e-3 and "moves nothing" in same.text()
    # Round 1 only: its own vertex at its own steps.
    assert transfer_choice(_round(1, 17, DEMO_17), 600).rate == transfer(1.94e-3, 17, 600)
    # The known-bad rate (diverged at 3.16e-2) is never chosen, and the transfer only lowers the rate.
    assert moved.rate < moved.measured_rate < 3.16e-3
    assert transfer_choice(_round(1, 17, [(1.0, None)]), 600) is None


def test_the_exponent_is_fitted_only_on_rounds_far_apart_and_falls_back_when_noisy():
    # 4x apart, a plausible exponent: used.
    assert fit_exponent((17, 2e-3), (68, 1.3e-3)) == pytest.approx(0.311, abs=1e-3)
    # 2x apart (the default pilot's rounds): too close to resolve, whatever it gives.
    assert fit_exponent((17, 2e-3), (34, 1.6e-3)) is None
    # The rounds agree (no measurable drift) or disagree wildly (noise, or the wrong sign): the published one.
    assert fit_exponent((17, 2e-3), (68, 1.99e-3)) is None
    assert fit_exponent((17, 2e-3), (68, 1e-4)) is None
    assert fit_exponent((17, 2e-3), (68, 4e-3)) is None
    # In a pilot: rounds 4x apart fit their own exponent; an unbracketed round falls back.
    far = (_round(1, 10, [(1e-3, 2.0), (3.16e-3, 1.5), (1e-2, 2.0)])
           + _round(2, 40, [(3.16e-4, 1.6), (1e-3, 1.3), (3.16e-3, 1.35)]))
    fitted = transfer_choice(far, 400)  # 3.16e-3 at 10 steps (symmetric), 1.51e-3 at 40: exponent 0.53
    assert fitted.measured_rate == 1.51e-3 and fitted.exponent == pytest.approx(0.533, abs=1e-3)
    assert "fitted on this pilot's rounds: 3.2e-03 at 10 steps, 1.5e-03 at 40" in fitted.exponent_source
    assert fitted.rate == transfer(1.51e-3, 40, 400, fitted.exponent) == pytest.approx(1.51e-3 / 10 ** 0.533, rel=1e-2)
    edge = _round(1, 10, [(1e-3, 2.0), (3.16e-3, 1.5), (1e-2, 2.0)]) + _round(2, 40, [(3.16e-4, 1.1), (1e-3, 1.2)])
    at_edge = transfer_choice(edge, 400)
    assert at_edge.exponent == HORIZON_EXPONENT and (at_edge.measured_rate, at_edge.edge) == (3.16e-4, "bottom")
    assert "(the best candidate, the lowest rate it tried: the best may lie lower)" in at_edge.text()
    assert transfer_choice(_round(1, 17, DEMO_17), 600).edge == ""


def test_refusals_name_the_problem_and_the_way_out():
    plan = Plan().with_overrides({"training.max_steps": 20})
    common = dict(params=1_585_440, train_examples=1800, tokens_per_example=35, weight_bytes=6_000_000)
    with pytest.raises(TunewiseError, match="too small for two candidates") as small:
        design_pilot(plan, budget_minutes=0.02, **common)
    assert small.value.field == "budget_minutes" and "minutes (--budget-minutes), or plan a longer run" in str(small.value)
    with pytest.raises(TunewiseError, match=re.escape('minutes ("Check budget (minutes)"), or plan a longer run')):
        design_pilot(plan, budget_minutes=0.02, budget_name='"Check budget (minutes)"', **common)  # the page's box
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
    last_round = [c for c in pilot["candidates"] if c["round"] == max(c["round"] for c in pilot["candidates"])]
    finished = [c for c in last_round if c["status"] == "finished"]
    best = min(finished, key=lambda c: c["eval_loss"])
    worst = next(c for c in pilot["candidates"] if c["rate"] == 1.0)
    best_first = min(c["eval_loss"] for c in pilot["candidates"] if c["round"] == 1 and c["status"] == "finished")
    assert worst["status"] == "diverged" or worst["eval_loss"] > best_first
    # The chosen rate is the last round's best, placed between its neighbours and moved to the run's 200
    # steps: never above the best candidate's upper neighbour, so never the known-bad 1.0.
    assert best["rate"] != 1.0 and chosen <= best["rate"] * 10 ** 0.5 < 1.0
    measured = pilot["measured"]
    assert measured["measured_steps"] == best["steps"] and measured["run_steps"] == 200
    assert chosen == transfer(measured["measured_rate"], best["steps"], 200, measured["exponent"])
    assert pilot["chosen_eval_loss"] == best["eval_loss"]
    assert pilot["reason"].startswith("pilot: 5 rates x ") and f"chosen {chosen:.1e}" in pilot["reason"]
    assert f"best at {best['steps']} steps {measured['measured_rate']:.1e}" in pilot["reason"]
    if best["steps"] < 200:
        assert chosen < measured["measured_rate"] and f"moved to the run's 200 steps by ({best['steps']}/200)^" in pilot["reason"]
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
    measured = pilot["measured"]
    assert pilot["chosen_rate"] == transfer(measured["measured_rate"], measured["measured_steps"], 100,
                                            measured["exponent"]) <= max(c["rate"] for c in pilot["candidates"])


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
    assert result["note"].startswith(f"stopped after {len(measured)} of 8 candidates; what was measured is kept")
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


def test_the_pages_budget_box_reads_minutes_and_names_itself_when_it_cannot():
    from advisor.wizard import PILOT_BUDGET_LABEL, DemoLimits, pilot_budget

    assert pilot_budget("") is None and pilot_budget(None) is None and pilot_budget("  ") is None  # the default share
    assert pilot_budget("2.5") == 2.5 and pilot_budget("1,440") == 1440.0 and pilot_budget(20) == 20.0
    for bad, why in (("soon", "must be a number of minutes"), ("0", "out of range"), ("-3", "out of range"),
                     ("nan", "finite"), ("1e9", "out of range")):
        with pytest.raises(TunewiseError) as refused:
            pilot_budget(bad)
        assert refused.value.field == "pilot_budget" and PILOT_BUDGET_LABEL in str(refused.value) and why in str(refused.value)
    # The public demo: at most its cap, said as such.
    limits = DemoLimits()
    assert pilot_budget("3", limits) == 3.0
    with pytest.raises(TunewiseError, match="the public demo checks for at most 3 minutes"):
        pilot_budget("30", limits)
