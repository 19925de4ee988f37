"""DAPO's overlong penalty against the paper's piecewise formula, and the reward signal the trainer hands the
advantage estimators (overall + penalty, or named components for gdpo)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlm_sapo.algos import get_advantage_estimator, overlong_penalty
from vlm_sapo.reward_signal import reward_signal
from vlm_sapo.scoring import ScoreResult


def dapo_length_reward(length: int, l_max: int, l_cache: int) -> float:
    """DAPO (arXiv:2503.14476) section 3.4, soft overlong punishment, as written in the paper."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def test_penalty_is_the_papers_formula():
    l_max, l_cache = 20, 8
    lengths = torch.arange(0, 26)
    got = overlong_penalty(lengths, l_max, l_cache)
    expected = [dapo_length_reward(n, l_max, l_cache) for n in lengths.tolist()]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    # the three pieces: free up to 12 tokens, linear to -1 at the limit, -1 beyond
    assert got[12] == 0 and got[16] == pytest.approx(-0.5) and got[20] == -1 and got[25] == -1
    torch.testing.assert_close(overlong_penalty(lengths, l_max, l_cache, penalty_factor=0.5), got * 0.5)
    assert overlong_penalty(torch.tensor([20]), 20, 20).item() == -1.0  # the whole budget is the buffer


def test_penalty_bad_settings_are_named():
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([3]), 10, 11)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([3]), 10, 0)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(torch.tensor([3]), 10, 4, penalty_factor=0.0)
    with pytest.raises(ValueError, match="integer token counts"):
        overlong_penalty(torch.tensor([3.0]), 10, 4)


def _completion(sid: str, n_tokens: int, reason: str) -> SimpleNamespace:
    return SimpleNamespace(sample_id=sid, completion_ids=[7] * n_tokens, finish_reason=reason)


def _score(overall: float, **scores: float) -> ScoreResult:
    return ScoreResult(overall, {k.replace("__", "/"): v for k, v in scores.items()}, None)


def test_scalar_signal_adds_the_penalty_before_advantages():
    """max_new_tokens 10, buffer 4: lengths 3 (free), 8 (-2/4) and 10 (truncated, -1)."""
    comps = [_completion("a", 3, "stop"), _completion("a", 8, "stop"), _completion("a", 10, "length")]
    scores = [_score(1.0), _score(1.0), _score(1.0)]
    overlong = SimpleNamespace(buffer=4, penalty_factor=1.0, filter=False)
    sig = reward_signal(scores, comps, 3, components=None, overlong=overlong, max_new_tokens=10)
    torch.testing.assert_close(sig.values, torch.tensor([[1.0, 0.5, 0.0]]))
    torch.testing.assert_close(sig.penalty, torch.tensor([0.0, -0.5, -1.0]))
    assert sig.truncated.tolist() == [False, False, True]
    assert sig.flat_groups().tolist() == [False]  # equal task rewards, but the lengths now tell them apart
    plain = reward_signal(scores, comps, 3, components=None, overlong=None, max_new_tokens=10)
    assert plain.penalty is None and plain.flat_groups().tolist() == [True]


def test_components_signal_for_gdpo():
    """Bare names match any reward's score, `label/key` one reward's; a missing score counts 0; the overlong
    penalty is a column of its own, in the order the recipe lists the components."""
    comps = [_completion("p", n, "stop") for n in (2, 9)] + [_completion("q", 10, "length"), _completion("q", 1, "stop")]
    scores = [_score(0.9, math__accuracy=1.0, math__format=1.0), _score(0.1, math__accuracy=0.0, math__format=1.0),
              _score(0.0, math__error=1.0), _score(0.5, math__accuracy=0.5, math__format=0.0)]
    overlong = SimpleNamespace(buffer=4, penalty_factor=1.0, filter=True)
    sig = reward_signal(scores, comps, 2, components={"overlong": 1.0, "accuracy": 1.0, "math/format": 0.5},
                        overlong=overlong, max_new_tokens=10)
    expected = [[[0.0, 1.0, 1.0], [-0.75, 0.0, 1.0]], [[-1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]]
    torch.testing.assert_close(sig.values, torch.tensor(expected))
    adv = get_advantage_estimator("gdpo")(sig.values, 2, weights=(1.0, 1.0, 0.5))
    assert adv.shape == (2, 2) and adv[0, 0] > 0 > adv[0, 1]


def test_component_errors_name_the_component():
    comps = [_completion("p", 2, "stop"), _completion("p", 3, "stop")]
    two_formats = [_score(1.0, math__format=1.0, format__format=1.0), _score(0.0, math__format=0.0, format__format=0.0)]
    with pytest.raises(ValueError, match=r"`format` matches 2 scores of sample 'p'.*`<label>/format`"):
        reward_signal(two_formats, comps, 2, components={"format": 1.0}, overlong=None, max_new_tokens=10)
    ok = reward_signal(two_formats, comps, 2, components={"format/format": 1.0}, overlong=None, max_new_tokens=10)
    assert ok.values[0, :, 0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"`acuracy` .* not a score of any sample.*math/format"):
        reward_signal(two_formats, comps, 2, components={"acuracy": 1.0}, overlong=None, max_new_tokens=10)
