"""Measure real GPU memory for small models and compare it with the estimator.

On a CUDA machine this trains a few steps of randomly initialised models built
from the catalogue's config numbers (no downloads: SmolLM2-135M and
Qwen2.5-0.5B) over a grid of settings (full / LoRA / QLoRA, micro-batch,
sequence length, gradient checkpointing), the way Tunewise's trainer does it
(transformers + PEFT + bitsandbytes, bf16 autocast, AdamW), and prints
`torch.cuda.max_memory_allocated` / `max_memory_reserved` beside
`advisor.memory.estimate(...)`. Without CUDA it prints a skip message and
exits 0.

Run: python bench/gpu_memory.py [--quick]   (writes its section of bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advisor.memory import GB, TrainingSetup, estimate  # noqa: E402
from advisor.specs import resolve_model, to_hf_config_dict  # noqa: E402

MODELS = ("smollm2-135m", "qwen2.5-0.5b")
GRID = [
    # (method, micro_batch, seq_len, gradient_checkpointing)
    ("full", 1, 512, False),
    ("full", 4, 512, False),
    ("full", 4, 512, True),
    ("lora", 1, 1024, False),
    ("lora", 4, 1024, False),
    ("lora", 4, 1024, True),
    ("qlora", 1, 1024, False),
    ("qlora", 4, 1024, False),
    ("qlora", 4, 1024, True),
]


def _setup_for(method: str, batch: int, seq: int, checkpointing: bool) -> TrainingSetup:
    return TrainingSetup(method=method, precision="bf16", optimizer="adamw", micro_batch=batch, seq_len=seq,
                         gradient_checkpointing=checkpointing, lora_rank=16, lora_targets=("recommended",),
                         lora_dropout=0.05, attn="sdpa")


def measure(model_name: str, setup: TrainingSetup, workdir: Path, steps: int = 3) -> tuple[int, int]:
    """(max allocated, max reserved) bytes over training steps after the first (optimizer state exists)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    spec = resolve_model(model_name, allow_hub=False)
    config_dict = to_hf_config_dict(spec)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    config._attn_implementation = setup.attn
    saved = workdir / spec.id.replace("/", "__")
    if not saved.exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(saved)
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": setup.attn}
    if setup.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=setup.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(saved, device_map={"": 0}, **kwargs)
    if setup.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        from advisor.specs import target_module_sets

        if setup.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.gradient_checkpointing)
        targets = target_module_sets(spec)[setup.lora_targets[0]]
        model = get_peft_model(model, LoraConfig(r=setup.lora_rank, lora_alpha=2 * setup.lora_rank,
                                                 lora_dropout=setup.lora_dropout, target_modules=targets))
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.method == "lora":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (setup.micro_batch, setup.seq_len), generator=generator).cuda()
    mask = torch.ones_like(ids)
    if setup.micro_batch > 1:
        mask[-1, : setup.seq_len // 10] = 0  # a padded sequence, as real batches have
    labels = ids.masked_fill(mask == 0, -100)
    allocated = reserved = 0
    for step in range(steps):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    del model, optimizer, loss
    gc.collect()
    torch.cuda.empty_cache()
    return allocated, reserved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, fewer settings")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("skip: torch is not installed; this benchmark measures real GPU memory")
        return 0
    if not torch.cuda.is_available():
        print("skip: no CUDA GPU here; run bench/gpu_memory.py on a machine with one to compare real peaks with the estimator")
        return 0
    models = MODELS[:1] if args.quick else MODELS
    grid = GRID[::2] if args.quick else GRID
    lines = ["| model | method | micro-batch | seq | checkpointing | measured alloc GB | estimate GB | error | measured reserved GB | estimate total GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in models:
            spec = resolve_model(model_name, allow_hub=False)
            for method, batch, seq, checkpointing in grid:
                setup = _setup_for(method, batch, seq, checkpointing)
                est = estimate(spec, setup)
                try:
                    allocated, reserved = measure(model_name, setup, Path(tmp))
                except Exception as exc:  # report and go on: one failing setting should not hide the rest
                    lines.append(f"| {spec.id} | {method} | {batch} | {seq} | {checkpointing} | failed: {type(exc).__name__}: {exc} | | | | |")
                    continue
                error = 100.0 * (est.peak_allocated_bytes - allocated) / allocated
                errors.append(abs(error))
                lines.append(f"| {spec.id} | {method} | {batch} | {seq} | {checkpointing} | {allocated / GB:.3f} | "
                             f"{est.peak_allocated_bytes / GB:.3f} | {error:+.1f}% | {reserved / GB:.3f} | {est.total_bytes / GB:.3f} |")
                print(lines[-1], flush=True)
    if errors:
        lines += ["", f"median |error| {statistics.median(errors):.1f}%, worst {max(errors):.1f}% over {len(errors)} settings "
                      f"({torch.cuda.get_device_name(0)})"]
    text = "\n".join(lines)
    print(text)
    from bench.results import write_section

    write_section("gpu_memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
