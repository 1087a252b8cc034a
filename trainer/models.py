"""Load the base model and its tokenizer the way a plan says: full, LoRA or QLoRA.

One place maps the plan's model and method settings onto transformers, PEFT
and bitsandbytes, so every stage (SFT here; reward model, DPO and PPO in
their own files) loads models the same way:

- `resolve_model_path(name)`: "demo", a catalogue alias, a local directory
  or a hub id -> what `from_pretrained` gets; `check_model(plan)` does the
  same and also proves the model is reachable, cheaply, before training.
- `resolve_precision(plan)`: the dtypes actually used on this machine (a
  CPU-only machine trains in fp32, and says so through `Precision.note`).
- `load_tokenizer(plan)`, `load_model(plan, kind, trainable)`: the plan's
  model (or any `model_name`: a stage's starting point, a reward model) in
  the plan's precision and attention kernel; QLoRA's 4-bit NF4 (or 8-bit)
  base via `BitsAndBytesConfig` and `prepare_model_for_kbit_training`; LoRA
  adapters from the plan's rank, alpha, targets and dropout, or none with
  `adapters=False` when TRL adds them from a `peft_config`; gradient
  checkpointing; RoPE scaling (`scaled_config`: the plan's linear, dynamic
  NTK or YaRN through the config's `rope_parameters`, so a sequence longer
  than the model's window trains). `trust_remote_code` only when the plan
  turns it on.

torch, transformers and PEFT are imported inside the functions, so importing
this module is cheap.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from advisor.errors import ModelNotFound, TunewiseError
from advisor.plan import DEMO_MODEL_DIR, Plan

HUB_HOST = "huggingface.co"

#: Model kinds `load_model` builds: a language model (SFT, DPO, PPO policy) or a scalar head
#: on top of it (reward and value models).
MODEL_KINDS = ("causal_lm", "seq_cls")


# -- where the model is ---------------------------------------------------------------------------


def _canonical_id(name: str) -> str | None:
    """The catalogue's id for an alias ("llama-2-7b" -> "meta-llama/Llama-2-7b-hf"); the name itself otherwise."""
    from advisor.specs import canonical_model_id

    try:
        return canonical_model_id(name)
    except (TunewiseError, KeyError, ValueError):
        return None


#: The shape of a hub id: "name" or "org/name" of letters, digits, "-", "_" and ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or not _HUB_ID.match(name)


def resolve_model_path(name: str) -> str:
    """What `from_pretrained` should load for a plan's `model.name`.

    "demo" -> the bundled `assets/demo-model/`; an existing local directory ->
    its path (it must hold config.json, or adapter_config.json for a trained
    adapter); a catalogue alias -> its hub id; anything else is taken as a hub
    id. Raises `ModelNotFound` for a local path that does not hold a model.
    Reachability of hub ids is checked by `check_model`, not here.
    """
    text = str(name).strip()
    if text.lower() == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelNotFound(
                f"the demo model is not built yet (no {DEMO_MODEL_DIR}/config.json): run `tunewise build-demo`",
                field="model.name",
            )
        return str(DEMO_MODEL_DIR)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return str(path)
        raise ModelNotFound(
            f"model directory {text} has no config.json (nor adapter_config.json): point model.name at a "
            "folder saved with save_pretrained, a hub id, or 'demo'",
            field="model.name",
        )
    canonical = _canonical_id(text)
    if canonical and canonical != text:
        return canonical
    if _looks_like_path(text):
        raise ModelNotFound(f"model directory {text} does not exist", field="model.name")
    return text


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (a TCP connect; no request is sent)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_on_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


def check_model(plan: Plan) -> str:
    """Resolve `plan.model.name` and prove it can be loaded, without loading it.

    A local model or adapter directory must exist; a hub id must be in the local
    cache, or the Hub must be reachable and know it. Returns the resolved path or
    id; raises `ModelNotFound` with the reason otherwise.
    """
    name = plan.model.name
    resolved = resolve_model_path(name)
    if Path(resolved).is_dir():
        adapter_base = base_of_adapter(resolved)
        if adapter_base is not None:
            check_model(plan.with_overrides({"model.name": adapter_base}))
        return resolved
    if _cached_on_hub_cache(resolved, plan.model.revision):
        return resolved
    if not hub_reachable():
        alias = f" ({resolved})" if resolved != name else ""
        raise ModelNotFound(
            f"model {name!r}{alias} is not on this machine (no local folder, nothing in the Hugging Face cache) "
            f"and the Hub ({HUB_HOST}) cannot be reached to download it: use 'demo', a local folder saved with "
            "save_pretrained, or download the model where you have access",
            field="model.name",
        )
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

        HfApi().model_info(resolved, revision=plan.model.revision, timeout=10)
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"model {name!r} was not found on the Hugging Face Hub (nor as a local folder): check the spelling, "
            "e.g. meta-llama/Llama-3.2-1B, or use 'demo'",
            field="model.name",
        ) from None
    except GatedRepoError:
        raise ModelNotFound(
            f"model {name!r} is gated on the Hub: accept its licence on huggingface.co and log in with `hf auth login`",
            field="model.name",
        ) from None
    except Exception:  # a network hiccup: let the real load try, and report what it finds
        return resolved
    return resolved


def base_of_adapter(path: str | Path) -> str | None:
    """For a PEFT adapter directory, the base model it was trained on (resolved); None for anything else."""
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelNotFound(f"{config_path} is not readable JSON", field="model.name") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelNotFound(f"{config_path} does not name its base model (base_model_name_or_path)", field="model.name")
    return base


# -- precision ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """The numeric formats a run really uses on this machine (the plan's wish, adapted)."""

    device: str
    """cuda or cpu."""
    weights_dtype: str
    """torch dtype name the (non-quantized) weights are loaded in: float32, bfloat16 or float16."""
    compute_dtype: str
    """QLoRA: the dtype 4-bit weights are dequantized to for each matmul."""
    bf16: bool
    """TrainingArguments.bf16: bfloat16 autocast in the forward pass."""
    fp16: bool
    """TrainingArguments.fp16: float16 autocast with a loss scaler."""
    note: str | None = None
    """Why the effective precision differs from the plan's, for a `notice` event; None when it does not."""

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.weights_dtype)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def inference_placement():
    """(dtype, device) for generating with a tuned model (samples, chat): the GPU in bfloat16 (float16 where
    the GPU has no bfloat16) when CUDA is there, else the CPU in float32. An 8B model in float32 on the CPU
    needs about 32 GB of RAM and gives about a token a second; half precision on the CPU is slower still."""
    import torch

    if _cuda_available():
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), "cuda"
    return torch.float32, "cpu"


def resolve_precision(plan: Plan) -> Precision:
    """Map plan.method.precision onto this machine.

    - CPU: everything in float32 (fp16 autocast is not supported on the CPU and
      bf16 autocast is slower than fp32 there); QLoRA keeps its 4-bit base and
      computes in fp32. A note says so when the plan asked for 16 bit.
    - GPU: bf16 loads 16-bit weights and autocasts in bf16 (falls back to fp16
      on GPUs without bf16, e.g. T4); fp16 does the same in fp16, except for full
      fine-tuning, whose loss scaler needs fp32 master weights; fp32 is plain fp32;
      amp keeps fp32 weights and autocasts in bf16 (or fp16).
    """
    wanted = plan.method.precision
    method = plan.method.method
    requested_device = plan.hardware.device
    has_cuda = _cuda_available()
    if requested_device == "cuda" and not has_cuda:
        raise TunewiseError(
            "hardware.device is cuda but no CUDA GPU is visible to this process: set hardware.device to auto or cpu",
            field="hardware.device",
        )
    device = "cuda" if (requested_device in ("auto", "cuda") and has_cuda) else "cpu"
    if device == "cpu":
        note = None
        if wanted != "fp32":
            note = (
                f"precision {wanted} was asked for, but this run is on the CPU: training in fp32 "
                "(16-bit autocast is unsupported or slower on a CPU)"
            )
        return Precision("cpu", "float32", "float32", False, False, note)

    import torch

    bf16_ok = torch.cuda.is_bf16_supported()
    half = "bfloat16" if bf16_ok else "float16"
    note = None
    if wanted in ("bf16", "amp") and not bf16_ok:
        note = f"this GPU has no bfloat16 support: using float16 instead of {wanted}'s bfloat16"
    if wanted == "fp32":
        return Precision("cuda", "float32", "float32", False, False, None)
    if wanted == "amp":
        return Precision("cuda", "float32", half, half == "bfloat16", half == "float16", note)
    if wanted == "bf16" and bf16_ok:
        return Precision("cuda", "bfloat16", "bfloat16", True, False, None)
    # fp16, or bf16 on a GPU without bfloat16
    if method == "full":
        note = (note + "; " if note else "") + (
            "full fine-tuning in float16 needs fp32 master weights for the loss scaler: "
            "weights stay fp32 with float16 autocast"
        )
        return Precision("cuda", "float32", "float16", False, True, note)
    return Precision("cuda", "float16", "float16", False, True, note)


# -- loading --------------------------------------------------------------------------------------


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def _hub_kwargs(plan: Plan, path: str) -> dict:
    kwargs = {"trust_remote_code": bool(plan.model.trust_remote_code)}
    if plan.model.revision and not Path(path).is_dir():
        kwargs["revision"] = plan.model.revision
    return kwargs


def load_tokenizer(plan: Plan, model_name: str | None = None):
    """The tokenizer of the plan's model (or of `model_name`), with a pad token set.

    An adapter directory without its own tokenizer files uses its base model's.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name or plan.model.name)
    base = base_of_adapter(path)
    if base is not None and not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        path = resolve_model_path(base)
    tokenizer = AutoTokenizer.from_pretrained(path, **_hub_kwargs(plan, path))
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss; reusing EOS (or UNK) as the pad id is the
        # usual choice for decoder-only models that ship without one.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def scaled_config(plan: Plan, path: str):
    """The model's config with the plan's RoPE scaling applied, or None when the plan needs none.

    Refuses (TunewiseError naming the setting, `advisor.specs.check_context`, the planner's own words) a
    sequence longer than the model's window without scaling, scaling on a model without rotary positions, and a
    factor too small for the sequence. transformers 5 reads RoPE from `config.rope_parameters` (rope_type,
    rope_theta, factor; YaRN also original_max_position_embeddings): linear and YaRN stretch the window, so
    max_position_embeddings grows by the factor; dynamic NTK keeps it as the base its frequencies grow from."""
    from transformers import AutoConfig

    from advisor.specs import check_context

    config = AutoConfig.from_pretrained(path, **_hub_kwargs(plan, path))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "max_position_embeddings", None)
    if not isinstance(window, int):
        return None
    params = getattr(text, "rope_parameters", None)
    rotary = isinstance(params, dict) and bool(params)
    factor = check_context(plan.model.name, window, plan.training.seq_len, plan.training.rope_scaling,
                           plan.training.rope_factor, rotary=rotary)
    if factor is None:
        return None
    if any(isinstance(value, dict) for value in params.values()):
        raise TunewiseError(
            f"training.rope_scaling: {plan.model.name} has RoPE parameters per layer type, which Tunewise does not "
            "scale: set training.rope_scaling to none and training.seq_len within its window", field="training.rope_scaling")
    scaled = {**params, "rope_type": plan.training.rope_scaling, "factor": float(factor)}
    if plan.training.rope_scaling == "yarn":
        scaled["original_max_position_embeddings"] = window
    text.rope_parameters = scaled
    if plan.training.rope_scaling in ("linear", "yarn"):
        text.max_position_embeddings = int(window * factor)
    return config


def quantization_config(plan: Plan, precision: Precision):
    """QLoRA's BitsAndBytesConfig (NF4 + optional double quantization, or LLM.int8), or None for full/LoRA."""
    if plan.method.method != "qlora":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise TunewiseError(
            "QLoRA needs bitsandbytes: pip install bitsandbytes (or choose method lora)", field="method.method"
        ) from None
    import torch

    if plan.method.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=bool(plan.method.double_quant),
        bnb_4bit_compute_dtype=getattr(torch, precision.compute_dtype),
        # FSDP shards parameters of one dtype: the packed 4-bit weights must be stored in the
        # compute dtype for that (QLoRA + FSDP); uint8 otherwise.
        bnb_4bit_quant_storage=getattr(torch, precision.compute_dtype) if plan.hardware.shard != "none" else torch.uint8,
    )


def lora_config(plan: Plan, kind: str = "causal_lm"):
    """PEFT LoraConfig from the plan: rank, alpha (default 2 x rank), targets (or all-linear), dropout, DoRA."""
    from peft import LoraConfig, TaskType

    targets = list(plan.method.lora_targets)
    target_modules: str | list[str] = "all-linear" if targets == ["all-linear"] else targets
    return LoraConfig(
        r=plan.method.lora_rank,
        lora_alpha=plan.method.alpha,
        lora_dropout=plan.method.lora_dropout,
        target_modules=target_modules,
        use_dora=plan.method.use_dora,
        bias="none",
        task_type=TaskType.SEQ_CLS if kind == "seq_cls" else TaskType.CAUSAL_LM,
    )


def _enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA on a frozen base) without
    # forcing requires_grad on the embeddings.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


def load_model(
    plan: Plan,
    kind: str = "causal_lm",
    trainable: bool = True,
    *,
    model_name: str | None = None,
    num_labels: int = 1,
    adapters: bool = True,
    notify: Callable[[str], None] | None = None,
):
    """Load the plan's model (or `model_name`) ready to train or to serve as a frozen reference.

    kind: "causal_lm" (AutoModelForCausalLM) or "seq_cls" (AutoModelForSequenceClassification
    with `num_labels` outputs: reward and value models).

    trainable=True applies the method: full trains every weight; lora wraps the
    model in fresh LoRA adapters; qlora loads the base quantized (4-bit NF4 or
    8-bit), runs `prepare_model_for_kbit_training`, then adds LoRA adapters.
    Gradient checkpointing is switched on when the plan asks for it.
    trainable=False returns the model in eval mode with gradients off (a
    reference or reward model), still quantized under qlora.

    adapters=False (the preference stages): no LoRA adapters and no gradient
    checkpointing here, only QLoRA's quantized base and its k-bit preparation.
    The stage hands LoRA to TRL as a `peft_config` and TRL switches gradient
    checkpointing on from its config, so TRL wraps a bare base and computes the
    reference with the adapter disabled (no second copy, no "ref" adapter).

    A PEFT adapter directory (a previous LoRA stage's output) is loaded onto its
    base; on a 16-bit base the adapter is merged first, so new adapters (or full
    training) start from the tuned weights; on a quantized base it cannot be
    merged, so it stays attached and, when trainable, keeps training.

    `notify(message)` receives notes on choices made (precision on the CPU, ...).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    say = notify or (lambda message: None)
    precision = resolve_precision(plan)
    path = resolve_model_path(model_name or plan.model.name)
    adapter_dir = None
    base = base_of_adapter(path)
    if base is not None:
        adapter_dir, path = path, resolve_model_path(base)

    quant = quantization_config(plan, precision)
    kwargs = dict(_hub_kwargs(plan, path))
    config = scaled_config(plan, path)
    if config is not None:
        if kind == "seq_cls":
            config.num_labels = num_labels
        kwargs["config"] = config
        say(f"RoPE scaling {plan.training.rope_scaling} x{config.get_text_config().rope_parameters['factor']:g}: the "
            f"window is now {config.get_text_config().max_position_embeddings} positions (an adapter trained here "
            "expects the same rope_parameters on its base)")
    kwargs["dtype"] = precision.torch_dtype
    kwargs["attn_implementation"] = plan.method.attn
    if quant is not None:
        kwargs["quantization_config"] = quant
        # Quantized weights must be placed at load time: on this process's GPU, or the CPU.
        kwargs["device_map"] = {"": f"cuda:{_local_rank()}" if precision.device == "cuda" else "cpu"}
    if kind == "seq_cls":
        if config is None:
            kwargs["num_labels"] = num_labels
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    model = auto.from_pretrained(path, **kwargs)
    if kind == "seq_cls" and model.config.pad_token_id is None:
        tokenizer = load_tokenizer(plan, model_name=path)
        model.config.pad_token_id = tokenizer.pad_token_id

    if adapter_dir is not None:
        from peft import PeftModel

        if quant is None:
            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
            say(f"merged the adapter {adapter_dir} into its base {path} before training")
        else:
            keep_training = trainable and plan.method.method in ("lora", "qlora")
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=keep_training)
            say(f"loaded the adapter {adapter_dir} on a quantized base; it cannot be merged, so it "
                + ("keeps training" if keep_training else "stays attached"))
            if keep_training:
                if quant is not None and plan.method.gradient_checkpointing:
                    _enable_gradient_checkpointing(model)
                return model

    if not trainable:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    if quant is not None:
        from peft import prepare_model_for_kbit_training

        # Casts norms/embeddings to fp32 for stability and freezes the quantized base.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.method.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if not adapters:
        return model
    if plan.method.method == "full":
        if plan.method.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        return model
    from peft import get_peft_model

    if quant is None and plan.method.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    model = get_peft_model(model, lora_config(plan, kind))
    if plan.method.gradient_checkpointing:
        model.config.use_cache = False
    return model


def trainable_parameters(model) -> dict:
    """Counts for the `started`-style summaries: trainable and total parameters (4-bit weights counted once each)."""
    trainable = 0
    total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        # bitsandbytes packs two 4-bit weights per uint8 element.
        if getattr(parameter, "quant_state", None) is not None or parameter.__class__.__name__ == "Params4bit":
            count *= 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return {"trainable_params": trainable, "total_params": total}
