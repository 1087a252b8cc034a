"""The advisor: the guide's tables and ranges, the memory fit, fallbacks, warnings and overrides."""

from __future__ import annotations

import pytest

from advisor.errors import TunewiseError
from advisor.recommend import (
    LR_RANGES,
    RANK_TABLE,
    AdvisorInputs,
    learning_rate_for,
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
            lr, lr_reason = learning_rate_for(method, None if method == "full" else rank, AdvisorInputs(
                model="7B", examples=examples, task=task, priority=priority, preserve_original=preserve))
            assert GUIDE_LR[method][0] <= lr <= GUIDE_LR[method][1], (method, lr)
            assert lr_reason.startswith("guide: ")


def test_higher_rank_and_smaller_data_lower_the_lora_lr():
    big = AdvisorInputs(model="7B", examples=50_000, task="instruction")
    small = AdvisorInputs(model="7B", examples=2_000, task="instruction")
    assert learning_rate_for("lora", 8, big)[0] > learning_rate_for("lora", 128, big)[0]
    assert learning_rate_for("lora", 64, big)[0] > learning_rate_for("lora", 64, small)[0]


def test_instruction_sft_on_an_a100_is_lora_with_the_guide_values():
    rec = recommend(AdvisorInputs(model="meta-llama/Llama-2-7b-hf", examples=50_000, task="instruction", gpu="A100-80GB"))
    assert rec.fits and rec.memory.checked
    assert rec["method"].value == "lora"
    assert rec["lora_rank"].value == 128 and "complex (instruction following) -> 64-128" in rec["lora_rank"].reason
    assert rec["lora_alpha"].value == 256  # guide: typical alpha = 2 x rank
    assert rec["lora_targets"].value == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert 1e-4 <= rec["learning_rate"].value <= 3e-4
    assert 0.05 <= rec["warmup_ratio"].value <= 0.10
    assert rec["micro_batch"].value * rec["grad_accum"].value == rec["effective_batch"].value
    # The estimator agrees the chosen micro-batch fits.
    assert rec.memory.total_bytes <= rec.memory.gpu_bytes
    assert rec["micro_batch"].value <= rec.memory.max_micro_batch
    assert all(not advice.overridden for advice in rec.values.values())
    plan = rec.to_plan()
    assert (plan.method.method, plan.method.lora_rank, plan.method.lora_alpha) == ("lora", 128, 256.0)
    assert plan.training.learning_rate == rec["learning_rate"].value
    assert plan.model.name == "meta-llama/Llama-2-7b-hf" and plan.hardware.gpu == "A100-80GB"


def test_targets_use_the_architectures_own_names():
    rec = recommend(AdvisorInputs(model="gpt2", examples=5_000, task="classification"))
    assert rec["lora_targets"].value == ("c_attn",)
    assert rec["lora_rank"].value == 4  # small data: low end of 4-8
    assert not rec.memory.checked  # no GPU given: nothing claimed about the fit


def test_large_very_different_data_prefers_full_and_falls_back_when_it_does_not_fit():
    big_gpu = recommend(AdvisorInputs(model="Qwen/Qwen2.5-0.5B", examples=500_000, task="instruction",
                                      domain_shift="high", gpu="A100-80GB", original_data="general_text.jsonl"))
    assert big_gpu["method"].value == "full"
    assert "large dataset (>100k examples" in big_gpu["method"].reason
    assert big_gpu["lora_rank"].value is None
    assert 1e-5 <= big_gpu["learning_rate"].value <= 5e-5
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
    assert ranked["lora_alpha"].value == 128 and not ranked["lora_alpha"].overridden  # follows your rank
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
