"""The estimator against tensors really alive on the CPU: a live-tensor count of real training steps.

`torch.cuda.max_memory_allocated()` needs a GPU; on the CPU the same quantity can be measured by counting
every tensor storage a step allocates, from allocation until it is freed (a TorchDispatchMode sees every
op's outputs, a weakref finalizer sees each storage die). The model's own weights are left out, since the
estimate's weights are what the model was given. Each case is a tiny Llama trained with transformers + PEFT
in fp32 (the precision Tunewise's trainer uses on a CPU), one case per phase that can set the peak: the
loss (large vocabulary), the recompute + backward of one layer (small vocabulary, checkpointing), with and
without checkpointing, LoRA and full fine-tuning.

Run: python bench/cpu_memory.py   (writes its section of bench/RESULTS.md; tests/test_memory_edges.py checks
each case within 5%)
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from advisor.memory import TrainingSetup, estimate  # noqa: E402
from advisor.specs import ModelSpec  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One measured training step."""

    vocab: int
    checkpointing: bool
    micro_batch: int
    seq_len: int
    targets: tuple[str, ...]
    method: str = "lora"

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(id=f"cpu-{self.vocab}", model_type="llama", hidden_size=256, num_layers=4, num_heads=4,
                         num_kv_heads=2, intermediate_size=688, vocab_size=self.vocab, max_position_embeddings=4096)

    @property
    def setup(self) -> TrainingSetup:
        return TrainingSetup(method=self.method, precision="fp32", optimizer="sgd", lora_rank=8, lora_targets=self.targets,
                             lora_dropout=0.0, micro_batch=self.micro_batch, seq_len=self.seq_len,
                             gradient_checkpointing=self.checkpointing)


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = (
    Case(32000, True, 1, 1024, ("q_proj", "v_proj")),    # the loss sets the peak; no layer recomputed beside it
    Case(32000, False, 1, 1024, ("q_proj", "v_proj")),   # the loss on top of every layer's saved tensors
    Case(64, True, 1, 2048, ALL),                        # recompute + backward of one layer sets the peak
    Case(64, False, 1, 2048, ("q_proj", "v_proj")),      # the first layer's backward on top of all saved tensors
    Case(64, True, 1, 2048, ("q_proj", "v_proj"), "full"),
)


def _live_bytes_mode(ignore):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        """Bytes of tensor storages alive, and their peak, for everything created inside the mode."""

        def __init__(self):
            super().__init__()
            self.ignored = {t.untyped_storage().data_ptr() for t in ignore}
            self.seen: set[int] = set()
            self.live = self.peak = 0

        def _track(self, tensor):
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if not size or key in self.seen or key in self.ignored:
                return  # a view of a storage counted already, or one of the model's weights
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)

            def freed(key=key, size=size):
                self.live -= size
                self.seen.discard(key)

            weakref.finalize(storage, freed)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor) and item.device.type == "cpu":
                    self._track(item)
            return out

    return LiveBytes()


def measure(case: Case) -> tuple[int, int]:
    """(measured peak bytes, the estimate's peak minus the weights and adapters) for one case."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = case.spec
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config)
    inner = model
    if case.method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=list(case.targets), lora_dropout=0.0))
    if case.checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, spec.vocab_size, (case.micro_batch, case.seq_len))
    peak = 0
    for _ in range(2):  # the second step is the steady state
        mode = _live_bytes_mode(list(model.parameters()) + list(model.buffers()))
        with mode:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            del loss
        for parameter in model.parameters():
            parameter.grad = None
        peak = mode.peak
    est = estimate(spec, case.setup)
    return peak, est.peak_allocated_bytes - est.components["weights"] - est.components.get("adapters", 0)


def main() -> str:
    lines = ["| vocab | checkpointing | micro-batch x seq | method | measured MB | estimate MB | error | phase |",
             "|---|---|---|---|---|---|---|---|"]
    for case in CASES:
        measured, estimated = measure(case)
        phase = estimate(case.spec, case.setup).peak_phase
        what = case.method if case.method == "full" else f"LoRA {','.join(t.split('_')[0] for t in case.targets)}"
        lines.append(f"| {case.vocab} | {'on' if case.checkpointing else 'off'} | {case.micro_batch} x {case.seq_len} | "
                     f"{what} | {measured / 1e6:.1f} | {estimated / 1e6:.1f} | "
                     f"{100 * (estimated - measured) / measured:+.1f}% | {phase} |")
    text = "\n".join(lines)
    print(text)
    from bench.results import write_section

    write_section("cpu_memory", text)
    return text


if __name__ == "__main__":
    main()
