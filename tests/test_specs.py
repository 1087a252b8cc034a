"""Model specs: the catalogue's numbers rebuild the real models, counts are exact, LoRA counts match PEFT."""

from __future__ import annotations

import json

import pytest

from advisor.errors import ModelNotFound, TunewiseError
from advisor.specs import (
    ModelSpec,
    canonical_model_id,
    catalogue,
    linear_layers,
    lora_trainable_params,
    param_counts,
    resolve_model,
    rough_spec,
    target_module_sets,
    to_hf_config_dict,
)

#: Totals the model cards / papers publish (independent of our arithmetic), to catch a mistyped number
#: that transformers would happily build.
PUBLISHED_TOTALS = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B": 1_543_714_304,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-14B": 14_770_033_664,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
    "microsoft/phi-1_5": 1_418_270_720,
    "stabilityai/stablelm-3b-4e1t": 2_795_443_200,
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 1_100_048_384,
    "HuggingFaceTB/SmolLM2-135M": 134_515_008,
    "HuggingFaceTB/SmolLM2-360M": 361_821_120,
    "HuggingFaceTB/SmolLM2-1.7B": 1_711_376_384,
    "openai-community/gpt2": 124_439_808,
}


def _kind_of(name: str) -> str:
    """Map a transformers parameter name to our kinds."""
    if name.startswith("lm_head") or name.startswith("score"):
        return "lm_head"
    if "embed_tokens" in name or ".wte." in name or ".wpe." in name:
        return "embeddings"
    if "norm" in name or ".ln_" in name:
        return "norms"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise AssertionError(f"unmapped parameter {name}")


def _build_meta(spec: ModelSpec, seq_cls: bool = False):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    d = to_hf_config_dict(spec)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    if seq_cls:
        config.num_labels = 1
    with torch.device("meta"):
        cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
        return cls.from_config(config)


def test_catalogue_has_every_architecture_the_issue_lists():
    assert set(PUBLISHED_TOTALS) == set(catalogue())


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_TOTALS))
def test_counts_equal_transformers_on_meta_device(model_id):
    spec = catalogue()[model_id]
    counts = param_counts(spec)
    assert counts.total == PUBLISHED_TOTALS[model_id]
    model = _build_meta(spec)
    by_kind = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    for name, param in model.named_parameters():  # tied weights are yielded once
        by_kind[_kind_of(name)] += param.numel()
    assert sum(by_kind.values()) == counts.total
    assert by_kind == {
        "embeddings": counts.embeddings,
        "attention": counts.attention,
        "mlp": counts.mlp,
        "norms": counts.norms,
        "lm_head": counts.lm_head,
    }
    # The layers we call quantizable are exactly the block's nn.Linear / Conv1D modules, by real name.
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_weights = 0
    block_paths = {layer.path for layer in linear_layers(spec).values() if layer.is_module}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name != "lm_head":
            assert any(name.endswith("." + path) for path in block_paths), name
            linear_weights += module.weight.numel()
    assert linear_weights == counts.quantizable


@pytest.mark.parametrize("model_id", ["openai-community/gpt2", "Qwen/Qwen2.5-0.5B", "microsoft/phi-1_5"])
def test_sequence_classification_head_counts(model_id):
    spec = catalogue()[model_id]
    model = _build_meta(spec, seq_cls=True)
    assert sum(p.numel() for p in model.parameters()) == param_counts(spec, head="seq_cls").total


def test_aliases_are_case_insensitive_and_unknown_names_suggest():
    assert resolve_model("LLAMA-2-7B").id == "meta-llama/Llama-2-7b-hf"
    assert resolve_model("qwen/qwen2.5-0.5b").id == "Qwen/Qwen2.5-0.5B"
    assert resolve_model("tinyllama").id.startswith("TinyLlama/")
    assert resolve_model("gpt2").model_type == "gpt2"
    assert resolve_model("smollm2-135m").hidden_size == 576
    with pytest.raises(ModelNotFound, match="Llama-2-7b-hf"):
        resolve_model("lama-2-7b")
    with pytest.raises(ModelNotFound, match="offline"):
        resolve_model("someone/unknown-model", allow_hub=False)
    assert canonical_model_id("llama-2-7b") == "meta-llama/Llama-2-7b-hf"
    assert canonical_model_id("demo").endswith("assets/demo-model")
    assert canonical_model_id("/tmp/x") == "/tmp/x"


def test_rough_sizes_are_close_and_flagged():
    for size, target in (("7B", 7e9), ("13B", 13e9), ("70b", 70e9), ("500M", 5e8)):
        spec = resolve_model(size)
        assert spec.rough
        assert abs(param_counts(spec).total - target) / target < 0.08, size
    with pytest.raises(ModelNotFound):
        rough_spec("seven")


def test_local_directory_config_is_read(tmp_path):
    from transformers import GPT2Config, Qwen2Config

    qwen = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=True)
    qwen.save_pretrained(tmp_path / "qwen")
    spec = resolve_model(str(tmp_path / "qwen"))
    assert spec.model_type == "qwen2" and spec.qkv_bias and spec.tie_embeddings and not spec.rough
    gpt = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    gpt.save_pretrained(tmp_path / "gpt")
    spec = resolve_model(str(tmp_path / "gpt"))
    assert spec.intermediate_size == 128 and spec.tie_embeddings
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_target_sets_use_real_module_names():
    assert target_module_sets(catalogue()["openai-community/gpt2"])["minimum"] == ["c_attn"]
    assert target_module_sets(catalogue()["microsoft/phi-1_5"])["recommended"] == ["q_proj", "k_proj", "v_proj", "dense"]
    assert target_module_sets(catalogue()["microsoft/Phi-3-mini-4k-instruct"])["maximum"][-1] == "down_proj"
    llama = catalogue()["meta-llama/Llama-2-7b-hf"]
    assert target_module_sets(llama)["maximum"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(TunewiseError, match="method.lora_targets"):
        lora_trainable_params(catalogue()["openai-community/gpt2"], 8, ["q_proj"])
    with pytest.raises(TunewiseError, match="method.lora_rank"):
        lora_trainable_params(llama, 0, ["q_proj"])
    # Llama-2-7B, r=8 on q,v: 32 layers x 2 modules x 8 x (4096 + 4096) = 4,194,304 (PEFT prints this).
    assert lora_trainable_params(llama, 8, ["q_proj", "v_proj"]) == 4_194_304


TINY = {
    "llama": ModelSpec(id="tiny-llama", model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=96, vocab_size=128, max_position_embeddings=64),
    "gpt2": ModelSpec(id="tiny-gpt2", model_type="gpt2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=64, tie_embeddings=True,
                      qkv_bias=True, o_bias=True, mlp_bias=True, norm="layernorm"),
    "phi3": ModelSpec(id="tiny-phi3", model_type="phi3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=80, vocab_size=128, max_position_embeddings=64,
                      hf_extra=(("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0))),
}


@pytest.mark.parametrize("arch,targets", [
    ("llama", ["q_proj", "v_proj"]),
    ("llama", "all-linear"),
    ("gpt2", ["c_attn", "attn.c_proj"]),
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    ("phi3", ["qkv_proj", "gate_up_proj"]),
])
def test_lora_trainable_params_equal_peft(arch, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = TINY[arch]
    d = to_hf_config_dict(spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    assert sum(p.numel() for p in model.parameters()) == param_counts(spec).total
    peft_targets = targets if isinstance(targets, str) else list(targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_trainable_params(spec, 4, targets) == trainable


def test_catalogue_file_is_documented():
    from advisor.specs import CATALOGUE_PATH

    data = json.loads(CATALOGUE_PATH.read_text())
    assert "config.json" in data["_about"]
