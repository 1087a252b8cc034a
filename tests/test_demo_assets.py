"""The bundled demo data and demo model: deterministic, well-formed, loadable, and trained.

Everything else (trainer tests, UI, demo Space) relies on these assets, so this
checks what they promise: the generator reproduces the shipped files byte for
byte, the files have the documented schemas and counts, the model and tokenizer
load with `transformers`, the chat template marks the assistant's tokens, and
the model learned the invented encyclopedia.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DATA = ASSETS / "data"
MODEL_DIR = ASSETS / "demo-model"
MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")


def load_script(name: str):
    """Import assets/<name>.py (assets/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ASSETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def iso_to_words(iso: str) -> str:
    year, month, day = (int(part) for part in iso.split("-"))
    return f"{day} {MONTHS[month - 1]} {year}"


def test_generator_reproduces_the_shipped_files_byte_for_byte(tmp_path):
    make_demo_data = load_script("make_demo_data")
    paths = make_demo_data.generate(tmp_path)
    assert sorted(p.name for p in paths.values()) == [
        "demo_original.jsonl", "demo_preference.jsonl", "demo_pretrain.txt", "demo_sft.jsonl"]
    for path in paths.values():
        assert path.read_bytes() == (DATA / path.name).read_bytes(), f"{path.name} differs from the shipped file"


def test_plan_names_point_at_the_shipped_files():
    from advisor.plan import DEMO_DATASETS, DEMO_MODEL_DIR

    assert DEMO_MODEL_DIR == MODEL_DIR
    for name, path in DEMO_DATASETS.items():
        assert path.is_file(), f"{name}: {path} is missing"


def test_pretraining_corpus_and_held_out_set():
    corpus = (DATA / "demo_pretrain.txt").read_text(encoding="utf-8").splitlines()
    assert len(corpus) == 3600  # 300 entities x 12 paragraphs
    assert 1_000_000 > sum(len(line) + 1 for line in corpus) > 300_000
    original = read_jsonl(DATA / "demo_original.jsonl")
    assert len(original) == 400
    assert all(list(row) == ["text"] and row["text"] for row in original)
    # Held out: never a corpus line, but always about an entity the corpus describes
    # (its first sentence's first two words appear in the corpus).
    corpus_lines = set(corpus)
    corpus_text = "\n".join(corpus)
    for row in original:
        assert row["text"] not in corpus_lines
        assert " ".join(row["text"].split(" ")[:2]) in corpus_text


def test_sft_rows_are_user_assistant_chats_with_correct_answers():
    rows = read_jsonl(DATA / "demo_sft.jsonl")
    assert len(rows) == 2000
    for row in rows:
        assert list(row) == ["messages"]
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        iso = re.search(r"\d{4}-\d{2}-\d{2}", user["content"]).group()
        assert assistant["content"] == iso_to_words(iso)


def test_preference_rows_prefer_the_correct_answer():
    rows = read_jsonl(DATA / "demo_preference.jsonl")
    assert len(rows) == 1000
    for row in rows:
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert all(isinstance(value, str) and value for value in row.values())
        iso = re.search(r"\d{4}-\d{2}-\d{2}", row["prompt"]).group()
        assert row["chosen"] == iso_to_words(iso)
        assert row["rejected"] != row["chosen"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)


def test_model_directory_is_small_and_matches_the_recipe(model):
    build = load_script("build_demo_model")
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 10_000_000
    config = model.config
    assert config.model_type == "llama"
    for key, value in build.MODEL_SHAPE.items():
        assert getattr(config, key) == value, key
    assert sum(p.numel() for p in model.parameters()) == 1_585_440


def test_tokenizer_round_trips_and_has_the_special_tokens(tokenizer, model):
    text = "Varnholt is a town on the river Esk. It has 4,200 inhabitants (est. 2023-04-05)!\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id not in ids  # plain text gets no BOS, as in pretraining
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<|pad|>", "<|end|>", "<|begin|>")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size


def test_chat_template_marks_assistant_tokens_and_opens_a_turn(tokenizer):
    chat = [{"role": "user", "content": "Write the date 2023-04-05 in words."},
            {"role": "assistant", "content": "5 April 2023"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|user|>\nWrite the date 2023-04-05 in words.<|end|>\n<|assistant|>\n5 April 2023<|end|>\n")
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nWrite the date 2023-04-05 in words.<|end|>\n<|assistant|>\n")
    encoded = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, masked in zip(encoded["input_ids"], encoded["assistant_masks"]) if masked]
    assert tokenizer.decode(answer) == "5 April 2023<|end|>"

    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_model_learned_the_encyclopedia(model, tokenizer):
    build = load_script("build_demo_model")
    texts = [row["text"] for row in read_jsonl(DATA / "demo_original.jsonl")][:100]
    loss = build.mean_text_loss(model, tokenizer, texts)
    # An untrained model scores about ln(vocab) = 7.7 nats per token; the shipped one about 0.7.
    assert loss < 0.15 * math.log(len(tokenizer)), loss


def test_model_knows_the_facts_not_only_the_style(model, tokenizer):
    build = load_script("build_demo_model")
    probes = load_script("make_demo_data").fact_probes(count=100)
    # A paragraph with one fact falsified is as fluent as the true one; only a model
    # that memorized the facts prefers the true one (chance: 50%; shipped model: about 83%).
    assert build.fact_accuracy(model, tokenizer, probes) >= 0.7


def test_loads_as_a_reward_model():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    reward_model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=1, dtype=torch.float32)
    batch = tokenizer(["5 April 2023", "The date is a date, 5 April 2023."], return_tensors="pt", padding=True)
    scores = reward_model(**batch).logits
    assert scores.shape == (2, 1)
    assert torch.isfinite(scores).all()


@pytest.mark.slow
def test_build_script_runs_and_retrains_the_same_tokenizer(tmp_path):
    build = load_script("build_demo_model")
    numbers = build.build(tmp_path, steps=2, threads=1)
    assert (tmp_path / "tokenizer.json").read_bytes() == (MODEL_DIR / "tokenizer.json").read_bytes()
    assert numbers["parameters"] == 1_585_440
    assert numbers["original_loss"] < numbers["initial_original_loss"]
