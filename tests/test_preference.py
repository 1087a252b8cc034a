"""Preference stages on a tiny random Llama: reward model, DPO, PPO (and GRPO), and bad data.

What the issue asks, checked on real runs: the reward model beats chance on
held-out pairs; DPO's first logged loss is ln 2 and its rewards start at 0
(the policy equals the reference); the DPO KL estimate on policy samples is
exactly 0 at step 0 and then grows; PPO logs finite, non-negative KL and
rewards; a bad preference dataset is refused before training, naming the row;
pre-flight and the stage load the data the same way (what one refuses, the
other refuses with the same message; what one accepts, the other trains on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from advisor.errors import DatasetError
from advisor.plan import Plan
from conftest import build_tiny_model, tiny_plan_dict, write_tiny_datasets


def preference_plan(model_dir: Path, data_dir: Path, stage: str, overrides: dict | None = None) -> Plan:
    plan = Plan.from_dict(tiny_plan_dict(model_dir, data_dir))
    return plan.with_overrides({
        "stage": stage,
        "data.dataset": str(Path(data_dir) / "preference.jsonl"),
        "data.eval_fraction": 0.2,
        "training.max_steps": 4,
        "preference.sample_every": 2,
        "preference.num_samples": 4,
        "preference.max_new_tokens": 8,
        **(overrides or {}),
    })


def run_stage(run_dir: Path, setup: dict, stage: str, overrides: dict | None = None):
    """Run one stage in-process in `run_dir`; returns its events (the result is in run_dir/result.json)."""
    from trainer.context import RunContext
    from trainer.events import EventWriter, read_all_events
    from trainer.stages import get_stage

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = preference_plan(setup["model"], setup["data"], stage, overrides)
    plan.save(run_dir / "plan.yaml")
    ctx = RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))
    result = get_stage(stage)(ctx)
    (run_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return read_all_events(run_dir / "events.jsonl")


@pytest.fixture(scope="session")
def tiny_preference_setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pref")
    model = build_tiny_model(root / "model")
    data = root / "data"
    write_tiny_datasets(data)
    return {"model": model, "data": data, "root": root}


@pytest.fixture(scope="session")
def trained_reward_model(tiny_preference_setup) -> dict:
    run_dir = tiny_preference_setup["root"] / "rm-run"
    events = run_stage(run_dir, tiny_preference_setup, "rm", {"training.max_steps": 10})
    result = json.loads((run_dir / "result.json").read_text())
    return {"dir": run_dir, "events": events, "result": result}


# -- bad data --------------------------------------------------------------------------------------

def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad_row, words", [
    ({"prompt": "Which colour?", "chosen": "Red."}, ["line 3", "rejected", "missing"]),
    ({"prompt": "Which colour?", "chosen": "", "rejected": "Blue?"}, ["line 3", "chosen", "empty"]),
    ({"prompt": "   ", "chosen": "Red.", "rejected": "Blue?"}, ["line 3", "prompt", "empty"]),
])
def test_bad_preference_rows_are_named(tmp_path, tiny_preference_setup, bad_row, words):
    from trainer.data import load_preference_rows

    good = {"prompt": "Which colour is the sky?", "chosen": "Blue.", "rejected": "Green?"}
    path = _write(tmp_path / "bad.jsonl", [good, good, bad_row, good])
    plan = preference_plan(tiny_preference_setup["model"], tiny_preference_setup["data"], "dpo",
                           {"data.dataset": str(path)})
    with pytest.raises(DatasetError) as info:
        load_preference_rows(plan)
    message = str(info.value)
    for word in words:
        assert word in message, message


def test_dpo_refuses_bad_data_before_training(tmp_path, tiny_preference_setup):
    good = {"prompt": "Which colour is the sky?", "chosen": "Blue.", "rejected": "Green?"}
    path = _write(tmp_path / "bad.jsonl", [good, {"prompt": "Sky?", "chosen": "Blue."}, good])
    with pytest.raises(DatasetError, match="line 2.*rejected"):
        run_stage(tmp_path / "run", tiny_preference_setup, "dpo", {"data.dataset": str(path)})
    from trainer.events import read_all_events

    assert [e for e in read_all_events(tmp_path / "run" / "events.jsonl") if e["event"] == "log"] == []


# -- pre-flight checks what the stage loads -------------------------------------------------------------

def launch(run_dir: Path, plan: Plan) -> tuple[int, list[dict], float]:
    """Run `plan` through the training process's entry point, in this process: (exit code, events, seconds)."""
    import time

    import torch

    from trainer.events import read_all_events
    from trainer.runner import run

    run_dir.mkdir(parents=True)
    plan.save(run_dir / "plan.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        code = run(run_dir)
    finally:
        torch.set_num_threads(threads)
    return code, read_all_events(run_dir / "events.jsonl"), time.monotonic() - started


def stage_refusal(run_dir: Path, plan: Plan) -> str:
    """The DatasetError message the plan's stage gives by itself (no pre-flight check before it)."""
    from trainer.context import RunContext
    from trainer.events import EventWriter
    from trainer.stages import get_stage

    run_dir.mkdir(parents=True)
    ctx = RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))
    with pytest.raises(DatasetError) as info:
        get_stage(plan.stage)(ctx)
    return str(info.value)


#: (id, stage, dataset: a file of the tiny data or a hub name, whether the Hub is switched off (else unreachable)).
REFUSED_DATA = [
    ("dpo-on-messages", "dpo", "messages.jsonl", True),
    ("rm-on-prompt-completion", "rm", "prompt_completion.jsonl", True),
    ("ppo-on-plain-text", "ppo", "text.jsonl", True),
    ("dpo-on-hub-data-hub-off", "dpo", "someone/preference-pairs", True),
    ("ppo-on-hub-data-no-network", "ppo", "someone/preference-pairs", False),
]


@pytest.mark.parametrize("stage, dataset, hub_off", [case[1:] for case in REFUSED_DATA],
                         ids=[case[0] for case in REFUSED_DATA])
def test_preflight_refuses_in_seconds_what_the_stage_would_refuse(stage, dataset, hub_off, tmp_path,
                                                                   tiny_preference_setup, monkeypatch):
    from trainer import models

    if not hub_off:  # Hugging Face access allowed, but the Hub does not answer (no network here)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    name = str(tiny_preference_setup["data"] / dataset) if dataset.endswith(".jsonl") else dataset
    extra = {"preference.reward_model": str(tiny_preference_setup["model"])} if stage == "ppo" else {}
    plan = preference_plan(tiny_preference_setup["model"], tiny_preference_setup["data"], stage,
                           {"data.dataset": name, **extra})
    expected = stage_refusal(tmp_path / "stage", plan)

    code, events, seconds = launch(tmp_path / "run", plan)
    failed = events[-1]
    assert code == 2 and failed["event"] == "failed" and failed["user_error"] is True, failed
    assert failed["error"] == expected
    assert not [e for e in events if e["event"] in ("train_begin", "log", "model_loaded")]
    assert seconds < 30, seconds
    if "/" in dataset and not dataset.endswith(".jsonl"):
        assert "hub dataset, which needs the network" in expected
        assert ("HF_HUB_OFFLINE" in expected) is hub_off


@pytest.mark.parametrize("pipeline", ["rlhf", "dpo", "compare"])
def test_preflight_checks_a_pipelines_data_for_every_step(pipeline, tmp_path, tiny_preference_setup):
    """A pipeline's reward-model or DPO step needs pairs: chat data is refused before its SFT step trains."""
    plan = preference_plan(tiny_preference_setup["model"], tiny_preference_setup["data"], "sft",
                           {"pipeline": pipeline, "data.dataset": str(tiny_preference_setup["data"] / "messages.jsonl")})
    expected = stage_refusal(tmp_path / "stage", plan.with_overrides({"pipeline": "none",
                                                                      "stage": "rm" if pipeline != "dpo" else "dpo"}))
    code, events, seconds = launch(tmp_path / "run", plan)
    failed = events[-1]
    assert code == 2 and failed["event"] == "failed" and failed["error"] == expected, failed
    assert not [e for e in events if e["event"] in ("stage", "train_begin", "log", "model_loaded")]
    assert seconds < 30, seconds


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["messages.jsonl", "prompt_completion.jsonl"])
def test_ppo_trains_on_the_prompts_of_data_without_pairs(dataset, tmp_path, tiny_preference_setup):
    """Pre-flight accepts any data with prompts for PPO; so does the stage, which trains on them."""
    plan = preference_plan(tiny_preference_setup["model"], tiny_preference_setup["data"], "ppo",
                           {"data.dataset": str(tiny_preference_setup["data"] / dataset), "training.max_steps": 2,
                            "preference.reward_model": str(tiny_preference_setup["model"])})
    code, events, _ = launch(tmp_path / "run", plan)
    assert code == 0 and events[-1]["event"] == "finished", events[-1]
    logs = [e for e in events if e["event"] == "log" and "objective/kl" in e]
    assert len(logs) == 2 and all(math.isfinite(e["objective/scores"]) for e in logs)
    samples = [e for e in events if e["event"] == "sample"]
    # Held-out prompts are sampled; without pairs there is no held-out preference accuracy.
    assert samples and all(s["num_samples"] == 4 and "heldout_accuracy" not in s for s in samples)
    assert events[-1]["steps"] == 2 and events[-1]["heldout_accuracy"] is None


@pytest.mark.slow
def test_dpo_trains_on_a_hub_preference_dataset_when_the_hub_answers(tmp_path, tiny_preference_setup, monkeypatch):
    """The online path, with `datasets.load_dataset` replaced by a stand-in (tests never use the network):
    pre-flight and the stage both download the hub dataset, and it trains."""
    import importlib

    import datasets

    from trainer import models

    importlib.import_module("trainer.stages.dpo")  # TRL and transformers imported while the Hub is still off

    rows = [json.loads(line) for line in (tiny_preference_setup["data"] / "preference.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    plan = preference_plan(tiny_preference_setup["model"], tiny_preference_setup["data"], "dpo",
                           {"data.dataset": "someone/preference-pairs", "training.max_steps": 2})
    code, events, _ = launch(tmp_path / "run", plan)
    assert code == 0 and events[-1]["event"] == "finished", events[-1]
    assert calls == [("someone/preference-pairs", "train")] * 2  # pre-flight, then the stage
    assert len([e for e in events if e["event"] == "log" and "rewards/margins" in e]) == 2
    assert events[-1]["heldout_accuracy"] is not None  # 10 of the 48 pairs held out and measured


# -- reward model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_reward_model_beats_chance_and_loads_for_ppo(trained_reward_model, tiny_preference_setup):
    result = trained_reward_model["result"]
    events = trained_reward_model["events"]
    logs = [e for e in events if e["event"] == "log"]
    assert all("accuracy" in e and "margin" in e for e in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals and evals[-1]["eval_accuracy"] > 0.5  # 10 held-out pairs; chance is 0.5
    assert result["heldout_accuracy"] > 0.5 and result["heldout_pairs"] == 10

    from trainer.sources import merged_model_dir, resolve_model_source
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(str(trained_reward_model["dir"]), "preference.reward_model")
    merged = merged_model_dir(source, "seq_cls", trained_reward_model["dir"])
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


# -- DPO -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dpo_starts_at_ln2_and_its_sampled_kl_grows(tmp_path, tiny_preference_setup):
    events = run_stage(tmp_path / "dpo", tiny_preference_setup, "dpo", {"training.max_steps": 4})
    logs = [e for e in events if e["event"] == "log"]
    first = logs[0]
    assert abs(first["loss"] - math.log(2)) < 0.01
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in logs[-1]
    assert logs[-1]["rewards/margins"] > first["rewards/margins"]
    samples = [e for e in events if e["event"] == "sample"]
    assert [s["step"] for s in samples] == [0, 2, 4]
    assert samples[0]["kl"] == 0.0 and samples[0]["kl_sequence"] == 0.0 and samples[0]["kl_logratio"] == 0.0
    assert samples[-1]["kl"] > 0.0 and samples[-1]["kl_sequence"] > samples[0]["kl_sequence"]
    for key in ("reward", "distinct_1", "distinct_2", "entropy", "heldout_accuracy"):
        assert math.isfinite(samples[-1][key])
    assert samples[0]["reward_source"] == "implicit"
    result = json.loads((tmp_path / "dpo" / "result.json").read_text())
    assert result["status"] == "finished" and (Path(result["output_dir"]) / "adapter_config.json").is_file()


# -- PPO / GRPO ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ppo_logs_finite_nonnegative_kl_and_rewards(tmp_path, tiny_preference_setup, trained_reward_model,
                                                    monkeypatch):
    import trl.experimental.ppo as trl_ppo

    from advisor import memory, specs

    # Catch the models the stage really hands to PPOTrainer, to hold the planner to the same set.
    loaded = {}

    class Recording(trl_ppo.PPOTrainer):
        def __init__(self, *args, **kwargs):
            loaded.update({k: kwargs.get(k) for k in ("model", "ref_model", "reward_model", "value_model")})
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trl_ppo, "PPOTrainer", Recording)
    events = run_stage(tmp_path / "ppo", tiny_preference_setup, "ppo",
                       {"training.max_steps": 2, "preference.reward_model": str(trained_reward_model["dir"]),
                        "preference.adaptive_kl": True, "preference.target_kl": 0.01})
    logs = [e for e in events if e["event"] == "log" and "objective/kl" in e]
    assert len(logs) == 2
    for log in logs:
        for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "kl_coef"):
            assert isinstance(log[key], float) and math.isfinite(log[key]), key
        assert log["objective/kl"] >= 0.0
    # Ziegler et al.'s controller after step 1: coef x (1 + clip(KL / target - 1, +-0.2) x batch / 10000).
    error = max(-0.2, min(0.2, logs[0]["objective/kl"] / 0.01 - 1))
    assert logs[0]["kl_coef"] == 0.05
    assert logs[1]["kl_coef"] == pytest.approx(0.05 * (1 + error * 4 / 10000), rel=1e-9)
    samples = [e for e in events if e["event"] == "sample"]
    assert samples[0]["kl"] == 0.0 and samples[0]["reward_source"] == "reward_model"
    assert all(s["kl"] >= 0.0 and math.isfinite(s["reward"]) for s in samples)
    result = json.loads((tmp_path / "ppo" / "result.json").read_text())
    assert result["status"] == "finished" and result["steps"] == 2

    # The planner's PPO model set (LoRA) is what the stage loaded: the policy, no reference copy
    # (the adapter is disabled instead), a frozen sequence-classification reward model, and a value
    # model that is a second full sequence-classification copy carrying its own adapters.
    spec = specs.resolve_model(str(tiny_preference_setup["model"]))
    plan = preference_plan(tiny_preference_setup["model"], tiny_preference_setup["data"], "ppo")
    assert plan.method.method == "lora" and plan.method.precision == "fp32"
    estimate = memory.estimate(spec, memory.setup_from_plan(plan))
    def total(model):
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert loaded["ref_model"] is None and estimate.components["reference_model"] == 0
    assert total(loaded["model"]) == specs.param_counts(spec).total
    seq_cls = specs.param_counts(spec, head="seq_cls").total
    assert total(loaded["reward_model"]) == seq_cls
    assert estimate.components["reward_model"] == 4 * seq_cls  # fp32 on the CPU
    assert total(loaded["value_model"]) == seq_cls
    assert any("lora_" in n for n, _ in loaded["value_model"].named_parameters())
    assert estimate.components["value_model"] >= 4 * seq_cls  # its frozen base, plus adapters and activations


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_online_rl_uses_the_reward_model_and_logs_ppo_names(algorithm, tmp_path, tiny_preference_setup,
                                                            trained_reward_model):
    events = run_stage(tmp_path / algorithm, tiny_preference_setup, "ppo",
                       {"training.max_steps": 1, "preference.algorithm": algorithm, "preference.sample_every": 5,
                        "preference.reward_model": str(trained_reward_model["dir"])})
    logs = [e for e in events if e["event"] == "log" and "objective/scores" in e]
    assert logs, [e["event"] for e in events]
    for log in logs:
        assert math.isfinite(log["objective/scores"]) and log["objective/kl"] >= 0
        assert log["kl_coef"] == pytest.approx(0.05)  # beta = preference.kl_coef
    result = json.loads((tmp_path / algorithm / "result.json").read_text())
    assert result["status"] == "finished" and result["algorithm"] == algorithm


# -- a run that stops being numbers fails, in every stage ---------------------------------------------------

#: (id, stage, overrides, whether the poisoned model is the policy (else the reward model)). PPO starts from a
#: healthy policy and a reward model that scores NaN, so the NaN arrives through the rewards and the value model
#: (which starts from the reward model). GRPO and RLOO ignore NaN rewards by design (they count them as missing),
#: so there the policy itself is the broken model.
NON_FINITE_CASES = [
    ("rm", "rm", {}, True),
    ("dpo", "dpo", {}, True),
    ("ppo", "ppo", {"preference.algorithm": "ppo"}, False),
    ("grpo", "ppo", {"preference.algorithm": "grpo"}, True),
    ("rloo", "ppo", {"preference.algorithm": "rloo"}, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, overrides, poisoned_policy", [case[1:] for case in NON_FINITE_CASES],
                         ids=[case[0] for case in NON_FINITE_CASES])
def test_a_non_finite_loss_fails_every_stage_with_an_alert_and_no_output(stage, overrides, poisoned_policy, tmp_path,
                                                                          tiny_preference_setup, poisoned_model_dir):
    import torch

    from trainer.events import read_all_events
    from trainer.runner import run

    setup = {**tiny_preference_setup, "model": poisoned_model_dir if poisoned_policy else tiny_preference_setup["model"]}
    extra = {}
    if stage == "ppo":  # the online algorithms score with a reward model: the broken one, or a healthy one
        extra["preference.reward_model"] = str(tiny_preference_setup["model"] if poisoned_policy else poisoned_model_dir)
    plan = preference_plan(setup["model"], setup["data"], stage, {"training.max_steps": 3, "training.save_steps": 1,
                                                                  **extra, **overrides})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan.save(run_dir / "plan.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run(run_dir)
    finally:
        torch.set_num_threads(threads)
    events = read_all_events(run_dir / "events.jsonl")
    kinds = [event["event"] for event in events]
    assert code == 2 and kinds[-1] == "failed", events[-1]
    assert "finished" not in kinds and "stopped" not in kinds
    failed = events[-1]
    assert failed["user_error"] is True and "traceback" not in failed, failed
    assert "training diverged at step 1: " in failed["error"] and " is nan" in failed["error"], failed["error"]
    assert "lower the learning rate" in failed["error"]
    alerts = [event for event in events if event["event"] == "alert" and event.get("kind") == "non_finite"]
    assert len(alerts) == 1 and alerts[0]["step"] == 1 and alerts[0]["message"] == failed["error"]
    assert not (run_dir / "output").exists()
    assert not list((run_dir / "checkpoints").glob("checkpoint-*"))


def test_a_pipelines_preference_steps_train_at_their_own_rate(tmp_path):
    """`preference.learning_rate` reaches the DPO and PPO steps' TRL configs; SFT and the reward model keep the
    plan's learning rate (the advisor's preference rule sets it far lower, advisor.recommend)."""
    from trl import DPOConfig, RewardConfig

    from trainer.context import RunContext
    from trainer.events import EventWriter
    from trainer.training_args import trl_args

    base = Plan.from_dict({"training": {"learning_rate": 1e-3}, "preference": {"learning_rate": 2e-6},
                           "hardware": {"device": "cpu"}, "method": {"precision": "fp32"}})

    def rate(stage: str, config_cls) -> float:
        ctx = RunContext(plan=base.with_overrides({"stage": stage}), run_dir=tmp_path, events=EventWriter(tmp_path / "e"))
        return trl_args(ctx, False, config_cls)["learning_rate"]

    assert rate("dpo", DPOConfig) == 2e-6 and rate("ppo", DPOConfig) == 2e-6
    assert rate("rm", RewardConfig) == 1e-3
    unset = RunContext(plan=Plan.from_dict({"stage": "dpo", "training": {"learning_rate": 1e-3}}), run_dir=tmp_path,
                       events=EventWriter(tmp_path / "e"))
    assert trl_args(unset, False, DPOConfig)["learning_rate"] == 1e-3
