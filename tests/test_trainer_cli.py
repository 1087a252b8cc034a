"""`tunewise train / launch / runs / status / stop / resume / merge` as a user types them.

One real foreground run from flags only (no plan file); the rest checks how
flags and plan files combine and that mistakes give `error: ...` naming the
problem, without starting anything.
"""

from __future__ import annotations

import json

import pytest

import cli
from advisor.plan import Plan


def tunewise(*argv, capsys):
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_train_from_flags_then_runs_status_and_merge(tiny_model_dir, tiny_data_dir, runs_dir, capsys, tmp_path):
    code, out, err = tunewise(
        "train", "--model", tiny_model_dir, "--dataset", tiny_data_dir / "messages.jsonl", "--method", "lora",
        "--max-steps", 3, "--runs-dir", runs_dir, "--precision", "fp32", "--lr", "5e-3", "--seq-len", 64,
        "--lora-targets", "all-linear", "--no-forgetting", "--device", "cpu", "--name", "flags only",
        capsys=capsys,
    )
    assert code == 0, err
    run_id = next(line.split()[1] for line in out.splitlines() if line.startswith("run "))
    assert "flags-only" in run_id
    assert f"finished {run_id} at step 3" in out
    plan = Plan.load(runs_dir / run_id / "plan.yaml")
    assert (plan.model.name, plan.method.method, plan.training.max_steps, plan.training.learning_rate) == (
        str(tiny_model_dir), "lora", 3, 5e-3)
    assert plan.method.lora_targets == ("all-linear",) and plan.forgetting.monitor is False

    code, out, _ = tunewise("runs", "--runs-dir", runs_dir, "--json", capsys=capsys)
    listed = json.loads(out)
    assert code == 0 and [run["run_id"] for run in listed] == [run_id]
    assert listed[0]["state"] == "finished" and listed[0]["step"] == 3 and listed[0]["progress"] == 1.0

    code, out, _ = tunewise("status", run_id, "--runs-dir", runs_dir, "--json", capsys=capsys)
    status = json.loads(out)
    assert status["state"] == "finished" and status["last_loss"] > 0 and status["output_dir"].endswith("output")

    code, out, err = tunewise("resume", run_id, "--runs-dir", runs_dir, capsys=capsys)
    assert code == 2 and "has finished: there is nothing to resume" in err

    code, out, _ = tunewise("merge", run_id, "--runs-dir", runs_dir, "--out", tmp_path / "merged", "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["max_abs_logit_diff"] <= report["tolerance"]
    assert (tmp_path / "merged" / "config.json").is_file()


def test_flags_override_the_plan_file(tmp_path):
    import argparse

    from trainer.cli import plan_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    plan_file = tmp_path / "plan.yaml"
    Plan().with_overrides({"training.max_steps": 50, "method.lora_rank": 32}).save(plan_file)
    args = parser.parse_args(["launch", str(plan_file), "--max-steps", "7", "--gpus", "2", "--packing", "--beta", "0.3",
                              "--stage", "dpo", "--dataset", "demo-preference"])
    plan = plan_from_args(args)
    assert plan.training.max_steps == 7  # flag wins
    assert plan.method.lora_rank == 32  # file kept
    assert plan.hardware.num_gpus == 2 and plan.data.packing is True
    assert plan.stage == "dpo" and plan.preference.beta == 0.3


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train", "--lora-rank", "0"], "method.lora_rank"),
        (["launch", "--lr", "-0.001"], "training.learning_rate"),
        (["launch", "--method", "dora"], "method.method"),
        (["train", "missing-plan.yaml"], "missing-plan.yaml does not exist"),
        (["status", "nope"], "no run 'nope'"),
        (["stop", "nope"], "no run 'nope'"),
        (["merge", "nope"], "no run 'nope'"),
    ],
)
def test_mistakes_are_errors_that_name_the_problem(argv, expected, runs_dir, capsys):
    code, out, err = tunewise(*argv, "--runs-dir", runs_dir, capsys=capsys)
    assert code == 2
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err
    assert list(runs_dir.iterdir()) == []  # nothing was launched
