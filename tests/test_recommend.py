"""The advisor: the guide's tables and ranges, the published evidence beside them (each rule against its
source's numbers), the memory fit, fallbacks, warnings and overrides."""

from __future__ import annotations

import math

import pytest

from advisor.errors import TunewiseError
from advisor.recommend import (
    LR_RANGES,
    RANK_TABLE,
    AdvisorInputs,
    guide_learning_rate,
    rank_for,
    recommend,
)

# The guide's tables, copied from fine-tuning-guide.md so a drift in the advisor's copy fails here.
GUIDE_RANKS = {"classification": (4, 8), "qa": (16, 32), "summarization": (16, 32), "instruction": (64, 128), "max": (256, 256)}
GUIDE_LR = {"full": (1e-5, 5e-5), "lora": (1e-4, 3e-4), "qlora": (1e-4, 3e-4)}


def test_tables_match_the_guide():
    assert RANK_TABLE == GUIDE_RANKS
    assert LR_RANGES == GUIDE_LR


@pytest.mark.parametrize("task", sorted(GUIDE_RANKS))
@pytest.mark.parametrize("examples", [500, 20_000, 500_000])
@pytest.mark.parametrize("priority", ["quality", "balanced", "memory"])
def test_rank_and_lr_stay_in_the_guide_ranges(task, examples, priority):
    inputs = AdvisorInputs(model="7B", examples=examples, task=task, priority=priority)
    rank, reason = rank_for(inputs)
    low, high = GUIDE_RANKS[task]
    assert low <= rank <= high and reason.startswith("guide: LoRA rank table")
    for method in ("full", "lora", "qlora"):
        for preserve in (False, True):
            lr, lr_reason = guide_learning_rate(method, None if method == "full" else rank, AdvisorInputs(
                model="7B", examples=examples, task=task, priority=priority, preserve_original=preserve))
            assert GUIDE_LR[method][0] <= lr <= GUIDE_LR[method][1], (method, lr)
            assert lr_reason.startswith("guide: ")


def test_higher_rank_and_smaller_data_lower_the_lora_lr():
    big = AdvisorInputs(model="7B", examples=50_000, task="instruction")
    small = AdvisorInputs(model="7B", examples=2_000, task="instruction")
    assert guide_learning_rate("lora", 8, big)[0] > guide_learning_rate("lora", 128, big)[0]
    assert guide_learning_rate("lora", 64, big)[0] > guide_learning_rate("lora", 64, small)[0]


def test_instruction_sft_on_an_a100_is_lora_with_the_evidence_and_the_guide_beside_it():
    rec = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=50_000, task="instruction", gpu="A100-80GB"))
    assert rec.fits and rec.memory.checked
    assert rec["method"].value == "lora"
    assert rec["lora_rank"].value == 128 and "complex (instruction following) -> 64-128" in rec["lora_rank"].reason
    # Evidence: alpha fixed at 32; the guide's 2 x rank is shown beside it.
    assert rec["lora_alpha"].value == 32 and "guide: typical alpha = 2 x rank (scaling 2) -> 256" in rec["lora_alpha"].reason
    # Evidence: all linear layers; the guide's "all attention" for instruction is shown beside it.
    assert rec["lora_targets"].value == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert "guide: Recommended (all attention)" in rec["lora_targets"].reason
    # Evidence: Tinker's 3e-4 for Llama-3.1-8B moved to 6.7B by 1/sqrt(parameters); the guide's 1.3e-4 beside it.
    assert rec["learning_rate"].value == pytest.approx(3e-4 * (8_030_261_248 / 6_738_415_616) ** 0.5, rel=0.05)
    assert "guide: LoRA: higher than full fine-tuning, 1e-4 to 3e-4" in rec["learning_rate"].reason
    assert 0.05 <= rec["warmup_ratio"].value <= 0.10
    assert rec["micro_batch"].value * rec["grad_accum"].value == rec["effective_batch"].value
    # The estimator agrees the chosen micro-batch fits.
    assert rec.memory.total_bytes <= rec.memory.gpu_bytes
    assert rec["micro_batch"].value <= rec.memory.max_micro_batch
    assert all(not advice.overridden for advice in rec.values.values())
    plan = rec.to_plan()
    assert (plan.method.method, plan.method.lora_rank, plan.method.lora_alpha) == ("lora", 128, 32.0)
    assert plan.training.learning_rate == rec["learning_rate"].value
    assert plan.model.name == "meta-llama/Llama-2-7b-hf" and plan.hardware.gpu == "A100-80GB"


def test_targets_use_the_architectures_own_names():
    rec = recommend(AdvisorInputs(model="gpt2", examples=5_000, task="classification"))
    assert rec["lora_targets"].value == ("c_attn", "c_proj", "c_fc")  # every linear layer, in GPT-2's names
    assert "guide: Minimum (query, value projections) (minimum for classification) -> c_attn" in rec["lora_targets"].reason
    assert rec["lora_rank"].value == 4  # small data: low end of 4-8
    assert not rec.memory.checked  # no GPU given: nothing claimed about the fit


def test_large_very_different_data_prefers_full_and_falls_back_when_it_does_not_fit():
    big_gpu = recommend(AdvisorInputs(model="Qwen/Qwen2.5-0.5B", examples=500_000, task="instruction",
                                      domain_shift="high", gpu="A100-80GB", original_data="general_text.jsonl"))
    assert big_gpu["method"].value == "full"
    assert "large dataset (>100k examples" in big_gpu["method"].reason
    assert big_gpu["lora_rank"].value is None
    # Full fine-tuning takes a tenth of the evidence's LoRA rate (Llama-3.2-1B's 1e-3 moved to 0.5B).
    lora_rate = 1e-3 * (1_235_814_400 / 494_032_768) ** 0.5
    assert big_gpu["learning_rate"].value == pytest.approx(lora_rate / 10, rel=0.05)
    assert "guide: Full fine-tuning: lower LR than pretraining (1e-5 to 5e-5)" in big_gpu["learning_rate"].reason
    assert big_gpu["warmup_ratio"].value == 0.10
    assert big_gpu["ewc_lambda"].value > 0 and big_gpu["replay_fraction"].value == 0.10

    small_gpu = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=500_000, task="instruction",
                                        domain_shift="high", gpu="RTX-4090"))
    assert small_gpu.fits
    assert small_gpu["method"].value in ("lora", "qlora")
    assert "full does not fit" in small_gpu["method"].reason


def test_memory_priority_and_quantized_inference_choose_qlora():
    rec = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=20_000, task="qa", gpu="T4",
                                  quantized_inference=True))
    assert rec["method"].value == "qlora" and "inference will also be quantized" in rec["method"].reason
    assert rec["quant_bits"].value == 4 and rec["double_quant"].value is True
    assert rec["optimizer"].value == "paged_adamw_8bit"
    assert rec["precision"].value == "fp16"  # a T4 has no bf16
    assert rec.fits


def test_70b_on_one_t4_fits_nowhere_and_says_what_would():
    rec = recommend(AdvisorInputs(model="meta-llama/Llama-2-70b-hf", examples=20_000, task="instruction", gpu="T4"))
    assert not rec.fits
    assert rec["method"].value == "qlora"  # the closest method, shown with why it fails
    assert "qlora does not fit" in rec["method"].reason
    assert rec.warnings[0].startswith("does not fit 1 x T4")
    fixes = " | ".join(rec.memory.fixes)
    assert "of these GPUs with ZeRO-3" in fixes
    assert "smaller model" in fixes
    with pytest.raises(TunewiseError, match="no setup of meta-llama/Llama-2-70b-hf fits 1 x T4"):
        rec.to_plan()


def test_warnings_from_the_guides_risks():
    small = recommend(AdvisorInputs(model="gpt2", examples=300, task="qa"))
    assert any("far below the guide's typical 10k-100k" in w for w in small.warnings)
    full = small.with_override("method", "full")
    assert full["method"].overridden and full["method"].reason == "set by you"
    assert any("overfitting on small datasets" in w for w in full.warnings)

    dpo = recommend(AdvisorInputs(model="gpt2", examples=3_000, task="instruction", stage="dpo"))
    assert any("dpo without an SFT start" in w for w in dpo.warnings)
    assert 0.1 <= dpo["beta"].value <= 0.5 and dpo["kl_coef"].value is None
    assert "DPO is simpler" in dpo["preference_method"].reason
    with_sft = recommend(AdvisorInputs(model="gpt2", examples=3_000, task="instruction", stage="dpo", sft_model="runs/sft"))
    assert not any("SFT start" in w for w in with_sft.warnings)

    merge = recommend(AdvisorInputs(model="gpt2", examples=20_000, task="qa", priority="quality", will_merge=True,
                                    quantized_inference=True))
    assert merge["method"].value == "qlora"
    assert any("merge back to 16 bit for quality-critical use" in w for w in merge.warnings)


def test_ppo_kl_coefficient_in_the_guide_range():
    rec = recommend(AdvisorInputs(model="gpt2", examples=20_000, task="instruction", pipeline="rlhf"))
    assert 0.01 <= rec["kl_coef"].value <= 0.1
    assert rec["method"].value != "qlora"  # TRL's PPO does not train a quantized policy
    assert rec.to_plan().preference.kl_coef == rec["kl_coef"].value


def test_override_is_marked_and_rechecks_the_fit():
    rec = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=50_000, task="qa", gpu="RTX-4090"))
    assert rec.fits
    ranked = rec.with_override("lora_rank", 64)
    assert ranked["lora_rank"] .value == 64 and ranked["lora_rank"].overridden and ranked["lora_rank"].reason == "set by you"
    # alpha stays at the evidence's 32 for any rank; its reason follows the rank (scaling 32 / 64 = 0.5).
    assert ranked["lora_alpha"].value == 32 and not ranked["lora_alpha"].overridden
    assert "0.5 at rank 64" in ranked["lora_alpha"].reason and "-> 128" in ranked["lora_alpha"].reason
    assert any("rank 64 is outside the guide's 16-32" in w for w in ranked.warnings)
    huge = rec.with_override("micro_batch", 64).with_override("seq_len", 4096)
    assert huge["micro_batch"].overridden and huge["seq_len"].overridden
    assert not huge.fits and huge.warnings[0].startswith("does not fit")
    assert huge.to_plan(allow_unfit=True).training.micro_batch == 64
    with pytest.raises(TunewiseError, match="method.lora_rank"):
        rec.with_override("lora_rank", 0)
    with pytest.raises(TunewiseError, match="not an advised setting"):
        rec.with_override("rank", 8)


def test_bad_inputs_name_the_field():
    with pytest.raises(TunewiseError, match="examples: must be a whole number"):
        AdvisorInputs(model="7B", examples=0)
    with pytest.raises(TunewiseError, match="task: 'poetry' is not one of"):
        AdvisorInputs(model="7B", examples=10, task="poetry")
    with pytest.raises(TunewiseError, match="unknown model"):
        recommend(AdvisorInputs(model="not-a-model", examples=10))


def test_forgetting_interval_keeps_the_monitor_cheap_and_the_curve_drawn():
    from advisor.recommend import MONITOR_BUDGET, forgetting_interval, monitor_share

    # The cost model reproduces the measured 29% (bench/train_throughput.py: batch 8, every 10 steps).
    assert monitor_share(10, 8) == pytest.approx(0.29, abs=0.01)
    # A long run: within the budget, and never more than 200 measurements.
    for steps, batch in ((1500, 32), (20_000, 128), (5000, 8)):
        every, reason = forgetting_interval(steps, batch)
        assert monitor_share(every, batch) <= MONITOR_BUDGET and steps / every <= 200, (steps, batch, every)
        assert f"every {every} steps" in reason
    # A short run: at least 4 measurements, with the cost said plainly.
    every, reason = forgetting_interval(30, 4)
    assert 30 // every >= 4 and "only 30 steps" in reason and "% of training time" in reason

    # The advice reaches the plan, and a step cap (the demo's) is taken into account.
    long_run = recommend(AdvisorInputs(model="llama-2-7b", examples=50_000, task="instruction", gpu="A100-80GB"))
    plan = long_run.to_plan(allow_unfit=True)
    assert plan.forgetting.eval_every == long_run.values["forgetting_eval_every"].value
    assert monitor_share(plan.forgetting.eval_every, plan.training.micro_batch * plan.training.grad_accum) <= MONITOR_BUDGET
    capped = recommend(AdvisorInputs(model="demo", examples=2000, task="instruction", max_steps=30))
    assert capped.values["forgetting_eval_every"].value <= 7
    # The demo's step cap (600) replaces the epochs (375 steps of 16 here): the monitor is sized for 600 steps,
    # at least 4 points on the chart and well under a tenth of the run.
    demo = recommend(AdvisorInputs(model="demo", examples=2000, task="instruction", max_steps=600))
    every, batch = demo.values["forgetting_eval_every"].value, demo.values["effective_batch"].value
    assert 600 // every >= 4 and monitor_share(every, batch) <= MONITOR_BUDGET < 0.10
    assert "(600 steps:" in demo.values["forgetting_eval_every"].reason


# -- the published evidence beside the guide: each rule against its source's numbers ----------------------

from advisor import specs  # noqa: E402
from advisor.recommend import (  # noqa: E402
    DPO_LORA_RANK,
    LORA_LARGE_BATCH,
    RL_LORA_RANK,
    evidence_learning_rate,
    preference_learning_rate,
)

#: Tinker cookbook's SFT sweep (hyperparam_utils.get_lr), copied here so a drift in the advisor's copy fails.
TINKER_SWEEP = {"meta-llama/Llama-3.2-1B": 1e-3, "meta-llama/Llama-3.2-3B": 1e-3, "meta-llama/Llama-3.1-8B": 3e-4,
                "meta-llama/Llama-3.1-70B": 3e-4}


def _params(model: str) -> int:
    return specs.param_counts(specs.resolve_model(model)).total


def test_lora_rate_is_tinkers_sweep_moved_by_one_over_sqrt_params_and_full_is_a_tenth():
    for model, rate in TINKER_SWEEP.items():
        lora, reason, extrapolated = evidence_learning_rate("lora", _params(model))
        assert lora == rate and not extrapolated and "Tinker cookbook SFT sweep" in reason
        full, full_reason, _ = evidence_learning_rate("full", _params(model))
        assert full == pytest.approx(rate / 10)  # LoRA Without Regret: LoRA's best LR ~10x full fine-tuning's
        assert "about 10x" in full_reason and "32 for Llama-3.2-1B and 128 for Llama-3.1-70B" in full_reason
    # Between anchors: the nearest one (in log size), times sqrt(its parameters / these).
    mistral = _params("mistralai/Mistral-7B-v0.1")
    # (rounded to two significant figures, as every advised value)
    assert evidence_learning_rate("lora", mistral)[0] == pytest.approx(3e-4 * (_params("meta-llama/Llama-3.1-8B") / mistral) ** 0.5, rel=0.05)
    # Below the sweep's smallest model it is an extrapolation, and says so.
    demo_rate, demo_reason, extrapolated = evidence_learning_rate("lora", _params("demo"))
    assert extrapolated and "extrapolated" in demo_reason and "pilot" in demo_reason
    assert demo_rate == pytest.approx(1e-3 * (_params("meta-llama/Llama-3.2-1B") / _params("demo")) ** 0.5, rel=0.05)


def test_the_lora_rate_ignores_the_rank_at_alpha_32_and_follows_alpha():
    inputs = AdvisorInputs(model="meta-llama/Llama-3.1-8B", examples=50_000, task="instruction")
    rates = {rank: recommend(inputs, {"lora_rank": rank})["learning_rate"].value for rank in (8, 64, 256)}
    assert len(set(rates.values())) == 1 and rates[8] == 3e-4  # LoRA Without Regret: nearly rank-independent
    # PEFT scales the update by alpha: twice the alpha takes half the rate.
    doubled = recommend(inputs, {"lora_alpha": 64.0})
    assert doubled["learning_rate"].value == pytest.approx(1.5e-4) and "32 / 64" in doubled["learning_rate"].reason
    # QLoRA: the same rule, with the QLoRA paper's own 2e-4 (7B and 13B) quoted.
    assert "QLoRA paper (Dettmers et al. 2023) used 2e-04 for 7B and 13B" in recommend(
        inputs, {"method": "qlora"})["learning_rate"].reason


def test_all_linear_targets_even_for_memory_and_moe_experts_are_named():
    memory = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=20_000, task="qa", priority="memory"))
    assert "down_proj" in memory["lora_targets"].value and "at a lower rank" in memory["lora_targets"].reason
    assert memory["lora_rank"].value == 16  # the guide's low end for memory: the evidence trades rank, not layers
    mixtral = recommend(AdvisorInputs(model="mistralai/Mixtral-8x7B-v0.1", examples=20_000, task="instruction"))
    assert "experts are fused tensors" in mixtral["lora_targets"].reason


def test_large_batches_warn_for_lora_not_for_full_fine_tuning():
    inputs = AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=500_000, task="instruction")
    big = recommend(inputs, {"micro_batch": 32, "grad_accum": 8})
    assert big["effective_batch"].value == 256 > LORA_LARGE_BATCH
    assert any("LoRA pays a larger loss penalty than full fine-tuning" in w and "a higher rank does not remove it" in w
               for w in big.warnings)
    at_limit = recommend(inputs, {"micro_batch": 32, "grad_accum": 4})
    assert at_limit["effective_batch"].value == LORA_LARGE_BATCH and not any("larger loss penalty" in w for w in at_limit.warnings)
    full = recommend(inputs, {"method": "full", "micro_batch": 32, "grad_accum": 8})
    assert not any("larger loss penalty" in w for w in full.warnings)


def test_the_rank_holds_the_completion_tokens_or_is_raised_until_it_does():
    def holds(model, rank, targets, tokens):
        return specs.lora_trainable_params(specs.resolve_model(model), rank, targets) >= tokens

    # The demo's 23k completion tokens fit the guide's rank 64 (778k adapter parameters): kept, and said.
    demo = recommend(AdvisorInputs(model="demo", examples=2_000, task="instruction", completion_tokens=23_452))
    assert demo["lora_rank"].value == 64 and "778,240, which hold the data's 23,452 completion tokens" in demo["lora_rank"].reason
    # 5M completion tokens do not fit rank 64 (778k): raised to the smallest power of two that holds them.
    raised = recommend(AdvisorInputs(model="demo", examples=2_000, task="instruction", completion_tokens=2_000_000))
    rank = raised["lora_rank"].value
    targets = raised["lora_targets"].value
    assert rank == 256 and holds("demo", rank, targets, 2_000_000) and not holds("demo", rank // 2, targets, 2_000_000)
    assert "raised from the guide's 64" in raised["lora_rank"].reason
    # More than even rank 256 holds: a warning naming the primer and the way out.
    over = recommend(AdvisorInputs(model="demo", examples=2_000, task="instruction", completion_tokens=50_000_000))
    assert over["lora_rank"].value == 256
    assert any("exceeds what LoRA can hold even at rank 256" in w and "full fine-tuning" in w for w in over.warnings)
    # Without completion counts, total tokens stand in, and the reason says so.
    approx = recommend(AdvisorInputs(model="demo", examples=2_000, task="instruction", tokens=69_509))
    assert "tokens (all of them: completions alone are not known)" in approx["lora_rank"].reason


def test_rl_and_dpo_stages_use_small_ranks_and_their_own_rates():
    ppo = recommend(AdvisorInputs(model="gpt2", examples=20_000, task="instruction", stage="ppo"))
    assert ppo["lora_rank"].value == RL_LORA_RANK == 1 and "rank 1 matched full fine-tuning" in ppo["lora_rank"].reason
    dpo = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=20_000, task="instruction", stage="dpo"))
    assert dpo["lora_rank"].value == DPO_LORA_RANK == 8
    # DPO's rate: the DPO paper's 1e-6 (full, GPT-J 6B) moved to 6.7B by 1/sqrt(parameters), x10 for LoRA.
    expected = 1e-6 * (6.05e9 / _params("meta-llama/Llama-2-7b-hf")) ** 0.5 * 10
    assert dpo["learning_rate"].value == pytest.approx(expected, rel=0.05)
    assert "DPO paper (Rafailov et al. 2023): 1e-6" in dpo["learning_rate"].reason
    assert dpo["preference_lr"].value is None  # one DPO stage: its rate is the learning rate
    assert "DPO paper" in dpo["beta"].reason and 0.1 <= dpo["beta"].value <= 0.5
    # A pipeline: SFT at the SFT rule, its DPO and PPO steps at their own rate (a plan setting of their own).
    rlhf = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=20_000, task="instruction", pipeline="compare"))
    assert rlhf["lora_rank"].value == 128 and "preference steps need far less" in rlhf["lora_rank"].reason
    assert rlhf["learning_rate"].value > 10 * rlhf["preference_lr"].value
    assert rlhf["preference_lr"].value == pytest.approx(expected, rel=0.05)
    assert "Tunewise starts online RL at the DPO rate" in rlhf["preference_lr"].reason
    assert "InstructGPT (Ouyang et al. 2022) used 0.02" in rlhf["kl_coef"].reason
    plan = rlhf.to_plan()
    assert plan.preference.learning_rate == rlhf["preference_lr"].value
    assert plan.training.learning_rate == rlhf["learning_rate"].value
    assert preference_learning_rate("full", 6_050_000_000, "dpo")[0] == pytest.approx(1e-6)


def test_a_measured_rate_replaces_the_rules_and_keeps_them_in_the_reason():
    inputs = AdvisorInputs(model="meta-llama/Llama-3.1-8B", examples=20_000, task="instruction", measured_lr=1e-3,
                           measured_lr_reason="pilot: 5 rates x 20 steps", measured_lr_method="lora")
    rec = recommend(inputs)
    assert rec["learning_rate"].value == 1e-3 and rec["learning_rate"].rule == "measured_lr"
    assert rec["learning_rate"].reason.startswith("pilot: 5 rates x 20 steps; rules gave 3.0e-04 (evidence:")
    assert any("measured on your data" in note for note in rec.notes)
    # Measured for LoRA, but the plan is full fine-tuning now: the rules again, and a note.
    full = recommend(inputs, {"method": "full"})
    assert full["learning_rate"].value == pytest.approx(3e-5) and any("check it again" in note for note in full.notes)
def test_a_real_model_without_general_text_gets_no_forgetting_probe_on_the_demo_text():
    """The demo's invented-world text says nothing about a real model: the safeguards are off, saying how to
    turn them on, until the user gives general text; the demo model keeps its own probe."""
    real = recommend(AdvisorInputs(model="Qwen/Qwen2.5-0.5B", examples=500_000, task="instruction",
                                   domain_shift="high", gpu="A100-80GB"))
    for name in ("forgetting_monitor", "replay_fraction", "ewc_lambda"):
        assert not real[name].value, name
        assert "--original-data" in real[name].reason and "demo text" in real[name].reason, real[name].reason
    assert real.to_plan().forgetting.monitor is False
    given = recommend(AdvisorInputs(model="Qwen/Qwen2.5-0.5B", examples=500_000, task="instruction",
                                    domain_shift="high", gpu="A100-80GB", original_data="wiki_slice.jsonl"))
    assert given["forgetting_monitor"].value is True and given["ewc_lambda"].value > 0
    demo = recommend(AdvisorInputs(model="demo", examples=500, task="instruction"))
    assert demo["forgetting_monitor"].value is True


def test_the_implausible_rate_ceiling_grows_for_small_models_and_spares_a_measured_rate():
    """The plan status's "Check this" on the learning rate agrees with the advice: the fixed ceilings (set for
    7B-class models) rise to 10x the evidence's rate for a smaller model, and a rate the pilot measured is kept."""
    from advisor.plan import Plan
    from advisor.wizard import IMPLAUSIBLE_LR, implausible_lr, plausibility_warnings

    demo = _params("demo")
    assert implausible_lr("lora", demo) == pytest.approx(10 * evidence_learning_rate("lora", demo)[0])  # 0.28
    assert implausible_lr("full", demo) == pytest.approx(10 * evidence_learning_rate("full", demo)[0])  # 0.028
    big = _params("meta-llama/Llama-3.1-8B")
    assert implausible_lr("lora", big) == IMPLAUSIBLE_LR["lora"] and implausible_lr("full", big) == IMPLAUSIBLE_LR["full"]
    # The rules' own advice for the demo is never questioned by the plan status.
    advised = recommend(AdvisorInputs(model="demo", examples=2_000, task="instruction")).to_plan()
    assert not plausibility_warnings(advised, demo)
    wild = Plan().with_overrides({"model.name": "demo", "training.learning_rate": 0.5})
    (warning,) = plausibility_warnings(wild, demo)
    assert "0.5 for LoRA is far above" in warning and "2.8e-02 is the evidence's rate" in warning
    assert not plausibility_warnings(wild, demo, measured_lr=0.5)  # measured on the data: said by the pilot instead
    assert plausibility_warnings(wild.with_overrides({"training.learning_rate": 0.05}), big)  # 7B: the fixed ceiling


def test_advice_measured_on_a_model_and_dataset_replaces_the_rules_for_that_data_only(tmp_path):
    """A model folder's measured_advice.json (bench/advice_quality.py writes the demo model's) gives the method,
    rank, rate and batch that trained best on a dataset; the reasons say so beside the rules, and other data,
    or a malformed entry, get the rules."""
    import json
    import shutil

    from advisor.plan import DEMO_MODEL_DIR
    from advisor.recommend import MEASURED_ADVICE_FILE

    model = tmp_path / "model"
    model.mkdir()
    shutil.copyfile(DEMO_MODEL_DIR / "config.json", model / "config.json")
    entry = {"method": "lora", "learning_rate": 1e-3, "effective_batch": 8, "steps": 600, "lora_rank": 8,
             "summary": "600 steps of 8: LoRA r8 at 1e-3 reached 0.80"}
    (model / MEASURED_ADVICE_FILE).write_text(json.dumps({"datasets": {"my-data": entry}}), encoding="utf-8")
    inputs = AdvisorInputs(model=str(model), examples=2_000, task="instruction", dataset="my-data", max_steps=600)
    rec = recommend(inputs)
    assert rec["method"].value == "lora" and rec["lora_rank"].value == 8 and rec["learning_rate"].value == 1e-3
    assert rec["effective_batch"].value == 8 and rec["learning_rate"].rule == "measured_lr"
    for name in ("method", "lora_rank", "learning_rate", "effective_batch"):
        assert rec[name].reason.startswith("measured on this model and data"), (name, rec[name].reason)
    assert "rules gave 2.8e-02" in rec["learning_rate"].reason and "rules: 64" in rec["lora_rank"].reason
    other = recommend(AdvisorInputs(model=str(model), examples=2_000, task="instruction", dataset="other-data"))
    assert other["learning_rate"].value == 0.028 and other["lora_rank"].value == 64
    entry["lora_rank"] = "eight"
    (model / MEASURED_ADVICE_FILE).write_text(json.dumps({"datasets": {"my-data": entry}}), encoding="utf-8")
    assert recommend(inputs)["learning_rate"].value == 0.028  # malformed: ignored, the rules apply


def test_the_advised_run_length_counts_the_examples_the_run_trains_on_after_its_eval_split():
    """The trainer holds out the eval split before training (trainer.data.split_heldout), so the advised steps,
    and the intervals sized by them, count what is left: 20,000 examples at 32 a step train 563 steps an epoch."""
    from advisor.recommend import train_examples_of
    from trainer.data import split_heldout

    for count in (1, 2, 3, 9, 10, 11, 2000, 20_001):
        train, _ = split_heldout(list(range(count)), 0.1, seed=0)
        assert train_examples_of(count) == len(train), count
    advice = recommend(AdvisorInputs(model="meta-llama/Llama-3.1-8B", examples=20_000, task="instruction", gpu="A100-80GB"))
    batch, epochs = advice.values["effective_batch"].value, advice.values["epochs"].value
    steps = advice.values["total_steps"]
    assert steps.value == math.ceil(math.ceil(18_000 / batch) * epochs)
    assert "18,000 training examples (of 20,000, after the 10% eval split" in steps.reason
    every = advice.values["eval_steps"].value
    assert steps.value // every >= 5  # the eval interval's "at least 5 evaluations" holds for the real run
    # The demo's measured 600 steps come out as 600 (the trainer takes ceil(epochs x steps per epoch)).
    demo = recommend(AdvisorInputs(model="demo", dataset="demo-sft", examples=2000, task="instruction"))
    assert demo.values["total_steps"].value == 600 and "measured on this model and data" in demo.values["epochs"].reason
    assert math.ceil(demo.values["epochs"].value * math.ceil(1800 / demo.values["effective_batch"].value)) == 600
