"""The estimator at its edges: peaks by phase, measured tensors on the CPU, long context with RoPE scaling,
MoE under QLoRA as bitsandbytes really quantizes it, the fused losses (TRL's chunked one, Liger's), host RAM,
and the warnings `tunewise plan --json` lists."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.errors import TunewiseError
from advisor.memory import (GB, PHASES, HostEstimate, TrainingSetup, estimate, gpu_fit, host_estimate, host_fit,
                            moe_qlora_warning, quantization_report, setup_from_plan)
from advisor.plan import Plan, PlanError
from advisor.specs import (ModelSpec, check_seq_len, context_window, param_counts, quantized_parameter_names,
                           resolve_model, spec_from_hf_config, to_hf_config_dict)

ROOT = Path(__file__).resolve().parent.parent

#: A tiny Llama with a large vocabulary: its loss's tensors dwarf one layer's, as in real long-context runs.
WIDE_VOCAB = ModelSpec(id="wide-vocab", model_type="llama", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=688, vocab_size=32000, max_position_embeddings=4096)
TINY_MIXTRAL = ModelSpec(id="tiny-mixtral", model_type="mixtral", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=96, vocab_size=256, max_position_embeddings=128, num_experts=4,
                         experts_per_token=2)
TINY_QWEN_MOE = ModelSpec(id="tiny-qwen-moe", model_type="qwen2_moe", hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, intermediate_size=48, vocab_size=256, max_position_embeddings=128,
                          num_experts=4, experts_per_token=2, shared_expert_size=80, qkv_bias=True)


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- peaks by phase ---------------------------------------------------------------------------------------


def test_peak_is_the_largest_phase_and_the_components_stay():
    setup = TrainingSetup(method="lora", micro_batch=1, seq_len=1024, gradient_checkpointing=True)
    est = estimate(WIDE_VOCAB, setup)
    assert tuple(est.phases) == PHASES
    assert est.peak_allocated_bytes == max(est.phases.values()) == est.phases[est.peak_phase]
    assert est.peak_phase == "forward_loss"  # the loss's tensors are the largest thing alive
    assert set(est.components) >= {"weights", "adapters", "gradients", "optimizer", "activations", "logits", "overhead"}
    # With checkpointing the loss's tensors are freed before the first layer is recomputed: the peak is below
    # the sum of the components (the one recomputed layer never meets the logits).
    assert est.peak_allocated_bytes < sum(est.components.values())
    assert set(est.phase_explanations) == set(PHASES) and est.peak_phase in est.peak_explanation
    # A small vocabulary moves the peak to the recompute + backward of a layer.
    small = ModelSpec(**{**WIDE_VOCAB.__dict__, "id": "small-vocab", "vocab_size": 64})
    assert estimate(small, setup).peak_phase == "backward"
    # Full fine-tuning with AdamW: the optimizer step (gradients + its foreach temporaries) can set it.
    tiny = resolve_model("gpt2", allow_hub=False)
    full = estimate(tiny, TrainingSetup(method="full", precision="amp", micro_batch=1, seq_len=16))
    assert full.peak_phase == "optimizer_step"
    assert full.phases["optimizer_step"] == (full.components["weights"] + full.components["optimizer"]
                                             + full.components["gradients"] + 4 * full.params_total)


def test_cpu_measurement_of_live_tensors_matches_the_phases():
    """A real run on the CPU (transformers + PEFT, fp32, the CPU trainer's precision), every tensor's bytes
    counted from allocation to free: the estimate's peak (minus the weights it was given) is within 5%, in
    both the loss-bound and the recompute-bound case, with and without checkpointing."""
    bench = _bench("cpu_memory")
    for case in bench.CASES:
        measured, estimated = bench.measure(case)
        assert abs(estimated - measured) / measured < 0.05, (case, measured, estimated)


def test_calibration_median_error_at_most_five_percent():
    bench = _bench("estimator_accuracy")
    rows = bench.evaluate()
    assert len(rows) == 10
    assert bench.median_abs_error() <= 5.0


def _litgpt_attention_saved_bytes(n_head: int, n_query_groups: int, head_size: int = 16, seq: int = 64,
                                  rope_n: int = 8) -> int:
    """Bytes of the distinct storages autograd keeps for litgpt's CausalSelfAttention, as litgpt writes it (fused
    QKV output viewed, split, k and v expanded for grouped queries, RoPE on the first rope_n dims, SDPA), in bf16."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    hidden = n_head * head_size
    x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn((n_head + 2 * n_query_groups) * head_size, hidden, dtype=torch.bfloat16) * 0.02
    cos, sin = torch.randn(seq, rope_n), torch.randn(seq, rope_n)
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def rope(t):
        rotated = torch.cat((-t[..., rope_n // 2:], t[..., : rope_n // 2]), dim=-1)
        return ((t * cos) + (rotated * sin)).to(t.dtype)

    qkv = F.linear(x, weight)  # the frozen projection keeps nothing
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        per_kv = n_head // n_query_groups
        qkv = qkv.view(1, seq, n_query_groups, per_kv + 2, head_size).permute(0, 2, 3, 1, 4)
        q, k, v = qkv.split((per_kv, 1, 1), dim=2)
        if n_query_groups != n_head:
            k, v = (t.expand(1, n_query_groups, per_kv, seq, head_size) for t in (k, v))
        q, k, v = (t.reshape(1, -1, seq, head_size) for t in (q, k, v))
        q = torch.cat((rope(q[..., :rope_n]), q[..., rope_n:]), dim=-1)
        k = torch.cat((rope(k[..., :rope_n]), k[..., rope_n:]), dim=-1)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    small = 4 * seq * rope_n * 2  # the RoPE tables and the logsumexp
    return sum(n for n in saved.values() if n > small)


def test_litgpt_fused_qkv_keeps_its_buffer_without_grouped_queries():
    """Without grouped queries litgpt's v stays a view of the fused QKV output while RoPE makes new q and k, so
    autograd keeps q + k + v + (new q, new k) + output = 6 x hidden per token; grouped queries copy k and v when
    expanding them, freeing the buffer: 4 x hidden. The estimator's litgpt count has exactly that difference."""
    from advisor.memory import _layer_activation_bytes_per_token

    seq, head = 64, 16
    assert _litgpt_attention_saved_bytes(4, 4, head, seq) == 6 * 2 * 4 * head * seq
    assert _litgpt_attention_saved_bytes(8, 2, head, seq) == 4 * 2 * 8 * head * seq
    lora = dict(method="lora", precision="bf16", adapter_fp32=False, lora_targets=("q_proj", "v_proj"))
    for spec, extra in ((resolve_model("microsoft/phi-1_5", allow_hub=False), 2 * 2 * 2048),
                        (resolve_model("tinyllama", allow_hub=False), 0)):
        adapted = frozenset({"q_proj", "v_proj"})
        litgpt = _layer_activation_bytes_per_token(spec, TrainingSetup(runtime="litgpt", **lora), adapted, 1)[0]
        separate = _layer_activation_bytes_per_token(spec, TrainingSetup(runtime="torchtune", **lora), adapted, 1)[0]
        assert litgpt - separate == extra, spec.id


# -- long context -------------------------------------------------------------------------------------------


def test_rope_scaling_stretches_the_window_and_its_refusals_name_the_setting():
    spec = resolve_model("llama-2-7b", allow_hub=False)
    with pytest.raises(TunewiseError) as info:
        check_seq_len(spec, 8192)
    assert info.value.field == "training.seq_len" and "training.rope_scaling" in str(info.value)
    check_seq_len(spec, 8192, "yarn")  # factor 2 from seq_len / window
    assert context_window(spec, "yarn", None, 8192) == 8192
    assert context_window(spec, "linear", 4.0) == 16384
    with pytest.raises(TunewiseError) as info:
        check_seq_len(spec, 16384, "dynamic", 2.0)
    assert info.value.field == "training.rope_factor" and "raise it to 4" in str(info.value)
    with pytest.raises(TunewiseError) as info:
        check_seq_len(resolve_model("gpt2", allow_hub=False), 2048, "linear")
    assert info.value.field == "training.rope_scaling" and "rotary" in str(info.value)
    with pytest.raises(PlanError) as info:
        Plan().with_overrides({"training.rope_factor": 2.0})
    assert info.value.field == "training.rope_factor"
    # The fit search may grow the sequence up to the stretched window, not the model's own.
    setup = TrainingSetup(method="qlora", micro_batch=1, seq_len=8192, rope_scaling="linear", rope_factor=4.0,
                          gradient_checkpointing=True)
    fit = gpu_fit(spec, setup, 1000 * GB)
    assert fit.max_seq_len == 16384
    assert setup_from_plan(Plan().with_overrides({"training.rope_scaling": "yarn", "training.seq_len": 8192})).rope_scaling == "yarn"


def test_recommender_proposes_rope_scaling_with_its_factor_for_long_data():
    from advisor.recommend import AdvisorInputs, recommend

    rec = recommend(AdvisorInputs(model="llama-2-7b", examples=5000, task="instruction", seq_len=10000,
                                  gpu="A100-80GB"))
    assert rec["seq_len"].value == 10000
    assert rec["rope_scaling"].value == "yarn" and rec["rope_factor"].value == 3.0
    assert "4096" in rec["rope_scaling"].reason and "3" in rec["rope_factor"].reason
    plan = rec.to_plan(allow_unfit=True)
    assert (plan.training.seq_len, plan.training.rope_scaling, plan.training.rope_factor) == (10000, "yarn", 3.0)
    short = recommend(AdvisorInputs(model="llama-2-7b", examples=5000, task="instruction", seq_len=1024))
    assert "rope_scaling" not in short.values


# -- MoE under QLoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TINY_MIXTRAL, TINY_QWEN_MOE], ids=lambda s: s.model_type)
def test_moe_quantized_set_equals_what_bitsandbytes_quantizes(spec, tmp_path):
    """Load a tiny Mixtral / Qwen2-MoE with bitsandbytes 4-bit on the CPU, as the trainer's QLoRA does: the
    Params4bit parameters are exactly the estimator's quantized set, and what stays unquantized (the fused experts
    among it) is what the estimator counts, in fp32 after PEFT's k-bit preparation."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    d = to_hf_config_dict(spec)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    read = spec_from_hf_config(json.loads((tmp_path / "config.json").read_text()), spec.id)
    assert (read.num_experts, read.experts_per_token, read.shared_expert_size, param_counts(read)) == (
        spec.num_experts, spec.experts_per_token, spec.shared_expert_size, param_counts(spec))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"},
                                                     dtype=torch.bfloat16)
    except Exception as exc:  # bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes 4-bit does not load on this CPU: {type(exc).__name__}: {exc}")
    params = dict(model.named_parameters())
    quantized = {name for name, p in params.items() if type(p).__name__ == "Params4bit"}
    assert quantized == set(quantized_parameter_names(spec))
    report = quantization_report(spec, TrainingSetup(method="qlora"))
    assert report.quantized_params == sum(2 * params[n].numel() for n in quantized)  # two 4-bit weights per byte
    kept = {name: p for name, p in params.items() if name not in quantized}
    assert sum(p.numel() for p in kept.values()) == sum(report.kept_params.values())
    assert sum(p.numel() for n, p in kept.items() if ".experts." in n) == report.kept_params["experts"]
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in quantized) == report.kept_bytes
    assert report.kept_dtype == "fp32"


def test_moe_qlora_says_which_weights_stay_16_bit_what_it_saves_and_what_to_do():
    spec = resolve_model("mixtral", allow_hub=False)
    setup = TrainingSetup(method="qlora")
    est = estimate(spec, setup)
    warning = moe_qlora_warning(spec, setup)
    assert warning in est.warnings
    report = quantization_report(spec, setup)
    assert report.kept_params["experts"] == 32 * 8 * 3 * 4096 * 14336
    assert report.saved_bytes < 0  # fp32 experts: QLoRA costs more than LoRA's bf16 base
    assert est.components["weights"] == report.qlora_weights_bytes
    for words in ("fused 3-D", "stay 16-bit", "upcasts", "costs", "more than LoRA", "--method lora", "zero3"):
        assert words in warning
    assert moe_qlora_warning(resolve_model("llama-2-7b", allow_hub=False), setup) is None
    fit = gpu_fit(spec, setup, 80 * GB)
    assert fit.cheapest_fix.startswith("Train LoRA on the 16-bit base instead of QLoRA")
    assert fit.fixed_setup.method == "lora"


def test_qwen_moe_counts_equal_transformers_on_the_meta_device():
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = ModelSpec(**{**TINY_QWEN_MOE.__dict__, "hidden_size": 256, "intermediate_size": 128, "shared_expert_size": 512,
                        "num_experts": 8})
    d = to_hf_config_dict(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    assert sum(p.numel() for p in model.parameters()) == param_counts(spec).total


# -- fused losses --------------------------------------------------------------------------------------------


def test_liger_and_trl_chunked_losses_never_hold_the_full_logits():
    spec = resolve_model("llama-3.1-8b", allow_hub=False)  # 128k vocabulary
    base = TrainingSetup(method="lora", micro_batch=2, seq_len=4096, gradient_checkpointing=True)
    full = estimate(spec, base).components["logits"]
    chunked = estimate(spec, base.with_(chunked_loss=True)).components["logits"]
    liger = estimate(spec, base.with_(use_liger_kernel=True)).components["logits"]
    tokens = 2 * 4096
    assert full == 12 * tokens * spec.vocab_size
    assert liger < chunked < full
    assert liger < 4 * tokens * spec.hidden_size + 2 * 16384 * spec.vocab_size  # about tokens x hidden per chunk
    assert estimate(spec, base.with_(use_liger_kernel=True)).peak_allocated_bytes < estimate(spec, base).peak_allocated_bytes
    # The plan's SFT runs TRL's chunked loss unless the Liger kernel is on.
    plan = Plan()
    assert setup_from_plan(plan).chunked_loss and not setup_from_plan(plan).use_liger_kernel
    liger_plan = plan.with_overrides({"method.use_liger_kernel": True})
    assert setup_from_plan(liger_plan).use_liger_kernel and not setup_from_plan(liger_plan).chunked_loss
    assert not setup_from_plan(plan.with_overrides({"stage": "dpo"})).chunked_loss


# -- host RAM ------------------------------------------------------------------------------------------------


def test_host_ram_components_and_cheapest_fix():
    spec = resolve_model("llama-2-7b", allow_hub=False)
    ddp = TrainingSetup(method="lora", num_gpus=8)
    mapped, unmapped = host_estimate(spec, ddp), host_estimate(spec, ddp, mmap=False)
    assert isinstance(mapped, HostEstimate) and set(mapped.components) == {"runtime", "loading"}
    # Every DDP process loads the model; without memory-mapping each holds the file and its tensors.
    assert unmapped.components["loading"] == 8 * 2 * 2 * param_counts(spec).total
    assert unmapped.host_ram_bytes > 100 * GB > mapped.host_ram_bytes
    fit = host_fit(spec, ddp, 64 * GB, mmap=False)
    assert not fit.fits and fit.cheapest_fix.startswith("Save the checkpoint as safetensors")
    # ZeRO-Offload keeps the optimizer state and fp32 gradients in host RAM: 16 B per trainable parameter.
    offload = TrainingSetup(method="full", precision="amp", num_gpus=8, shard="zero2", cpu_offload=True)
    est = host_estimate(spec, offload)
    assert est.components["offload"] == 16 * param_counts(spec).total
    assert host_estimate(spec, offload.with_(shard="zero3")).components["offload"] == 18 * param_counts(spec).total
    fit = host_fit(spec, offload, 64 * GB)
    assert "turn off cpu offload" in fit.cheapest_fix.lower()
    # On a CPU the whole training footprint is host RAM, in fp32.
    cpu = host_estimate(spec, TrainingSetup(method="lora", micro_batch=1, seq_len=256), on_gpu=False)
    assert cpu.components["training"] > 4 * param_counts(spec).total
    assert all(cpu.explanations[name] for name in cpu.components)
    small = host_fit(spec, TrainingSetup(method="full", micro_batch=8, seq_len=1024), 160 * GB, on_gpu=False)
    assert not small.fits and small.cheapest_fix and "needs" in small.cheapest_fix


def test_plan_json_has_phases_warnings_quantization_and_host_ram():
    out = subprocess.run([sys.executable, "cli.py", "plan", "--model", "mixtral", "--method", "qlora", "--json",
                          "--host-ram-gb", "64", "--gpu", "A100-80GB"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    entry = report["estimates"][0]
    assert entry["peak_phase"] in PHASES and set(entry["phases"]) == set(PHASES)
    assert isinstance(entry["warnings"], list) and any("fused 3-D" in w for w in entry["warnings"])
    assert entry["quantization"]["kept_params"]["experts"] > 0 and entry["quantization"]["saved_vs_lora_bytes"] < 0
    assert entry["host_ram_bytes"] > 0 and "host_fits" in entry and report["host"]["ram_bytes"] == 64 * GB
    text = subprocess.run([sys.executable, "cli.py", "plan", "--model", "mixtral", "--method", "qlora",
                           "--gpu", "A100-80GB"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "set by phase" in text and "warning (qlora): QLoRA quantizes only" in text
    long = subprocess.run([sys.executable, "cli.py", "plan", "--model", "llama-2-7b", "--seq-len", "8192"],
                          cwd=ROOT, capture_output=True, text=True)
    assert long.returncode == 2 and "training.rope_scaling" in long.stderr
    scaled = json.loads(subprocess.run([sys.executable, "cli.py", "plan", "--model", "llama-2-7b", "--seq-len", "8192",
                                        "--rope-scaling", "yarn", "--method", "lora", "--json"],
                                       cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert scaled["setup"]["rope_scaling"] == "yarn" and scaled["setup"]["rope_factor"] == 2.0


def test_the_wizards_plan_step_says_the_phase_the_moe_warning_and_host_ram():
    from advisor import wizard
    from advisor.gpus import this_machine

    moe = wizard.plan_view(Plan().with_overrides({"model.name": "mixtral", "method.method": "qlora",
                                                  "hardware.gpu": "A100-80GB"}))
    spec = resolve_model("mixtral", allow_hub=False)
    warning = moe_qlora_warning(spec, TrainingSetup(method="qlora"))
    assert "fused 3-D" in moe.status_markdown and "--method lora" in moe.status_markdown
    est = estimate(spec, setup_from_plan(Plan().with_overrides({"model.name": "mixtral", "method.method": "qlora"})))
    assert f"The peak comes in the **{est.peak_phase.replace('_', ' ')}** phase" in moe.status_markdown
    assert "Host RAM: about **" in moe.status_markdown and warning.split(":")[0] in moe.status_markdown
    # Longer than the window with RoPE scaling is planned, not refused; on the CPU host RAM is checked here.
    long = wizard.plan_view(Plan().with_overrides({"model.name": "llama-2-7b", "training.seq_len": 8192,
                                                   "training.rope_scaling": "yarn"}))
    assert f"this machine has only {this_machine().ram_bytes / 1e9:.2f} GB" in long.status_markdown
    with pytest.raises(TunewiseError) as info:
        wizard.plan_view(Plan().with_overrides({"model.name": "llama-2-7b", "training.seq_len": 8192}))
    assert "training.rope_scaling" in str(info.value)


def test_the_plan_chart_shows_no_cuda_context_when_no_gpu_is_chosen():
    """On "No GPU" the chart is the tensors a step holds (in host memory on the CPU), not a bar that is 90% a
    CUDA context the CPU does not have; with a GPU it is what the card must hold, context and slack included."""
    from advisor import wizard
    from advisor.plan import Plan

    cpu = wizard.plan_view(Plan.from_dict({"model": {"name": "demo"}, "training": {"seq_len": 64, "micro_batch": 8}}))
    assert "host memory" in cpu.chart_title and cpu.gpu_bytes is None
    assert all("context_and_slack" not in parts for parts in cpu.stacked.values())
    gpu = wizard.plan_view(Plan.from_dict({"model": {"name": "demo"}, "hardware": {"gpu": "L4"},
                                           "training": {"seq_len": 64, "micro_batch": 8}}))
    assert gpu.chart_title == "Memory per GPU by component"
    assert all(parts.get("context_and_slack", 0) > 0 for parts in gpu.stacked.values())
    # The same tensors either way: the GPU's bar adds the context and slack on top of them.
    for label, parts in cpu.stacked.items():
        on_gpu = dict(gpu.stacked[label])
        on_gpu.pop("context_and_slack")
        assert sum(on_gpu.values()) <= sum(parts.values()) + 1
