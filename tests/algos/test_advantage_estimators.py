"""Advantage estimators against per-group Python loops (statistics module), and their invariances."""

from __future__ import annotations

import inspect
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_sapo.algos import get_advantage_estimator, list_advantage_estimators, takes_components, zero_variance_groups


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
    assert list_advantage_estimators() == ["drgrpo", "gdpo", "grpo", "rloo"]
    assert [n for n in list_advantage_estimators() if takes_components(n)] == ["gdpo"]
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


# ---- GDPO (arXiv:2601.05242): reward components normalised per group, weighted sum, batch std -----------------------

def ref_gdpo(components: list[list[list[float]]], weights: list[float], eps: float = 1e-6) -> list[list[float]]:
    """components[prompt][sample][k]; plain Python with statistics.stdev (Bessel) at both steps."""
    summed = []
    for group in components:
        row = [0.0] * len(group)
        for k, w in enumerate(weights):
            col = [s[k] for s in group]
            if len(set(col)) == 1:
                continue  # a flat component adds exactly 0
            mean, std = sum(col) / len(col), statistics.stdev(col)
            for j, c in enumerate(col):
                row[j] += w * (c - mean) / (std + eps)
        summed.append(row)
    batch_std = statistics.stdev([a for row in summed for a in row])
    return [[a / (batch_std + eps) for a in row] for row in summed]


def test_gdpo_by_hand():
    """Two groups of three, (accuracy, format) with weights (1, 0.5), and an all-flat third group.
    Group 1: accuracy [1, 0, 0] -> mean 1/3, std sqrt(1/3) -> [1.1547, -0.5774, -0.5774]; format [1, 1, 0] ->
    [0.5774, 0.5774, -1.1547]; sum with weights: [1.4434, -0.2887, -1.1547]. Group 2: accuracy flat (0);
    format [0, 1, 0] -> [-0.5774, 1.1547, -0.5774] * 0.5 = [-0.2887, 0.5774, -0.2887]. Group 3: 0, 0, 0.
    Batch std of the nine sums: 0.7071 (sum of squares 4.0, / 8, sqrt): every value is divided by it."""
    comps = [[[1, 1], [0, 1], [0, 0]], [[1, 0], [1, 1], [1, 0]], [[0.5, 1], [0.5, 1], [0.5, 1]]]
    r = 3 ** -0.5
    sums = [[2 * r + 0.5 * r, -r + 0.5 * r, -r - r], [-0.5 * r, r, -0.5 * r], [0.0, 0.0, 0.0]]
    assert sum(x * x for row in sums for x in row) == pytest.approx(4.0)
    std = (4.0 / 8) ** 0.5  # the mean of the nine sums is 0
    hand = [[x / (std + 1e-6) for x in row] for row in sums]
    rewards = torch.tensor(comps, dtype=torch.float64)
    adv = get_advantage_estimator("gdpo")(rewards, 3, weights=(1.0, 0.5))
    assert adv.shape == (3, 3)
    torch.testing.assert_close(adv, torch.tensor(hand, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(adv, torch.tensor(ref_gdpo(comps, [1.0, 0.5]), dtype=torch.float64))
    assert torch.all(adv[2] == 0.0)
    flat = get_advantage_estimator("gdpo")(rewards.reshape(9, 2), 3, weights=(1.0, 0.5))
    assert flat.shape == (9,) and torch.equal(flat, adv.reshape(-1))


def test_gdpo_and_grpo_on_the_summed_reward_disagree_in_sign():
    """accuracy [0, 0, 1, 1], format [0, 0.5, 0, 0]: GRPO on the sum [0, 0.5, 1, 1] ranks the wrong-but-formatted
    sample 1 below the mean (negative); GDPO gives format its own unit scale, and sample 1 is the only one that has
    it: positive. The paper's point: a summed reward lets the component with the larger spread decide the sign."""
    acc, fmt = [0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.0, 0.0]
    grpo = get_advantage_estimator("grpo")(torch.tensor([a + f for a, f in zip(acc, fmt)]), 4)
    gdpo = get_advantage_estimator("gdpo")(torch.tensor([acc, fmt]).T.contiguous(), 4)
    assert grpo[1] < 0 < gdpo[1]
    assert torch.equal(torch.sign(grpo[[0, 2, 3]]), torch.sign(gdpo[[0, 2, 3]]))
    torch.testing.assert_close(gdpo.double(), torch.tensor(ref_gdpo([[[a, f] for a, f in zip(acc, fmt)]], [1, 1]),
                                                          dtype=torch.float64).reshape(-1), rtol=1e-6, atol=1e-6)


@st.composite
def grouped_components(draw):
    """[num_prompts, G, C] in which some groups are flat in every component (they must get exactly 0)."""
    G, C = draw(st.integers(2, 6)), draw(st.integers(1, 3))
    groups = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            groups.append([draw(st.lists(reward_values, min_size=C, max_size=C))] * G)
        else:
            groups.append([draw(st.lists(reward_values, min_size=C, max_size=C)) for _ in range(G)])
    weights = draw(st.lists(st.floats(0.1, 3.0), min_size=C, max_size=C))
    return torch.tensor(groups, dtype=torch.float64), G, weights


@settings(max_examples=60, deadline=None)
@given(data=grouped_components())
def test_gdpo_all_flat_groups_get_exactly_zero_and_match_the_reference(data):
    rewards, G, weights = data
    adv = get_advantage_estimator("gdpo")(rewards, G, weights=tuple(weights))
    flat = torch.tensor([all(len({s[k] for s in g}) == 1 for k in range(len(weights))) for g in rewards.tolist()])
    assert torch.all(adv[flat] == 0.0)
    if not flat.all():
        ref = ref_gdpo(rewards.tolist(), weights)
        torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_gdpo_bad_inputs_are_named():
    gdpo = get_advantage_estimator("gdpo")
    with pytest.raises(ValueError, match="2 finite weights"):
        gdpo(torch.zeros(4, 2), 2, weights=(1.0,))
    with pytest.raises(ValueError, match="component rewards must be"):
        gdpo(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="whole number of groups"):
        gdpo(torch.zeros(5, 2), 2)
