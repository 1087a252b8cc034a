"""The plan contract: defaults are valid, YAML round-trips, bad values name their field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from advisor.plan import FIELD_LIMITS, Limit, Plan, PlanError


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


# -- ranges: every number in a plan is finite and within a range no real run leaves ---------------------------

#: Numeric settings whose value is a choice, not a range.
CHOICES = {"method.quant_bits"}

#: The plan's groups of settings: {"training": TrainingSettings, ...}.
GROUPS = {f.name: type(f.default_factory()) for f in dataclasses.fields(Plan) if f.default_factory is not dataclasses.MISSING}


def _numeric_fields(kind: str):
    """(dotted name, field) of every plan setting annotated with `kind` (int or float)."""
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            if str(f.type).split(" ")[0] == kind:
                yield f"{group}.{f.name}", f


FLOAT_FIELDS = [dotted for dotted, _ in _numeric_fields("float")]
INT_FIELDS = [dotted for dotted, _ in _numeric_fields("int")]


def test_every_numeric_setting_has_a_range():
    assert FLOAT_FIELDS and INT_FIELDS
    missing = [d for d in FLOAT_FIELDS + INT_FIELDS if d not in FIELD_LIMITS and d not in CHOICES]
    assert not missing, f"settings without a range in FIELD_LIMITS: {missing}"
    for dotted in INT_FIELDS:
        if dotted not in CHOICES:
            assert FIELD_LIMITS[dotted].whole, dotted
    assert all(math.isfinite(limit.high) for limit in FIELD_LIMITS.values())


@pytest.mark.parametrize("dotted", FLOAT_FIELDS)
@pytest.mark.parametrize("text, value", [(".nan", math.nan), (".inf", math.inf), ("-.inf", -math.inf), ("1.0e+308", 1e308)])
def test_every_float_setting_refuses_nan_infinity_and_1e308(dotted, text, value, tmp_path):
    group, name = dotted.split(".")
    limit = FIELD_LIMITS[dotted]
    assert not (limit.low <= value <= limit.high)  # 1e308 is out of every float range too
    # From widgets and CLI flags (with_overrides, as a number and as the flag's text), from a YAML plan file,
    # and from Python (the dataclass itself).
    attempts = [lambda: Plan().with_overrides({dotted: value}), lambda: Plan().with_overrides({dotted: str(value)})]
    path = tmp_path / "plan.yaml"
    path.write_text(f"{group}:\n  {name}: {text}\n", encoding="utf-8")
    attempts.append(lambda: Plan.load(path))
    attempts.append(lambda: GROUPS[group](**{name: value}))
    for attempt in attempts:
        with pytest.raises(PlanError) as info:
            attempt()
        assert info.value.field == dotted and str(info.value).startswith(f"{dotted}: must be a number")


@pytest.mark.parametrize("dotted", sorted(FIELD_LIMITS))
def test_each_range_keeps_its_maximum_and_refuses_beyond_it(dotted):
    limit: Limit = FIELD_LIMITS[dotted]
    assert Plan().with_overrides({dotted: limit.high}).to_dict()[dotted.split(".")[0]][dotted.split(".")[1]] == limit.high
    beyond = [limit.high + 1 if limit.whole else limit.high * 1.5, 10**30, 10**19]
    if not limit.whole:
        beyond.append(1e308)
    for value in beyond:
        with pytest.raises(PlanError) as info:
            Plan().with_overrides({dotted: value})
        message = str(info.value)
        assert info.value.field == dotted and message.startswith(f"{dotted}: must be")
        assert " to " in message or "at most" in message, message  # the range is named


def test_hostile_integers_get_range_errors_not_memory_figures():
    with pytest.raises(PlanError, match=r"method\.lora_rank: must be a whole number from 1 to 16,384, got 10000000000000000000"):
        Plan().with_overrides({"method.lora_rank": 10**19})
    with pytest.raises(PlanError, match=r"training\.micro_batch: must be a whole number from 1 to 65,536"):
        Plan().with_overrides({"training.micro_batch": 1e30})  # a whole float, as a number box sends it
    with pytest.raises(PlanError, match=r"training\.learning_rate: must be a finite number"):
        Plan().with_overrides({"training.learning_rate": 10**400})  # too large to be a float at all
    with pytest.raises(PlanError, match=r"training\.seq_len: must be a whole number from 1 to 2,097,152, got a number with about"):
        Plan().with_overrides({"training.seq_len": 10**5000})
    # Big but real runs stay allowed.
    big = Plan().with_overrides({"training.seq_len": 1_048_576, "method.lora_rank": 4096, "training.micro_batch": 4096,
                                 "training.grad_accum": 100_000, "training.max_steps": 2_000_000, "hardware.num_gpus": 1024})
    assert big.training.seq_len == 1_048_576 and big.method.lora_rank == 4096


# -- one description per setting: the fields say everything the CLIs, the wizard and the planner need ----------


def _leaves(cls=Plan, prefix=""):
    """The dotted name of every leaf of the Plan dataclasses, read from the dataclasses themselves."""
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from _leaves(f.default_factory, f"{f.name}.")
        else:
            yield prefix + f.name


def test_every_plan_field_has_a_label_help_and_a_flag_or_a_reason_for_none():
    from advisor.plan import settings

    described = {s.dotted: s for s in settings()}
    assert list(described) == list(_leaves())  # every leaf, once, in declaration order
    problems = []
    for s in described.values():
        if not s.label.strip():
            problems.append(f"{s.dotted}: no label")
        if len(s.help.split()) < 2:
            problems.append(f"{s.dotted}: no help text (a docstring under the field)")
        if s.flag is None and len(s.no_flag.split()) < 3:
            problems.append(f"{s.dotted}: no flag, and no reason why not")
        if s.flag is not None and (not s.flag.startswith("--") or s.no_flag):
            problems.append(f"{s.dotted}: flag {s.flag!r} (and no_flag {s.no_flag!r})")
    assert not problems, "\n".join(problems)
    flags = [flag for s in described.values() for flag in (s.flag, *s.aliases) if flag]
    assert len(flags) == len(set(flags)), "two settings share a flag"
    assert len({s.name for s in described.values()}) == len(described), "two settings share a short name"
    # What the tests, the API and the messages rely on.
    assert described["method.lora_rank"].flag == "--lora-rank" and described["method.lora_rank"].label == "LoRA rank"
    assert described["hardware.num_gpus"].aliases == ("--gpus",)
    assert described["training.learning_rate"].help.startswith("Peak learning rate")


def test_choices_and_ranges_are_checked_from_the_field_descriptions():
    from advisor.plan import settings

    for s in settings():
        if s.choices:
            assert s.default in s.choices, s.dotted
            with pytest.raises(PlanError) as info:
                Plan().with_overrides({s.dotted: 3 if s.type is int else "no-such-choice"})
            assert info.value.field == s.dotted and "is not one of" in str(info.value)
        if s.limit is not None:
            assert FIELD_LIMITS[s.dotted] is s.limit
            assert s.default is None or s.limit.low <= s.default <= s.limit.high, s.dotted


def test_the_memory_setup_and_the_wizard_come_from_the_descriptions():
    from advisor import memory, wizard
    from advisor.plan import settings

    plan = Plan().with_overrides({"method.lora_rank": 8, "training.grad_accum": 3, "preference.max_new_tokens": 99})
    setup = memory.setup_from_plan(plan)
    assert (setup.lora_rank, setup.grad_accum, setup.generation_len) == (8, 3, 99)
    widgets = {s.name: s.dotted for s in settings() if s.widget}
    advanced = {s.name: s.dotted for s in wizard.ADVANCED_SETTINGS}
    assert wizard.PLAN_WIDGETS == {"goal": "stage", **widgets, **advanced}
    # every plan setting is on the page: a widget of its own, the Advanced group, or the goal / GPU / profile
    on_page = set(widgets.values()) | set(advanced.values()) | {"stage", "pipeline", "hardware.device",
                                                                "data.examples", "data.tokens"}
    assert {s.dotted for s in settings()} == on_page
    assert wizard.LABELS["training.micro_batch"] == "Micro-batch" and wizard.LABELS["hardware.num_gpus"] == "Number of GPUs"
    assert wizard.NUMBER_LIMITS["lora_rank"] == (1, FIELD_LIMITS["method.lora_rank"].high)
    assert wizard.NUMBER_LIMITS["max_steps"][0] == 0  # 0 on the page: run the epochs
