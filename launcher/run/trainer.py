"""Ray Train's TorchTrainer as a launch runs it: without the helper actors that serve what tunefleet does not use.

Besides its controller and the workers, Ray Train always starts helpers for features of its own:

- a placement-group cleaner, which asks Ray's State API every second whether the controller still lives. A Ray
  without a dashboard (the embedded one, by default) has no State API: each ask failed and logged a warning
  (44 lines in launch.log for a 40-step launch; the cleaner took 0.011 core beside two CPU ranks).
- a dataset manager, which splits Ray Datasets among the workers. tunefleet passes none (the workers read the
  token arrays the driver prepared), yet the actor started, importing Ray Data, while the ranks started.
- an autoscaling coordinator, which forwards the worker group's resource request to the cluster autoscaler. The
  controller waits for it (up to 5 s) before it starts the workers; an embedded Ray has no autoscaler to ask.
  An elastic worker group (`parallelism.min_workers`) keeps it: it sizes the group from what the coordinator
  reserved.

Each helper is a Ray worker process started at launch (Python, Ray and its libraries imported: CPU the ranks'
start-up does not get) and polled by Ray while the run trains (~0.007 core each beside two CPU ranks). Where
Ray renames a hook, the helper simply stays (the unit tests say so).
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

# Ray Train's default callbacks that a launch leaves out, and when.
STATE_API_CLEANER = "PlacementGroupCleanerCallback"
DATASETS = "DatasetsCallback"


class FixedSizeWithoutAutoscaler(FixedScalingPolicy):
    """Ray Train's fixed-size policy, minus the resource requests to a cluster autoscaler (there is none)."""

    def after_controller_start(self, train_run_context) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _maybe_send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass


def trainer_class(*, state_api: bool, autoscaler: bool) -> type[TorchTrainer]:
    """A TorchTrainer without the dataset manager; without the placement-group cleaner unless the cluster
    serves the State API (``state_api``); without the autoscaling coordinator for a fixed-size group on a
    cluster that has no autoscaler (``autoscaler``)."""

    class LaunchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            left_out = {DATASETS} if not self.datasets else set()
            if not state_api:
                left_out.add(STATE_API_CLEANER)
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in left_out]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            policy = controller_init_kwargs.get("scaling_policy")
            if not autoscaler and type(policy) is FixedScalingPolicy:
                controller_init_kwargs["scaling_policy"] = FixedSizeWithoutAutoscaler(policy.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return LaunchTrainer
