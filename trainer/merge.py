"""Merge a LoRA adapter into its base model and export it, checked against base + adapter.

The guide says to merge cautiously. `merge_and_export(run_or_adapter, out_dir)`:

1. finds the adapter (a run directory's output/, or an adapter folder) and
   its base model;
2. refuses a QLoRA adapter: its base was 4-bit, and PEFT cannot fold an
   adapter into 4-bit weights. The message gives the two ways out: keep the
   adapter separate (load the base in 4 bit and the adapter on top, exactly
   as trained), or merge into the base reloaded in 16 bit
   (`reload_16bit=True` / `tunewise merge --reload-16bit`), knowing the adapter
   learned to correct the 4-bit weights, not the 16-bit ones;
3. loads the base in 16 bit (bfloat16 by default), attaches the adapter, and
   computes logits on a few prompts; merges (`merge_and_unload`) and computes
   them again;
4. reports the largest absolute logit difference, and fails the export
   (`TunewiseError`, nothing written) when it exceeds the tolerance; for
   scale it also reports how far the adapter moves the base's logits.

The tolerance is relative to the logits' size: folding B·A into 16-bit weights
rounds each merged weight to 16 bits (bfloat16 keeps 8 significant bits, a
relative error up to 2^-9), and those errors add up over the layers, so a
correct merge differs by a small fraction of the largest logit; a wrong one
(mismatched base, wrong scaling) by about the adapter's own effect.
"""

from __future__ import annotations

import json
from pathlib import Path

from advisor.errors import TunewiseError
from trainer.rundir import PLAN_FILE, final_output

DEFAULT_PROMPTS = (
    "Convert 2011-09-24 to day, month and year.",
    "The river Mork rises in the",
    "Once upon a time",
)

#: Accepted logit difference as a share of the largest |logit| of base + adapter, per dtype.
#: bfloat16 has 8 significant bits (float16 11, float32 24); the shares leave room for the
#: rounding of every merged weight to add up across layers.
RELATIVE_TOLERANCE = {"bfloat16": 0.02, "float16": 0.005, "float32": 1e-4}

REPORT_FILE = "merge_report.json"


def _find_adapter(source: Path, step: str | None = None) -> tuple[Path, Path | None]:
    """(adapter directory, the run directory that trained it, or None) for a run directory (its output, a
    pipeline's final policy or its `step`, or the newest complete checkpoint while there is no output), a
    run's output, or an adapter folder."""
    source = source.expanduser().resolve()
    if (source / "adapter_config.json").is_file():
        run_dir = source.parent if (source.parent / PLAN_FILE).is_file() else None
        return source, run_dir
    if (source / PLAN_FILE).is_file():
        trained = final_output(source, step, policy=False)
        if (trained.path / "adapter_config.json").is_file():
            return trained.path, trained.run_dir
        raise TunewiseError(
            f"run {source.name} ({trained.label}) trained all the weights: {trained.path} is already a complete "
            "model, so there is no adapter to merge; export copies it as it is"
        )
    raise TunewiseError(f"{source} is neither a run directory nor an adapter folder (no adapter_config.json)")


def _was_quantized(adapter_dir: Path, run_dir: Path | None, base_path: str) -> bool:
    """Whether the adapter was trained on a quantized base (a QLoRA plan, or a pre-quantized base model)."""
    if run_dir is not None and (run_dir / PLAN_FILE).is_file():
        from advisor.plan import Plan

        if Plan.load(run_dir / PLAN_FILE).method.method == "qlora":
            return True
    config_path = Path(base_path) / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError:
            return False
        return "quantization_config" in config
    return False


def _logits(model, tokenizer, prompts: list[str]):
    import torch

    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            outputs.append(model(input_ids=ids).logits.float())
    return outputs


def _max_abs_diff(first, second) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second))


def merge_and_export(
    run_dir_or_adapter: str | Path,
    out_dir: str | Path | None = None,
    prompts: list[str] | None = None,
    *,
    reload_16bit: bool = False,
    tolerance: float | None = None,
    dtype: str = "bfloat16",
    step: str | None = None,
) -> dict:
    """Merge the adapter into a 16-bit copy of its base, verify it, and save it to `out_dir`.

    Returns {"out_dir", "base_model", "adapter_dir", "dtype", "prompts",
    "max_abs_logit_diff", "tolerance", "adapter_effect", "reloaded_16bit"};
    also written to out_dir/merge_report.json. Raises `TunewiseError` for a
    QLoRA adapter (unless reload_16bit), a full-fine-tuning run (nothing to
    merge), or a merged model whose logits differ from base + adapter by more
    than the tolerance (then nothing is written). For a pipeline run, `step` picks the step whose
    adapter is merged (default: its final policy, see trainer.rundir.final_output).
    """
    from trainer.models import base_of_adapter, resolve_model_path

    if dtype not in RELATIVE_TOLERANCE:
        raise TunewiseError(f"dtype must be one of {', '.join(RELATIVE_TOLERANCE)}, got {dtype!r}")
    adapter_dir, run_dir = _find_adapter(Path(run_dir_or_adapter), step)
    base_path = resolve_model_path(base_of_adapter(adapter_dir))
    quantized = _was_quantized(adapter_dir, run_dir, base_path)
    if quantized and not reload_16bit:
        raise TunewiseError(
            "this adapter was trained with QLoRA on a 4-bit base, and an adapter cannot be merged into 4-bit "
            "weights. Either keep the adapter separate (load the base in 4 bit with the adapter on top, exactly "
            "as it was trained), or merge it into the base reloaded in 16 bit (`tunewise merge --reload-16bit`; "
            "the adapter learned to correct the 4-bit weights, so check the merged model's quality before using it)"
        )
    # Only now the heavy imports: the refusals above take a second, not the time to import torch.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if out_dir is None:
        out_dir = (run_dir / "merged") if run_dir is not None else adapter_dir.parent / f"{adapter_dir.name}-merged"
    out_dir = Path(out_dir).expanduser().resolve()
    prompts = list(prompts or DEFAULT_PROMPTS)

    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    torch_dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    with_adapter = _logits(model, tokenizer, prompts)
    with model.disable_adapter():
        base_only = _logits(model, tokenizer, prompts)
    merged = model.merge_and_unload()
    merged.eval()
    after_merge = _logits(merged, tokenizer, prompts)

    difference = _max_abs_diff(after_merge, with_adapter)
    adapter_effect = _max_abs_diff(with_adapter, base_only)
    scale = max(float(logits.abs().max()) for logits in with_adapter)
    limit = tolerance if tolerance is not None else RELATIVE_TOLERANCE[dtype] * max(scale, 1.0)
    report = {
        "out_dir": str(out_dir),
        "base_model": base_path,
        "adapter_dir": str(adapter_dir),
        "dtype": dtype,
        "prompts": prompts,
        "max_abs_logit_diff": difference,
        "tolerance": limit,
        "adapter_effect": adapter_effect,
        "max_abs_logit": scale,
        "reloaded_16bit": bool(quantized and reload_16bit),
    }
    if not difference <= limit:  # also catches NaN
        raise TunewiseError(
            f"the merged model disagrees with base + adapter: largest logit difference {difference:.4g} is above "
            f"the tolerance {limit:.4g} (the adapter itself moves logits by {adapter_effect:.4g}); nothing was "
            "exported. Keep the adapter separate, or merge in float32 (dtype='float32')"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.merge RUN_DIR [--reload-16bit] [--out DIR]`: merge and print the report as one JSON
    object on stdout (whatever the libraries print goes to stderr), or `error: ...` on stderr and exit 2."""
    import argparse
    import contextlib
    import sys

    parser = argparse.ArgumentParser(prog="python -m trainer.merge", description="Merge a run's adapter, print JSON.")
    parser.add_argument("run_dir", help="a run directory, a run's output or an adapter folder")
    parser.add_argument("--out", default=None, help="where the merged model goes (default: <run>/merged)")
    parser.add_argument("--reload-16bit", action="store_true", help="QLoRA: merge into the base reloaded in 16 bit")
    parser.add_argument("--step", default=None, help="a pipeline's step to merge (default: its final policy)")
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            report = merge_and_export(args.run_dir, args.out, reload_16bit=args.reload_16bit, step=args.step)
    except TunewiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
