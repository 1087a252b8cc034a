"""Sampling from a policy and measuring it against its reference.

What every preference stage reports on held-out prompts, every
`plan.preference.sample_every` steps:

- `kl`: the mean over sampled completion tokens of log pi(y|x) - log pi_ref(y|x),
  with y sampled from the policy pi (temperature 1). This is a Monte-Carlo
  estimate of the per-token KL(pi || pi_ref); it is exactly 0 when the policy
  equals the reference. `kl_sequence` is the same log-ratio summed over each
  completion and averaged over completions (the scale of TRL's `objective/kl`).
- `reward`: the reward model's mean score of the samples when there is one,
  otherwise DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) summed
  over the completion, averaged.
- diversity: `distinct_1` / `distinct_2` (unique n-grams over all n-grams of the
  completions) and `entropy` (the policy's mean next-token entropy in nats at
  the sampled positions).
- `heldout_accuracy` on held-out preference pairs: the share of pairs whose
  chosen answer gets the larger implicit reward (log-ratio to the reference),
  ties counting half. It needs no reward model, so it is an independent check.

The reference is either a separate frozen model or, for LoRA / QLoRA, the
policy itself with its adapter disabled (no second copy).

Runs only inside the training process, so torch is imported at the top.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    """Token ids of one prompt: chat messages (or a plain request when the tokenizer has a chat
    template) go through the template with the generation prompt; other text is tokenized as is."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def answer_ids(tokenizer, prompt: Any, answer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for a preference pair side, matching how TRL tokenizes it:
    the chat template for conversational data, prompt + answer text otherwise."""
    if isinstance(answer, list):
        answer = "".join(m.get("content", "") for m in answer)
    if isinstance(prompt, list) or (isinstance(prompt, str) and getattr(tokenizer, "chat_template", None)):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        head = prompt_ids(tokenizer, messages)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True)
        if isinstance(full, dict) or hasattr(full, "keys"):
            full = full["input_ids"]
        full = list(full)
        if full[: len(head)] == head:
            return head, full[len(head):]
        return head, tokenizer(answer, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    return head, tail


@contextlib.contextmanager
def reference_of(policy, reference=None):
    """Yields the reference model: `reference` when given, else the policy with its adapter disabled."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model given and the policy has no adapter to disable")
    with policy.disable_adapter():
        yield policy


@contextlib.contextmanager
def eval_mode(*models):
    """Eval mode (no dropout) for the measurement, then each model's previous mode again."""
    previous = [(m, m.training) for m in models if m is not None]
    for model, _ in previous:
        model.eval()
    try:
        yield
    finally:
        for model, was_training in previous:
            model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_completions(policy, tokenizer, prompts: Sequence[Any], max_new_tokens: int, seed: int = 0,
                       batch_size: int = 8) -> tuple[list[list[int]], list[list[int]]]:
    """Sample one completion per prompt at temperature 1 (no top-k / top-p), cut after the first EOS.

    The random state is forked and seeded, so measurements at different steps draw with the same
    seed and the training run's own random stream is left untouched.
    """
    all_prompts = [prompt_ids(tokenizer, p) for p in prompts]
    completions: list[list[int]] = []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(policy)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(all_prompts), batch_size):
            batch = all_prompts[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            # Left padding, so every prompt ends where generation begins.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            out = policy.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                  eos_token_id=tokenizer.eos_token_id)
            for row in out[:, width:].tolist():
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != pad_id] if pad_id != tokenizer.eos_token_id else row
                completions.append(row or [tokenizer.eos_token_id])
    return all_prompts, completions


@torch.no_grad()
def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 8,
                        with_entropy: bool = False):
    """Per-token log-probabilities of each completion given its prompt (and, optionally, the model's
    next-token entropy at those positions): one float32 tensor per completion."""
    device = _device(model)
    logps, entropies = [], []
    for start in range(0, len(prompts), batch_size):
        rows = [p + c for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        width = max(len(r) for r in rows)
        # Right padding; positions are then 0..n-1 for every row, as in training.
        input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        for i, (p, c) in enumerate(zip(prompts[start:start + batch_size], completions[start:start + batch_size])):
            # The logits at position t predict token t + 1: completion token j sits at len(p) + j.
            step_logits = logits[i, len(p) - 1: len(p) + len(c) - 1]
            log_probs = F.log_softmax(step_logits, dim=-1)
            target = torch.tensor(c, device=device)
            logps.append(log_probs.gather(-1, target[:, None]).squeeze(-1).cpu())
            if with_entropy:
                entropies.append(-(log_probs.exp() * log_probs).sum(-1).cpu())
    return (logps, entropies) if with_entropy else logps


def distinct_n(completions: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams over all n-grams across the completions (1.0: no repeats; 0 when there are none)."""
    grams = [tuple(c[i:i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def reward_scores(reward_model, prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                  batch_size: int = 8) -> list[float]:
    """The reward model's score (its single logit at the last real token) of each prompt + completion."""
    device = _device(reward_model)
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [p + c for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], device=device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = reward_model(input_ids=input_ids, attention_mask=attention).logits.float()
        scores += logits[:, 0].cpu().tolist()
    return scores


def measure_policy(policy, tokenizer, prompts: Sequence[Any], *, reference=None, max_new_tokens: int = 32,
                   seed: int = 0, beta: float = 0.1, reward_model=None, pairs: Sequence[dict] | None = None,
                   examples: int = 2) -> dict:
    """Sample from the policy on `prompts` and measure KL, reward, diversity and held-out accuracy.

    `reference`: a frozen reference model, or None to use the policy with its adapter disabled.
    `pairs`: held-out {"prompt", "chosen", "rejected"} rows for `heldout_accuracy` (skipped when None).
    Returns the fields of a `sample` event.
    """
    models = [policy, reference, reward_model]
    with eval_mode(*models):
        prompt_tokens, completions = sample_completions(policy, tokenizer, prompts, max_new_tokens, seed)
        policy_logps, entropies = completion_logprobs(policy, prompt_tokens, completions, with_entropy=True)
        with reference_of(policy, reference) as ref:
            ref_logps = completion_logprobs(ref, prompt_tokens, completions)
        log_ratios = [p - r for p, r in zip(policy_logps, ref_logps)]
        tokens = sum(len(c) for c in completions)
        kl = float(sum(lr.sum() for lr in log_ratios) / max(tokens, 1))
        kl_sequence = float(sum(lr.sum() for lr in log_ratios) / max(len(log_ratios), 1))
        fields = {
            "kl": kl,
            "kl_sequence": kl_sequence,
            "distinct_1": distinct_n(completions, 1),
            "distinct_2": distinct_n(completions, 2),
            "entropy": float(sum(e.sum() for e in entropies) / max(tokens, 1)),
            "completion_length": tokens / max(len(completions), 1),
            "num_samples": len(completions),
        }
        if reward_model is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            scores = reward_scores(reward_model, prompt_tokens, completions, pad_id)
            fields["reward"] = sum(scores) / len(scores)
            fields["reward_source"] = "reward_model"
        else:
            fields["reward"] = beta * kl_sequence
            fields["reward_source"] = "implicit"
        if pairs:
            fields["heldout_accuracy"] = heldout_preference_accuracy(policy, tokenizer, pairs, reference)
        fields["examples"] = [
            {"prompt": tokenizer.decode(p, skip_special_tokens=True),
             "completion": tokenizer.decode(c, skip_special_tokens=True)}
            for p, c in list(zip(prompt_tokens, completions))[:examples]
        ]
    for key, value in list(fields.items()):
        if isinstance(value, float) and not math.isfinite(value):
            fields[key] = None
    return fields


@torch.no_grad()
def heldout_preference_accuracy(policy, tokenizer, pairs: Sequence[dict], reference=None) -> float:
    """Share of pairs whose chosen answer has the larger log-ratio to the reference (ties count half)."""
    prompts_c, answers_c, prompts_r, answers_r = [], [], [], []
    for row in pairs:
        p, c = answer_ids(tokenizer, row["prompt"], row["chosen"])
        prompts_c.append(p)
        answers_c.append(c)
        p, r = answer_ids(tokenizer, row["prompt"], row["rejected"])
        prompts_r.append(p)
        answers_r.append(r)
    with eval_mode(policy, reference):
        chosen = [x.sum() for x in completion_logprobs(policy, prompts_c, answers_c)]
        rejected = [x.sum() for x in completion_logprobs(policy, prompts_r, answers_r)]
        with reference_of(policy, reference) as ref:
            ref_chosen = [x.sum() for x in completion_logprobs(ref, prompts_c, answers_c)]
            ref_rejected = [x.sum() for x in completion_logprobs(ref, prompts_r, answers_r)]
    score = 0.0
    for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected):
        margin = float((c - rc) - (r - rr))
        score += 1.0 if margin > 1e-6 else 0.5 if abs(margin) <= 1e-6 else 0.0
    return score / len(pairs) if pairs else float("nan")


@torch.no_grad()
def reward_model_accuracy(reward_model, tokenizer, pairs: Sequence[dict]) -> dict:
    """A reward model's held-out accuracy (chosen scored above rejected) and mean margin."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts_c, answers_c, prompts_r, answers_r = [], [], [], []
    for row in pairs:
        p, c = answer_ids(tokenizer, row["prompt"], row["chosen"])
        prompts_c.append(p)
        answers_c.append(c)
        p, r = answer_ids(tokenizer, row["prompt"], row["rejected"])
        prompts_r.append(p)
        answers_r.append(r)
    with eval_mode(reward_model):
        chosen = reward_scores(reward_model, prompts_c, answers_c, pad_id)
        rejected = reward_scores(reward_model, prompts_r, answers_r, pad_id)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "heldout_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else float("nan"),
        "heldout_margin": sum(margins) / len(margins) if margins else float("nan"),
        "heldout_pairs": len(margins),
    }
