"""Benchmark: the forgetting monitor catching a high-LR full fine-tune, and the safeguards reducing it.

    python bench/forgetting.py [--steps 60] [--lr 1e-3] [--ewc-lambda 1.0] [--replay 0.1] [--no-write]

Runs the SFT stage (through `trainer.runner.run`, in this process) on the
demo model and the demo SFT task (dates) several times on the same seed:

* full FT, high LR: the run built to forget; the monitor measures the
  original-domain loss (held-out encyclopedia paragraphs, `demo-original`)
  before training and every `--eval-every` steps and raises its alert;
* + replay: the same, with `--replay` of the training mix drawn from the
  pretraining corpus (`demo-pretrain`);
* + EWC: the same, with elastic weight consolidation (Fisher on `demo-pretrain`);
* lower LR and LoRA: the guide's other two safeguards, for comparison.

Prints a table (baseline and final original-domain loss, degradation %, the
worst degradation seen, the step of the alert, the SFT task's held-out loss,
wall time) and writes it to bench/RESULTS.md under "forgetting".
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
from trainer.events import read_all_events  # noqa: E402


def base_plan(args) -> Plan:
    return Plan.from_dict(
        {
            "stage": "sft",
            "model": {"name": args.model},
            "data": {"dataset": args.dataset, "eval_fraction": 0.05, "max_examples": None},
            "method": {"method": "full", "precision": "fp32"},
            "training": {
                "learning_rate": args.lr,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
                "max_steps": args.steps,
                "micro_batch": args.batch,
                "grad_accum": 1,
                "seq_len": args.seq_len,
                "logging_steps": 5,
                "seed": args.seed,
            },
            "forgetting": {
                "monitor": True,
                "original_data": args.original,
                "replay_data": args.replay_data,
                "eval_every": args.eval_every,
                "threshold_pct": args.threshold,
                "stop_on_threshold": False,
                "max_eval_examples": 64,
            },
            "hardware": {"device": "cpu" if args.cpu else "auto"},
        }
    )


def variants(args) -> dict[str, dict]:
    return {
        f"full FT, LR {args.lr:g} (no safeguard)": {},
        f"+ replay {args.replay:.0%}": {"forgetting.replay_fraction": args.replay},
        f"+ EWC (lambda {args.ewc_lambda:g})": {"forgetting.ewc_lambda": args.ewc_lambda},
        f"lower LR ({args.lr / 10:g})": {"training.learning_rate": args.lr / 10},
        "LoRA r16 (LR 2e-4)": {"method.method": "lora", "training.learning_rate": 2e-4},
    }


def run_variant(plan: Plan, run_dir: Path) -> dict:
    from trainer.runner import run

    run_dir.mkdir(parents=True)
    plan.save(run_dir / "plan.yaml")
    started = time.perf_counter()
    code = run(run_dir)
    seconds = time.perf_counter() - started
    events = read_all_events(run_dir / "events.jsonl")
    if code != 0:
        raise SystemExit(f"{run_dir.name} failed: {events[-1]}")
    measured = [e for e in events if e["event"] == "forgetting"]
    alerts = [e for e in events if e["event"] == "alert" and e.get("kind") == "forgetting"]
    evals = [e for e in events if e["event"] == "eval" and "eval_loss" in e]
    return {
        "baseline": measured[0]["baseline_loss"],
        "final": measured[-1]["loss"],
        "degradation": measured[-1]["degradation_pct"],
        "worst": max(e["degradation_pct"] for e in measured),
        "alert_step": alerts[0]["step"] if alerts else None,
        "task_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_ms": sum(e["eval_ms"] for e in measured) / len(measured),
        "examples": measured[0]["examples"],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default="demo-sft")
    parser.add_argument("--original", default="demo-original", help="the monitor's original-domain set")
    parser.add_argument("--replay-data", default="demo-pretrain", help="what replay and EWC's Fisher use")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3, help="the high LR of the forgetting run (guide's full FT range: 1e-5 to 5e-5)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=20.0)
    parser.add_argument("--replay", type=float, default=0.1)
    parser.add_argument("--ewc-lambda", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated variant numbers to run (1-5)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even where a GPU is present")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)

    plan = base_plan(args)
    chosen = variants(args)
    if args.only:
        keep = {int(n) for n in args.only.split(",")}
        chosen = {name: o for i, (name, o) in enumerate(chosen.items(), start=1) if i in keep}
    rows = []
    monitor_examples = 0
    with tempfile.TemporaryDirectory(prefix="bench-forgetting-") as tmp:
        for index, (name, overrides) in enumerate(chosen.items()):
            result = run_variant(plan.with_overrides(overrides), Path(tmp) / f"v{index}")
            monitor_examples = result["examples"]
            rows.append(
                [
                    name,
                    f"{result['baseline']:.3f}",
                    f"{result['final']:.3f}",
                    f"{result['degradation']:+.1f}%",
                    f"{result['worst']:+.1f}%",
                    result["alert_step"] if result["alert_step"] is not None else "none",
                    f"{result['task_loss']:.3f}" if result["task_loss"] is not None else "-",
                    f"{result['eval_ms']:.0f}",
                    f"{result['seconds']:.0f}",
                ]
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    headers = [
        "variant",
        "original loss before",
        "after",
        "degradation",
        "worst",
        f"alert step (>{args.threshold:g}%)",
        "SFT task eval loss",
        "monitor ms/eval",
        "wall s",
    ]
    table = markdown_table(headers, rows)
    setup = (
        f"Demo SFT task `{args.dataset}` on model `{args.model}`, full fine-tuning for {args.steps} steps "
        f"(batch {args.batch}, seq_len {args.seq_len}, constant LR, seed {args.seed}); the monitor measures "
        f"`{args.original}` ({monitor_examples} held-out texts) every {args.eval_every} steps; replay and EWC's Fisher "
        f"draw on `{args.replay_data}`. Degradation = rise of the original-domain loss over its value before training."
    )
    print()
    print(setup)
    print(table)
    if not args.no_write:
        command = "python bench/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_section("forgetting", f"`{command.strip()}`\n\n{setup}\n\n{table}")
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
