"""Benchmark: training throughput of Tunewise's SFT stage against a bare TRL script.

    python bench/train_throughput.py [--steps 200] [--rounds 3] [--no-write]

On the demo model and SFT data, LoRA (r16, q/k/v/o), the same fixed number
of steps, seed and batch shape, measures tokens per second as TRL counts
them (`num_tokens`: the non-padding tokens of the batches) over the Trainer's
own `train_runtime`, for:

* bare TRL: a plain `SFTTrainer` script with the same settings;
* Tunewise, forgetting monitor off: our stage (`trainer.runner.run` in this
  process: events, stop callback, data checks);
* Tunewise, monitor on: the same with the forgetting monitor at the interval
  the advisor recommends for this run (advisor.recommend.forgetting_interval;
  its baseline, every measurement and the final one fall inside
  `train_runtime`, so their cost is in the figure);
* Tunewise, packing on: useful tokens/s with several examples per sequence.

Each variant runs `--rounds` times, interleaved (so drift in a shared
machine's load hits all alike); the table reports the median and the ratio
to bare TRL, and the monitor's cost per measurement (ms) and share of the
run. Writes the table to bench/RESULTS.md under "train_throughput".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from advisor.plan import DEMO_DATASETS, Plan  # noqa: E402
from bench.results import markdown_table, write_section  # noqa: E402
from trainer.events import read_all_events  # noqa: E402


def our_plan(args, monitor: bool, packing: bool) -> Plan:
    # Packed sequences hold ~7x the tokens of a padded batch of short chats: a quarter of the steps
    # gives as steady a rate in a quarter of the time.
    steps = max(10, args.steps // 4) if packing else args.steps
    return Plan.from_dict(
        {
            "stage": "sft",
            "model": {"name": args.model},
            "data": {"dataset": args.dataset, "eval_fraction": 0.0, "packing": packing},
            "method": {"method": "lora", "precision": "fp32", "lora_rank": 16, "lora_dropout": 0.05},
            "training": {
                "learning_rate": 2e-4,
                "warmup_ratio": 0.05,
                "lr_scheduler": "cosine",
                "max_steps": steps,
                "micro_batch": args.batch,
                "grad_accum": 1,
                "seq_len": args.seq_len,
                "logging_steps": args.logging_steps,
                "seed": 0,
            },
            "forgetting": {"monitor": monitor, "eval_every": args.eval_every},
            "hardware": {"device": "auto"},
        }
    )


def run_ours(plan: Plan, run_dir: Path) -> dict:
    from trainer.runner import run

    run_dir.mkdir(parents=True)
    plan.save(run_dir / "plan.yaml")
    if run(run_dir) != 0:
        raise SystemExit(f"our SFT run failed: {read_all_events(run_dir / 'events.jsonl')[-1]}")
    events = read_all_events(run_dir / "events.jsonl")
    end = next(e for e in events if e["event"] == "train_end")
    measured = [e for e in events if e["event"] == "forgetting"]
    return {
        # TRL's running total of trained tokens, as logged at the last logging step.
        "tokens": max(e.get("num_tokens") or 0 for e in events if e["event"] in ("log", "train_end")),
        "seconds": end["train_runtime"],
        "eval_ms": [e["eval_ms"] for e in measured],
        "monitor_pct": measured[-1].get("monitor_cost_pct") if measured else None,
    }


def run_bare_trl(args, output_dir: Path) -> dict:
    """The same training as `our_plan(monitor=False, packing=False)`, written as a plain TRL script."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_path = str(REPO_ROOT / "assets" / "demo-model") if args.model == "demo" else args.model
    data_path = str(DEMO_DATASETS.get(args.dataset, args.dataset))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        ),
    )
    dataset = load_dataset("json", data_files=data_path, split="train")
    config = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=2e-4,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        optim="adamw_torch",
        seed=0,
        data_seed=0,
        max_length=args.seq_len,
        assistant_only_loss=True,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # TRL's SFTConfig defaults differ from TrainingArguments: gradient checkpointing on and
        # bf16 on. The plan says fp32 without checkpointing, so say the same here.
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    return {"tokens": tokens, "seconds": output.metrics["train_runtime"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default="demo-sft")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=None,
                        help="the forgetting monitor's interval (default: what the advisor recommends for this run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.eval_every is None:
        from advisor.recommend import forgetting_interval, monitor_share

        args.eval_every, _ = forgetting_interval(args.steps, args.batch)
        print(f"forgetting check every {args.eval_every} steps (the advisor's choice for {args.steps} steps of batch "
              f"{args.batch}; predicted cost {monitor_share(args.eval_every, args.batch):.1%})", flush=True)

    results: dict[str, list[dict]] = {}
    variants = {
        "bare TRL SFTTrainer": lambda d: run_bare_trl(args, d),
        "Tunewise, monitor off": lambda d: run_ours(our_plan(args, monitor=False, packing=False), d),
        f"Tunewise, monitor on (every {args.eval_every} steps)": lambda d: run_ours(our_plan(args, monitor=True, packing=False), d),
        "Tunewise, packing on, monitor off": lambda d: run_ours(our_plan(args, monitor=False, packing=True), d),
    }
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        names = list(variants)
        for round_index in range(args.rounds):
            # Rotate the order each round, so no variant always runs first (or right after another).
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                index, runner = names.index(name), variants[name]
                started = time.perf_counter()
                result = runner(Path(tmp) / f"r{round_index}-v{index}")
                result["wall"] = time.perf_counter() - started
                results.setdefault(name, []).append(result)
                print(f"round {round_index + 1}: {name}: {result['tokens'] / result['seconds']:.0f} tokens/s", flush=True)

    bare_rate = statistics.median(r["tokens"] / r["seconds"] for r in results["bare TRL SFTTrainer"])
    rows = []
    for name, runs in results.items():
        rates = [r["tokens"] / r["seconds"] for r in runs]
        rate = statistics.median(rates)
        eval_ms = [ms for r in runs for ms in r.get("eval_ms", [])]
        monitor_pct = [r["monitor_pct"] for r in runs if r.get("monitor_pct") is not None]
        rows.append(
            [
                name,
                f"{rate:,.0f}",
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                f"{rate / bare_rate:.3f}",
                f"{statistics.median(r['tokens'] for r in runs):,.0f}",
                f"{statistics.median(eval_ms):.0f} ms x {len(eval_ms) // len(runs)}" if eval_ms else "-",
                f"{statistics.median(monitor_pct):.1f}%" if monitor_pct else "-",
            ]
        )
    headers = ["variant", "tokens/s (median)", "range", "vs bare TRL", "tokens per run", "monitor per eval", "monitor share"]
    table = markdown_table(headers, rows)
    setup = (
        f"Demo model, `{args.dataset}`, LoRA r16 on q/k/v/o, {args.steps} steps of batch {args.batch}, seq_len "
        f"{args.seq_len}, fp32, seed 0 (packing: a quarter of the steps); {args.rounds} rounds, the order rotated "
        "each round. Both sides get the same TrainingArguments, model and tokenized data (checked: only the "
        "callbacks differ). tokens/s = TRL's `num_tokens` (non-padding "
        "tokens) / the Trainer's `train_runtime`; with packing these are the useful tokens (no padding). "
        "The monitor measures 64 held-out `demo-original` texts; its baseline and every measurement are inside "
        "`train_runtime`."
    )
    from advisor.recommend import monitor_share

    setup += (f" The advisor's cost model predicts {monitor_share(args.eval_every, args.batch):.1%} for the monitor "
              f"every {args.eval_every} steps at batch {args.batch} (measurements in between only; the baseline and "
              "the final measurement come on top).")
    print()
    print(setup)
    print(table)
    if not args.no_write:
        command = "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = write_section("train_throughput", f"`{command.strip()}`\n\n{setup}\n\n{table}")
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
