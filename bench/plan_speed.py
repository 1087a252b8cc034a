"""How long does planning a 70B model take, and does it stay free of torch?

Runs in a fresh Python process: imports the planner, then estimates Llama-2-70B
for every method (full, LoRA, QLoRA) on every GPU in the list, with the search
for the largest micro-batch and sequence length and the cheapest fix. Prints
the import time, the planning time (target: under 50 ms) and whether torch (or
transformers) ended up in sys.modules (it must not).

Run: python bench/plan_speed.py   (writes its section of bench/RESULTS.md)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from advisor.gpus import GPUS
from advisor.memory import TrainingSetup, estimate, gpu_fit
from advisor.specs import resolve_model
t1 = time.perf_counter()
spec = resolve_model("meta-llama/Llama-2-70b-hf", allow_hub=False)
fits = 0
for method in ("full", "lora", "qlora"):
    setup = TrainingSetup(method=method, micro_batch=1, seq_len=512)
    estimate(spec, setup)
    for gpu in GPUS:
        fits += gpu_fit(spec, setup, gpu.memory_bytes).fits
t2 = time.perf_counter()
heavy = sorted(m for m in ("torch", "transformers", "peft", "trl", "gradio") if m in sys.modules)
print(json.dumps({"import_ms": 1000 * (t1 - t0), "plan_ms": 1000 * (t2 - t1), "fits": fits, "heavy_modules": heavy}))
"""


def measure(repeats: int = 5) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["plan_ms"])
    return {"plan_ms_best": best["plan_ms"], "plan_ms_all": [round(r["plan_ms"], 1) for r in runs],
            "import_ms_best": min(r["import_ms"] for r in runs), "heavy_modules": runs[0]["heavy_modules"],
            "fits": runs[0]["fits"]}


def main() -> str:
    result = measure()
    assert not result["heavy_modules"], f"planning imported {result['heavy_modules']}"
    text = (
        f"Llama-2-70B, 3 methods x 10 GPUs (estimate + largest micro-batch + longest sequence + cheapest fix), fresh process:\n\n"
        f"- planning: {result['plan_ms_best']:.1f} ms best of 5 (all: {result['plan_ms_all']} ms; target < 50 ms)\n"
        f"- importing the planner: {result['import_ms_best']:.1f} ms\n"
        f"- torch / transformers / peft / trl / gradio imported: {result['heavy_modules'] or 'none'} (sys.modules checked)\n"
        f"- method x GPU combinations that fit at micro-batch 1, 512 tokens: {result['fits']} of 30"
    )
    print(text)
    sys.path.insert(0, str(ROOT))
    from bench.results import write_section

    write_section("plan_speed", text)
    return text


if __name__ == "__main__":
    main()
