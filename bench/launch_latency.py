"""Benchmark: time from `supervisor.launch()` to the first logged loss, and where it goes.

    python bench/launch_latency.py [--rounds 3] [--no-write]

Launches a short LoRA SFT run on the demo model (exactly as the wizard and
`tunewise launch` do: a detached watcher starting `python -m trainer.runner`),
polls events.jsonl, and splits the wait by the events' timestamps:

    launch() called ........ started      process start (watcher + trainer) and the runner's light imports
    started ................ model_loaded imports of torch / transformers / TRL / PEFT, pre-flight checks,
                                          tokenizer, data and model loading
    model_loaded ........... train_begin  SFTTrainer set-up (dataset tokenization) and forgetting set-up
    train_begin ............ first loss   forgetting baseline, then the first optimizer step

The import share of the second segment is measured separately (a fresh
`python -c "import torch, transformers, trl, peft"`), since no event sits
between the imports and the loading. Each round launches cold (a fresh
trainer process) and warm (forked by trainer.warm's worker, which has the
libraries imported already, as the app arranges). Reports medians over
`--rounds`; writes bench/RESULTS.md under "launch_latency".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from advisor.plan import Plan  # noqa: E402
from bench.results import markdown_table, write_section  # noqa: E402

SEGMENTS = [
    ("launch() -> started", "process start + runner imports"),
    ("started -> model_loaded", "heavy imports, pre-flight, tokenizer, data, model"),
    ("model_loaded -> train_begin", "SFTTrainer + forgetting set-up"),
    ("train_begin -> first loss", "forgetting baseline + first step"),
    ("total: launch() -> first loss", ""),
]


def plan_for(args) -> Plan:
    return Plan.from_dict(
        {
            "stage": "sft",
            "model": {"name": args.model},
            "data": {"dataset": args.dataset, "eval_fraction": 0.0},
            "method": {"method": "lora", "precision": "fp32"},
            "training": {"max_steps": 3, "micro_batch": 8, "seq_len": 256, "logging_steps": 1, "seed": 0},
            "forgetting": {"monitor": not args.no_monitor},
        }
    )


def measure_once(plan: Plan, runs_dir: Path, timeout: float) -> dict:
    from trainer import supervisor

    launched = time.time()
    run_id = supervisor.launch(plan, runs_dir=runs_dir)
    returned = time.time()
    seen: dict[str, dict] = {}
    offset = 0
    deadline = launched + timeout
    while time.time() < deadline:
        events, offset = supervisor.read_run_events(run_id, offset, runs_dir=runs_dir)
        for event in events:
            kind = event["event"]
            if kind == "log" and event.get("loss") is not None:
                kind = "first_loss"
            seen.setdefault(kind, event)
            if kind in ("failed", "stopped"):
                raise SystemExit(f"run {run_id} ended early: {event}")
        if "first_loss" in seen:
            break
        time.sleep(0.05)
    else:
        raise SystemExit(f"no loss logged within {timeout:.0f} s")
    supervisor.wait(run_id, timeout=timeout, runs_dir=runs_dir)
    at = {kind: event["time"] for kind, event in seen.items()}
    baseline = seen.get("forgetting")
    return {
        "launch() returns": returned - launched,
        SEGMENTS[0][0]: at["started"] - launched,
        SEGMENTS[1][0]: at["model_loaded"] - at["started"],
        SEGMENTS[2][0]: at["train_begin"] - at["model_loaded"],
        SEGMENTS[3][0]: at["first_loss"] - at["train_begin"],
        SEGMENTS[4][0]: at["first_loss"] - launched,
        "forgetting baseline": (baseline["eval_ms"] / 1000) if baseline else 0.0,
    }


def import_seconds() -> float:
    """A fresh interpreter's time to import the training libraries."""
    code = "import time; t = time.perf_counter(); import torch, transformers, trl, peft; print(time.perf_counter() - t)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default="demo-sft")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--no-monitor", action="store_true", help="turn the forgetting monitor off")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)

    from trainer import warm

    plan = plan_for(args)
    results: dict[str, list[dict]] = {"cold": [], "warm": []}
    imports = []
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        cold_runs, warm_runs = Path(tmp) / "cold", Path(tmp) / "warm"
        warm_runs.mkdir()
        worker = warm.ensure_warm(warm_runs, owner_pid=os.getpid())
        if not worker or not warm.wait_ready(warm_runs):
            raise SystemExit("the warm worker did not start (see .warm.log)")
        for index in range(args.rounds):  # interleaved, so load changes hit both alike
            imports.append(import_seconds())
            for kind, runs in (("cold", cold_runs), ("warm", warm_runs)):
                results[kind].append(measure_once(plan, runs, args.timeout))
                print(f"round {index + 1} {kind}: first loss after {results[kind][-1][SEGMENTS[4][0]]:.2f} s", flush=True)

    def median(kind, key):
        return statistics.median(r[key] for r in results[kind])

    def row(key, what):
        return [key, f"{median('cold', key):.2f}", f"{median('warm', key):.2f}", what]

    rows = [row("launch() returns", "launch() waits for the watcher to report the trainer's pid")]
    rows += [row(key, what) for key, what in SEGMENTS]
    rows.insert(3, ["  of which: importing torch, transformers, trl, peft", f"{statistics.median(imports):.2f}", "0 (done)",
                    "fresh interpreter, measured apart; the warm worker imported them before"])
    rows.insert(6, row("forgetting baseline", "64 original-domain texts, no grad"))
    rows[6][0] = "  of which: forgetting baseline"
    table = markdown_table(["segment", "cold start: seconds (median)", "warm worker: seconds (median)", "what happens"], rows)
    total = SEGMENTS[4][0]
    saved = median("cold", total) - median("warm", total)
    setup = (
        f"`supervisor.launch()` of a LoRA SFT plan on `{args.model}` / `{args.dataset}` (3 steps, batch 8, "
        f"seq_len 256, forgetting monitor {'off' if args.no_monitor else 'on'}), {args.rounds} launches each, "
        "cold (a fresh `python -m trainer.runner`) and warm (forked by trainer.warm's worker, which the app starts); "
        "segments from the events' timestamps."
    )
    summary = (f"The warm worker cuts launch -> first loss from {median('cold', total):.1f} s to "
               f"{median('warm', total):.1f} s ({saved:.1f} s saved).")
    print()
    print(setup)
    print(table)
    print(summary)
    if not args.no_write:
        command = "python bench/launch_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_section("launch_latency", f"`{command.strip()}`\n\n{setup}\n\n{table}\n\n{summary}")
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
