"""Advantage estimators against per-group Python loops (statistics module), and their invariances."""

from __future__ import annotations

import inspect
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_sapo.algos import get_advantage_estimator, list_advantage_estimators, zero_variance_groups


def ref_advantages(name: str, rewards: list[float], group_size: int) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        g = rewards[start : start + group_size]
        if len(set(g)) == 1:
            out += [0.0] * group_size
            continue
        mean = sum(g) / len(g)
        if name == "grpo":
            out += [(r - mean) / (statistics.stdev(g) + 1e-6) for r in g]
        elif name == "drgrpo":
            out += [r - mean for r in g]
        else:  # rloo: the mean of the other completions' rewards is the baseline
            out += [r - sum(g[:j] + g[j + 1 :]) / (group_size - 1) for j, r in enumerate(g)]
    return out


def test_registry():
    assert list_advantage_estimators() == ["drgrpo", "grpo", "rloo"]
    for name in list_advantage_estimators():
        params = list(inspect.signature(get_advantage_estimator(name)).parameters.values())
        assert [p.name for p in params[:2]] == ["rewards", "group_size"]
        assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params[2:])
    with pytest.raises(ValueError, match="grpo"):
        get_advantage_estimator("gae")


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_match_reference_and_keep_shape(name):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.9, -1.0, 3.0, 0.0, 0.0, 0.0, 1.0]
    expected = torch.tensor(ref_advantages(name, rewards, 4), dtype=torch.float64)
    fn = get_advantage_estimator(name)
    flat = fn(torch.tensor(rewards, dtype=torch.float64), 4)
    grouped = fn(torch.tensor(rewards, dtype=torch.float64).reshape(4, 4), 4)
    assert flat.shape == (16,) and grouped.shape == (4, 4)
    torch.testing.assert_close(flat, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grouped.reshape(-1), expected, rtol=1e-12, atol=1e-12)
    assert torch.all(flat[4:8] == 0)  # the all-0.5 group


def test_grpo_without_std_scaling_is_drgrpo_and_integer_rewards_become_float():
    rewards = torch.tensor([1, 0, 0, 0, 1, 1])
    adv = get_advantage_estimator("grpo")(rewards, 3, scale_std=False)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, get_advantage_estimator("drgrpo")(rewards, 3))
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))


def test_group_of_one_gives_zero_and_rloo_refuses_it():
    assert torch.all(get_advantage_estimator("grpo")(torch.tensor([0.3, 0.7]), 1) == 0)
    with pytest.raises(ValueError, match="rloo"):
        get_advantage_estimator("rloo")(torch.tensor([0.3, 0.7]), 1)


def test_bad_rewards_are_named():
    grpo = get_advantage_estimator("grpo")
    with pytest.raises(ValueError, match="whole number of groups"):
        grpo(torch.zeros(7), 4)
    with pytest.raises(ValueError, match=r"index \[5\]"):
        grpo(torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, float("nan")]), 3)
    with pytest.raises(ValueError, match="group_size"):
        grpo(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="group_size"):
        grpo(torch.zeros(4), 0)


def test_zero_variance_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.25, 0.25, 0.25], [0.0, 0.0, 1e-9]])
    assert zero_variance_groups(rewards, 3).tolist() == [True, False, True, False]
    assert zero_variance_groups(rewards.reshape(-1), 3).tolist() == [True, False, True, False]


# ---- properties --------------------------------------------------------------------------------------------------

reward_values = st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.floats(-5, 5, allow_subnormal=False))


@st.composite
def grouped_rewards(draw):
    """[num_prompts, G] rewards in which some groups are all equal (the case that must give exactly 0)."""
    G = draw(st.integers(2, 8))
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            rows.append([draw(reward_values)] * G)
        else:
            rows.append(draw(st.lists(reward_values, min_size=G, max_size=G)))
    return torch.tensor(rows, dtype=torch.float64), G


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
@settings(max_examples=60, deadline=None)
@given(data=grouped_rewards())
def test_all_equal_groups_get_exactly_zero(name, data):
    rewards, G = data
    adv = get_advantage_estimator(name)(rewards, G)
    flat = torch.tensor([len(set(row)) == 1 for row in rewards.tolist()])
    assert zero_variance_groups(rewards, G).tolist() == flat.tolist()
    assert torch.all(adv[flat] == 0.0)
    assert torch.all(adv[~flat].abs().sum(-1) > 0)
    torch.testing.assert_close(
        adv.reshape(-1), torch.tensor(ref_advantages(name, rewards.reshape(-1).tolist(), G), dtype=torch.float64)
    )


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
@settings(max_examples=60, deadline=None)
@given(data=grouped_rewards(), shift=st.floats(-100, 100), scale=st.floats(0.1, 10))
def test_group_invariance_to_shift_and_scale(name, data, shift, scale):
    rewards, G = data
    fn = get_advantage_estimator(name)
    adv = fn(rewards, G)
    # a per-group shift: every prompt's rewards move by a different constant
    shifts = shift * torch.arange(rewards.shape[0], dtype=torch.float64)[:, None]
    flat = zero_variance_groups(rewards, G)
    shifted = fn(rewards + shifts, G)
    assert torch.all(shifted[flat] == 0.0)
    torch.testing.assert_close(shifted, adv, rtol=1e-6, atol=1e-6)
    # grpo divides by the group std: scale-invariant (exactly so without epsilon, which all-equal groups never need);
    # the others scale with the rewards
    hp = {"epsilon": 0.0} if name == "grpo" else {}
    expected = fn(rewards, G, **hp) * (1.0 if name == "grpo" else scale)
    torch.testing.assert_close(fn(rewards * scale, G, **hp), expected, rtol=1e-9, atol=1e-9)
