"""The registry that picks a strategy by name (``StrategyPlan.name``).

The built-in strategies are imported on first use, so that importing this module stays light (no
DeepSpeed). They do not import the registry: it names them, and ``register`` adds others.
"""

from __future__ import annotations

from tunefleet.strategies.base import Strategy, StrategyPlan

_REGISTERED: dict[str, type[Strategy]] = {}


def _builtin() -> dict[str, type[Strategy]]:
    from tunefleet.strategies.ddp import DDPStrategy
    from tunefleet.strategies.deepspeed import DeepSpeedZero2Strategy, DeepSpeedZero3Strategy
    from tunefleet.strategies.fsdp import FSDPStrategy

    return {cls.name: cls for cls in (DDPStrategy, FSDPStrategy, DeepSpeedZero2Strategy, DeepSpeedZero3Strategy)}


def _strategies() -> dict[str, type[Strategy]]:
    return {**_builtin(), **_REGISTERED}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available under ``cls.name``."""
    if cls.name in _strategies():
        raise ValueError(f"strategy {cls.name!r} registered twice")
    _REGISTERED[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_strategies())


def create(plan: StrategyPlan) -> Strategy:
    strategies = _strategies()
    try:
        cls = strategies[plan.name]
    except KeyError:
        raise ValueError(f"unknown strategy {plan.name!r}; choose one of {sorted(strategies)}") from None
    return cls(plan)
