"""Build Tunewise's offline demo base model: tokenizer, tiny Llama, brief pretraining.

    python assets/build_demo_model.py [--out assets/demo-model] [--steps N]

1. Trains a byte-level BPE tokenizer (the `tokenizers` library) on the
   encyclopedia corpus plus the SFT chats, with special tokens for padding,
   begin/end of text and the chat roles, and a chat template whose assistant
   turns are wrapped in `{% generation %}` markers (TRL's assistant-only loss).
2. Builds a small `LlamaForCausalLM` and pretrains it with plain torch on
   `assets/data/demo_pretrain.txt`, so it "knows" the invented encyclopedia.
3. Saves model and tokenizer with `save_pretrained` (float32 safetensors) and
   prints the final training loss, the loss on the held-out
   `demo_original.jsonl` paragraphs (about the same entities) and how often the
   model prefers a true paragraph to one with a fact falsified.

Seeded and single-process (`--threads`, default 2; 1 and 2 gave bit-identical
weights): the same machine rebuilds the same weights and byte-identical
tokenizer files (tested). Regenerate the data first with
`python assets/make_demo_data.py`. Numbers and timings: assets/DEMO.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DATA_DIR = ASSETS_DIR / "data"
DEFAULT_OUT = ASSETS_DIR / "demo-model"

SEED = 1234
VOCAB_SIZE = 4096
PAD, BOS, EOS = "<|pad|>", "<|begin|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS

#: Each turn is `<|role|>\n{content}<|end|>\n`. The assistant's content and its
#: `<|end|>` sit inside the generation markers, so an assistant-only loss
#: teaches the model to answer and to stop; `add_generation_prompt` opens an
#: assistant turn. No BOS is added (the corpus has none either).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('the demo chat template knows the roles system, user and assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

#: The model: a Llama with grouped-query attention and tied embeddings.
MODEL_SHAPE = dict(
    hidden_size=160,
    intermediate_size=480,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

SEQ_LEN = 128
BATCH_SIZE = 16
DEFAULT_STEPS = 400
PEAK_LR = 3e-3
WARMUP_STEPS = 30
MIN_LR_RATIO = 0.1


def load_data_generator():
    """The `make_demo_data` module next to this file (assets/ is not a package)."""
    import importlib.util
    import sys

    if "make_demo_data" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_demo_data", ASSETS_DIR / "make_demo_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_demo_data"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["make_demo_data"]


def read_corpus(data_dir: Path = DATA_DIR) -> list[str]:
    """Pretraining paragraphs, one per line."""
    return (data_dir / "demo_pretrain.txt").read_text(encoding="utf-8").splitlines()


def read_original(data_dir: Path = DATA_DIR) -> list[str]:
    """Held-out original-domain paragraphs."""
    with open(data_dir / "demo_original.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def read_sft_texts(data_dir: Path = DATA_DIR) -> list[str]:
    """Every message content in the SFT set (the tokenizer must cover the task's words)."""
    texts = []
    with open(data_dir / "demo_sft.jsonl", encoding="utf-8") as f:
        for line in f:
            texts.extend(message["content"] for message in json.loads(line)["messages"])
    return texts


def build_tokenizer(texts: list[str]):
    """A byte-level BPE with single-digit number tokens, wrapped for `transformers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Digits become one token each, so "2023-04-05" and "5 April 2023" share
    # their digit tokens and the date task is learnable by a tiny model.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        padding_side="right",
    )


def token_stream(tokenizer, paragraphs: list[str]) -> list[int]:
    """All paragraphs as one token list, each followed by EOS (as TRL does for plain text)."""
    ids: list[int] = []
    for encoded in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return ids


def lr_at(step: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay from PEAK_LR to MIN_LR_RATIO * PEAK_LR."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def mean_text_loss(model, tokenizer, texts: list[str], batch_size: int = 50) -> float:
    """Mean next-token cross-entropy (nats per token) over `texts`, each scored on its own."""
    import torch

    total_loss, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Position t predicts token t + 1.
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
            total_loss += losses.item()
            total_tokens += int((labels[:, 1:] != -100).sum())
    model.train()
    return total_loss / total_tokens


def text_log_likelihoods(model, tokenizer, texts: list[str], batch_size: int = 50) -> list[float]:
    """Total log-likelihood (nats) of each text under the model (right-padded batches)."""
    import torch

    totals: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits
            # Position t predicts token t + 1; padding positions count zero.
            token_log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
            totals.extend((token_log_probs * mask[:, 1:]).sum(dim=1).tolist())
    model.train()
    return totals


def fact_accuracy(model, tokenizer, probes: list[tuple[str, str]]) -> float:
    """Share of (true, falsified) paragraph pairs where the true one is more likely (chance: 0.5)."""
    true_scores = text_log_likelihoods(model, tokenizer, [true for true, _ in probes])
    false_scores = text_log_likelihoods(model, tokenizer, [false for _, false in probes])
    return sum(t > f for t, f in zip(true_scores, false_scores)) / len(probes)


def pretrain(model, stream: list[int], steps: int, log_every: int = 50) -> float:
    """Plain-torch causal-LM training on random SEQ_LEN windows; returns the mean loss of the last 20 steps."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    recent: list[float] = []
    started = time.time()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([data[s:s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step, steps):.2e}  "
                  f"{time.time() - started:.0f}s", flush=True)
    return sum(recent) / len(recent)


def build(out_dir: Path, steps: int, threads: int = 2, data_dir: Path = DATA_DIR) -> dict:
    """Build tokenizer and model into `out_dir`; returns the measured numbers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    random.seed(SEED)

    corpus, original = read_corpus(data_dir), read_original(data_dir)
    tokenizer = build_tokenizer(corpus + read_sft_texts(data_dir))
    # Saved before any use: calling it with padding=True would store that padding
    # state in tokenizer.json, and the file would depend on the last call.
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    stream = token_stream(tokenizer, corpus)
    print(f"tokenizer: {len(tokenizer)} tokens; corpus: {len(stream):,} tokens", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    initial_original_loss = mean_text_loss(model, tokenizer, original)
    print(f"model: {params:,} parameters; held-out loss before training {initial_original_loss:.3f} "
          f"(ln vocab = {math.log(len(tokenizer)):.3f})", flush=True)

    probes = load_data_generator().fact_probes()
    initial_fact_accuracy = fact_accuracy(model, tokenizer, probes)
    final_train_loss = pretrain(model, stream, steps)
    original_loss = mean_text_loss(model, tokenizer, original)
    facts = fact_accuracy(model, tokenizer, probes)
    print(f"final training loss {final_train_loss:.3f}; held-out demo_original loss {original_loss:.3f} "
          f"(perplexity {math.exp(original_loss):.1f}); true fact preferred in {facts:.0%} of "
          f"{len(probes)} probes (before training {initial_fact_accuracy:.0%}, chance 50%)", flush=True)

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    seconds = time.time() - started
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print(f"saved to {out_dir} ({size:,} bytes) in {seconds:.0f}s", flush=True)
    return {"parameters": params, "final_train_loss": final_train_loss, "original_loss": original_loss,
            "initial_original_loss": initial_original_loss, "fact_accuracy": facts,
            "initial_fact_accuracy": initial_fact_accuracy, "seconds": seconds, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: assets/demo-model)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"pretraining steps (default {DEFAULT_STEPS})")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2; use 1 on a machine busy with other work)")
    parser.add_argument("--data", type=Path, default=DATA_DIR, help="demo data folder (default: assets/data)")
    args = parser.parse_args()
    build(args.out, args.steps, args.threads, args.data)


if __name__ == "__main__":
    main()
