"""The hf engine's own categorical sampler against softmax, by chi-square over many draws with fixed seeds.

Thresholds are the chi-square 0.9999 quantile (Wilson-Hilferty), so a correct sampler fails with probability 1e-4
per check; each test also shows the check rejects a slightly wrong distribution, so it has the power to matter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vlm_sapo.data import prompt_model_inputs
from vlm_sapo.rollout import SamplingConfig
from vlm_sapo.rollout.hf_engine import HFRolloutEngine, _TemperatureLogprobs, sample_categorical

Z_9999 = 3.719


def chi2_limit(df: int, z: float = Z_9999) -> float:
    """Upper quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty approximation)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the categories of positive probability, and its degrees of freedom."""
    keep = probs > 0
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum()
    stat = float(((counts[keep].double() - expected) ** 2 / expected).sum())
    return stat, int(keep.sum()) - 1


@pytest.fixture(scope="module")
def model(tiny_qwen25_dir):
    from vlm_sapo.models.loading import load_policy

    return load_policy(tiny_qwen25_dir, dtype="float32", device="cpu")


def draws(sampler, rows: int, vocab: int) -> torch.Tensor:
    idx = sampler(rows)
    return torch.bincount(idx, minlength=vocab)


def test_sample_categorical_matches_the_distribution_exactly():
    torch.manual_seed(0)
    vocab = 37  # not a multiple of the block: the padded tail must never be drawn
    probs = torch.rand(vocab) ** 3
    probs[[0, 5, 36]] = 0.0  # zero-probability entries, the first and the last among them
    probs *= 7.3  # any positive total
    rows = 300_000
    torch.manual_seed(1)
    counts = draws(lambda n: sample_categorical(probs.expand(n, vocab).contiguous(), block=8), rows, vocab)
    assert counts.shape == (vocab,) and int(counts.sum()) == rows
    assert int(counts[[0, 5, 36]].sum()) == 0
    stat, df = chi2(counts, probs)
    assert stat < chi2_limit(df), (stat, chi2_limit(df))
    # The same counts against a distribution 5% off on its three most likely entries: rejected.
    wrong = probs.clone()
    wrong[probs.topk(3).indices] *= 1.05
    assert chi2(counts, wrong)[0] > chi2_limit(df)


def test_sample_categorical_per_row_distributions_and_block_sizes():
    torch.manual_seed(2)
    rows_dist = torch.softmax(torch.randn(3, 50) * 2, dim=-1)
    for block in (1, 7, 50, 64):
        torch.manual_seed(3)
        reps = 60_000
        idx = sample_categorical(rows_dist.repeat(reps, 1), block=block).view(reps, 3)
        for r in range(3):
            stat, df = chi2(torch.bincount(idx[:, r], minlength=50), rows_dist[r])
            assert stat < chi2_limit(df), (block, r, stat)


def test_processor_draws_from_tempered_allowed_softmax_and_records_full_logprobs():
    torch.manual_seed(4)
    vocab, temperature = 40, 0.7
    raw = torch.randn(vocab) * 2
    banned = torch.tensor([3, 17, 39])
    raw[17] = 150.0  # a banned token with all the mass: exp(logp) of every allowed token underflows to 0
    rows = 200_000
    proc = _TemperatureLogprobs(temperature, banned, sample=True)
    torch.manual_seed(5)
    out = proc(torch.zeros(rows, 1, dtype=torch.long), raw.expand(rows, vocab).contiguous())
    # generate takes the argmax of what the processor returns: exactly one finite entry per row.
    assert bool((torch.isfinite(out).sum(-1) == 1).all())
    token = out.argmax(-1)
    allowed = raw.clone()
    allowed[banned] = float("-inf")
    expected = torch.softmax(allowed / temperature, -1)
    counts = torch.bincount(token, minlength=vocab)
    assert int(counts[banned].sum()) == 0
    stat, df = chi2(counts, expected)
    assert stat < chi2_limit(df), stat
    assert chi2(counts, torch.softmax(allowed, -1))[0] > chi2_limit(df)  # the untempered distribution is rejected
    # The recorded logprobs are over the whole vocabulary at T, banned tokens included.
    torch.testing.assert_close(proc.prev[0], torch.log_softmax(raw / temperature, -1), rtol=0, atol=1e-6)


def test_engine_first_tokens_follow_the_model_softmax(model, tiny25_processor, test_prompts):
    """End to end through generate: the first sampled token of many samples against a forward pass's softmax."""
    likely = {1000: 9.0, 2000: 8.5, 3000: 8.0, 151655: 9.5}  # the last is <|image_pad|>: banned
    biased = copy.deepcopy(model)
    bias = torch.zeros(biased.lm_head.weight.shape[0])
    for token, value in likely.items():
        bias[token] = value
    biased.lm_head.bias = torch.nn.Parameter(bias)
    engine = HFRolloutEngine(biased, tiny25_processor)
    prompt = test_prompts[0]
    n, temperature = 1500, 0.9
    ro = engine.generate([prompt], n, SamplingConfig(temperature=temperature, max_new_tokens=1, seed=11))
    first = torch.tensor([c.completion_ids[0] for c in ro.completions])

    with torch.no_grad():
        logits = biased(**prompt_model_inputs(tiny25_processor, prompt)).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, -1)
    probs[torch.tensor(engine.banned_ids)] = 0.0
    probs /= probs.sum()
    cats = [1000, 2000, 3000]
    expected = torch.cat([probs[cats], (1 - probs[cats].sum()).view(1)])
    counts = torch.tensor([int((first == t).sum()) for t in cats] + [int(~torch.isin(first, torch.tensor(cats)).sum())])
    assert not bool(torch.isin(first, torch.tensor(engine.banned_ids)).any())
    stat, df = chi2(counts, expected)
    assert stat < chi2_limit(df), (counts.tolist(), (expected * n).tolist())
