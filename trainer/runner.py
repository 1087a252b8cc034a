"""The training process: `python -m trainer.runner RUN_DIR [--resume CHECKPOINT]`.

Runs one plan inside its run directory and reports through events.jsonl:

1. `started` (plan summary, pid, world size, Python and library versions);
2. a pre-flight check of everything that is cheap to check before any model
   is loaded (plan valid, model resolvable, dataset present and well formed
   with the right columns, checkpoint to resume present, device and
   precision usable, sequence length within the model's maximum, SFT rows
   that keep a token with loss after the cut to seq_len), so a bad
   plan fails in seconds with a `failed` event naming the problem;
3. the stage (`trainer.stages.get_stage(plan.stage)`) or, for a pipeline,
   `trainer.pipeline.run_pipeline(ctx)`, or for a learning-rate pilot (pilot.json
   in the run directory) `trainer.pilot.run_pilot(ctx)`;
4. exactly one terminal event: `finished` (result metrics), `stopped` (with
   the reason) or `failed` (the message; for a bug also the last traceback
   lines; a user error carries `user_error: true` and no traceback).

SIGTERM / SIGINT become a cooperative stop (the stage saves and returns
"stopped"). Under `accelerate launch` every rank runs this; the rank comes
from the environment and only rank 0 writes events. Each rank records its
pid in `procs/rank<N>.pid` so the supervisor can signal (or, as a last
resort, kill) every training process of a run.

The `started` event carries the plan's memory estimate for the device it trains
on (`memory_estimate`, see trainer.memwatch); every `log` carries the measured
memory. Running out of memory ends the run with a `failed` event that says so
(`oom`: "cuda" or "host") with the estimate, what the machine has, the measured
peak before the failure and the planner's cheapest fix.

Exit codes: 0 finished or stopped, 1 failed (a bug or crash), 2 failed
(a problem with the plan or its inputs), 3 failed because the run's disk is
full (`trainer.rundir.EXIT_DISK_FULL`; said on stderr too, in case even the
`failed` event did not fit), 4 failed out of memory (GPU or host RAM).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import traceback
from importlib import metadata
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.plan import PIPELINE_STAGES, Plan
from advisor.profile import config_max_length
from trainer.context import RunContext
from trainer.events import EVENTS_FILE, EventWriter, is_disk_full
from trainer.procs import rank_from_env, record_rank_pid, world_size_from_env
from trainer.rundir import (DISK_FULL_BYTES, EXIT_DISK_FULL, PILOT_FILE, PLAN_FILE, checkpoint_step,
                            drop_partial_checkpoints)

TRACEBACK_LINES = 12
#: Exit code of a run that ran out of GPU memory or host RAM (its `failed` event says which and what to do).
EXIT_OUT_OF_MEMORY = 4

#: The data each stage reads (see trainer.data.DATA_KINDS).
STAGE_DATA_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompts"}




def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions










def _check_lora_targets(plan: Plan, resolved: str) -> None:
    """LoRA targets must name linear layers the model has: PEFT would only say so after loading the
    model, with a traceback. Models the spec reader cannot describe are left to PEFT."""
    from advisor import specs

    try:
        spec = specs.resolve_model(resolved, allow_hub=False)
    except TunewiseError:
        return
    specs.resolve_targets(spec, plan.method.lora_targets)


def preflight(ctx: RunContext) -> None:
    """Check what is cheap to check before loading any model; raise TunewiseError naming the problem."""
    from trainer.data import check_dataset
    from trainer.models import base_of_adapter, check_model, quantization_config, resolve_precision

    plan = ctx.plan
    if plan.model.trust_remote_code:
        ctx.emit("notice", message="warning: model.trust_remote_code is on, so the model repository's own Python code "
                 "runs on this machine with your rights; turn it off unless you trust the model's authors")
    if ctx.resume_from is not None and not (Path(ctx.resume_from) / "trainer_state.json").is_file():
        raise TunewiseError(f"cannot resume: {ctx.resume_from} is not a checkpoint (no trainer_state.json)")
    resolved = check_model(plan)
    base = base_of_adapter(resolved) if Path(resolved).is_dir() else None
    max_positions = config_max_length(base or resolved)
    if max_positions is not None:
        # Longer than the model's window trains only with RoPE scaling, which the model's config must take.
        from trainer.models import scaled_config

        scaled_config(plan, base or resolved)
    if plan.method.use_liger_kernel:
        _check_liger(plan)
    if plan.method.method != "full":
        _check_lora_targets(plan, base or resolved)
    if plan.pipeline == "none" and plan.stage == "ppo":
        # The PPO stage would find out only after importing TRL and loading the policy.
        from trainer.sources import resolve_model_source

        if not plan.preference.reward_model:
            raise TunewiseError("preference.reward_model: PPO needs a reward model: give a reward-model run id, its "
                                "directory or a model path (the rlhf pipeline fills it in)", field="preference.reward_model")
        resolve_model_source(plan.preference.reward_model, "preference.reward_model", ctx.run_dir)
    # A pipeline's steps all read the plan's dataset: check it the way each of them will load it, so an
    # rlhf pipeline on chat data is refused now, not after its SFT step has trained.
    stages = (plan.stage,) if plan.pipeline == "none" else PIPELINE_STAGES[plan.pipeline]
    for kind in dict.fromkeys(STAGE_DATA_KIND[stage] for stage in stages):
        check_dataset(plan, kind)
    if "sft" in stages:
        # Rows the cut to seq_len leaves without a loss token (TRL drops them silently): said by number, with
        # the fix; none left at all fails now (trainer.preview, TRL's own labelling).
        from trainer.models import load_tokenizer
        from trainer.preview import check_loss_masks

        check_loss_masks(plan, load_tokenizer(plan), lambda message: ctx.emit("notice", message=message))
    from trainer.forgetting import check_original_text

    check_original_text(plan)
    from trainer.training_args import check_report_to

    check_report_to(plan)
    precision = resolve_precision(plan)
    quantization_config(plan, precision)  # QLoRA without bitsandbytes fails here
    if plan.hardware.num_gpus > 1 and world_size_from_env() == 1:
        ctx.emit(
            "notice",
            message=f"the plan asks for {plan.hardware.num_gpus} processes but this one runs alone "
            "(start it with `tunewise launch` to get accelerate launch)",
        )
    elif world_size_from_env() > 1 and precision.device == "cpu":
        ctx.emit("notice", message=f"no GPU on this machine: the plan's {world_size_from_env()} processes run DDP on "
                 "the CPU (gloo). That checks a multi-GPU plan end to end, but it is no faster than one process; "
                 "on a GPU machine each process gets its own GPU")


def _check_liger(plan: Plan) -> None:
    """The Liger kernel is Triton code for CUDA GPUs: refuse it on the CPU, and without the package."""
    import importlib.util

    from trainer.models import resolve_precision

    if resolve_precision(plan).device != "cuda":
        raise TunewiseError(
            "method.use_liger_kernel: the Liger kernel runs Triton kernels on CUDA GPUs, and this run trains on the "
            "CPU: turn it off (--no-liger-kernel), or train on a GPU", field="method.use_liger_kernel")
    if importlib.util.find_spec("liger_kernel") is None:
        raise TunewiseError(
            "method.use_liger_kernel: the liger-kernel package is not installed: pip install liger-kernel, or turn "
            "it off (--no-liger-kernel)", field="method.use_liger_kernel")


def _device(plan: Plan) -> str:
    """Where the run will train (the planner's estimate is for that device)."""
    from trainer.models import _cuda_available

    return "cuda" if plan.hardware.device != "cpu" and _cuda_available() else "cpu"


def _dispatch(ctx: RunContext) -> dict:
    if (ctx.run_dir / PILOT_FILE).is_file():  # a learning-rate pilot (trainer/pilot.py), not a training run
        from trainer.pilot import run_pilot

        return run_pilot(ctx)
    if ctx.plan.pipeline != "none":
        from trainer.pipeline import run_pipeline

        return run_pipeline(ctx)
    from trainer.stages import get_stage

    return get_stage(ctx.plan.stage)(ctx)


def _disk_full(exc: BaseException, run_dir: Path) -> bool:
    """Whether `exc` came from a full disk: ENOSPC, or a library's own error (torch's zip writer
    says "unexpected pos ...") raised while the run's disk has (almost) no room left."""
    if is_disk_full(exc):
        return True
    try:
        return shutil.disk_usage(run_dir).free < DISK_FULL_BYTES
    except OSError:
        return False




def _disk_full_message(exc: BaseException, run_dir: Path, removed: list[str]) -> str:
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        free = 0
    dropped = f"; removed the half-written {', '.join(removed)}" if removed else ""
    return (
        f"the disk is full (No space left on device: {free} bytes free on the disk holding {run_dir}) "
        f"while writing the run ({type(exc).__name__}: {exc}){dropped}. Free some space, then "
        f"`tunewise resume {run_dir.name}` continues from the newest complete checkpoint"
    )


def _terminal_fields(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in ("status", "reason")}


def run(run_dir: str | Path, resume: str | Path | None = None) -> int:
    """Run the plan in `run_dir`, write its events, return the process exit code."""
    run_dir = Path(run_dir).resolve()
    try:
        return _run(run_dir, resume)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # Even the `failed` event did not fit (the disk reserve was gone too): say it where the watcher and
        # a person can still see it, the exit code and stderr.
        _say(f"error: {_disk_full_message(exc, run_dir, [])}")
        return EXIT_DISK_FULL


def _say(text: str) -> None:
    """Print to stderr, which may itself be a file on the full disk."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


def _run(run_dir: Path, resume: str | Path | None) -> int:
    rank = rank_from_env()
    if not (run_dir / PLAN_FILE).is_file():
        # Writing events would re-create a run directory the user deleted (a ghost run): refuse.
        print(f"error: {run_dir} has no {PLAN_FILE} (was the run directory deleted?)", file=sys.stderr)
        return 2
    events = EventWriter(run_dir / EVENTS_FILE)

    def emit(event: str, **fields):
        if rank == 0:
            events.emit(event, **fields)

    record_rank_pid(run_dir, rank)
    try:
        plan = Plan.load(run_dir / PLAN_FILE)
    except TunewiseError as exc:
        emit("started", pid=os.getpid(), world_size=world_size_from_env(), **_versions())
        emit("failed", error=str(exc), field=exc.field, user_error=True)
        return 2

    ctx = RunContext(plan=plan, run_dir=run_dir, events=events, resume_from=Path(resume) if resume else None, rank=rank)
    if resume:
        events.step = checkpoint_step(Path(resume))  # steps continue from the checkpoint, not from 0
    try:
        ctx.install_signal_handlers()
    except ValueError:  # not the main thread (an in-process caller): stops go through the STOP file
        pass
    from trainer import memwatch

    estimate = memwatch.plan_estimate(plan, _device(plan))
    emit(
        "started",
        pid=os.getpid(),
        world_size=world_size_from_env(),
        summary=plan.summary(),
        stage=plan.stage,
        pipeline=plan.pipeline,
        method=plan.method.method,
        model=plan.model.name,
        dataset=plan.data.dataset,
        resume_from=str(resume) if resume else None,
        host=platform.node(),
        memory_estimate=estimate,
        **_versions(),
    )
    try:
        preflight(ctx)
        result = _dispatch(ctx)
    except TunewiseError as exc:
        emit("failed", error=str(exc), field=exc.field, user_error=True)
        return 2
    except Exception as exc:  # a bug or a crash: report it with where it happened
        if memwatch.is_cuda_oom(exc) or memwatch.is_host_oom(exc):
            # Out of GPU memory or host RAM: say what the plan estimated, what the machine has, what was measured.
            describe = memwatch.cuda_oom_message if memwatch.is_cuda_oom(exc) else memwatch.host_oom_message
            message, fields = describe(plan, estimate, exc, events.step)
            _say(f"error: {message}")
            emit("failed", error=message, user_error=True, **fields)
            return EXIT_OUT_OF_MEMORY
        if _disk_full(exc, run_dir):
            removed = drop_partial_checkpoints(run_dir) if rank == 0 else []
            message = _disk_full_message(exc, run_dir, removed)
            _say(f"error: {message}")
            emit("failed", error=message, user_error=True, disk_full=True)
            return EXIT_DISK_FULL
        lines = traceback.format_exc().rstrip().splitlines()[-TRACEBACK_LINES:]
        emit("failed", error=f"{type(exc).__name__}: {exc}", traceback=lines, user_error=False)
        if rank != 0:
            traceback.print_exc()
        return 1
    result = dict(result or {})
    if result.get("status") == "stopped":
        emit("stopped", reason=result.get("reason") or "stop requested", **_terminal_fields(result))
    else:
        emit("finished", **_terminal_fields(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.runner", description="Run the plan in a run directory.")
    parser.add_argument("run_dir", help="the run directory (holds plan.yaml)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="a checkpoint directory to continue from")
    args = parser.parse_args(argv)
    return run(args.run_dir, args.resume)


if __name__ == "__main__":
    sys.exit(main())
