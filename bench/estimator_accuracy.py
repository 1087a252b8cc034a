"""How close is the memory estimator to published GPU measurements, and to the rules people use?

For every row of /work/shared/calibration/memory-measurements.md (copied below
with its source) this prints our estimate, the measurement, the error, and the
error of the simple rules: "4 bytes x params", "16-bit weights x 4", the
guide's quick-reference table (when the model size matches) and LLaMA-Factory's
README table for 7B models (full AMP 120 GB, LoRA 16-bit 16 GB, QLoRA 4-bit
6 GB). Each row's setup restates how the measurement was taken (the framework's
precision, LoRA targets, dropout, checkpointing), because those change memory.

Run: python bench/estimator_accuracy.py   (writes its section of bench/RESULTS.md)
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advisor.memory import GB, GUIDE_TABLE_GB, TrainingSetup, estimate, quantized_weight_bytes  # noqa: E402
from advisor.specs import param_counts, resolve_model  # noqa: E402

LITGPT_TABLES = "Lightning-AI/litgpt tutorials/resource-tables.md"
LITGPT_HUB = "Lightning-AI/litgpt config_hub/finetune/README.md"
TORCHTUNE = "pytorch/torchtune README (older revision)"


@dataclass(frozen=True)
class CalibrationRow:
    """One published measurement and the setup that reproduces it."""

    model: str
    label: str
    setup: TrainingSetup
    measured_gb: float
    kind: str
    source: str


# litgpt runs in "bf16-true": every weight, adapter and optimizer state in bf16; its fused-QKV LoRA
# uses one dropout; quantized models keep the rest in bf16 (no fp32 upcast). Alpaca's longest sample
# is 1304 tokens (micro-batches are padded to their longest sample).
_LITGPT = dict(runtime="litgpt", precision="bf16", optimizer="adamw", adapter_fp32=False, upcast_non_quantized=False, lora_dropout=0.05)

CALIBRATION_ROWS: tuple[CalibrationRow, ...] = (
    CalibrationRow("microsoft/phi-1_5", "LoRA r8 (q,v) mb1 s1304",
                   TrainingSetup(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=1, seq_len=1304, **_LITGPT),
                   4.82, "alloc", LITGPT_TABLES),
    CalibrationRow("microsoft/phi-1_5", "LoRA r8 (q,v) mb4 s1304",
                   TrainingSetup(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=4, seq_len=1304, **_LITGPT),
                   10.68, "alloc", LITGPT_TABLES),
    CalibrationRow("microsoft/phi-1_5", "QLoRA NF4 r8 (q,v) mb1 s1304",
                   TrainingSetup(method="qlora", double_quant=False, lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=1, seq_len=1304, **_LITGPT),
                   3.78, "alloc", LITGPT_TABLES),
    CalibrationRow("stabilityai/stablelm-3b-4e1t", "LoRA r8 (q,v) mb1 s1304",
                   TrainingSetup(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=1, seq_len=1304, **_LITGPT),
                   9.69, "alloc", LITGPT_TABLES),
    CalibrationRow("stabilityai/stablelm-3b-4e1t", "LoRA r8 (q,v) mb4 s1304",
                   TrainingSetup(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=4, seq_len=1304, **_LITGPT),
                   16.92, "alloc", LITGPT_TABLES),
    CalibrationRow("stabilityai/stablelm-3b-4e1t", "QLoRA NF4 r8 (q,v) mb1 s1304",
                   TrainingSetup(method="qlora", double_quant=False, lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=1, seq_len=1304, **_LITGPT),
                   6.35, "alloc", LITGPT_TABLES),
    # litgpt's tiny-llama/lora.yaml: r32 on q,k,v,proj, the MLP and the head.
    CalibrationRow("tinyllama", "LoRA r32 all linear + head mb8 s512",
                   TrainingSetup(method="lora", lora_rank=32, lora_targets=("all-linear", "lm_head"), micro_batch=8, seq_len=512, **_LITGPT),
                   13.50, "alloc", LITGPT_HUB),
    # litgpt's tiny-llama/full.yaml: global batch 32 = micro-batch 4 x 8 accumulation steps.
    CalibrationRow("tinyllama", "full bf16 mb4 s512 (accum 8)",
                   TrainingSetup(method="full", micro_batch=4, seq_len=512, grad_accum=8, **_LITGPT),
                   14.10, "alloc", LITGPT_HUB),
    # torchtune's single-device recipes checkpoint activations; its QLoRA adapts every linear layer
    # (NF4 with double-quantized scales, bf16 elsewhere); its LoRA recipe adapts q and v.
    CalibrationRow("llama-2-7b", "QLoRA r8 all linear mb4 s2048 paged AdamW, checkpointing",
                   TrainingSetup(method="qlora", lora_rank=8, lora_targets=("all-linear",), micro_batch=4, seq_len=2048,
                                 optimizer="paged_adamw_8bit", gradient_checkpointing=True, precision="bf16", runtime="torchtune",
                                 adapter_fp32=False, upcast_non_quantized=False, lora_dropout=0.05),
                   12.3, "alloc", TORCHTUNE),
    CalibrationRow("llama-2-7b", "LoRA r8 (q,v) mb4 s2048, checkpointing",
                   TrainingSetup(method="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"), micro_batch=4, seq_len=2048,
                                 gradient_checkpointing=True, precision="bf16", adapter_fp32=False, lora_dropout=0.05, runtime="torchtune"),
                   21.3, "alloc", TORCHTUNE),
)

#: Quantized weights alone (inference load), litgpt resource tables.
WEIGHT_ROWS = (
    ("llama-2-7b", 4, False, 4.57),
    ("llama-2-7b", 4, True, 4.26),
    ("llama-2-70b", 4, True, 37.21),
)

#: LLaMA-Factory README's hardware table, 7B column (GB).
LLAMA_FACTORY_7B = {"full": 120, "lora": 16, "qlora": 6}


def _size_label(params: int) -> str | None:
    for label, target in (("7B", 7e9), ("13B", 13e9), ("70B", 70e9)):
        if abs(params - target) / target < 0.1:
            return label
    return None


def _err(estimate_gb: float, measured_gb: float) -> float:
    return 100.0 * (estimate_gb - measured_gb) / measured_gb


def evaluate() -> list[dict]:
    """One dict per training row: estimate, measurement and each rule's error (%)."""
    out = []
    for row in CALIBRATION_ROWS:
        spec = resolve_model(row.model, allow_hub=False)
        est = estimate(spec, row.setup)
        params = param_counts(spec).total
        ours = est.peak_allocated_bytes / GB
        rules = {
            "4B x params": 4 * params / GB,
            "16-bit weights x 4": 4 * 2 * params / GB,
        }
        size = _size_label(params)
        if size:
            rules["guide table"] = GUIDE_TABLE_GB[size][row.setup.method]
        if size == "7B":
            rules["LLaMA-Factory 7B"] = LLAMA_FACTORY_7B[row.setup.method]
        out.append({
            "model": spec.id, "label": row.label, "measured": row.measured_gb, "estimate": ours,
            "error": _err(ours, row.measured_gb), "rules": {k: (v, _err(v, row.measured_gb)) for k, v in rules.items()},
            "source": row.source,
        })
    return out


def median_abs_error() -> float:
    return statistics.median(abs(r["error"]) for r in evaluate())


def main() -> str:
    rows = evaluate()
    lines = ["| model | setup | measured GB (alloc) | estimate GB | error | 4B x params | weights x 4 | guide table | LLaMA-Factory |",
             "|---|---|---|---|---|---|---|---|---|"]
    rule_errors: dict[str, list[float]] = {}
    for r in rows:
        cells = []
        for rule in ("4B x params", "16-bit weights x 4", "guide table", "LLaMA-Factory 7B"):
            if rule in r["rules"]:
                value, err = r["rules"][rule]
                rule_errors.setdefault(rule, []).append(abs(err))
                cells.append(f"{value:.1f} ({err:+.0f}%)")
            else:
                cells.append("-")
        lines.append(f"| {r['model']} | {r['label']} | {r['measured']:.2f} | {r['estimate']:.2f} | {r['error']:+.1f}% | " + " | ".join(cells) + " |")
    ours = [abs(r["error"]) for r in rows]
    lines.append("")
    lines.append(f"Tunewise estimate: median |error| {statistics.median(ours):.1f}%, worst {max(ours):.1f}% over {len(ours)} rows")
    for rule, errs in rule_errors.items():
        lines.append(f"{rule}: median |error| {statistics.median(errs):.1f}%, worst {max(errs):.1f}% over {len(errs)} rows")
    lines.append("")
    lines.append("Quantized weights alone (bitsandbytes layout: block linears quantized, the rest 16-bit):")
    lines.append("")
    lines.append("| model | format | measured GB | estimate GB | error |")
    lines.append("|---|---|---|---|---|")
    for model, bits, dq, measured in WEIGHT_ROWS:
        spec = resolve_model(model, allow_hub=False)
        est = quantized_weight_bytes(spec, bits, dq) / GB
        lines.append(f"| {spec.id} | NF4{' + DQ' if dq else ''} | {measured:.2f} | {est:.2f} | {_err(est, measured):+.1f}% |")
    text = "\n".join(lines)
    print(text)
    from bench.results import write_section

    write_section("estimator_accuracy", text)
    return text


if __name__ == "__main__":
    main()
