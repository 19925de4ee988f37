"""SamplingConfig / Rollouts validation, stop and banned token ids, and the weight-name checks (no model runs)."""

from __future__ import annotations

import pytest
import torch

from vlm_sapo.rollout import Completion, Rollouts, RolloutTiming, SamplingConfig
from vlm_sapo.rollout.tokens import banned_token_ids, model_vocab_size, stop_token_ids
from vlm_sapo.rollout.weight_names import checked_weights, missing_names, parameter_names, require_complete


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"stop": ["</answer>", ""]}, "stop strings must be non-empty"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_sampling_config_defaults_and_derived_values():
    s = SamplingConfig(temperature=0.6, top_k=-1, stop=["</answer>"])
    assert s.stop == ("</answer>",) and s.top_k_or_none is None and s.logprob_temperature == 0.6 and not s.greedy
    g = SamplingConfig(temperature=0)
    assert g.greedy and g.logprob_temperature == 1.0
    assert SamplingConfig(top_k=20).top_k_or_none == 20


def completion(p: int, k: int, n_tokens: int = 2, reason: str = "stop") -> Completion:
    return Completion(p, k, f"s{p}", [1, 2], list(range(n_tokens)), torch.full((n_tokens,), -1.0), reason, "", 0.1)


def test_rollouts_are_prompt_major_and_counted():
    comps = [completion(p, k, reason="length" if k else "stop") for p in range(2) for k in range(3)]
    ro = Rollouts(comps, 3, RolloutTiming(2.0, 10, 12), "hf")
    assert ro.num_prompts == 2 and len(ro) == 6
    assert [[c.sample_index for c in g] for g in ro.groups()] == [[0, 1, 2], [0, 1, 2]]
    assert ro.finish_reason_counts() == {"stop": 2, "length": 4}
    assert ro.timing.tokens_per_s == 6.0
    assert ro.timing.as_metrics() == {"rollout/seconds": 2.0, "rollout/tokens_per_s": 6.0,
                                      "rollout/prompt_tokens": 10.0, "rollout/completion_tokens": 12.0}
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        Rollouts(comps, 4, RolloutTiming(1.0, 0, 0), "hf")
    with pytest.raises(ValueError, match=r"completion 1 is \(prompt 1, sample 0\)"):
        Rollouts([comps[0], comps[3], comps[1], comps[4], comps[2], comps[5]], 3, RolloutTiming(1.0, 0, 0), "hf")


def test_completion_logprobs_must_be_fp32_per_token():
    with pytest.raises(ValueError, match=r"sample 's0': logprobs must be fp32 of shape \(3,\)"):
        Completion(0, 0, "s0", [1], [5, 6, 7], torch.zeros(3, dtype=torch.float64), "stop", "", 0.0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        Completion(0, 0, "s0", [1], [5, 6, 7], torch.zeros(2), "length", "", 0.0)


def test_stop_and_banned_ids_on_the_real_qwen_vocabulary(tiny25_processor):
    tok = tiny25_processor.tokenizer
    from transformers import AutoConfig, GenerationConfig

    gen = GenerationConfig(eos_token_id=[151645, 151643])
    assert stop_token_ids(tok) == [151645]  # the tiny tokenizer's eos is <|im_end|>
    assert stop_token_ids(tok, gen) == [151643, 151645]
    config = AutoConfig.from_pretrained(tok.name_or_path)
    vocab = model_vocab_size(config)
    assert vocab == 151936
    banned = banned_token_ids(tok, vocab)
    # Qwen's ids: <|vision_start|> 151652 .. <|video_pad|> 151656; rows len(tok)..151935 have no token.
    assert set(range(151652, 151657)) <= set(banned)
    assert set(range(len(tok), 151936)) <= set(banned)
    assert len(banned) == 5 + 151936 - len(tok)
    assert 151644 not in banned and 151645 not in banned  # <|im_start|>, <|im_end|> stay legal
    assert 42 in banned_token_ids(tok, vocab, extra=[42])
    with pytest.raises(ValueError, match=r"banned token id 151936 is outside the vocabulary \[0, 151936\)"):
        banned_token_ids(tok, vocab, extra=[151936])
    with pytest.raises(ValueError, match="only 1000 output rows"):
        banned_token_ids(tok, 1000)


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(1))


def test_weight_names_group_tied_parameters_and_reject_bad_updates():
    m = TiedLM()
    names = parameter_names(m)
    assert names.first_names == ["embed.weight", "proj.weight", "proj.bias"]
    assert names.group_of["head.weight"] == names.group_of["embed.weight"]
    assert names.buffers == frozenset({"scale"})

    seen: set[int] = set()
    sent = [("head.weight", torch.zeros(10, 4)), ("proj.weight", torch.zeros(4, 4)), ("scale", torch.ones(1))]
    assert [n for n, _ in checked_weights(sent, names, seen, "test engine")] == ["head.weight", "proj.weight", "scale"]
    assert missing_names(names, seen) == ["proj.bias"]  # the tied pair is covered through either name
    with pytest.raises(ValueError, match=r"test engine: weight update is missing 1 of 3 parameters \(proj.bias\)"):
        require_complete(names, seen, "test engine", "")

    with pytest.raises(ValueError, match="unknown weight name 'proj.weights'"):
        list(checked_weights([("proj.weights", torch.zeros(4, 4))], names, set(), "test engine"))
    with pytest.raises(ValueError, match=r"'proj.bias' has shape \(5,\), the model's is \(4,\)"):
        list(checked_weights([("proj.bias", torch.zeros(5))], names, set(), "test engine"))
    with pytest.raises(ValueError, match="'proj.bias' is a list"):
        list(checked_weights([("proj.bias", [0.0] * 4)], names, set(), "test engine"))
