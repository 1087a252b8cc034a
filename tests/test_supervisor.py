"""The supervisor with real background training processes on the tiny model.

SIGKILL -> failed with signal 9 and intact events; resume continues from the
checkpoint's step; stop saves a checkpoint and ends `stopped`; the state is
rebuilt from the run directory alone (as after a UI restart); a bad plan
launched in the background fails with its message; 2-process DDP on the CPU
through accelerate completes; sharded plans get an FSDP config.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import wait_for

from advisor.plan import Plan
import trainer.status
from trainer import rundir, supervisor
from trainer.events import read_all_events

pytestmark = pytest.mark.slow


def test_kill_resume_then_stop(make_plan, runs_dir):
    # Effectively endless, checkpointing every 3 steps: only a kill or a stop ends it.
    plan = make_plan({"training.max_steps": 100_000, "training.save_steps": 3})
    run_id = supervisor.launch(plan, runs_dir=runs_dir)
    run_dir = runs_dir / run_id
    assert (run_dir / "plan.yaml").is_file() and Plan.load(run_dir / "plan.yaml") == plan
    assert supervisor.status(run_id, runs_dir).state == "running"

    first = wait_for(lambda: supervisor.status(run_id, runs_dir).checkpoint and supervisor.status(run_id, runs_dir),
                     240, "a first checkpoint")
    os.kill(first.pid, signal.SIGKILL)
    killed = wait_for(lambda: (s := supervisor.status(run_id, runs_dir)).state != "running" and s, 10, "the kill to be recorded")
    assert killed.state == "failed" and killed.signal == 9
    assert "signal 9" in killed.error
    events = read_all_events(run_dir / "events.jsonl")
    assert not [e for e in events if e["event"] == "corrupt"]
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["started", "model_loaded", "train_begin"] and kinds[-1] == "failed"
    assert events[-1]["signal"] == 9
    logged_steps = [e["step"] for e in events if e["event"] == "log"]
    assert logged_steps == list(range(1, len(logged_steps) + 1))  # every step up to the kill is there

    checkpoint = rundir.last_checkpoint(run_dir)
    resumed_from = int(checkpoint.name.split("-")[1])
    assert resumed_from % 3 == 0 and resumed_from >= 3
    assert supervisor.resume(run_id, runs_dir) == run_id
    after = wait_for(
        lambda: [e for e in read_all_events(run_dir / "events.jsonl")[len(events):] if e["event"] == "log"][2:] and
        read_all_events(run_dir / "events.jsonl")[len(events):],
        240,
        "three logged steps after the resume",
    )
    resumed = [e for e in after if e["event"] == "resumed"][0]
    assert resumed["step"] == resumed_from and resumed["checkpoint"] == str(checkpoint)
    begin = [e for e in after if e["event"] == "train_begin"][0]
    assert begin["start_step"] == resumed_from
    assert [e["step"] for e in after if e["event"] == "log"][:3] == [resumed_from + 1, resumed_from + 2, resumed_from + 3]

    stopped = supervisor.stop(run_id, timeout=120, runs_dir=runs_dir)
    assert stopped.state == "stopped" and stopped.reason == "stopped by the user"
    assert stopped.exit_code == 0 and stopped.signal is None
    final = rundir.last_checkpoint(run_dir)
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == stopped.step > resumed_from
    assert [e["event"] for e in read_all_events(run_dir / "events.jsonl")].count("stopped") == 1

    # A fresh process (a restarted UI) rebuilds the same picture from the run directory alone.
    trainer.status._DIGESTS.clear()
    again = supervisor.status(run_id, runs_dir)
    assert (again.state, again.step, again.attempts) == ("stopped", stopped.step, 2)
    assert [run.run_id for run in supervisor.list_runs(runs_dir)] == [run_id]
    events, offset = supervisor.read_run_events(run_id, 0, runs_dir)
    assert events[0]["event"] == "started" and offset == (run_dir / "events.jsonl").stat().st_size
    assert supervisor.read_run_events(run_id, offset, runs_dir) == ([], offset)


def test_background_run_with_a_bad_dataset_fails_with_its_message(make_plan, runs_dir, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    older = supervisor.launch(make_plan({"data.dataset": str(broken)}), runs_dir=runs_dir, name="broken")
    status = supervisor.wait(older, timeout=120, runs_dir=runs_dir)
    assert status.state == "failed" and status.user_error
    assert "line 2 of broken.jsonl is not valid JSON" in status.error
    assert status.exit_code == 2 and status.signal is None
    with pytest.raises(Exception, match="no checkpoint"):
        supervisor.resume(older, runs_dir)


def test_two_process_ddp_on_the_cpu(make_plan, runs_dir):
    plan = make_plan({"training.max_steps": 3, "hardware.num_gpus": 2})
    run_id = supervisor.launch(plan, runs_dir=runs_dir)
    status = supervisor.wait(run_id, timeout=400, runs_dir=runs_dir)
    run_dir = runs_dir / run_id
    assert status.state == "finished", (status.error, status.error_lines)
    assert "accelerate.commands.launch" in json.loads((run_dir / "run.json").read_text())["attempts"][0]["command"]
    events = read_all_events(run_dir / "events.jsonl")
    assert [e["event"] for e in events].count("started") == 1  # rank 1 stays silent
    assert events[0]["world_size"] == 2
    assert sorted(p.name for p in (run_dir / "procs").iterdir()) == ["rank0.pid", "rank1.pid"]
    logs = [e for e in events if e["event"] == "log"]
    # Each optimizer step consumes micro_batch (4) examples per process from 48: 8/48 of an epoch.
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert logs[0]["epoch"] == pytest.approx(8 / 48)
    assert (run_dir / "output" / "adapter_model.safetensors").is_file()
    # Said where the monitor shows it: two CPU processes are a check of the plan, not a speed-up.
    (notice,) = [e for e in events if e["event"] == "notice" and "no GPU on this machine" in e["message"]]
    assert "2 processes run DDP on the CPU" in notice["message"]


def test_sharded_plans_get_an_fsdp_config(make_plan, tmp_path):
    from trainer.accelerate_config import accelerate_config, write_accelerate_config

    zero3 = make_plan({"hardware.num_gpus": 4, "hardware.shard": "zero3", "hardware.cpu_offload": True,
                       "hardware.device": "cuda"})
    config = accelerate_config(zero3)
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 4
    assert config["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert config["fsdp_config"]["fsdp_offload_params"] is True
    zero2 = accelerate_config(make_plan({"hardware.num_gpus": 2, "hardware.shard": "zero2", "hardware.device": "cuda"}))
    assert zero2["fsdp_config"]["fsdp_sharding_strategy"] == "SHARD_GRAD_OP"
    ddp = accelerate_config(make_plan({"hardware.num_gpus": 2, "hardware.device": "cpu"}))
    assert ddp["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in ddp
    path = write_accelerate_config(zero3, tmp_path / "accelerate.yaml")
    import yaml

    assert yaml.safe_load(path.read_text()) == config
    command = supervisor.training_command(tmp_path, zero3)
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in command
    assert command[command.index("--num_processes") + 1] == "4"


def test_unknown_runs_are_refused_clearly(runs_dir):
    from advisor.errors import TunewiseError

    with pytest.raises(TunewiseError, match="no run 'nope'"):
        supervisor.status("nope", runs_dir)
    assert supervisor.list_runs(runs_dir) == []
    assert rundir.default_runs_dir() == runs_dir  # $TUNEWISE_RUNS_DIR


def test_a_copied_dataset_keeps_the_run_going_when_the_original_goes(make_plan, runs_dir, tmp_path):
    """What the app does for uploads: the run trains on its own copy under data/."""
    import shutil

    plan = make_plan({"training.max_steps": 2})
    upload = tmp_path / "upload-folder" / "my data.jsonl"
    upload.parent.mkdir()
    shutil.copyfile(plan.data.dataset, upload)
    run_id = supervisor.launch(plan.with_overrides({"data.dataset": str(upload)}), runs_dir=runs_dir,
                               copy_dataset=True)
    shutil.rmtree(upload.parent)  # e.g. demo mode cleaning old uploads
    run_dir = runs_dir / run_id
    saved = Plan.load(run_dir / "plan.yaml")
    assert Path(saved.data.dataset) == run_dir / "data" / "my data.jsonl"
    assert Path(saved.data.dataset).read_bytes() == Path(plan.data.dataset).read_bytes()
    final = supervisor.wait(run_id, timeout=300, runs_dir=runs_dir)
    assert final.state == "finished", final.error


def test_a_stop_saves_before_it_measures_and_waits_as_long_as_the_run_needs(make_plan, runs_dir, tiny_data_dir):
    """With the forgetting monitor measuring every step (the heaviest load it puts on a stop), a stop writes
    its checkpoint before any measurement of that step, the wait before a kill is scaled to the run's own
    measured times, and the run ends stopped (not killed) with the checkpoint of the step it stopped at."""
    plan = make_plan({"training.max_steps": 100_000, "forgetting.monitor": True, "forgetting.eval_every": 1,
                      "forgetting.original_data": str(tiny_data_dir / "original.jsonl")})
    run_id = supervisor.launch(plan, runs_dir=runs_dir)
    running = wait_for(lambda: (s := supervisor.status(run_id, runs_dir)).step >= 4 and s, 240, "four steps")
    assert running.step_s and running.stop_wait_s >= trainer.status.STOP_GRACE_S + 2 * running.step_s
    stopped = supervisor.stop(run_id, runs_dir=runs_dir)  # the run's own wait, not a fixed 30 s
    assert stopped.state == "stopped" and stopped.reason == "stopped by the user", stopped
    events = read_all_events(runs_dir / run_id / "events.jsonl")
    assert not events[-1].get("forced")
    (checkpoint,) = [e for e in events if e["event"] == "checkpoint"]
    at_stop = [e for e in events if e.get("step") == checkpoint["step"]]
    kinds = [e["event"] for e in at_stop]
    # One measurement at that step. Made after the stop was asked for, it is the final one and comes after the
    # save; a stop that arrives just after the step's own measurement (on_step_end ran before it) finds that
    # step measured already and measures nothing more (CI caught that order: forgetting, log, checkpoint).
    measured = [(i, e) for i, e in enumerate(at_stop) if e["event"] == "forgetting"]
    assert len(measured) == 1, kinds
    index, measurement = measured[0]
    if measurement.get("final"):
        assert kinds.index("checkpoint") < index, kinds
    else:
        assert index < kinds.index("checkpoint"), kinds
    assert rundir.last_checkpoint(runs_dir / run_id).name == f"checkpoint-{checkpoint['step']}"
