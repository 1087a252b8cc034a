"""Base vs tuned generations of a run, side by side: `python -m trainer.samples RUN_DIR --prompt P ...`.

The app asks for samples through `generate(run_dir, prompts, timeout_s, step)`, which runs this module as
a subprocess, so torch and transformers never load in the page's process. The child loads the run's base
model and its tuned result (trainer.rundir.final_output: the run's output, a pipeline's final policy or
the step asked for, or the newest complete checkpoint while there is no output yet; an adapter is loaded
on the base it was trained on, which for a pipeline's later steps is the merged SFT model), generates
greedily from each prompt (through the tokenizer's chat template when it has one, as the stages train),
and prints one JSON object: {"base": [...], "tuned": [...], "tuned_from": "<label>"}.

Exit codes: 0 done, 2 the run has nothing to sample from yet (the message is on stderr).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from advisor.errors import TunewiseError
from trainer.procs import REPO_ROOT, child_env
from trainer.rundir import PLAN_FILE, final_output

#: At most this many prompts per request (each is generated twice, base and tuned).
MAX_PROMPTS = 8
MAX_NEW_TOKENS = 32


def generate(run_dir: Path, prompts: list[str], timeout_s: float, step: str | None = None,
             max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[str]]:
    """[prompt, base completion, tuned completion] for each prompt, computed in a subprocess (the tuned model:
    `step` of a pipeline, else the run's final policy); TunewiseError (naming the field) when there are no
    prompts, too many, the run has nothing to sample yet, or it took longer than `timeout_s`."""
    if not prompts:
        raise TunewiseError("prompts: write at least one prompt, one per line", field="prompts")
    if len(prompts) > MAX_PROMPTS:
        raise TunewiseError(f"prompts: at most {MAX_PROMPTS} prompts at a time", field="prompts")
    final_output(run_dir, step)  # nothing to sample from, or no such step: say so now, not after loading torch
    command = [sys.executable, "-m", "trainer.samples", str(run_dir), "--max-new-tokens", str(max_new_tokens)]
    if step:
        command += ["--step", str(step)]
    for prompt in prompts:
        command += ["--prompt", prompt]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO_ROOT),
                              env=child_env())
    except subprocess.TimeoutExpired:
        raise TunewiseError(f"samples: generation took longer than {timeout_s:.0f} s; use fewer prompts",
                            field="prompts") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TunewiseError(f"samples: generation failed: {last}", field="run")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [[prompt, base, tuned] for prompt, base, tuned in zip(prompts, result["base"], result["tuned"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--step", default=None, help="a pipeline's step (default: its final policy)")
    args = parser.parse_args(argv)

    from advisor.plan import Plan

    run_dir = Path(args.run_dir)
    plan = Plan.load(run_dir / PLAN_FILE)
    try:
        tuned = final_output(run_dir, args.step)
    except TunewiseError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models import base_of_adapter, inference_placement, resolve_model_path

    base_name = resolve_model_path(plan.model.name)
    trust = plan.model.trust_remote_code
    dtype, device = inference_placement()
    tokenizer = AutoTokenizer.from_pretrained(base_name, trust_remote_code=trust)
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype, trust_remote_code=trust).to(device)
    base.eval()

    def complete(model, prompt: str) -> str:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    base_out = [complete(base, prompt) for prompt in args.prompt]
    adapter_base = base_of_adapter(tuned.path)
    if adapter_base is not None:
        from peft import PeftModel

        # A pipeline's PPO or DPO adapter sits on the merged SFT model, not on the plan's base.
        under = base if resolve_model_path(adapter_base) == base_name else AutoModelForCausalLM.from_pretrained(
            resolve_model_path(adapter_base), dtype=dtype, trust_remote_code=trust).to(device)
        model = PeftModel.from_pretrained(under, str(tuned.path)).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tuned.path), dtype=dtype, trust_remote_code=trust).to(device)
    model.eval()
    tuned_out = [complete(model, prompt) for prompt in args.prompt]
    print(json.dumps({"base": base_out, "tuned": tuned_out, "tuned_from": tuned.label}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
