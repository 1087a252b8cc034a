"""Online RL stage: PPO (the guide's RLHF step 3), or RLOO / GRPO, against a trained reward model.

All online-RL code lives in this one file, so the choice of library can change
in one place. `preference.algorithm` picks:

- ppo: `trl.experimental.ppo.PPOTrainer` (TRL 1.12; removed from TRL in 1.13,
  hence the pin). Models, exactly what the planner's memory model assumes:
  the policy (from `preference.sft_model`, an SFT adapter merged first);
  the reference: none extra with LoRA (the policy with its adapter disabled),
  a frozen copy with full fine-tuning; the reward model from
  `preference.reward_model`, frozen; a value model, a one-logit classifier
  initialised from the reward model and trained with the policy's method
  (full weights, or LoRA adapters on a frozen copy with a trainable score
  head); plus the generation KV cache. QLoRA is refused by the plan for PPO.
  KL penalty coefficient `preference.kl_coef`; with `preference.adaptive_kl`
  the coefficient follows Ziegler et al.'s adaptive controller towards
  `preference.target_kl` (TRL 1.12's PPOTrainer has only a fixed
  coefficient, so `AdaptiveKLCallback` updates it between steps).
  TRL's metrics are logged unchanged, per step: `objective/scores` (mean
  reward-model score), `objective/kl` (KL to the reference, TRL's k3 estimator
  summed over the response, averaged), `objective/rlhf_reward` (score - kl_coef x KL),
  `objective/non_score_reward`, `objective/entropy`, `policy/*`, `loss/*`,
  `val/*`; we add `kl_coef` (the coefficient in force).
- rloo / grpo: TRL's RLOOTrainer / GRPOTrainer with the reward model as the
  reward function and `beta = preference.kl_coef` (reference: the adapter-
  disabled policy with LoRA, TRL's frozen copy with full). TRL logs `reward`,
  `kl` (per token), `rewards/<reward model>/mean`, ...; we add the same
  `objective/scores`, `objective/kl` (per-token KL x mean completion length,
  i.e. per sequence), `objective/rlhf_reward` and `kl_coef`, so every
  algorithm plots the same way.

The data: prompts from any format that has them (prompt/completion, chat
messages: the turns before the last reply, or preference pairs;
`trainer.data.load_prompt_rows`, which the pre-flight check runs too).
Every `preference.sample_every` steps a `sample` event measures the policy on
held-out prompts (KL, reward-model score, diversity, and with preference
data held-out preference accuracy; trainer/sampling.py), and the preference
monitors watch it all.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from advisor.errors import TunewiseError
from trainer.callbacks import callbacks_for, metric_history
from trainer.context import stage_result
from trainer.data import conversational, load_prompt_rows
from trainer.forgetting import PAIRS_NO_REPLAY, setup_forgetting
from trainer.models import load_model, load_tokenizer, lora_config
from trainer.monitors import monitored_context
from trainer.sampling import SampleCallback, prompt_ids
from trainer.sources import policy_start, reward_model_dir
from trainer.training_args import trl_args


class StopNow(Exception):
    """Raised from a callback to end PPO's loop, which does not check `should_training_stop`."""


class StopPPOCallback(TrainerCallback):
    """TRL's PPO loop ignores `control.should_training_stop`; this ends it at the step boundary instead."""

    def __init__(self, ctx):
        self.ctx = ctx

    def on_step_end(self, args, state, control, **kwargs):
        if self.ctx.stop_requested():
            raise StopNow()


class AdaptiveKLCallback(TrainerCallback):
    """The KL coefficient: fixed, or Ziegler et al.'s adaptive controller (arXiv:1909.08593, section 2.2).

    After each step with KL `kl`: error = clip(kl / target - 1, -0.2, 0.2) and
    coef <- coef x (1 + error x batch / horizon), horizon 10000 episodes: the
    coefficient grows while KL is above target and shrinks while below. PPO reads
    `args.kl_coef` afresh each step, so updating it here takes effect on the next one.
    Also adds `kl_coef` to every log.
    """

    def __init__(self, config, attribute: str, target_kl: float | None, batch_size: int, horizon: int = 10000):
        self.config = config
        self.attribute = attribute
        self.target_kl = target_kl
        self.batch_size = batch_size
        self.horizon = horizon

    @property
    def coef(self) -> float:
        return float(getattr(self.config, self.attribute))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "objective/kl" not in logs:
            return
        logs["kl_coef"] = self.coef
        if self.target_kl:
            kl = float(logs["objective/kl"])
            error = max(-0.2, min(0.2, kl / self.target_kl - 1.0))
            setattr(self.config, self.attribute, self.coef * (1.0 + error * self.batch_size / self.horizon))


class ObjectiveKeysCallback(TrainerCallback):
    """RLOO / GRPO logs under PPO's names: objective/scores, objective/kl (per sequence), objective/rlhf_reward."""

    def __init__(self, reward_name: str, beta: float):
        self.reward_name = reward_name
        self.beta = beta

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        score = logs.get(f"rewards/{self.reward_name}/mean")
        if score is None:
            return
        length = logs.get("completions/mean_length") or 0.0
        # TRL's `kl` is per token; times the mean completion length it is per sequence, like PPO's.
        # TRL reports a non-finite mean as None: keep it non-finite (NonFiniteCallback judges the run).
        kl_per_token = logs.get("kl", 0.0)
        kl = float("nan") if kl_per_token is None else kl_per_token * length
        logs["objective/scores"] = score
        logs["objective/kl"] = kl
        logs["objective/rlhf_reward"] = score - self.beta * kl
        logs["kl_coef"] = self.beta


class UnwrapPolicy(TrainerCallback):
    """Hands a callback the bare policy in place of PPO's policy-and-value wrapper."""

    def __init__(self, inner, policy_of):
        self.inner = inner
        self.policy_of = policy_of

    def _call(self, name, args, state, control, model=None, **kwargs):
        method = getattr(self.inner, name, None)
        if method is not None:
            return method(args, state, control, model=self.policy_of(model) if model is not None else None, **kwargs)
        return None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        return self._call("on_train_begin", args, state, control, model, **kwargs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        return self._call("on_step_end", args, state, control, model, **kwargs)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        return self._call("on_train_end", args, state, control, model, **kwargs)

    def on_log(self, args, state, control, model=None, **kwargs):
        return self._call("on_log", args, state, control, model, **kwargs)

    @property
    def stop_reason(self):
        return getattr(self.inner, "stop_reason", None)

    def summary(self):
        return self.inner.summary() if hasattr(self.inner, "summary") else {}


def _value_model(rm_dir: Path, plan):
    """The value model: a one-logit classifier initialised from the reward model, trained like the policy.

    Full: every weight trains. LoRA: the base is frozen and LoRA adapters are injected in place
    (no PeftModel wrapper, since PPO reaches into `value_model.model` and `.score`), with the
    score head trainable.
    """
    if plan.method.method == "full":
        return load_model(plan, "seq_cls", trainable=True, model_name=str(rm_dir), adapters=False)
    from peft import inject_adapter_in_model

    model = load_model(plan.with_overrides({"method.method": "full"}), "seq_cls", trainable=False,
                       model_name=str(rm_dir), adapters=False)
    model.train()
    config = lora_config(plan, "seq_cls")
    config.task_type = None
    config.modules_to_save = None
    model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or name.startswith("score."))
    return model


def _ppo(ctx, plan, policy_dir, tokenizer, train_rows, heldout, pairs, reward_model, rm_dir, sampler_kwargs):
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    use_adapter = plan.method.method == "lora"
    policy = load_model(plan, "causal_lm", trainable=True, model_name=str(policy_dir), adapters=False)
    reference = None if use_adapter else load_model(plan, "causal_lm", trainable=False, model_name=str(policy_dir),
                                                     adapters=False)
    value_model = _value_model(rm_dir, plan)
    value_model.config.pad_token_id = tokenizer.pad_token_id

    train_dataset = Dataset.from_list([{"input_ids": prompt_ids(tokenizer, r["prompt"])} for r in train_rows])
    eval_rows = heldout or train_rows[:2]
    eval_dataset = Dataset.from_list([{"input_ids": prompt_ids(tokenizer, r["prompt"])} for r in eval_rows])

    training = plan.training
    batch = training.micro_batch * training.grad_accum
    args = trl_args(ctx, False, PPOConfig)
    args.pop("max_steps", None)
    config = PPOConfig(
        **args,
        kl_coef=plan.preference.kl_coef,
        # k3 = (r - 1) - log r with r = pi_ref / pi: unbiased like k1 but never negative and less noisy
        # (http://joschu.net/blog/kl-approx.html), so objective/kl is a KL you can read at a glance.
        kl_estimator="k3",
        response_length=plan.preference.max_new_tokens,
        stop_token="eos",
        # One PPO step consumes one batch of prompts (episodes); max_steps fixes the count.
        total_episodes=training.max_steps * batch if training.max_steps else None,
        num_sample_generations=0,
        num_mini_batches=1,
        local_rollout_forward_batch_size=max(batch, 1),
    )
    forgetting = setup_forgetting(ctx, policy, tokenizer, train_dataset, replay=PAIRS_NO_REPLAY, ewc=(
        "EWC is not applied to PPO (TRL's PPO loop has no hook for an extra loss term); the forgetting monitor "
        "still runs."))
    policy_of = (lambda model: getattr(model, "policy", model))
    sampler = SampleCallback(ctx, tokenizer, [r["prompt"] for r in heldout], pairs=pairs, reference=reference,
                             reward_model=reward_model, policy_of=policy_of, **sampler_kwargs)
    kl_callback = AdaptiveKLCallback(config, "kl_coef", plan.preference.target_kl if plan.preference.adaptive_kl
                                     else None, batch)
    callbacks = ([UnwrapPolicy(cb, policy_of) for cb in forgetting.callbacks] + [kl_callback, sampler]
                 + callbacks_for(ctx) + [StopPPOCallback(ctx)])
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        peft_config=lora_config(plan, "causal_lm") if use_adapter else None,
    )
    stopped = False
    try:
        trainer.train()
    except StopNow:
        stopped = True
    if sampler.last_step != trainer.state.global_step:
        sampler.measure(trainer.model, trainer.state.global_step)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    return trainer, sampler, forgetting, stopped


def _rloo_or_grpo(ctx, plan, policy_dir, tokenizer, train_rows, heldout, pairs, reward_model, sampler_kwargs):
    if plan.preference.algorithm == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer

    use_adapter = plan.method.method in ("lora", "qlora")
    policy = load_model(plan, "causal_lm", trainable=True, model_name=str(policy_dir), adapters=False)
    train_dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in conversational(train_rows, tokenizer)])
    training = plan.training
    args = trl_args(ctx, False, Config)
    # Each prompt is answered twice or more so that completions can be compared within a group;
    # the generation batch (micro_batch x grad_accum) must hold whole groups.
    batch = training.micro_batch * training.grad_accum
    generations = 2 if batch % 2 == 0 else batch
    if batch < 2:
        raise TunewiseError(f"training.micro_batch: {plan.preference.algorithm} compares at least 2 completions per "
                            f"prompt: set micro_batch x grad_accum to 2 or more", field="training.micro_batch")
    # remove_invalid_values: a policy gone NaN then samples garbage instead of raising inside generate(), and
    # its NaN loss fails the run with NonFiniteCallback's message (finite logits are untouched).
    config = Config(**args, beta=plan.preference.kl_coef, num_generations=generations,
                    max_completion_length=plan.preference.max_new_tokens, temperature=1.0, log_completions=False,
                    generation_kwargs={"remove_invalid_values": True})
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_name = reward_model.config._name_or_path.split("/")[-1]
    forgetting = setup_forgetting(ctx, policy, tokenizer, train_dataset, replay=PAIRS_NO_REPLAY, ewc=(
        f"EWC is not applied to {plan.preference.algorithm}; the forgetting monitor still runs."))
    sampler = SampleCallback(ctx, tokenizer, [r["prompt"] for r in heldout], pairs=pairs,
                             reward_model=reward_model, **sampler_kwargs)
    objective = ObjectiveKeysCallback(reward_name, plan.preference.kl_coef)
    trainer = Trainer(
        model=policy,
        reward_funcs=reward_model,
        args=config,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[*forgetting.callbacks, objective, sampler, *callbacks_for(ctx)],
        peft_config=lora_config(plan, "causal_lm") if use_adapter else None,
    )
    if not use_adapter:
        # Full fine-tuning: measure KL against TRL's frozen reference copy.
        sampler.reference = getattr(trainer, "ref_model", None)
    objective.reward_name = trainer.reward_func_names[0] if hasattr(trainer, "reward_func_names") else reward_name
    trainer.train(resume_from_checkpoint=str(ctx.resume_from) if ctx.resume_from else None)
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(ctx.output_dir))
    return trainer, sampler, forgetting, ctx.stop_requested()


def run(ctx) -> dict:
    # -- setup ------------------------------------------------------------------------------------
    ctx = monitored_context(ctx)
    plan = ctx.plan
    torch.manual_seed(plan.training.seed)
    policy_dir = policy_start(ctx)
    rm_dir = reward_model_dir(ctx)
    tokenizer = load_tokenizer(plan, model_name=str(policy_dir))
    tokenizer.padding_side = "left"
    train_rows, heldout = load_prompt_rows(plan)
    # Held-out pairs (preference data) also measure preference accuracy; other data gives prompts only.
    pairs = heldout if heldout and "chosen" in heldout[0] else None
    # The reward model stays frozen and unquantized (16-bit on a GPU).
    reward_model = load_model(plan.with_overrides({"method.method": "full"}), "seq_cls", trainable=False,
                              model_name=str(rm_dir), adapters=False)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    sampler_kwargs = {"beta": plan.preference.kl_coef}

    # -- train (each algorithm builds its trainer, trains and saves the policy) ----------------------
    if plan.preference.algorithm == "ppo":
        if ctx.resume_from:
            ctx.emit("note", message="TRL's PPO cannot resume mid-run from a checkpoint: starting this stage afresh.")
        trainer, sampler, forgetting, stopped = _ppo(ctx, plan, policy_dir, tokenizer, train_rows, heldout, pairs,
                                                     reward_model, rm_dir, sampler_kwargs)
    else:
        trainer, sampler, forgetting, stopped = _rloo_or_grpo(ctx, plan, policy_dir, tokenizer, train_rows, heldout,
                                                              pairs, reward_model, sampler_kwargs)

    # -- save -------------------------------------------------------------------------------------
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(str(ctx.output_dir))

    history = trainer.state.log_history
    scores = metric_history(history, "objective/scores")
    kls = metric_history(history, "objective/kl")
    rlhf = metric_history(history, "objective/rlhf_reward")
    return stage_result(
        ctx, stopped, forgetting, sampler.history,
        algorithm=plan.preference.algorithm,
        steps=trainer.state.global_step,
        first_score=scores[0] if scores else None,
        last_score=scores[-1] if scores else None,
        first_kl=kls[0] if kls else None,
        last_kl=kls[-1] if kls else None,
        first_rlhf_reward=rlhf[0] if rlhf else None,
        last_rlhf_reward=rlhf[-1] if rlhf else None,
    )
