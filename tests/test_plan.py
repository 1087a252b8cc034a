"""The plan contract: defaults are valid, YAML round-trips, bad values name their field."""

from __future__ import annotations

import pytest

from advisor.plan import Plan, PlanError


def test_default_plan_round_trips_through_yaml(tmp_path):
    plan = Plan()
    path = plan.save(tmp_path / "plan.yaml")
    assert Plan.load(path) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def test_overrides_coerce_strings_from_flags_and_widgets():
    plan = Plan().with_overrides(
        {
            "stage": "dpo",
            "training.max_steps": "30",
            "training.learning_rate": "1e-4",
            "method.lora_targets": "q_proj, v_proj",
            "method.double_quant": "false",
            "forgetting.replay_fraction": None,  # an unset flag changes nothing
        }
    )
    assert plan.stage == "dpo"
    assert plan.training.max_steps == 30
    assert plan.training.learning_rate == pytest.approx(1e-4)
    assert plan.method.lora_targets == ("q_proj", "v_proj")
    assert plan.method.double_quant is False
    assert plan.forgetting.replay_fraction == 0.0


def test_alpha_defaults_to_twice_the_rank():
    assert Plan().with_overrides({"method.lora_rank": 8}).method.alpha == 16.0
    assert Plan().with_overrides({"method.lora_rank": 8, "method.lora_alpha": 8}).method.alpha == 8.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"method.lora_rank": 0}, "method.lora_rank"),
        ({"method.lora_rank": -4}, "method.lora_rank"),
        ({"training.learning_rate": -1e-4}, "training.learning_rate"),
        ({"training.learning_rate": 0}, "training.learning_rate"),
        ({"training.micro_batch": 0}, "training.micro_batch"),
        ({"training.seq_len": "long"}, "training.seq_len"),
        ({"method.method": "prefix"}, "method.method"),
        ({"method.optimizer": "adam9000"}, "method.optimizer"),
        ({"hardware.num_gpus": 0}, "hardware.num_gpus"),
        ({"hardware.num_gpus": "many"}, "hardware.num_gpus"),
        ({"hardware.cpu_offload": True}, "hardware.cpu_offload"),
        ({"preference.beta": 0}, "preference.beta"),
        ({"forgetting.replay_fraction": 0.9}, "forgetting.replay_fraction"),
        ({"stage": "pretrain"}, "stage"),
        ({"training.learnign_rate": 1e-4}, "training.learnign_rate"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides, field):
    with pytest.raises(PlanError) as info:
        Plan().with_overrides(overrides)
    assert info.value.field == field
    assert field in str(info.value)


def test_plan_file_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("stage: sft\ntraining:\n  lr: 0.001\n", encoding="utf-8")
    with pytest.raises(PlanError, match=r"training\.lr: is not a known setting.*learning_rate"):
        Plan.load(path)


def test_plan_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(PlanError, match="mapping"):
        Plan.load(path)
    path.write_text("stage: [unclosed\n", encoding="utf-8")
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.load(path)


def test_qlora_needs_16_bit_compute():
    with pytest.raises(PlanError, match="method.precision"):
        Plan().with_overrides({"method.method": "qlora", "method.precision": "fp32"})
