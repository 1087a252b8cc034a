"""Chained pipelines: SFT -> DPO and SFT -> RM -> PPO end to end (tiny), stop propagation and resume.

Each step must be its own run directory with plan.yaml, events.jsonl and
result.json; the pipeline's events.jsonl must carry `stage` events and the
steps' metrics on one timeline; a second run of a finished pipeline skips
every step; a stop request for the pipeline reaches its steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from advisor.plan import Plan
from conftest import tiny_plan_dict
from test_preference import tiny_preference_setup  # noqa: F401  (session fixture)
from trainer.context import RunContext
from trainer.events import EventWriter, read_all_events
from trainer.pipeline import StepContext, run_pipeline
from trainer.rundir import STOP_FILE, last_checkpoint


def pipeline_ctx(run_dir: Path, setup: dict, pipeline: str, overrides: dict | None = None) -> RunContext:
    plan = Plan.from_dict(tiny_plan_dict(setup["model"], setup["data"])).with_overrides({
        "pipeline": pipeline,
        "data.dataset": str(Path(setup["data"]) / "preference.jsonl"),
        "data.eval_fraction": 0.2,
        "training.max_steps": 2,
        "preference.sample_every": 2,
        "preference.num_samples": 2,
        "preference.max_new_tokens": 6,
        **(overrides or {}),
    })
    run_dir.mkdir(parents=True, exist_ok=True)
    plan.save(run_dir / "plan.yaml")
    return RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))


@pytest.mark.slow
def test_dpo_pipeline_end_to_end_then_resume_skips_finished_steps(tmp_path, tiny_preference_setup):
    ctx = pipeline_ctx(tmp_path / "pipe", tiny_preference_setup, "dpo")
    result = run_pipeline(ctx)
    assert result["status"] == "finished"
    steps = tmp_path / "pipe" / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["1-sft", "2-dpo"]
    for step in ("1-sft", "2-dpo"):
        assert Plan.load(steps / step / "plan.yaml").pipeline == "none"
        kinds = [e["event"] for e in read_all_events(steps / step / "events.jsonl")]
        assert kinds[0] == "started" and kinds[-1] == "finished" and "log" in kinds
    dpo_plan = Plan.load(steps / "2-dpo" / "plan.yaml")
    assert dpo_plan.stage == "dpo" and dpo_plan.preference.sft_model == str(steps / "1-sft" / "output")
    events = read_all_events(tmp_path / "pipe" / "events.jsonl")
    stages = [(e["stage"], e["status"]) for e in events if e["event"] == "stage"]
    assert stages == [("sft", "started"), ("sft", "finished"), ("dpo", "started"), ("dpo", "finished")]
    # DPO's metrics are forwarded after SFT's two steps: one timeline.
    dpo_logs = [e for e in events if e["event"] == "log" and e.get("stage") == "dpo"]
    assert [e["step"] for e in dpo_logs] == [3, 4] and [e["local_step"] for e in dpo_logs] == [1, 2]
    assert any(e["event"] == "sample" and e["stage"] == "dpo" for e in events)
    report = json.loads((tmp_path / "pipe" / "comparison.json").read_text())
    assert set(report["branches"]) == {"dpo"} and report["branches"]["dpo"]["heldout_accuracy"] is not None

    again = run_pipeline(pipeline_ctx(tmp_path / "pipe", tiny_preference_setup, "dpo"))
    assert again["status"] == "finished" and again["outputs"] == result["outputs"]
    events = read_all_events(tmp_path / "pipe" / "events.jsonl")
    assert [e["status"] for e in events if e["event"] == "stage"][-2:] == ["skipped", "skipped"]


@pytest.mark.slow
def test_rlhf_pipeline_end_to_end(tmp_path, tiny_preference_setup):
    ctx = pipeline_ctx(tmp_path / "rlhf", tiny_preference_setup, "rlhf")
    result = run_pipeline(ctx)
    assert result["status"] == "finished", result
    steps = tmp_path / "rlhf" / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["1-sft", "2-rm", "3-ppo"]
    ppo_plan = Plan.load(steps / "3-ppo" / "plan.yaml")
    assert ppo_plan.preference.reward_model == str(steps / "2-rm" / "output")
    events = read_all_events(tmp_path / "rlhf" / "events.jsonl")
    ppo_logs = [e for e in events if e["event"] == "log" and e.get("stage") == "ppo"]
    assert ppo_logs and all(e["objective/kl"] >= 0 for e in ppo_logs)
    report = json.loads((tmp_path / "rlhf" / "comparison.json").read_text())
    assert report["branches"]["rlhf"]["reward_source"] == "reward_model"
    assert report["branches"]["rlhf"]["reward_model_heldout_accuracy"] is not None


@pytest.mark.slow
def test_compare_pipeline_reports_both_branches_side_by_side(tmp_path, tiny_preference_setup):
    ctx = pipeline_ctx(tmp_path / "cmp", tiny_preference_setup, "compare")
    result = run_pipeline(ctx)
    assert result["status"] == "finished", result
    steps = tmp_path / "cmp" / "steps"
    assert sorted(p.name for p in steps.iterdir()) == ["1-sft", "2-rm", "3-ppo", "4-dpo"]
    # Both branches start from the one SFT output.
    sft_out = str(steps / "1-sft" / "output")
    assert Plan.load(steps / "3-ppo" / "plan.yaml").preference.sft_model == sft_out
    assert Plan.load(steps / "4-dpo" / "plan.yaml").preference.sft_model == sft_out
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(report["branches"]) == {"rlhf", "dpo"}
    for branch in report["branches"].values():
        assert branch["heldout_accuracy"] is not None and math.isfinite(branch["reward"])
        assert branch["kl"] >= 0
        # Scored by the same reward model, so the two rewards are on one scale.
        assert branch["reward_source"] == "reward_model"
    events = read_all_events(tmp_path / "cmp" / "events.jsonl")
    (event,) = [e for e in events if e["event"] == "comparison"]
    assert set(event["branches"]) == {"rlhf", "dpo"}

    # What the monitor shows of it: the table side by side, one curve per stage with the boundaries marked,
    # PPO's own objective, and the header on the current stage's numbers.
    import figures

    table = figures.comparison_table(events)
    assert table["headers"] == ["", "RLHF (SFT -> RM -> PPO)", "DPO (SFT -> DPO)"]
    rows = {row[0]: row[1:] for row in table["data"]}
    assert rows["scored by"] == ["reward_model", "reward_model"] and len(rows["held-out preference accuracy"]) == 2
    figure = figures.loss_figure(events)
    names = [trace.name for trace in figure.data]
    assert names[:4] == ["sft loss", "rm loss", "ppo policy loss", "ppo objective (reward - KL penalty)"], names
    assert "dpo loss" in names
    assert [a.text for a in figure.layout.annotations] == ["sft", "rm", "ppo", "dpo"]
    running = events[: next(i for i, e in enumerate(events) if e.get("event") == "stage" and e.get("stage") == "ppo"
                            and e.get("status") == "finished")]
    progress = figures.run_progress(running)
    assert (progress.stage, progress.stage_index, progress.stages, progress.max_steps) == ("ppo", 3, 4, 2)
    assert 0.5 < progress.fraction < 1.0 and progress.stage_step == 2
    assert "stage 3/4 (ppo)" in figures.run_header_html("cmp", progress)


def test_pipeline_stop_reaches_steps_and_ends_stopped(tmp_path, tiny_preference_setup):
    ctx = pipeline_ctx(tmp_path / "stop", tiny_preference_setup, "rlhf")
    step = StepContext(plan=ctx.plan, run_dir=tmp_path / "stop" / "steps" / "1-sft",
                       events=EventWriter(tmp_path / "step-events.jsonl"), parent=ctx)
    assert not step.stop_requested()
    (tmp_path / "stop" / STOP_FILE).write_text("stop requested by test\n")
    assert step.stop_requested()
    result = run_pipeline(ctx)
    assert result["status"] == "stopped" and result["completed"] == []
    assert not (tmp_path / "stop" / "steps").exists()


@pytest.mark.slow
def test_a_stopped_pipeline_resumes_in_the_background(tmp_path, tiny_preference_setup):
    """Through the supervisor, as the wizard and `tunewise resume` do: stop during DPO, resume, finish."""
    import time

    from trainer import supervisor

    runs = tmp_path / "runs"
    ctx = pipeline_ctx(tmp_path / "plan-only", tiny_preference_setup, "dpo",
                       {"training.max_steps": 40, "preference.sample_every": 20})
    run_id = supervisor.launch(ctx.plan, runs_dir=runs)
    run_dir = runs / run_id
    deadline = time.monotonic() + 300
    while not any(e["event"] == "log" and e.get("stage") == "dpo" for e in read_all_events(run_dir / "events.jsonl")):
        assert time.monotonic() < deadline, "DPO never started"
        assert supervisor.status(run_id, runs).state == "running", supervisor.status(run_id, runs).error
        time.sleep(0.1)
    stopped = supervisor.stop(run_id, timeout=120, runs_dir=runs)
    assert stopped.state == "stopped", stopped.error
    dpo_dir = run_dir / "steps" / "2-dpo"
    checkpoint = last_checkpoint(dpo_dir)
    assert checkpoint is not None  # the stop saved the DPO step
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 0 < stopped_at < 40

    assert supervisor.resume(run_id, runs) == run_id
    final = supervisor.wait(run_id, timeout=300, runs_dir=runs)
    assert final.state == "finished", final.error
    events = read_all_events(run_dir / "events.jsonl")
    resumed = [e for e in events if e["event"] == "resumed"][-1]
    assert resumed["finished_steps"] == ["sft"] and resumed["next_stage"] == "dpo"
    assert resumed["checkpoint"] == str(checkpoint)
    after = events[events.index(resumed):]
    assert [(e["stage"], e["status"]) for e in after if e["event"] == "stage"] == [
        ("sft", "skipped"), ("dpo", "started"), ("dpo", "finished")]
    step_events = read_all_events(dpo_dir / "events.jsonl")
    begins = [e for e in step_events if e["event"] == "train_begin"]
    assert begins[-1]["start_step"] == stopped_at  # continued, not restarted
    assert json.loads((dpo_dir / "result.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_finished_pipeline_gives_a_model_to_sample_merge_and_export(tmp_path, tiny_preference_setup):
    """The final policy by default, any step on request: samples, `tunewise merge` and the export all find it."""
    import cli
    from advisor.errors import TunewiseError
    from trainer import runs, samples
    from trainer.rundir import final_output, model_outputs

    run_dir = tmp_path / "rlhf"
    assert run_pipeline(pipeline_ctx(run_dir, tiny_preference_setup, "rlhf"))["status"] == "finished"
    assert [o.label for o in model_outputs(run_dir)] == ["1-sft", "2-rm", "3-ppo"]
    final = final_output(run_dir)
    assert final.label == "3-ppo" and final.path == run_dir / "steps" / "3-ppo" / "output" and not final.checkpoint
    assert final_output(run_dir, "sft").label == "1-sft" and final_output(run_dir, "2").stage == "rm"
    with pytest.raises(TunewiseError, match="no step 'dpo'.*1-sft, 2-rm, 3-ppo"):
        final_output(run_dir, "dpo")

    rows = samples.generate(run_dir, ["Convert 2011-09-24 to day, month and year."], timeout_s=300)
    assert len(rows) == 1 and rows[0][0].startswith("Convert") and isinstance(rows[0][2], str)

    out = tmp_path / "merged-sft"
    assert cli.main(["merge", str(run_dir), "--step", "sft", "--out", str(out), "--json"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["adapter_dir"] == str(run_dir / "steps" / "1-sft" / "output")
    assert report["max_abs_logit_diff"] <= report["tolerance"] and (out / "config.json").is_file()

    archive, note = runs.export(run_dir, tmp_path / "exports", reload_16bit=False, timeout_s=300)
    assert note.startswith("3-ppo: merged into") and Path(archive).is_file()
    import zipfile

    with zipfile.ZipFile(archive) as zipped:
        assert "config.json" in zipped.namelist() and any(n.endswith(".safetensors") for n in zipped.namelist())
