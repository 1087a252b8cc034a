"""One file per training stage; `STAGES` maps a plan's stage name to its `run` function.

Each stage module exposes `run(ctx: trainer.context.RunContext) -> dict`,
imported lazily here so that listing stages costs nothing.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "sft": "trainer.stages.sft",
    "rm": "trainer.stages.reward",
    "dpo": "trainer.stages.dpo",
    "ppo": "trainer.stages.ppo",
}


def get_stage(name: str):
    """The `run` function of stage `name` (sft, rm, dpo, ppo)."""
    if name not in _MODULES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).run
