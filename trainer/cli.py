"""The training subcommands of `tunewise`: train, launch, pilot, runs, status, stop, resume, merge, job, build-demo.

`register(subparsers)` adds them to the parser in `cli.py`. A plan comes from
a PLAN.yaml, from flags, or both (flags override the file), so one line runs
the demo without a plan file:

    tunewise train --model demo --dataset demo-sft --method lora --max-steps 30 --runs-dir DIR

`train` runs in the foreground with a progress bar driven by the run's
events (Ctrl-C stops it cleanly: a checkpoint is saved); `launch` starts
the same thing detached and prints the run id; `pilot` measures the
learning rate first (trainer/pilot.py) and `--save` writes the plan with
it. `runs`, `status`, `stop`,
`resume`, `merge` take `--json` for scripts. Mistakes raise `TunewiseError`
(printed as `error: ...`, exit 2). Nothing here imports torch except `merge`
and `build-demo`, which need it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from advisor.errors import TunewiseError
from advisor.cli import add_plan_flags, plan_overrides
from advisor.plan import ASSETS_DIR, Plan, settings
from trainer import jobs, rundir

def _flagged() -> list:
    """Every plan setting that has a flag (advisor.plan.settings(): the flag, its help and its type are
    declared once, on the Plan's field)."""
    return [setting for setting in settings() if setting.flag]


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", nargs="?", help="a plan file (YAML); flags override its settings")
    add_plan_flags(parser.add_argument_group("plan settings (override the plan file)"), _flagged())
    _add_runs_dir(parser)


def _add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", help="the runs folder (default: $TUNEWISE_RUNS_DIR or ./runs)")


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The plan file (or the defaults) with the flags applied; PlanError names a bad setting."""
    plan = Plan.load(args.plan) if getattr(args, "plan", None) else Plan()
    return plan.with_overrides(plan_overrides(args, _flagged()))


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- train (foreground) and launch (detached) --------------------------------------------------------


def follow(run_id: str, runs_dir: str | None, quiet: bool = False, offset: int = 0):
    """Show a run's progress from its events (from byte `offset`: a resume shows only its own attempt) until
    it ends; Ctrl-C asks it to stop. Returns its status."""
    from tqdm import tqdm

    from trainer import supervisor

    bar = None if quiet else tqdm(total=None, unit="step", desc=run_id, dynamic_ncols=True)
    stopping = False
    try:
        while True:
            try:
                events, offset = supervisor.read_run_events(run_id, offset, runs_dir)
                for event in events:
                    _show(event, bar)
                current = supervisor.status(run_id, runs_dir)
                if not current.active:
                    events, offset = supervisor.read_run_events(run_id, offset, runs_dir)
                    for event in events:
                        _show(event, bar)
                    return current
                time.sleep(0.3)
            except KeyboardInterrupt:
                if stopping:
                    raise
                stopping = True
                message = "stopping: the run saves a checkpoint and exits (Ctrl-C again to leave it running)"
                tqdm.write(message) if bar is not None else print(message, file=sys.stderr)
                supervisor.request_stop(run_id, runs_dir, reason="stopped from the terminal (Ctrl-C)")
    finally:
        if bar is not None:
            bar.close()


def _show(event: dict, bar) -> None:
    kind = event.get("event")
    write = (lambda text: bar.write(text)) if bar is not None else (lambda text: None)
    if kind == "train_begin" and bar is not None:
        bar.reset(total=event.get("max_steps") or None)
        bar.n = event.get("start_step") or 0
        bar.refresh()
    elif kind == "log" and bar is not None:
        bar.n = event.get("step", bar.n)
        postfix = {}
        for key in ("loss", "learning_rate", "rewards/margins", "objective/kl"):
            if isinstance(event.get(key), (int, float)):
                postfix[key] = f"{event[key]:.4g}"
        bar.set_postfix(postfix, refresh=True)
    elif kind == "eval":
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in event.items() if k.startswith("eval_") and isinstance(v, (int, float)))
        write(f"step {event.get('step')}: eval {metrics}")
    elif kind in ("notice", "alert"):
        write(f"{kind}: {event.get('message')}")
    elif kind == "forgetting":
        write(
            f"step {event.get('step')}: original-domain loss {event.get('loss')} "
            f"(baseline {event.get('baseline_loss')}, {event.get('degradation_pct')}%)"
        )
    elif kind == "checkpoint":
        write(f"step {event.get('step')}: checkpoint {event.get('path')}")
    elif kind == "stage":
        write(f"stage: {json.dumps({k: v for k, v in event.items() if k not in ('event', 'time')})}")
    elif kind == "candidate" and event.get("status") != "started":
        loss = event.get("eval_loss")
        shown = f"eval loss {loss:.4f}" if isinstance(loss, (int, float)) else event.get("status")
        write(f"candidate {event.get('candidate')} (round {event.get('round')}): learning rate {event.get('rate'):.2e}, "
              f"{event.get('steps')} steps: {shown} ({event.get('seconds', 0):.0f} s)")


def _finish(current, as_json: bool) -> int:
    """Print how a run ended; exit code 0 finished/stopped, 2 failed on the user's input, 1 otherwise."""
    if as_json:
        _print_json(current.to_dict())
        return 0 if current.state in ("finished", "stopped") else 1
    if current.state == "finished":
        loss = f", last loss {current.last_loss:.4f}" if current.last_loss is not None else ""
        print(f"finished {current.run_id} at step {current.step}{loss}; output: {current.output_dir}")
        return 0
    if current.state == "stopped":
        print(f"stopped {current.run_id} at step {current.step} ({current.reason}); resume with `tunewise resume {current.run_id}`")
        return 0
    if current.user_error:
        raise TunewiseError(f"{current.error} (run {current.run_id})")
    print(f"failed {current.run_id}: {current.error}", file=sys.stderr)
    for line in current.error_lines:
        print(f"  {line}", file=sys.stderr)
    return 1


def cmd_train(args: argparse.Namespace) -> int:
    from trainer import supervisor

    plan = plan_from_args(args)
    run_id = supervisor.launch(plan, runs_dir=args.runs_dir, name=plan.name)
    if not args.json:
        print(f"run {run_id} in {rundir.find_run_dir(run_id, args.runs_dir)}")
    current = follow(run_id, args.runs_dir, quiet=args.json)
    return _finish(current, args.json)


def cmd_launch(args: argparse.Namespace) -> int:
    from trainer import supervisor

    plan = plan_from_args(args)
    run_id = supervisor.launch(plan, runs_dir=args.runs_dir, name=plan.name)
    if args.json:
        _print_json(supervisor.status(run_id, args.runs_dir).to_dict())
    else:
        print(run_id)
    return 0


# -- pilot: measure the learning rate on this model, data and hardware --------------------------------


def plan_with_rate(plan: Plan, rate: float) -> Plan:
    """`plan` training at the pilot's chosen rate (a DPO run: its stage's rate, which is the plan's)."""
    return plan.with_overrides({"training.learning_rate": rate})


def _pilot_table(result: dict) -> list[str]:
    lines = ["rate       round  steps  held-out loss  seconds"]
    for entry in sorted(result.get("candidates") or [], key=lambda r: (r["round"], r["rate"])):
        loss = entry.get("eval_loss")
        shown = f"{loss:.4f}" if isinstance(loss, (int, float)) else entry.get("status", "?")
        best = (result.get("measured") or {}).get("measured_rate", result.get("chosen_rate"))
        last = entry["round"] == max(r["round"] for r in result["candidates"])
        mark = "  <- chosen" if entry.get("rate") == result.get("chosen_rate") and last else (
            "  <- best at this horizon" if last and best is not None and isinstance(entry.get("eval_loss"), (int, float))
            and entry.get("eval_loss") == result.get("chosen_eval_loss") else "")
        lines.append(f"{entry['rate']:<10.2e} {entry['round']:>5}  {entry['steps']:>5}  {shown:>13}  "
                     f"{entry.get('seconds', 0):>7.1f}{mark}")
    return lines


def cmd_pilot(args: argparse.Namespace) -> int:
    from advisor.pilot import minutes
    from trainer import supervisor
    from trainer.pilot import pilot_design, read_result

    plan = plan_from_args(args)
    design = pilot_design(plan, args.budget_minutes, args.share)
    if not args.json:
        print(f"pilot: {design.describe()}", flush=True)
    run_id = supervisor.launch(plan, runs_dir=args.runs_dir, name=plan.name and f"pilot-{plan.name}",
                               pilot=design.to_dict())
    run_dir = rundir.find_run_dir(run_id, args.runs_dir)
    if args.background:
        if args.json:
            _print_json(supervisor.status(run_id, args.runs_dir).to_dict())
        else:
            print(run_id)
        return 0
    if not args.json:
        print(f"run {run_id} in {run_dir}", flush=True)
    current = follow(run_id, args.runs_dir, quiet=args.json)
    result = read_result(run_dir)
    if current.state == "failed" and not result.get("candidates"):
        return _finish(current, args.json)
    saved = None
    refusal = None
    if args.save:
        if result.get("status") == "finished" and result.get("chosen_rate"):
            saved = str(plan_with_rate(plan, result["chosen_rate"]).save(args.save))
        else:
            refusal = (f"not saved to {args.save}: the pilot {result.get('status') or current.state} before it finished "
                       "its search, so its best rate so far may not be the best (run it again to measure all of them)")
    if args.json:
        _print_json({"run_id": run_id, "state": current.state, "result": result, "saved": saved, "not_saved": refusal})
        return 0 if current.state in ("finished", "stopped") else 1
    for line in _pilot_table(result):
        print(line)
    if result.get("note"):
        print(f"note: {result['note']}")
    if result.get("reason"):
        print(f"learning rate {result['chosen_rate']:.2e}: {result['reason']}")
    print(f"spent {minutes(result.get('spent_s') or 0)} of a {minutes(design.budget_s)} budget ({design.budget_source})")
    if saved:
        print(f"plan written to {saved} (learning rate {result['chosen_rate']:.2e}); `tunewise train {saved}` runs it")
    if refusal:
        print(refusal)
    if current.state == "failed":
        return _finish(current, False)
    return 0


# -- run management -------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    from trainer import supervisor

    if args.delete:
        for run in args.delete:
            print(f"deleted {supervisor.delete(run, args.runs_dir)}")
        return 0
    if args.rename or args.tag or args.untag:
        changed = []
        for run, name in args.rename or []:
            changed.append(supervisor.relabel(run, args.runs_dir, name=name))
        for run, tag in args.tag or []:
            changed.append(supervisor.relabel(run, args.runs_dir, add_tags=(tag,)))
        for run, tag in args.untag or []:
            changed.append(supervisor.relabel(run, args.runs_dir, remove_tags=(tag,)))
        for run in changed:
            print(f"{run.run_id}  name {run.name or '-'}  tags {', '.join(run.tags) or '-'}")
        return 0
    runs = supervisor.filter_runs(supervisor.list_runs(args.runs_dir), tag=args.with_tag, stage=args.stage,
                                  state=args.state)
    if args.json:
        _print_json([run.to_dict() for run in runs])
        return 0
    if not runs:
        print(f"no runs in {args.runs_dir or rundir.default_runs_dir()}")
    for run in runs:
        print(run.describe())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from trainer import supervisor

    current = supervisor.status(args.run, args.runs_dir)
    if args.json:
        _print_json(current.to_dict())
        return 0
    print(current.describe())
    print(f"  directory  {current.run_dir}")
    if current.checkpoint:
        print(f"  checkpoint {current.checkpoint}")
    if current.output_dir:
        print(f"  output     {current.output_dir}")
    if current.reason:
        print(f"  reason     {current.reason}")
    if current.hint:
        print(f"  stalled?   {current.hint}")
    if current.damage:
        print(f"  damaged    {current.damage}")
    if current.error:
        print(f"  error      {current.error}")
        for line in current.error_lines:
            print(f"    {line}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from trainer import supervisor

    before = supervisor.status(args.run, args.runs_dir)
    if not before.active:
        raise TunewiseError(f"run {before.run_id} has already {before.state}: there is nothing to stop")
    current = supervisor.stop(args.run, timeout=args.timeout, runs_dir=args.runs_dir)
    if args.json:
        _print_json(current.to_dict())
    else:
        print(current.describe())
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from trainer import supervisor

    resumed = supervisor.resume_run(args.run, args.runs_dir)
    run_id = resumed.run_id
    if not args.json:
        print(f"resumed {run_id}: {resumed.message}", flush=True)
    if args.follow:
        return _finish(follow(run_id, args.runs_dir, quiet=args.json, offset=resumed.events_offset), args.json)
    if args.json:
        _print_json(supervisor.status(run_id, args.runs_dir).to_dict())
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from trainer.merge import merge_and_export

    source = Path(args.run).expanduser()
    if not source.exists():
        source = rundir.find_run_dir(args.run, args.runs_dir)
    report = merge_and_export(
        source,
        args.out,
        prompts=args.prompt or None,
        reload_16bit=args.reload_16bit,
        tolerance=args.tolerance,
        step=args.step,
    )
    if args.json:
        _print_json(report)
    else:
        print(f"merged model written to {report['out_dir']} ({report['dtype']})")
        print(
            f"largest logit difference, merged vs base + adapter, on {len(report['prompts'])} prompts: "
            f"{report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:.3g}); "
            f"the adapter itself moves logits by up to {report['adapter_effect']:.3g}"
        )
    return 0


def cmd_build_demo(args: argparse.Namespace) -> int:
    script = ASSETS_DIR / "build_demo_model.py"
    if not script.is_file():
        raise TunewiseError(f"{script} is missing: this checkout has no demo-model recipe")
    command = [sys.executable, str(script), *args.extra]
    return subprocess.call(command)


def register(subparsers) -> None:
    """Add the training subcommands to the `tunewise` parser."""
    train = subparsers.add_parser(
        "train",
        help="train in the foreground with a progress bar (Ctrl-C stops and saves)",
        description="Run a plan (file and/or flags) in the foreground; the run is also listed by `tunewise runs`.",
    )
    _add_plan_flags(train)
    train.add_argument("--json", action="store_true", help="no progress bar; print the final status as JSON")
    train.set_defaults(func=cmd_train)

    launch = subparsers.add_parser(
        "launch",
        help="start a run in the background and print its id",
        description="Start a plan (file and/or flags) detached from this terminal; follow it with `tunewise status`.",
    )
    _add_plan_flags(launch)
    launch.add_argument("--json", action="store_true", help="print the run's status as JSON")
    launch.set_defaults(func=cmd_launch)

    pilot = subparsers.add_parser(
        "pilot",
        help="measure the learning rate on your model, data and hardware: short runs at 5 rates, the best kept",
        description="A short learning-rate search for a plan (file and/or flags, as for `train`; --max-steps or "
                    "--epochs say how long the real run will be): five rates half a decade apart around the plan's, "
                    "then the best two for twice as long, scored by held-out loss. SFT (full, LoRA, QLoRA) and DPO; "
                    "a reward model, PPO / RLOO / GRPO and pipelines are refused with what to pilot instead. It runs "
                    "in its own run directory like any run (`tunewise stop` ends it, keeping what it measured).",
    )
    _add_plan_flags(pilot)
    pilot.add_argument("--budget-minutes", type=float, help="spend at most this long (default: --share of the run's time)")
    pilot.add_argument("--share", type=float, help="the pilot's share of the planned run's training time (default 0.1)")
    pilot.add_argument("--save", metavar="PLAN.yaml", help="write the plan with the chosen learning rate to this file")
    pilot.add_argument("--background", action="store_true", help="start it detached and print its run id")
    pilot.add_argument("--json", action="store_true", help="no progress bar; print the result as JSON")
    pilot.set_defaults(func=cmd_pilot)

    runs = subparsers.add_parser("runs", help="list runs, newest first (or delete ended ones)")
    _add_runs_dir(runs)
    runs.add_argument("--delete", metavar="RUN", action="append",
                      help="delete this run's directory (repeatable); a queued or running run is refused")
    runs.add_argument("--rename", nargs=2, metavar=("RUN", "NAME"), action="append",
                      help="give the run a display name (its id stays); repeatable")
    runs.add_argument("--tag", nargs=2, metavar=("RUN", "TAG"), action="append",
                      help="add a tag to the run (one word: letters, digits, _ . + -); repeatable")
    runs.add_argument("--untag", nargs=2, metavar=("RUN", "TAG"), action="append", help="remove a tag from the run")
    runs.add_argument("--with-tag", metavar="TAG", help="list only the runs with this tag")
    runs.add_argument("--stage", help="list only the runs of this stage (sft, rm, dpo, ppo) or pipeline "
                      "(rlhf, compare, pipeline:dpo)")
    runs.add_argument("--state", choices=("queued", "running", "finished", "failed", "stopped"),
                      help="list only the runs in this state")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    status = subparsers.add_parser("status", help="state, step, loss and errors of a run")
    status.add_argument("run", help="run id (or a unique prefix) or run directory")
    _add_runs_dir(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    stop = subparsers.add_parser("stop", help="stop a run (it saves a checkpoint; killed after --timeout)")
    stop.add_argument("run", help="run id or run directory")
    stop.add_argument("--timeout", type=float, default=None,
                      help="seconds to wait before killing (default: scaled to the run's own step, checkpoint-save "
                           "and forgetting-check times, at least 30)")
    _add_runs_dir(stop)
    stop.add_argument("--json", action="store_true")
    stop.set_defaults(func=cmd_stop)

    resume = subparsers.add_parser("resume", help="continue a stopped or failed run from its newest checkpoint")
    resume.add_argument("run", help="run id or run directory")
    resume.add_argument("--follow", action="store_true", help="stay attached with a progress bar")
    _add_runs_dir(resume)
    resume.add_argument("--json", action="store_true")
    resume.set_defaults(func=cmd_resume)

    merge = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its 16-bit base and export it (checked against base + adapter)",
    )
    merge.add_argument("run", help="run id, run directory or adapter directory")
    merge.add_argument("--out", help="output folder (default: <run dir>/merged)")
    merge.add_argument("--prompt", action="append", help="a prompt for the logit check (repeatable)")
    merge.add_argument(
        "--reload-16bit",
        action="store_true",
        help="for a QLoRA adapter: merge into the base reloaded in 16 bit (it was trained against 4-bit weights)",
    )
    merge.add_argument("--tolerance", type=float, default=None, help="largest logit difference accepted")
    merge.add_argument("--step", default=None,
                       help="a pipeline run: the step to merge, by number, stage or folder (default: its final policy)")
    _add_runs_dir(merge)
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(func=cmd_merge)

    jobs.register(subparsers)  # tunewise job: a cluster job for Slurm, SkyPilot or torchrun

    build = subparsers.add_parser("build-demo", help="build the offline demo model (assets/build_demo_model.py)")
    build.add_argument("extra", nargs=argparse.REMAINDER, help="passed to the script, e.g. --out DIR --steps N")
    build.set_defaults(func=cmd_build_demo)
