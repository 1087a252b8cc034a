"""Memory estimator: real optimizer state, monotonic behaviour, calibration, GPU fit, bad setups."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from advisor.gpus import GPUS, custom_gpu, find_gpu
from advisor.memory import (
    GB,
    GUIDE_TABLE_GB,
    GUIDE_TABLE_NOTE,
    TrainingSetup,
    estimate,
    gpu_fit,
    guide_table,
    nf4_bits_per_weight,
    setup_from_plan,
)
from advisor.plan import Plan, PlanError
from advisor.specs import ModelSpec, param_counts, resolve_model, to_hf_config_dict

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelSpec(id="tiny", model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=128)


def _tiny_model(dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = to_hf_config_dict(TINY)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).to(dtype)


def _one_step_state_bytes(model, optimizer_cls, **kwargs) -> int:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, lr=1e-3, **kwargs)
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    total, seen = 0, set()
    for state in optimizer.state.values():
        for name, value in state.items():
            # The step counter is bookkeeping; bitsandbytes shares its quantization maps between tensors.
            if torch.is_tensor(value) and name != "step" and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize("precision,dtype_name", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_adamw_state_equals_torch_after_one_step(precision, dtype_name):
    import torch

    model = _tiny_model(getattr(torch, dtype_name))
    real = _one_step_state_bytes(model, torch.optim.AdamW)
    ours = estimate(TINY, TrainingSetup(method="full", precision=precision, optimizer="adamw"))
    assert ours.components["optimizer"] == real
    assert ours.components["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert ours.components["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())


def test_lora_adapter_and_optimizer_bytes_equal_peft_after_one_step():
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_model(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    real = _one_step_state_bytes(model, torch.optim.AdamW)
    ours = estimate(TINY, TrainingSetup(method="lora", lora_rank=4, lora_targets=("q_proj", "v_proj")))
    assert ours.components["adapters"] == adapters  # PEFT keeps adapters in fp32
    assert ours.components["optimizer"] == real


def test_8bit_adamw_state_equals_bitsandbytes():
    import torch

    try:
        import bitsandbytes as bnb

        model = _tiny_model(torch.float32)
        real = _one_step_state_bytes(model, bnb.optim.AdamW8bit)
    except Exception as exc:  # bitsandbytes without a backend for this device
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run here: {type(exc).__name__}: {exc}")
    ours = estimate(TINY, TrainingSetup(method="full", precision="fp32", optimizer="adamw_8bit"))
    assert ours.components["optimizer"] == real


def test_more_rank_batch_or_sequence_never_costs_less():
    spec = resolve_model("llama-3.1-8b", allow_hub=False)
    for method in ("full", "lora", "qlora"):
        base = TrainingSetup(method=method, micro_batch=1, seq_len=256)
        previous = estimate(spec, base).peak_allocated_bytes
        # Full fine-tuning without accumulation can be bound by gradients at the step (equal is fine there).
        grows = (lambda new, old: new >= old) if method == "full" else (lambda new, old: new > old)
        for batch in (2, 3, 4, 8):
            current = estimate(spec, base.with_(micro_batch=batch)).peak_allocated_bytes
            assert grows(current, previous)
            previous = current
        previous = estimate(spec, base).peak_allocated_bytes
        for seq in (512, 1024, 4096):
            current = estimate(spec, base.with_(seq_len=seq)).peak_allocated_bytes
            assert grows(current, previous)
            previous = current
        assert estimate(spec, base.with_(micro_batch=64, seq_len=4096)).peak_allocated_bytes > estimate(spec, base).peak_allocated_bytes
    previous = 0
    for rank in (4, 8, 16, 64, 256):
        current = estimate(spec, TrainingSetup(method="lora", lora_rank=rank)).peak_allocated_bytes
        assert current > previous
        previous = current


def test_method_order_checkpointing_and_sharding():
    spec = resolve_model("llama-2-7b", allow_hub=False)
    by_method = {m: estimate(spec, TrainingSetup(method=m, precision="amp" if m == "full" else "bf16")).total_bytes
                 for m in ("full", "lora", "qlora")}
    assert by_method["qlora"] < by_method["lora"] < by_method["full"]
    long = TrainingSetup(method="lora", micro_batch=4, seq_len=2048)
    assert (estimate(spec, long.with_(gradient_checkpointing=True)).components["activations"]
            < estimate(spec, long).components["activations"] / 5)
    eager = estimate(spec, long.with_(attn="eager")).components["activations"]
    assert eager > estimate(spec, long).components["activations"]
    full = TrainingSetup(method="full", precision="amp", num_gpus=8)
    ddp = estimate(spec, full).peak_allocated_bytes
    zero2 = estimate(spec, full.with_(shard="zero2")).peak_allocated_bytes
    zero3 = estimate(spec, full.with_(shard="zero3")).peak_allocated_bytes
    offload = estimate(spec, full.with_(shard="zero3", cpu_offload=True)).peak_allocated_bytes
    assert offload < zero3 < zero2 < ddp


def test_quantized_weights_match_the_published_bits():
    assert nf4_bits_per_weight(True) == pytest.approx(4.127, abs=1e-3)
    assert nf4_bits_per_weight(False) == 4.5
    spec = resolve_model("llama-2-7b", allow_hub=False)
    setup = TrainingSetup(method="qlora", upcast_non_quantized=False)
    counts = param_counts(spec)
    expected = int(counts.quantizable * nf4_bits_per_weight(True) / 8) + 2 * (counts.total - counts.quantizable)
    assert estimate(spec, setup).components["weights"] == expected


def test_stage_model_sets():
    spec = resolve_model("qwen2.5-0.5b", allow_hub=False)
    sft = estimate(spec, TrainingSetup(method="full", stage="sft"))
    rm = estimate(spec, TrainingSetup(method="full", stage="rm"))
    assert rm.components["logits"] < sft.components["logits"] / 1000  # score head, no vocabulary
    assert rm.params_total == param_counts(spec, head="seq_cls").total
    dpo_full = estimate(spec, TrainingSetup(method="full", stage="dpo"))
    dpo_lora = estimate(spec, TrainingSetup(method="lora", stage="dpo"))
    assert dpo_full.components["reference_model"] == 2 * param_counts(spec).total
    assert dpo_lora.components["reference_model"] == 0
    assert dpo_full.components["activations"] > sft.components["activations"]  # chosen + rejected
    ppo = estimate(spec, TrainingSetup(method="lora", stage="ppo", generation_len=64))
    for name in ("reference_model", "reward_model", "value_model", "generation_cache"):
        assert name in ppo.components and ppo.explanations[name]
    assert ppo.components["reward_model"] == 2 * param_counts(spec, head="seq_cls").total
    assert ppo.peak_allocated_bytes > estimate(spec, TrainingSetup(method="lora")).peak_allocated_bytes


def test_every_component_is_explained_and_total_exceeds_peak():
    spec = resolve_model("tinyllama", allow_hub=False)
    est = estimate(spec, TrainingSetup(method="qlora"))
    assert set(est.components) == set(est.explanations)
    assert all(isinstance(v, int) and v >= 0 for v in est.components.values())
    assert all(est.explanations.values())
    assert est.total_bytes > est.peak_allocated_bytes


def test_gpu_fit_searches_and_fixes():
    spec = resolve_model("llama-2-7b", allow_hub=False)
    gpu = find_gpu("a100-80gb")
    setup = TrainingSetup(method="lora", seq_len=1024)
    fit = gpu_fit(spec, setup, gpu.memory_bytes)
    assert fit.fits and fit.max_micro_batch >= 1
    assert estimate(spec, setup.with_(micro_batch=fit.max_micro_batch)).total_bytes <= gpu.memory_bytes
    assert estimate(spec, setup.with_(micro_batch=fit.max_micro_batch + 1)).total_bytes > gpu.memory_bytes
    assert fit.max_seq_len == spec.max_position_embeddings or (
        estimate(spec, setup.with_(seq_len=fit.max_seq_len + 1)).total_bytes > gpu.memory_bytes)
    t4 = find_gpu("T4")
    full = gpu_fit(spec, TrainingSetup(method="full", precision="amp"), t4.memory_bytes)
    assert not full.fits and full.headroom_bytes < 0
    assert full.cheapest_fix and full.fixed_setup is not None
    assert estimate(spec, full.fixed_setup).total_bytes <= t4.memory_bytes
    lora = gpu_fit(spec, TrainingSetup(method="lora", micro_batch=8, seq_len=2048), t4.memory_bytes)
    assert not lora.fits and "checkpointing" in lora.cheapest_fix
    assert custom_gpu(24).memory_bytes == 24 * GB
    assert len(GPUS) == 10


def test_guide_table_present_with_its_numbers():
    rows = guide_table()
    assert {(r.size, r.method): r.guide_bytes // GB for r in rows} == {
        (size, method): gb for size, cells in GUIDE_TABLE_GB.items() for method, gb in cells.items()}
    assert GUIDE_TABLE_GB["7B"] == {"full": 28, "lora": 16, "qlora": 6}
    assert GUIDE_TABLE_GB["70B"] == {"full": 280, "lora": 160, "qlora": 48}
    full_7b = next(r for r in rows if r.size == "7B" and r.method == "full")
    assert full_7b.estimate_bytes > 16 * param_counts(resolve_model("llama-2-7b")).total  # AdamW needs ~16 B/param
    assert "4 bytes per parameter" in GUIDE_TABLE_NOTE


@pytest.mark.parametrize("changes,field", [
    ({"lora_rank": 0}, "method.lora_rank"),
    ({"micro_batch": 0}, "training.micro_batch"),
    ({"seq_len": -5}, "training.seq_len"),
    ({"optimizer": "lion"}, "method.optimizer"),
    ({"method": "prefix"}, "method.method"),
    ({"shard": "zero4"}, "hardware.shard"),
    ({"cpu_offload": True}, "hardware.cpu_offload"),
    ({"method": "qlora", "precision": "fp32"}, "method.precision"),
])
def test_bad_setups_are_rejected_naming_the_field(changes, field):
    with pytest.raises(PlanError) as info:
        TrainingSetup(**changes)
    assert info.value.field == field and field in str(info.value)


def test_setup_from_plan_carries_the_memory_settings():
    plan = Plan().with_overrides({"method.method": "qlora", "training.micro_batch": 3, "training.seq_len": 777,
                                  "method.lora_rank": 32, "hardware.num_gpus": 2, "hardware.shard": "zero3"})
    setup = setup_from_plan(plan)
    assert (setup.method, setup.micro_batch, setup.seq_len, setup.lora_rank, setup.num_gpus, setup.shard) == (
        "qlora", 3, 777, 32, 2, "zero3")


def _calibration_module():
    spec = importlib.util.spec_from_file_location("estimator_accuracy", ROOT / "bench" / "estimator_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["estimator_accuracy"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_calibration_median_error_under_ten_percent():
    bench = _calibration_module()
    rows = bench.evaluate()
    assert len(rows) == 10
    assert bench.median_abs_error() < 10.0
    # And far better than the rule of thumb "4 bytes x params".
    rule = sorted(abs(r["rules"]["4B x params"][1]) for r in rows)[len(rows) // 2]
    assert rule > 3 * bench.median_abs_error()


def test_planning_70b_imports_no_torch():
    code = ("import sys; from advisor.memory import TrainingSetup, gpu_fit; from advisor.gpus import GPUS; "
            "from advisor.specs import resolve_model; s = resolve_model('llama-2-70b', allow_hub=False); "
            "[gpu_fit(s, TrainingSetup(method=m), g.memory_bytes) for m in ('full','lora','qlora') for g in GPUS]; "
            "print(sorted(m for m in ('torch','transformers','gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _cheapest_fix_by_trying_every_micro_batch(spec, setup, gpu_bytes):
    """The fix search as it was before bisection: every divisor of the micro-batch, largest first, on each rung.
    The reference the bounded search must agree with."""
    def rungs():
        current, said = setup, []
        if not setup.gradient_checkpointing:
            current = current.with_(gradient_checkpointing=True)
            said.append("turn on gradient checkpointing (about 30% slower, same results)")
            yield said, current
        if setup.optimizer == "adamw":
            current = current.with_(optimizer="adamw_8bit")
            said = said + ["switch to 8-bit AdamW"]
            yield said, current
        if setup.method != "qlora" and setup.stage != "ppo":
            current = current.with_(method="qlora", precision="bf16" if setup.precision == "fp32" else setup.precision,
                                    optimizer="paged_adamw_8bit" if current.optimizer != "sgd" else "sgd")
            said = said + ["use QLoRA (4-bit NF4 base, double quantization)"]
            yield said, current
        # One node of up to 8 GPUs, then whole nodes of 8.
        for nodes, per_node in ((1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8), (16, 8)):
            if nodes * per_node <= setup.world_size:
                continue
            words = (f"shard with ZeRO-3 / FSDP over {per_node} GPUs of this size" if nodes == 1 else
                     f"shard with ZeRO-3 / FSDP over {nodes} nodes x {per_node} GPUs of this size "
                     f"({nodes * per_node} GPUs; `tunewise job` writes the cluster job)")
            yield said + [words], current.with_(num_gpus=per_node, num_nodes=nodes, shard="zero3")

    for said, candidate in rungs():
        options = [(said, candidate)]
        for b in range(setup.micro_batch - 1, 0, -1):
            if setup.micro_batch % b == 0:
                accum = setup.grad_accum * setup.micro_batch // b
                options.append((said + [f"lower the micro-batch to {b} with gradient accumulation {accum} (same effective batch)"],
                                candidate.with_(micro_batch=b, grad_accum=accum)))
        for words, option in options:
            if estimate(spec, option).total_bytes <= gpu_bytes:
                sentence = "; ".join(words)
                total = estimate(spec, option).total_bytes
                return f"{sentence[0].upper()}{sentence[1:]}: needs {total / GB:.1f} GB of {gpu_bytes / GB:.1f} GB.", option
    return None, None


@pytest.mark.parametrize("model", ["llama-2-7b", "gpt2", "llama-2-70b"])
@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_bounded_fix_search_finds_what_trying_every_micro_batch_finds(model, stage):
    spec = resolve_model(model, allow_hub=False)
    checked = 0
    for method, precision in (("full", "amp"), ("lora", "bf16"), ("qlora", "bf16")):
        if method == "qlora" and stage == "ppo":
            continue
        for micro_batch, seq_len, grad_accum in ((1, 512, 1), (12, 1024, 1), (64, 2048, 2), (96, 512, 1), (360, 256, 3)):
            setup = TrainingSetup(method=method, precision=precision, micro_batch=micro_batch, seq_len=seq_len,
                                  grad_accum=grad_accum, stage=stage)
            for gpu in GPUS:
                fit = gpu_fit(spec, setup, gpu.memory_bytes)
                if fit.fits:
                    continue
                want_fix, want_setup = _cheapest_fix_by_trying_every_micro_batch(spec, setup, gpu.memory_bytes)
                assert (fit.cheapest_fix, fit.fixed_setup) == (want_fix, want_setup), (method, setup, gpu.name)
                checked += 1
    assert checked > 20  # the grid really exercises the search


def test_planner_searches_stay_fast_at_the_largest_allowed_numbers():
    import time

    spec = resolve_model("llama-2-7b", allow_hub=False)
    rtx = find_gpu("RTX-4090")
    began = time.perf_counter()
    # The largest setup a plan may describe: nothing fits, and the search says so at once.
    fit = gpu_fit(spec, TrainingSetup(method="lora", micro_batch=65_536, seq_len=2**21, lora_rank=16_384), rtx.memory_bytes)
    assert not fit.fits and fit.cheapest_fix is None and fit.max_micro_batch == 0
    fit = gpu_fit(spec, TrainingSetup(method="lora", micro_batch=65_536, seq_len=512), rtx.memory_bytes)
    assert "lower the micro-batch to" in fit.cheapest_fix and fit.fixed_setup.micro_batch * fit.fixed_setup.grad_accum == 65_536
    assert time.perf_counter() - began < 1.0
    for changes, field in (({"micro_batch": 10**7}, "training.micro_batch"), ({"lora_rank": 10**19}, "method.lora_rank"),
                           ({"seq_len": 10**30}, "training.seq_len"), ({"num_gpus": 10**6}, "hardware.num_gpus")):
        with pytest.raises(PlanError) as info:
            TrainingSetup(**changes)
        assert info.value.field == field and "from 1 to" in str(info.value)


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the tensors autograd still holds for backward after one forward (parameters excluded)."""
    import weakref

    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs = []

    def pack(tensor):
        refs.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=ids, labels=ids)
    alive = {}
    for ref in refs:
        tensor = ref()
        if tensor is not None and tensor.untyped_storage().data_ptr() not in params:
            alive[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    del out
    return sum(alive.values())


def test_dora_extra_activations_match_what_autograd_saves():
    """DoRA keeps each adapted module's base and LoRA outputs for the magnitude's gradient: the planner's extra
    activation bytes over plain LoRA are within 5% of the extra bytes PEFT's DoRA layers leave in the graph."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    d = to_hf_config_dict(TINY)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    ids = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    measured = {}
    for dora in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", use_dora=dora))
        model.train()
        measured[dora] = _saved_activation_bytes(model, ids)
    setup = TrainingSetup(method="lora", precision="fp32", micro_batch=2, seq_len=32, lora_rank=8,
                          lora_targets=("all-linear",), lora_dropout=0.0)
    planned = (estimate(TINY, setup.with_(use_dora=True)).components["activations"]
               - estimate(TINY, setup).components["activations"])
    assert measured[True] - measured[False] == pytest.approx(planned, rel=0.05)
    full = setup.with_(method="full")
    assert estimate(TINY, full.with_(use_dora=True)).components == estimate(TINY, full).components


def test_the_wizard_starts_on_this_machines_gpus_named_as_the_driver_names_them():
    """Step 1's GPU default is the machine's own (nvidia-smi's names and totals, matched to the catalogue),
    so a plan made on a GPU box trains on its GPUs unless the user picks otherwise; "No GPU" without one."""
    from advisor import gpus, wizard

    seen = {  # names as nvidia-smi prints them, with their totals in MiB
        ("NVIDIA H100 80GB HBM3", 81559): "H100-80GB", ("NVIDIA H100 PCIe", 81559): "H100-80GB",
        ("NVIDIA A100-SXM4-40GB", 40960): "A100-40GB", ("NVIDIA A100-SXM4-80GB", None): "A100-80GB",
        ("NVIDIA A100 80GB PCIe", 81920): "A100-80GB", ("Tesla T4", 15360): "T4", ("NVIDIA L4", 23034): "L4",
        ("NVIDIA L40S", 46068): "L40S", ("NVIDIA A10G", 23028): "A10G", ("NVIDIA GeForce RTX 4090", 24564): "RTX-4090",
        ("NVIDIA GeForce RTX 3090", 24576): "RTX-3090", ("NVIDIA H200", 143771): "H200",
    }
    for (name, mib), expected in seen.items():
        assert gpus.match_gpu(name, mib).name == expected, name
    assert gpus.match_gpu("NVIDIA RTX A6000", 49140) is None  # not in the catalogue: not guessed
    assert wizard.default_hardware([("NVIDIA H100 80GB HBM3", 81559)] * 8) == ("H100-80GB", 8)
    assert wizard.default_hardware([("NVIDIA L4", 23034), ("NVIDIA L4", 23034), ("NVIDIA RTX A6000", 49140)]) == ("L4", 2)
    assert wizard.default_hardware([]) == (wizard.NO_GPU, 1)
    assert wizard.default_hardware([("NVIDIA RTX A6000", 49140)]) == (wizard.NO_GPU, 1)
    # This machine: what its driver says (no NVIDIA driver: nothing, and the wizard starts on "No GPU").
    if not gpus.this_machine().has_nvidia_gpu:
        assert gpus.local_gpus() == () and wizard.default_hardware() == (wizard.NO_GPU, 1)
