"""The Strategy interface, and the frozen plan a strategy is built from.

A strategy owns how the model and optimizer are distributed: it wraps or shards
the model, runs backward, suppresses gradient sync on non-final micro-steps,
clips and steps the optimizer, saves and loads its state, and exports full
weights. The training loop calls nothing else, so every strategy trains with
the same loop. Strategies know nothing of Ray: they see an initialized
``torch.distributed`` process group and a frozen ``StrategyPlan``.

Loss convention (every strategy relies on it): the loop hands ``backward`` a
loss already normalized so that *averaging gradients over ranks* gives the
gradient of the global-batch mean loss. Strategies therefore average gradients
across data-parallel ranks, as DDP does, and never rescale by accumulation.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
#: Optional key of a ``param_groups`` entry: the step at which its parameters, frozen
#: (``requires_grad`` False) until then, start to train (gradual unfreezing).
UNFREEZE_STEP = "unfreeze_step"


class StrategyPlan(BaseModel):
    """What a strategy needs to know about the layout and numerics; frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registry name of the strategy.")
    world_size: int = Field(ge=1)
    num_nodes: int = Field(ge=1)
    workers_per_node: int = Field(ge=1)
    use_gpu: bool = False
    micro_batch_size: int = Field(ge=1)
    grad_accum_steps: int = Field(ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    activation_checkpointing: bool = False
    compile: bool = False
    cpu_offload: bool = False
    hsdp: bool = False
    max_grad_norm: float | None = None
    deepspeed_overrides: dict = Field(default_factory=dict)

    @property
    def global_batch_rows(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def device_type(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def device(self) -> torch.device:
        """The device this rank trains (and evaluates) on: its current GPU, or the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.use_gpu else torch.device("cpu")


class Strategy(ABC):
    """One way of distributing a model; see the module docstring for the contract."""

    name: ClassVar[str]
    #: False when the method needs full parameters on every rank (e.g. 4-bit bases).
    shards_parameters: ClassVar[bool] = False

    def __init__(self, plan: StrategyPlan):
        self.plan = plan
        self.model: torch.nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # ------------------------------------------------------------ model building
    def model_init_context(self) -> contextlib.AbstractContextManager:
        """Context the model is built in (ZeRO-3 partitions parameters at load)."""
        return contextlib.nullcontext()

    @abstractmethod
    def setup(
        self,
        module: torch.nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
        param_groups: list[dict],
    ) -> None:
        """Wrap/shard ``module``, then build optimizer and scheduler over it.

        ``param_groups`` are torch optimizer groups over ``module``'s parameters
        (by object) *before* wrapping; a strategy that replaces parameters maps
        them to the wrapped ones by name.
        """

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The user's module (e.g. the PeftModel) without the strategy wrapper."""
        assert self.model is not None
        return getattr(self.model, "module", self.model)

    # ------------------------------------------------------------ training step
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self, enabled: bool) -> Iterator[None]:
        """Skip gradient synchronization inside when ``enabled`` (non-final micro-steps)."""
        yield

    @abstractmethod
    def optimizer_step(self) -> float | None:
        """Clip to ``plan.max_grad_norm``, step optimizer and scheduler, zero grads.

        Returns the global gradient norm before clipping (None if not computed).
        """

    # ------------------------------------------------------------ state
    @abstractmethod
    def save(self, path: str) -> None:
        """Collective: write model + optimizer + scheduler state under ``path``."""

    @abstractmethod
    def load(self, path: str) -> None:
        """Collective: restore what ``save`` wrote (any world size where supported)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded module state dict on rank 0 ({} elsewhere), on CPU."""

    def teardown(self) -> None:
        """Release what the strategy holds; the process group stays to the caller."""
        self.model = self.optimizer = self.scheduler = None
