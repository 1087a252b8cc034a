"""Sampling from a policy and measuring it against its reference.

What every preference stage reports on held-out prompts, every
`plan.preference.sample_every` steps:

- `kl`: the per-token KL(pi || pi_ref) on completions y sampled from the policy
  pi (temperature 1): at each sampled position t, the expectation over the next
  token of log pi(.|x, y<t) - log pi_ref(.|x, y<t), averaged over positions.
  It has the same expectation as the plain Monte-Carlo mean of
  log pi(y_t) - log pi_ref(y_t) over the sampled tokens (reported as
  `kl_logratio`), but averages the next token out exactly, so it is never
  negative and far less noisy with a handful of samples. Both are exactly 0
  when the policy equals the reference. `kl_sequence` is the per-position KL
  summed over each completion, averaged over completions (the scale of TRL's
  `objective/kl`, and of the plan's kl_limit / target_kl).
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
from transformers import TrainerCallback


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
            # remove_invalid_values: a policy whose weights went NaN would make sampling raise ("probability
            # tensor contains inf, nan") before trainer.callbacks.NonFiniteCallback can fail the run with its
            # clear message; finite logits are untouched.
            out = policy.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                  eos_token_id=tokenizer.eos_token_id, remove_invalid_values=True)
            for row in out[:, width:].tolist():
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != pad_id] if pad_id != tokenizer.eos_token_id else row
                completions.append(row or [tokenizer.eos_token_id])
    return all_prompts, completions


@torch.no_grad()
def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 8,
                        with_entropy: bool = False, full: bool = False):
    """Per-token log-probabilities of each completion given its prompt: one float32 tensor per completion.

    `with_entropy`: also the model's next-token entropy at those positions. `full`: instead of the
    sampled tokens' log-probs, the whole next-token log-distribution at each position ([tokens, vocab]).
    """
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
            if full:
                logps.append(log_probs.cpu())
            else:
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
        policy_dists = completion_logprobs(policy, prompt_tokens, completions, full=True)
        with reference_of(policy, reference) as ref:
            ref_dists = completion_logprobs(ref, prompt_tokens, completions, full=True)
        tokens = sum(len(c) for c in completions)
        # Per position: KL = sum_v pi(v) (log pi(v) - log pi_ref(v)); entropy = -sum_v pi(v) log pi(v).
        position_kls = [(p.exp() * (p - r)).sum(-1).clamp(min=0.0) for p, r in zip(policy_dists, ref_dists)]
        entropies = [-(p.exp() * p).sum(-1) for p in policy_dists]
        # The sampled tokens' own log-ratio (the plain Monte-Carlo estimator).
        log_ratios = [(p - r).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
                      for p, r, c in zip(policy_dists, ref_dists, completions)]
        del policy_dists, ref_dists
        kl = float(sum(k.sum() for k in position_kls) / max(tokens, 1))
        kl_sequence = float(sum(k.sum() for k in position_kls) / max(len(position_kls), 1))
        logratio_sequence = float(sum(lr.sum() for lr in log_ratios) / max(len(log_ratios), 1))
        fields = {
            "kl": kl,
            "kl_sequence": kl_sequence,
            "kl_logratio": float(sum(lr.sum() for lr in log_ratios) / max(tokens, 1)),
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
            # DPO's implicit reward of the samples: beta * log pi(y|x) / pi_ref(y|x), averaged.
            fields["reward"] = beta * logratio_sequence
            fields["reward_source"] = "implicit"
        if pairs:
            fields["heldout_accuracy"] = heldout_preference_accuracy(policy, tokenizer, pairs, reference)
            fields["heldout_pairs"] = len(pairs)  # how noisy that share is (the monitors judge a fall by it)
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


class SampleCallback(TrainerCallback):
    """Every `every` steps (and at step 0 and the last step) sample the policy on held-out prompts and
    emit a `sample` event: kl, kl_sequence, reward, reward_source, distinct_1, distinct_2, entropy,
    completion_length, heldout_accuracy, examples.

    `policy_of(model)` picks the policy out of what the trainer passes to callbacks (PPO wraps it
    with its value model); `reference` is a frozen model, or None for the adapter-disabled policy.
    """

    def __init__(self, ctx, tokenizer, prompts, *, pairs=None, reference=None, reward_model=None, beta=0.1,
                 policy_of=None, policy=None):
        pref = ctx.plan.preference
        self.ctx = ctx
        self.tokenizer = tokenizer
        self.prompts = list(prompts)[: pref.num_samples]
        self.pairs = list(pairs or [])[: max(pref.num_samples, 8)]
        self.reference = reference
        self.reward_model = reward_model
        self.beta = beta
        self.every = pref.sample_every
        self.max_new_tokens = pref.max_new_tokens
        self.seed = ctx.plan.training.seed
        self.policy_of = policy_of or (lambda model: model)
        self.policy = policy
        self.history: list[dict] = []
        self.last_step: int | None = None
        """The step of the latest measurement (None before the first)."""

    def measure(self, model, step: int) -> dict:
        policy = self.policy if self.policy is not None else self.policy_of(model)
        fields = measure_policy(policy, self.tokenizer, self.prompts, reference=self.reference,
                                max_new_tokens=self.max_new_tokens, seed=self.seed, beta=self.beta,
                                reward_model=self.reward_model, pairs=self.pairs)
        self.last_step = step
        self.history.append(dict(fields, step=step))
        self.ctx.emit("sample", step=step, **fields)
        return fields

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.prompts and self.last_step is None:
            self.measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.prompts and state.global_step % self.every == 0 and self.last_step != state.global_step:
            self.measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.prompts and self.last_step != state.global_step:
            self.measure(model, state.global_step)
