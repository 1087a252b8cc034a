"""Benchmark: the bundled preference demo, SFT -> RM -> PPO beside SFT -> DPO, on the CPU.

    python bench/preference_demo.py [--model demo] [--dataset demo-preference] [--steps 20]
                                    [--method lora] [--no-write]

Runs the `compare` pipeline (one SFT step shared by both branches, then reward
model -> PPO and DPO on the same data) in this process through
`trainer.pipeline.run_pipeline`, and prints / records under "preference_demo"
in bench/RESULTS.md:

- reward model: held-out accuracy (chance is 0.5) and margin;
- DPO: `rewards/margins` at the first and last logged step, loss first / last;
- PPO: `objective/scores` (reward-model score) and `objective/kl` first / last;
- the side-by-side comparison (held-out preference accuracy, reward-model
  score of held-out samples, KL to the SFT model, forgetting);
- wall time of each step and of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from advisor.plan import Plan  # noqa: E402
from bench.results import markdown_table, write_section  # noqa: E402
from trainer.context import RunContext  # noqa: E402
from trainer.events import EventWriter, read_all_events  # noqa: E402


def demo_plan(args) -> Plan:
    return Plan.from_dict({
        "pipeline": "compare",
        "model": {"name": args.model},
        "data": {"dataset": args.dataset, "eval_fraction": 0.05, "max_examples": args.max_examples},
        "method": {"method": args.method, "precision": "fp32", "lora_rank": 16, "lora_targets": ["all-linear"],
                   "lora_dropout": 0.0},
        "training": {"learning_rate": args.lr, "warmup_ratio": 0.0, "lr_scheduler": "constant",
                     "max_steps": args.steps, "micro_batch": 8, "grad_accum": 1, "seq_len": 128,
                     "logging_steps": 1, "seed": 0},
        "forgetting": {"monitor": True, "eval_every": max(args.steps // 2, 1), "max_eval_examples": 32},
        "preference": {"beta": 0.1, "kl_coef": 0.05, "sample_every": max(args.steps // 4, 1), "num_samples": 8,
                       "max_new_tokens": 16},
        "hardware": {"device": "cpu"},
    })


def series(events: list[dict], stage: str, key: str) -> list[float]:
    return [e[key] for e in events if e["event"] == "log" and e.get("stage") == stage
            and isinstance(e.get(key), (int, float))]


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default="demo-preference")
    parser.add_argument("--method", default="lora", choices=("full", "lora"))
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per pipeline step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()

    from trainer.pipeline import run_pipeline

    with tempfile.TemporaryDirectory(prefix="tunewise-pref-") as tmp:
        run_dir = Path(tmp) / "compare"
        run_dir.mkdir()
        plan = demo_plan(args)
        plan.save(run_dir / "plan.yaml")
        ctx = RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))
        started = time.perf_counter()
        result = run_pipeline(ctx)
        wall = time.perf_counter() - started
        events = read_all_events(run_dir / "events.jsonl")
        report = json.loads((run_dir / "comparison.json").read_text())
        steps = {p.name: json.loads((p / "result.json").read_text()) for p in sorted((run_dir / "steps").iterdir())}

    rm = next(v for k, v in steps.items() if k.endswith("-rm"))
    margins = series(events, "dpo", "rewards/margins")
    dpo_loss = series(events, "dpo", "loss")
    scores = series(events, "ppo", "objective/scores")
    kls = series(events, "ppo", "objective/kl")
    alerts = [e for e in events if e["event"] == "alert"]
    headline = [
        ["reward model held-out accuracy", fmt(rm.get("heldout_accuracy")), f"{rm.get('heldout_pairs')} pairs; chance 0.5"],
        ["reward model held-out margin", fmt(rm.get("heldout_margin")), "chosen - rejected score"],
        ["DPO rewards/margins first -> last", f"{fmt(margins[0] if margins else None)} -> {fmt(margins[-1] if margins else None)}", ""],
        ["DPO loss first -> last", f"{fmt(dpo_loss[0] if dpo_loss else None, 4)} -> {fmt(dpo_loss[-1] if dpo_loss else None, 4)}", "ln 2 = 0.6931"],
        ["PPO objective/scores first -> last", f"{fmt(scores[0] if scores else None)} -> {fmt(scores[-1] if scores else None)}", "reward-model score"],
        ["PPO objective/kl first -> last", f"{fmt(kls[0] if kls else None, 4)} -> {fmt(kls[-1] if kls else None, 4)}", "nats per response"],
        ["alerts", str(len(alerts)), "; ".join(sorted({a.get("kind", "?") for a in alerts}))],
        ["pipeline wall time", f"{wall:.0f} s", f"{args.steps} steps per step, {plan.method.method}"],
    ]
    side = [[branch, fmt(n.get("heldout_accuracy")), fmt(n.get("reward")), n.get("reward_source") or "-",
             fmt(n.get("kl"), 4), fmt(n.get("kl_sequence"), 3), fmt(n.get("forgetting_degradation_pct"), 1),
             fmt(n.get("wall_s"), 0)] for branch, n in report["branches"].items()]
    walls = [[name, fmt(r.get("wall_s"), 0), str(r.get("steps") or r.get("step"))] for name, r in steps.items()]
    body = "\n\n".join([
        f"`python bench/preference_demo.py --model {args.model} --dataset {args.dataset} --steps {args.steps} "
        f"--method {args.method}`: the compare pipeline (SFT, then RM -> PPO beside DPO) in one process.",
        markdown_table(["measure", "value", "note"], headline),
        "Side by side (final policies, on held-out prompts and pairs):",
        markdown_table(["branch", "held-out pref. accuracy", "reward", "reward from", "KL/token", "KL/completion",
                        "forgetting %", "wall s"], side),
        "Wall time per step:",
        markdown_table(["step", "wall s", "optimizer steps"], walls),
    ])
    print(body)
    print(f"\nstatus: {result['status']}")
    if not args.no_write:
        path = write_section("preference_demo", body)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
