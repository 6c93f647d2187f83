"""A strategy's state (model, optimizer, scheduler) saved and loaded with torch.distributed.checkpoint (DCP):
each rank writes its own shard, and a load reshards to the current world size. Used by ddp and fsdp;
DeepSpeed writes its own files.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)


def _app_state(model, optimizer, scheduler, options: StateDictOptions | None = None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict()}


def save_dcp(path: str, model, optimizer, scheduler) -> None:
    """Collective: each rank writes its shard of model/optimizer; scheduler rides along."""
    dcp.save(_app_state(model, optimizer, scheduler), checkpoint_id=path)


class BackgroundSaver:
    """DCP saves off the training thread, for one strategy.

    Both the copy of the state (staging, by one reused ``DefaultStager``) and
    the write run in the background, so the loop stalls only to start them.
    Until the copy is done the parameters and optimizer state must not change:
    ``wait_staged`` blocks until then, and strategies call it at the top of
    ``optimizer_step`` (forward and backward overlap with the copy).
    """

    def __init__(self):
        self._stager: DefaultStager | None = None
        self._staging: Future | None = None

    def save(self, path: str, model, optimizer, scheduler, group) -> Future:
        """Start a save on ``group`` (its own gloo group: sharing the training group makes gloo
        mismatch collectives); returns the future of the write."""
        self.wait_staged()
        if self._stager is None:
            on_gpu = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=True,
                use_non_blocking_copy=on_gpu,
            ))
        response = dcp.async_save(_app_state(model, optimizer, scheduler), checkpoint_id=path,
                                  process_group=group, async_stager=self._stager)
        self._staging = response.staging_completion
        return response.upload_completion

    def wait_staged(self) -> None:
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def close(self) -> None:
        self.wait_staged()
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def load_dcp(path: str, model, optimizer, scheduler) -> None:
    """Collective: load in place (DCP reshards to the current world size)."""
    state = _app_state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])


class AsyncSave:
    """Mixin for strategies whose state DCP writes (ddp, fsdp): checkpoints in the background.

    ``save_async`` returns once the save has started; see ``BackgroundSaver``.
    A strategy using it calls ``wait_staged()`` first thing in ``optimizer_step``.
    """

    _saver = None

    def save_async(self, path: str, group):
        """Collective on ``group``: start copying and writing the state; a future of the write."""
        if self._saver is None:
            self._saver = BackgroundSaver()
        return self._saver.save(path, self.model, self.optimizer, self.scheduler, group)

    def wait_staged(self) -> None:
        """Block until the last background save has copied the state (a no-op without one)."""
        if self._saver is not None:
            self._saver.wait_staged()

    def teardown(self) -> None:
        if self._saver is not None:
            self._saver.close()
            self._saver = None
        super().teardown()
