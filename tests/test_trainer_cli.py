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


@pytest.mark.parametrize("command", [["runs"], ["status", "20250101-000000-piped"]], ids=["runs", "status"])
def test_output_into_a_closed_pipe_prints_no_traceback(command, runs_dir, make_plan):
    """`tunewise status RUN | head -1`: the reader goes away before everything is written."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir = runs_dir / "20250101-000000-piped"
    run_dir.mkdir()
    make_plan().save(run_dir / "plan.yaml")
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_dir.name, "created_at": time.time(), "attempts": [
        {"started_at": time.time() - 9, "pid": 999_999_999, "ended_at": time.time() - 1, "exit_code": 0}]}))
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "finished", "time": time.time() - 1, "step": 3}) + "\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `head -1` after its line; here before the first one, so it never races
    try:
        done = subprocess.run([sys.executable, "-m", "cli", *command, "--runs-dir", str(runs_dir)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=Path(cli.__file__).parent, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141, (done.returncode, done.stderr)  # 128 + SIGPIPE, as a shell reports it


# -- the flags come from the plan's own description of each setting (advisor.plan.settings()) ----------------


def _parser():
    """(the `tunewise` parser with the training subcommands, those subcommands by name)."""
    import argparse

    from trainer.cli import register

    parser = argparse.ArgumentParser(prog="tunewise")
    subcommands = parser.add_subparsers(dest="command")
    register(subcommands)
    return parser, subcommands.choices


def _other_value(setting):
    """A valid value of `setting` that is not its default (awkward where it can be: a float that `:g` would
    round, several target modules)."""
    if setting.choices:
        return next(choice for choice in setting.choices if choice != setting.default)
    if setting.type is bool:
        return not setting.default
    if setting.type is tuple:
        return ("q_proj", "v_proj", "gate_proj")
    if setting.type is str:
        return f"some {setting.name}"  # a space: the command line must quote it
    low, high = setting.limit.low, setting.limit.high
    if setting.type is int:
        return low + 3 if setting.default != low + 3 else low + 2
    return low + (min(high, 1000.0) - low) * 0.123456789


def test_every_flag_is_listed_with_its_help_and_accepted():
    from advisor.cli import flag_argv
    from advisor.plan import settings
    from trainer.cli import plan_from_args

    parser, commands = _parser()
    for command in ("train", "launch"):
        shown = "".join(commands[command].format_help().split())  # argparse wraps the help: compare without spaces
        for setting in settings():
            if setting.flag:
                assert setting.flag in shown and "".join(setting.help.split()) in shown, (command, setting.dotted)
    for setting in settings():
        if setting.flag:
            value = _other_value(setting)
            # (--shard first: CPU offload needs sharding; --eval-steps: early stopping compares evaluations;
            # --rope-scaling: a RoPE factor stretches a scaling)
            plan = plan_from_args(parser.parse_args(["launch", "--shard", "zero3", "--eval-steps", "5",
                                                     "--rope-scaling", "yarn", *flag_argv(setting, value)]))
            assert setting.value(plan) == value, setting.dotted


def test_a_plan_round_trips_through_the_command_the_wizard_prints():
    import shlex

    from advisor import wizard
    from advisor.plan import settings
    from trainer.cli import plan_from_args

    changed = {s.dotted: _other_value(s) for s in settings()}
    changed["method.method"] = "qlora"  # DoRA (method.use_dora, on here) needs adapters: not full fine-tuning
    plan = Plan().with_overrides(changed)
    assert all(s.value(plan) != s.default for s in settings())  # every setting differs from its default
    text = wizard.train_command(plan, runs_dir="my runs")
    line = next(line for line in text.splitlines() if line.startswith("tunewise train --"))
    unflagged = [s.dotted for s in settings() if not s.flag]
    assert f"# (only the plan file carries: {', '.join(unflagged)})" in text
    argv = shlex.split(line)
    assert argv[-2:] == ["--runs-dir", "my runs"]
    parsed = plan_from_args(_parser()[0].parse_args(argv[1:]))
    # Only what no flag carries is lost: the advisor's record of the data size.
    assert unflagged == ["data.examples", "data.tokens"]
    assert parsed == Plan.from_dict({**plan.to_dict(), "data": {**plan.to_dict()["data"], "examples": None, "tokens": None}})
    # The defaults need no flags but what runs.
    assert wizard.train_command(Plan()).splitlines()[1] == "tunewise train --model demo --dataset demo-sft --method lora"


def _ended_run(runs_dir, run_id: str, plan, terminal: str) -> str:
    """A run directory as the supervisor lays it out, ended with `terminal` (finished / stopped), without training."""
    import time

    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True)
    plan.save(run_dir / "plan.yaml")
    now = time.time()
    record = {"run_id": run_id, "name": None, "created_at": now - 60, "summary": plan.summary(),
              "attempts": [{"started_at": now - 60, "ended_at": now - 10, "exit_code": 0, "pid": 1}]}
    (run_dir / "run.json").write_text(json.dumps(record), encoding="utf-8")
    events = [{"event": "started", "time": now - 50, "step": 0}, {"event": "log", "time": now - 40, "step": 1, "loss": 2.0},
              {"event": terminal, "time": now - 20, "step": 1, **({"reason": "stop requested"} if terminal == "stopped" else {})}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return run_id


def test_runs_are_renamed_tagged_and_filtered_from_the_command_line(runs_dir, make_plan, capsys):
    from trainer import supervisor

    sft = _ended_run(runs_dir, "20250101-000000-sft", make_plan(), "finished")
    dpo = _ended_run(runs_dir, "20250101-000001-dpo", make_plan({"stage": "dpo"}), "stopped")
    code, out, err = tunewise("runs", "--runs-dir", runs_dir, "--rename", sft, "lr sweep: 5e-3", "--tag", sft,
                              "baseline", "--tag", dpo, "baseline", "--tag", dpo, "r8", capsys=capsys)
    assert code == 0, err
    assert f"{sft}  name lr sweep: 5e-3  tags baseline" in out
    # Stored in the run directory, and the run id is unchanged.
    assert json.loads((runs_dir / sft / "meta.json").read_text()) == {"name": "lr sweep: 5e-3", "tags": ["baseline"]}
    assert supervisor.status(sft, runs_dir).name == "lr sweep: 5e-3"

    def listed(*filters):
        code, out, _ = tunewise("runs", "--runs-dir", runs_dir, "--json", *filters, capsys=capsys)
        assert code == 0
        return [run["run_id"] for run in json.loads(out)]

    assert listed("--with-tag", "baseline") == [dpo, sft]
    assert listed("--with-tag", "r8") == [dpo]
    assert listed("--stage", "sft") == [sft] and listed("--stage", "dpo") == [dpo]
    assert listed("--state", "stopped") == [dpo] and listed("--state", "running") == []
    assert listed("--with-tag", "baseline", "--state", "finished") == [sft]
    code, out, _ = tunewise("runs", "--runs-dir", runs_dir, capsys=capsys)
    assert f'"lr sweep: 5e-3"  #baseline' in out and "#baseline #r8" in out

    code, out, _ = tunewise("runs", "--runs-dir", runs_dir, "--untag", dpo, "baseline", capsys=capsys)
    assert code == 0 and listed("--with-tag", "baseline") == [sft]
    code, _, err = tunewise("runs", "--runs-dir", runs_dir, "--tag", sft, "two words", capsys=capsys)
    assert code == 2 and "tag: 'two words' is not a tag: use one word" in err
    code, _, err = tunewise("runs", "--runs-dir", runs_dir, "--rename", sft, "  ", capsys=capsys)
    assert code == 2 and "name: is empty" in err
    code, _, err = tunewise("runs", "--runs-dir", runs_dir, "--tag", "no-such-run", "x", capsys=capsys)
    assert code == 2 and "no-such-run" in err


@pytest.mark.slow
def test_delete_refuses_a_running_run_and_deletes_an_ended_one(runs_dir, make_plan, capsys):
    from conftest import wait_for
    from trainer import supervisor

    running = supervisor.launch(make_plan({"training.max_steps": 100_000}), runs_dir)
    try:
        wait_for(lambda: supervisor.status(running, runs_dir).state == "running", 120, "the run to start")
        code, _, err = tunewise("runs", "--runs-dir", runs_dir, "--delete", running, capsys=capsys)
        assert code == 2 and f"run {running} is still running: stop it before deleting it" in err
        assert (runs_dir / running / "plan.yaml").is_file()
    finally:
        supervisor.stop(running, runs_dir=runs_dir, timeout=60)
    code, out, _ = tunewise("runs", "--runs-dir", runs_dir, "--delete", running, capsys=capsys)
    assert code == 0 and out.strip() == f"deleted {running}" and not (runs_dir / running).exists()
