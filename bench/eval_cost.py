"""Benchmark: what evaluating during training costs on the demo, per eval interval, against the advice's figure.

    python bench/eval_cost.py [--steps 40] [--intervals 20,10,5] [--no-write]

Trains the demo SFT run (LoRA on the demo model, 10% of demo-sft held out) in this process once without
evaluations during training and once per interval, and reads the trainer's own `train_runtime` from
events.jsonl. The eval share is (runtime with evaluations - runtime without) / runtime with; the advice's
figure is advisor.recommend's per_eval / (interval + per_eval), where an evaluation costs held-out /
(2 x effective batch) training steps (the rule behind the advised `training.eval_steps`). Writes
bench/RESULTS.md under "eval_cost".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from advisor.plan import Plan  # noqa: E402
from bench.results import markdown_table, write_section  # noqa: E402


def plan_for(steps: int, every: int | None) -> Plan:
    return Plan.from_dict({
        "stage": "sft", "model": {"name": "demo"}, "data": {"dataset": "demo-sft", "eval_fraction": 0.1},
        "method": {"method": "lora", "precision": "fp32"},
        "training": {"max_steps": steps, "micro_batch": 8, "seq_len": 128, "logging_steps": 1, "seed": 0,
                     "eval_steps": every},
        "forgetting": {"monitor": False}, "hardware": {"device": "cpu"},
    })


def train(plan: Plan, folder: Path) -> tuple[float, int, int]:
    """(train_runtime in s, evaluations, held-out examples) of one in-process run."""
    from trainer.events import read_all_events
    from trainer.runner import run

    folder.mkdir(parents=True)
    plan.save(folder / "plan.yaml")
    assert run(folder) == 0, read_all_events(folder / "events.jsonl")[-1]
    events = read_all_events(folder / "events.jsonl")
    runtime = next(e["train_runtime"] for e in events if e["event"] == "train_end")
    evals = sum(1 for e in events if e["event"] == "eval")
    held_out = next(e["eval_examples"] for e in events if e["event"] == "model_loaded")
    return runtime, evals, held_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--intervals", default="20,10,5")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from advisor.recommend import _eval_cost_in_steps

    torch.set_num_threads(1)
    intervals = [int(x) for x in args.intervals.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, _, held_out = train(plan_for(args.steps, None), Path(tmp) / "none")
        per_eval = _eval_cost_in_steps(8, held_out)
        rows.append(["none (at the end only)", 0, f"{base:.2f}", "-", "-"])
        for every in intervals:
            runtime, evals, _ = train(plan_for(args.steps, every), Path(tmp) / f"every-{every}")
            share = (runtime - base) / runtime
            rows.append([f"every {every} steps", evals, f"{runtime:.2f}", f"{share:.1%}",
                         f"{per_eval / (every + per_eval):.1%}"])
    body = (f"Demo SFT, LoRA, {args.steps} steps at micro-batch 8 x 128 tokens, {held_out} held-out examples "
            f"(the advice's rule: an evaluation costs {per_eval:.2f} training steps); one thread.\n\n"
            + markdown_table(["evaluation", "evaluations", "train_runtime (s)", "eval share, measured",
                              "eval share, the advice's figure"], rows))
    print(body)
    if not args.no_write:
        write_section("eval_cost", body)
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"({time.time() - started:.0f} s)")
    sys.exit(code)
