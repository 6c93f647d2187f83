"""The TorchTrainer a launch runs (run/trainer.py): Ray Train's helper actors that serve nothing of tunefleet's are
left out, and only those. Each test first checks that Ray still has what is left out, so a Ray upgrade that renames
a hook fails here rather than silently keeping (or losing) a helper."""

from __future__ import annotations

import pytest
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

from tunefleet.launcher.run.trainer import (
    DATASETS,
    STATE_API_CLEANER,
    FixedSizeWithoutAutoscaler,
    trainer_class,
)


def callback_names(trainer_type) -> list[str]:
    trainer = trainer_type(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_the_dataset_manager_is_left_out_and_the_cleaner_only_without_a_state_api():
    ray_default = callback_names(TorchTrainer)
    assert STATE_API_CLEANER in ray_default and DATASETS in ray_default
    with_api = callback_names(trainer_class(state_api=True, autoscaler=True))
    without_api = callback_names(trainer_class(state_api=False, autoscaler=True))
    assert with_api == [name for name in ray_default if name != DATASETS]
    assert without_api == [name for name in ray_default if name not in (DATASETS, STATE_API_CLEANER)]


def test_a_trainer_given_ray_datasets_keeps_their_manager():
    trainer = trainer_class(state_api=True, autoscaler=True)(  # a dataset factory: what Ray calls per attempt
        lambda config: None, scaling_config=ScalingConfig(num_workers=1), datasets={"train": lambda: None})
    assert DATASETS in [type(c).__name__ for c in trainer._create_default_callbacks()]


@pytest.mark.parametrize("autoscaler", [False, True])
def test_a_fixed_size_group_skips_the_autoscaling_coordinator_only_without_an_autoscaler(monkeypatch, autoscaler):
    handed = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: handed.update(kwargs))
    config = ScalingConfig(num_workers=2)
    trainer = trainer_class(state_api=False, autoscaler=autoscaler)(lambda c: None, scaling_config=config)
    trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(config), other="kept")
    assert type(handed["scaling_policy"]) is (FixedScalingPolicy if autoscaler else FixedSizeWithoutAutoscaler)
    assert handed["scaling_policy"].scaling_config is config and handed["other"] == "kept"


def test_an_elastic_group_keeps_the_coordinator_it_sizes_itself_by(monkeypatch):
    handed = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kwargs: handed.update(kwargs))
    config = ScalingConfig(num_workers=(1, 2))
    elastic = ElasticScalingPolicy(config)
    trainer = trainer_class(state_api=False, autoscaler=False)(lambda c: None, scaling_config=config)
    trainer._initialize_and_run_controller(scaling_policy=elastic)
    assert handed["scaling_policy"] is elastic


def test_the_policy_without_autoscaler_decides_like_ray_and_never_makes_a_coordinator():
    overridden = ("after_controller_start", "_send_resource_request", "_maybe_send_resource_request",
                  "_cancel_resource_request")
    assert all(hasattr(FixedScalingPolicy, name) for name in overridden)
    policy = FixedSizeWithoutAutoscaler(ScalingConfig(num_workers=3))
    policy.after_controller_start(None)  # Ray's would create the coordinator actor here (no Ray is running)
    decision = policy.make_decision_for_non_running_worker_group()
    policy.before_controller_abort()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 3
    assert policy._coordinator_client is None
