"""The forgetting monitor, replay buffer and EWC (trainer/forgetting.py) on a tiny model.

The tiny model is first taught the "original domain" (sentences about things
living near coloured hills) so that its baseline loss there is low and
forgetting is measurable; then it is fine-tuned on the colour-question task.
A full fine-tune at a high learning rate must trip the alert (and stop the run
when asked); a LoRA run at a low learning rate must stay quiet. EWC's penalty
must count once per optimizer step under gradient accumulation, in SFT and DPO.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advisor.errors import DatasetError
from advisor.plan import Plan
from conftest import _COLOURS, _THINGS, build_tiny_model, tiny_plan_dict

ORIGINAL_TEXTS = [f"The {t} lives in a small town near the {c} hills." for t in _THINGS for c in _COLOURS]


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """The tiny Llama after a short pretraining on ORIGINAL_TEXTS (its "original knowledge")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.forgetting import make_batches

    directory = build_tiny_model(tmp_path_factory.mktemp("pretrained"))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = make_batches(tokenizer, ORIGINAL_TEXTS, 64, 16)
    for _ in range(25):
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from conftest import write_tiny_datasets

    directory = tmp_path_factory.mktemp("forgetting-data")
    write_tiny_datasets(directory)
    (directory / "original.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ORIGINAL_TEXTS))
    return directory


def make_plan(model_dir: Path, data_dir: Path, overrides: dict) -> Plan:
    base = Plan.from_dict(tiny_plan_dict(model_dir, data_dir))
    return base.with_overrides(
        {"forgetting.monitor": True, "forgetting.max_eval_examples": 16, "forgetting.eval_every": 2, **overrides}
    )


def train(plan: Plan, run_dir: Path):
    """Run `plan` through the training process's entry point, in this process; return (terminal event, events)."""
    from trainer.events import read_all_events
    from trainer.runner import run

    run_dir.mkdir(parents=True, exist_ok=True)
    plan.save(run_dir / "plan.yaml")
    assert run(run_dir) == 0, read_all_events(run_dir / "events.jsonl")[-1]
    events = read_all_events(run_dir / "events.jsonl")
    return events[-1], events


def of_kind(events, kind):
    return [e for e in events if e["event"] == kind]


HIGH_LR_FULL = {
    "method.method": "full",
    "training.learning_rate": 3e-2,
    "training.max_steps": 20,
    "forgetting.threshold_pct": 50.0,
}


@pytest.mark.slow
def test_monitor_alerts_and_stops_a_run_that_forgets(pretrained_dir, data_dir, tmp_path):
    plan = make_plan(pretrained_dir, data_dir, {**HIGH_LR_FULL, "forgetting.stop_on_threshold": True})
    result, events = train(plan, tmp_path / "run")

    measured = of_kind(events, "forgetting")
    baseline = measured[0]
    assert baseline["step"] == 0 and baseline["degradation_pct"] == 0.0
    keys = {"baseline_loss", "loss", "perplexity", "degradation_pct", "threshold_pct", "eval_ms"}
    assert all(keys <= set(e) for e in measured)
    assert all(e["baseline_loss"] == baseline["loss"] for e in measured)
    assert [e["step"] for e in measured[1:]] == list(range(2, 2 * len(measured), 2))

    alerts = of_kind(events, "alert")
    assert len(alerts) == 1 and alerts[0]["kind"] == "forgetting" and alerts[0]["action"] == "stop"
    assert alerts[0]["degradation_pct"] > 50.0 and "50%" in alerts[0]["message"]
    stop_step = alerts[0]["step"]
    # Stopped early, at the measurement that crossed the threshold, with a checkpoint saved there.
    assert stop_step < 20 and measured[-1]["step"] == stop_step and measured[-1]["degradation_pct"] > 50.0
    assert result["event"] == "stopped" and result["reason"] == "forgetting threshold exceeded"
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{stop_step}").is_dir()


@pytest.mark.slow
def test_monitor_stays_quiet_on_a_gentle_qlora_run_with_ewc(pretrained_dir, data_dir, tmp_path):
    # QLoRA: the monitor evaluates a 4-bit PEFT model; EWC anchors the adapters only.
    plan = make_plan(
        pretrained_dir,
        data_dir,
        {
            "method.method": "qlora",
            "method.precision": "bf16",
            "training.learning_rate": 1e-4,
            "training.max_steps": 5,
            "forgetting.stop_on_threshold": True,
            "forgetting.ewc_lambda": 1.0,
            "forgetting.ewc_batches": 2,
        },
    )
    result, events = train(plan, tmp_path / "run")
    measured = of_kind(events, "forgetting")
    # Baseline, steps 2 and 4, and a final measurement at step 5.
    assert [e["step"] for e in measured] == [0, 2, 4, 5] and measured[-1]["final"] is True
    assert all(abs(e["degradation_pct"]) < 5.0 for e in measured)
    assert of_kind(events, "alert") == [] and result["event"] == "finished"
    ewc = of_kind(events, "ewc")[0]
    loaded = of_kind(events, "model_loaded")[0]
    assert ewc["parameters"] == loaded["trainable_params"] and ewc["batches"] == 2
    assert measured[-1]["ewc_penalty"] > 0


def test_replay_mixes_the_requested_share_of_unseen_rows(data_dir):
    from datasets import Dataset

    from trainer.forgetting import mix_replay, replay_count, split_original

    settings = make_plan(data_dir, data_dir, {"forgetting.replay_fraction": 0.1}).forgetting
    split = split_original(settings, seed=0)
    # The monitor's held-out rows and the replay pool are disjoint and cover the file.
    assert len(split.monitor) == 16 and len(split.pool) == 48
    assert not set(split.monitor) & set(split.pool)

    train_rows = Dataset.from_list([{"text": f"task example {i}"} for i in range(90)])
    mixed, details = mix_replay(train_rows, split.pool, 0.1, seed=0)
    assert replay_count(90, 0.1) == 10 and details["rows"] == 10 and len(mixed) == 100
    replayed = mixed["text"][90:]
    assert len(set(replayed)) == 10 and set(replayed) <= set(split.pool)
    assert mix_replay(train_rows, split.pool, 0.1, seed=0)[0]["text"] == mixed["text"]  # seeded
    assert mix_replay(train_rows, split.pool, 0.1, seed=1)[0]["text"] != mixed["text"]

    chat = Dataset.from_list([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 45)
    mixed_chat, details = mix_replay(chat, split.pool, 0.1, seed=0)
    assert details["rows"] == 5 and len(mixed_chat) == 50
    assert mixed_chat[49]["messages"][0]["role"] == "assistant" and mixed_chat[49]["messages"][0]["content"] in split.pool


def test_missing_original_data_names_the_setting(data_dir, tmp_path):
    from trainer.forgetting import split_original

    settings = make_plan(data_dir, data_dir, {"forgetting.original_data": str(tmp_path / "nope.jsonl")}).forgetting
    with pytest.raises(DatasetError, match="forgetting.original_data"):
        split_original(settings, seed=0)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_distance(pretrained_dir, data_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.forgetting import EWC, make_batches

    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    model = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    ewc = EWC(1.0, make_batches(tokenizer, ORIGINAL_TEXTS[:8], 64, 4), "fp32", tmp_path / "ewc_state.pt")
    stats = ewc.prepare(model, resume=False)
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())
    assert stats["fisher_mean"] > 0 and stats["batches"] == 2
    assert all(p.grad is None for p in model.parameters())
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    # Every weight moved by 0.01 and the Fisher is normalised to mean 1, so the
    # penalty is lambda / 2 * (number of weights) * 0.01^2.
    expected = 0.5 * stats["parameters"] * 1e-4
    assert ewc.penalty(model).item() == pytest.approx(expected, rel=1e-3)
    penalty = ewc.penalty(model)
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # A resumed run reloads the same anchor rather than re-anchoring at the moved weights.
    again = EWC(1.0, [], "fp32", tmp_path / "ewc_state.pt")
    assert again.prepare(model, resume=True)["reloaded"] is True
    assert again.penalty(model).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_ewc_and_replay_reduce_forgetting(pretrained_dir, data_dir, tmp_path):
    overrides = {**HIGH_LR_FULL, "training.max_steps": 12, "forgetting.eval_every": 12, "forgetting.threshold_pct": 1e6}
    worst = {}
    for name, extra in {
        "plain": {},
        "ewc": {"forgetting.ewc_lambda": 1.0},
        "replay": {"forgetting.replay_fraction": 0.3},
    }.items():
        _, events = train(make_plan(pretrained_dir, data_dir, {**overrides, **extra}), tmp_path / name)
        worst[name] = of_kind(events, "forgetting")[-1]["degradation_pct"]
        if name == "ewc":
            assert of_kind(events, "ewc")[0]["parameters"] > 0
            assert of_kind(events, "forgetting")[-1]["ewc_penalty"] > 0
            # Each logged step carries the penalty too (the chart can show it beside the loss).
            assert all("ewc_penalty" in e for e in of_kind(events, "log") if "loss" in e)
            assert of_kind(events, "log")[-1]["ewc_penalty"] > 0
        if name == "replay":
            assert of_kind(events, "replay")[0]["rows"] > 0
    print("degradation %", worst)
    assert worst["plain"] > 50.0
    assert worst["ewc"] < worst["plain"] and worst["replay"] < worst["plain"], worst


# -- EWC under gradient accumulation -------------------------------------------------------------------

def _trained_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "output" / "model.safetensors")


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[name].double() - b[name].double()).pow(2).sum()) for name in a) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_ewc_penalty_counts_once_per_optimizer_step_with_gradient_accumulation(stage, tmp_path, data_dir):
    """Two accumulated micro-batches of 2 must train exactly like one batch of 4, penalty included.

    Plain SGD without clipping makes an optimizer step linear in the summed gradient, and a Fisher
    estimated on identical texts is the same whatever the micro-batch size, so the only difference
    a wrong rule can make is the penalty's weight. Counted on both micro-batches without being
    divided (SFT's loss is already normalised over the accumulated batch, so the penalty must be
    divided there; TRL's DPO loss is a per-batch mean, which the Trainer divides itself), the
    penalty weighs twice and the weights go where a batch of 4 with twice the ewc_lambda goes;
    divided twice, half as far the other way. So the accumulated run must sit far closer to the
    batch of 4 at the same lambda than that one sits to the batch of 4 at twice the lambda.
    """
    from conftest import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model")
    same_text = tmp_path / "same-text.jsonl"
    same_text.write_text((json.dumps({"text": ORIGINAL_TEXTS[0]}) + "\n") * 16, encoding="utf-8")
    common = {
        "method.method": "full",
        "method.optimizer": "sgd",
        # The largest normalised Fisher entry is about 900 here: lr x lambda x 900 stays below 1, so the
        # penalty pulls the weights back without overshooting.
        "training.learning_rate": 0.05,
        "training.max_grad_norm": 1e6,
        "training.max_steps": 4,
        "forgetting.monitor": False,
        "forgetting.original_data": str(same_text),
        "forgetting.ewc_batches": 2,
    }
    if stage == "dpo":
        common.update({"stage": "dpo", "data.dataset": str(data_dir / "preference.jsonl"),
                       "preference.sample_every": 100, "preference.num_samples": 1, "preference.max_new_tokens": 4})
    shapes = {
        "accumulated": {"training.micro_batch": 2, "training.grad_accum": 2, "forgetting.ewc_lambda": 0.01},
        "whole": {"training.micro_batch": 4, "training.grad_accum": 1, "forgetting.ewc_lambda": 0.01},
        "whole_doubled": {"training.micro_batch": 4, "training.grad_accum": 1, "forgetting.ewc_lambda": 0.02},
    }
    weights = {}
    for name, shape in shapes.items():
        plan = Plan.from_dict(tiny_plan_dict(model_dir, data_dir)).with_overrides({**common, **shape})
        result, events = train(plan, tmp_path / name)
        assert result["event"] == "finished", result
        assert of_kind(events, "log")[-1]["ewc_penalty"] > 0
        weights[name] = _trained_weights(tmp_path / name)
    twice_the_penalty = _distance(weights["whole"], weights["whole_doubled"])
    assert twice_the_penalty > 1e-3  # the penalty moves the weights measurably (runs agree to ~1e-7)
    assert _distance(weights["accumulated"], weights["whole"]) < 0.01 * twice_the_penalty


def test_a_real_model_is_never_probed_or_replayed_on_the_demo_text(pretrained_dir, data_dir, tmp_path):
    """Any model but the demo: the demo's invented-world text turns the monitor off with a note saying how to
    give general text, and replay or EWC on it are refused before training (never trained on the demo's towns)."""
    from trainer.events import read_all_events
    from trainer.runner import run

    plan = make_plan(pretrained_dir, data_dir, {"forgetting.original_data": "demo-original", "training.max_steps": 2})
    final, events = train(plan, tmp_path / "monitor")
    assert final["event"] == "finished" and not of_kind(events, "forgetting")
    (note,) = [e for e in of_kind(events, "note") if "forgetting monitor is off" in e["message"]]
    assert "--original-data" in note["message"] and "invented-world" in note["message"]

    for dotted, value in (("forgetting.replay_fraction", 0.05), ("forgetting.ewc_lambda", 1.0)):
        run_dir = tmp_path / dotted.split(".")[1]
        run_dir.mkdir()
        plan.with_overrides({dotted: value}).save(run_dir / "plan.yaml")
        assert run(run_dir) == 2
        failed = read_all_events(run_dir / "events.jsonl")[-1]
        assert failed["event"] == "failed" and failed["field"] == dotted and "demo's invented-world" in failed["error"]
        assert not [e for e in read_all_events(run_dir / "events.jsonl") if e["event"] in ("model_loaded", "log")]
