"""The numerical core of online RL on small tensors written out by hand: GRPO group advantages, token
log-probs, KL estimators, the clipped surrogate (clipping, averaging, masking, gradients), entropy, GAE,
the value loss, explained variance and whitening."""

from __future__ import annotations

import math

import pytest
import torch

from tunefleet.launcher.model.inputs import IGNORE_INDEX
from tunefleet.launcher.objectives import policy_gradient, value
from tunefleet.launcher.objectives.policy_gradient import (
    clipped_policy_loss,
    completion_mask,
    count_units,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    policy_metrics,
    token_log_probs,
)
from tunefleet.launcher.objectives.value import (
    clipped_value_loss,
    explained_variance,
    gae,
    reward_at_last_token,
    whiten,
)

T = torch.tensor


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.detach().double(), torch.tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=0)


# --------------------------------------------------------------------------- group advantages
def test_group_advantages_use_the_bessel_corrected_std_of_each_group():
    result = group_advantages(T([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    std = math.sqrt(1 / 3)  # deviations +-0.5 over 4 rewards: 4 * 0.25 / (4 - 1); 0.5 if the std were biased
    a = 0.5 / (std + 1e-4)
    close(result.advantages, [-a, -a, a, a, 0.0, 0.0, 0.0, 0.0])
    close(result.group_std, [std, 0.0])
    assert result.zero_std_fraction == 0.5


def test_group_advantages_unscaled_only_centre():
    result = group_advantages(T([1.0, 2.0, 6.0, 3.0, 3.0, 3.0]), group_size=3, scale=False)
    close(result.advantages, [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    assert result.zero_std_fraction == 0.5


@pytest.mark.parametrize(("shape", "group_size"), [((6,), 4), ((4,), 1), ((2, 2), 2)])
def test_group_advantages_reject_partial_groups(shape, group_size):
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(shape), group_size)


# --------------------------------------------------------------------------- log-probs, KL, entropy
def test_token_log_probs_shift_and_gather():
    logits = T([[[0.0, 0.0, 0.0], [math.log(1), math.log(2), math.log(3)], [100.0, -100.0, 7.0]]],
               dtype=torch.bfloat16, requires_grad=True)
    tokens = T([[0, 1, 2]])  # token 0 is the prompt's first: never predicted
    logp = token_log_probs(logits, tokens)
    assert logp.dtype == torch.float32 and logp.shape == (1, 2)
    close(logp, [[-math.log(3), math.log(3 / 6)]], atol=1e-2)  # bf16 logits: log 3 is not exact
    logp.sum().backward()
    assert logits.grad is not None and logits.grad[0, 2].abs().sum() == 0  # the last position predicts nothing


def test_token_log_probs_equal_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11, generator=generator), torch.randint(0, 11, (3, 5), generator=generator)
    expected = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_log_probs(logits, tokens), expected)


def test_completion_mask_follows_ignored_labels():
    labels = T([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    close(completion_mask(labels), [[0.0, 1.0, 1.0, 0.0]])


def test_kl_estimators():
    logp, ref = T([-1.0, -2.0, -3.0]), T([-2.0, -1.0, -3.0])
    close(kl_penalty(logp, ref, "k1"), [1.0, -1.0, 0.0])
    close(kl_penalty(logp, ref, "k3"), [math.exp(-1), math.e - 2, 0.0])  # exp(d) - d - 1 with d = ref - logp
    close(kl_penalty(logp, ref), [math.exp(-1), math.e - 2, 0.0])
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_entropy_of_masked_positions_only(monkeypatch):
    monkeypatch.setattr(policy_gradient, "ENTROPY_CHUNK_TOKENS", 1)  # one position per chunk: chunks add up
    logits = T([[[0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25)], [1000.0, -1000.0, 0.0]]])
    mask = T([[1.0, 1.0, 0.0]])
    close(entropy_from_logits(logits, mask), (math.log(3) + 1.5 * math.log(2)) / 2, atol=1e-5)
    close(entropy_from_logits(logits, torch.zeros(1, 3)), 0.0)


# --------------------------------------------------------------------------- the clipped surrogate
# Five completion tokens, clip_eps 0.2:  ratio  A   unclipped  clipped  min    loss  clipped chosen
#                                         1.5  +1     1.5       1.2     1.2   -1.2   yes (above, A > 0)
#                                         0.5  +1     0.5       0.8     0.5   -0.5   no
#                                         0.5  -1    -0.5      -0.8    -0.8    0.8   yes (below, A < 0)
#                                         1.5  -1    -1.5      -1.2    -1.5    1.5   no
#                                         1.1  +2     2.2       2.2     2.2   -2.2   no (inside)
RATIOS, ADVANTAGES = [1.5, 0.5, 0.5, 1.5, 1.1], [1.0, 1.0, -1.0, -1.0, 2.0]


def surrogate_inputs():
    old_logp = T([[-1.0, -2.0, -0.5, -3.0, -1.5]])
    logp = (old_logp + torch.log(T([RATIOS]))).requires_grad_(True)
    return logp, old_logp, T([ADVANTAGES]), torch.ones(1, 5)


def test_clipped_loss_hand_computed():
    logp, old_logp, advantages, mask = surrogate_inputs()
    result = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    close(result.loss, (-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5)
    close(result.clip_fraction, 0.4)
    close(result.mean_ratio, 5.1 / 5)
    close(result.mean_kl, 0.0)
    close(result.num_tokens, 5.0)
    assert not result.num_clipped.requires_grad


def test_gradient_is_zero_exactly_where_the_clipped_term_is_chosen():
    logp, old_logp, advantages, mask = surrogate_inputs()
    clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2).loss.backward()
    # d/dlogp of -r*A/N is -r*A/N on unclipped tokens, 0 on clipped ones
    close(logp.grad, [[0.0, -0.5 / 5, 0.0, 1.5 / 5, -2.2 / 5]])


def test_clip_eps_high_widens_the_upper_side_only():
    old_logp = torch.zeros(1, 2)
    logp = torch.log(T([[1.25, 0.75]]))
    advantages, mask = T([[1.0, -1.0]]), torch.ones(1, 2)
    symmetric = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    wider = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=0.28)
    close(symmetric.loss, (-1.2 + 0.8) / 2)  # 1.25 clipped to 1.2; 0.75 clipped to 0.8 (A < 0)
    close(symmetric.clip_fraction, 1.0)
    close(wider.loss, (-1.25 + 0.8) / 2)  # 1.25 is inside [0.8, 1.28]
    close(wider.clip_fraction, 0.5)


def test_token_and_sequence_averages_differ_on_unequal_lengths():
    logp = torch.zeros(2, 3)  # ratio 1: the per-token loss is -A
    advantages, mask = T([[1.0, 9.0, 9.0], [2.0, 2.0, 5.0]]), T([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    token = clipped_policy_loss(logp, logp, advantages, mask, clip_eps=0.2, average="token")
    sequence = clipped_policy_loss(logp, logp, advantages, mask, clip_eps=0.2, average="sequence")
    close(token.loss, -(1 + 2 + 2 + 5) / 4)
    close(sequence.loss, -(1 + 9 / 3) / 2)
    per_sequence = clipped_policy_loss(logp, logp, T([1.0, 3.0]), mask, clip_eps=0.2, average="sequence")
    close(per_sequence.loss, -(1 + 3) / 2)  # [B] advantages broadcast over each sequence's tokens


def test_masked_positions_change_nothing():
    logp, old_logp, advantages, _ = surrogate_inputs()
    pad = lambda x, left, right: torch.cat([T([[left]]), x.detach(), T([[right]])], dim=1)  # noqa: E731
    mask = T([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    kl = torch.full((1, 7), 0.5)
    reference = clipped_policy_loss(pad(logp, 0.0, 0.0), pad(old_logp, 0.0, 0.0), pad(advantages, 0.0, 0.0), mask,
                                    clip_eps=0.2, kl=kl, kl_coef=0.1)
    garbage_logp = pad(logp, 1000.0, -3.0).requires_grad_(True)  # exp(1000 - -1000) would overflow to inf
    garbage = clipped_policy_loss(garbage_logp, pad(old_logp, -1000.0, 2.0), pad(advantages, 50.0, -7.0), mask,
                                  clip_eps=0.2, kl=torch.cat([T([[math.inf]]), kl[:, 1:]], 1), kl_coef=0.1)
    close(garbage.loss, float(reference.loss))
    close(garbage.loss, (-1.2 - 0.5 + 0.8 + 1.5 - 2.2) / 5 + 0.1 * 0.5)
    close(garbage.mean_kl, 0.5)
    close(garbage.mean_ratio, 5.1 / 5)
    garbage.loss.backward()
    close(garbage_logp.grad[:, [0, 6]], [[0.0, 0.0]])
    assert torch.isfinite(garbage_logp.grad).all()


def test_kl_coef_needs_a_kl():
    logp = torch.zeros(1, 2)
    result = clipped_policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), clip_eps=0.2,
                                 kl=T([[0.5, 1.5]]), kl_coef=0.1)
    close(result.loss, 0.1 * 1.0)
    close(result.mean_kl, 1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        clipped_policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), clip_eps=0.2, kl_coef=0.1)
    with pytest.raises(ValueError, match="average"):
        clipped_policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), clip_eps=0.2, average="batch")


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_global_count_makes_split_batches_add_up(average):
    """Two micro-batches (or ranks) each divided by the global count sum to the loss of the whole batch."""
    generator = torch.Generator().manual_seed(1)
    logp, old_logp = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    advantages = torch.randn(4, 6, generator=generator)
    mask = T([[1.0] * 6, [0.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 6, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    whole = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, average=average)
    total = count_units(mask[:2], average) + count_units(mask[2:], average)
    close(total, 12.0 if average == "token" else 3.0)
    parts = [clipped_policy_loss(logp[rows], old_logp[rows], advantages[rows], mask[rows], clip_eps=0.2,
                                 average=average, num_units=total) for rows in (slice(0, 2), slice(2, 4))]
    close(parts[0].loss + parts[1].loss, float(whole.loss), atol=1e-6)
    close(parts[0].sums() + parts[1].sums(), whole.sums().tolist())


def test_policy_metrics_divide_reduced_sums():
    logp, old_logp, advantages, mask = surrogate_inputs()
    sums = clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2).sums()
    close(sums, [5.0, 2.0, 0.0, 5.1])
    metrics = policy_metrics((sums * 2).tolist())  # e.g. two ranks with the same batch
    assert metrics == pytest.approx({"clip_fraction": 0.4, "kl": 0.0, "ratio": 1.02})


# --------------------------------------------------------------------------- GAE and the value side
def reference_gae(rewards: list[float], values: list[float], mask: list[int], gamma: float,
                  lam: float) -> tuple[list[float], list[float]]:
    """The textbook loop over one row's completion tokens, right to left."""
    positions = [t for t, keep in enumerate(mask) if keep]
    advantages, returns = [0.0] * len(mask), [0.0] * len(mask)
    next_value = next_advantage = 0.0
    for t in reversed(positions):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[t]
        advantages[t], returns[t] = next_advantage, next_advantage + values[t]
    return advantages, returns


def test_gae_hand_computed():
    rewards, values = T([[9.0, 0.0, 0.0, 1.0, 4.0]]), T([[3.0, 0.5, 0.6, 0.7, 8.0]])
    mask = T([[0.0, 1.0, 1.0, 1.0, 0.0]])  # a prompt token, three completion tokens, a pad
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # t=3: 1 - 0.7 = 0.3; t=2: 0.9*0.7 - 0.6 + 0.855*0.3 = 0.2865; t=1: 0.9*0.6 - 0.5 + 0.855*0.2865
    close(advantages, [[0.0, 0.2849575, 0.2865, 0.3, 0.0]])
    close(returns, [[0.0, 0.7849575, 0.8865, 1.0, 0.0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_gae_matches_the_unrolled_loop(gamma, lam):
    generator = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    mask = T([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]).float()
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for row in range(3):
        expected = reference_gae(rewards[row].tolist(), values[row].tolist(), mask[row].tolist(), gamma, lam)
        close(advantages[row], expected[0], atol=1e-5)
        close(returns[row], expected[1], atol=1e-5)


def test_gae_with_gamma_and_lambda_one_returns_the_outcome():
    rewards = reward_at_last_token(T([1.0]), T([[0.0, 1.0, 1.0, 1.0]]))
    advantages, returns = gae(rewards, T([[5.0, 0.2, 0.4, 0.6]]), T([[0.0, 1.0, 1.0, 1.0]]), gamma=1.0, lam=1.0)
    close(returns, [[0.0, 1.0, 1.0, 1.0]])
    close(advantages, [[0.0, 0.8, 0.6, 0.4]])


def test_reward_at_last_completion_token():
    mask = T([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    close(reward_at_last_token(T([2.0, 3.0, -1.0]), mask), [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, -1]])


def test_clipped_value_loss_hand_computed():
    values = T([[1.0, 2.0, 0.0, 99.0]], requires_grad=True)
    old_values, returns = T([[0.5, 0.5, 0.0, 0.0]]), T([[2.0, 0.0, 1.0, 0.0]])
    result = clipped_value_loss(values, old_values, returns, T([[1.0, 1.0, 1.0, 0.0]]), clip_eps=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); token 1: max(4, 0.49) = 4; token 2: 1; token 3 masked
    close(result.loss, 0.5 * (1.69 + 4.0 + 1.0) / 3)
    close(result.clip_fraction, 1 / 3)
    result.loss.backward()
    close(values.grad, [[0.0, 2.0 / 3, -1.0 / 3, 0.0]])  # d/dV 0.5*(V-R)^2/3 = (V-R)/3; 0 where clipped


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0, 50.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    close(explained_variance(T([[1.0, 2.0, 3.0, -9.0]]), returns, mask), 1.0)
    close(explained_variance(T([[2.0, 2.0, 2.0, 7.0]]), returns, mask), 0.0)  # the mean return, as a constant
    close(explained_variance(T([[1.0, 2.0, 2.0, 0.0]]), returns, mask), 1 - (2 / 9) / (2 / 3))
    assert math.isnan(float(explained_variance(returns, T([[4.0, 4.0, 4.0, 1.0]]), mask)))


def test_whiten_uses_masked_statistics():
    whitened = whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    scale = 1 / math.sqrt(2 / 3 + value.WHITEN_EPS)
    close(whitened, [[-scale, 0.0, scale, 0.0]])
    close(whiten(T([[4.0, 4.0]]), T([[1.0, 1.0]])), [[0.0, 0.0]])
