"""Token sampling (engine/sampler.py) and SamplingParams validation (engine/request.py)."""

from __future__ import annotations

import math

import pytest
import torch

from minicpm4.engine.request import SamplingParams
from minicpm4.engine.sampler import apply_penalties, filter_logits, sample, token_counts

N_SAMPLES = 20_000


def _logits(b: int = 4, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _gens(seeds: list[int | None]) -> list[torch.Generator | None]:
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def _draws(logits_V: torch.Tensor, params: SamplingParams, n: int = N_SAMPLES,
           seed: int = 0) -> torch.Tensor:
    """n independent draws from one distribution (n rows sharing one generator)."""
    gen = torch.Generator().manual_seed(seed)
    return sample(logits_V.expand(n, -1).clone(), [params] * n, [gen] * n)


def _empirical(tokens: torch.Tensor, v: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=v).float() / tokens.numel()


def _tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


# --------------------------------------------------------------------------- deterministic rules
def test_greedy_is_argmax() -> None:
    logits = _logits()
    params = [SamplingParams(temperature=0.0)] * 4
    assert torch.equal(sample(logits, params, [None] * 4), logits.argmax(-1))
    assert params[0].greedy


def test_greedy_ignores_other_filters_and_rng() -> None:
    logits = _logits(seed=1)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, min_p=0.2, seed=3)] * 4
    torch.manual_seed(0)
    first = sample(logits, params, _gens([1, 2, 3, 4]))
    second = sample(logits, params, _gens([5, 6, 7, 8]))
    assert torch.equal(first, logits.argmax(-1)) and torch.equal(second, first)


def test_top_k_1_equals_greedy() -> None:
    logits = _logits(b=16, seed=2)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 16
    for seed in range(5):
        got = sample(logits, params, _gens(list(range(seed, seed + 16))))
        assert torch.equal(got, logits.argmax(-1))


def test_tiny_top_p_is_argmax() -> None:
    logits = _logits(b=16, seed=3)
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 16
    for seed in range(5):
        assert torch.equal(sample(logits, params, _gens([seed] * 16)), logits.argmax(-1))


def test_min_p_one_is_argmax() -> None:
    logits = _logits(b=16, seed=4)
    params = [SamplingParams(temperature=2.0, min_p=1.0)] * 16
    for seed in range(5):
        assert torch.equal(sample(logits, params, _gens([seed] * 16)), logits.argmax(-1))


def test_flat_logits_high_temperature_still_valid_token() -> None:
    logits = torch.zeros(3, 7)
    tokens = sample(logits, [SamplingParams(temperature=100.0)] * 3, _gens([0, 1, 2]))
    assert tokens.dtype == torch.long and tokens.shape == (3,)
    assert bool(((tokens >= 0) & (tokens < 7)).all())


# --------------------------------------------------------------------------- seeds
def test_seed_reproducible_and_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # flat: every draw is uniform over 1000 tokens
    params = [SamplingParams(temperature=1.0, seed=0)]

    def run(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [int(sample(logits, params, [gen])[0]) for _ in range(20)]

    assert run(123) == run(123)
    assert run(123) != run(124)
    assert len(set(run(5))) > 10  # really random, not a constant


def test_global_rng_used_without_generator() -> None:
    logits = torch.zeros(1, 1000)
    params = [SamplingParams(temperature=1.0)]
    torch.manual_seed(7)
    a = [int(sample(logits, params, [None])[0]) for _ in range(10)]
    torch.manual_seed(7)
    b = [int(sample(logits, params, [None])[0]) for _ in range(10)]
    assert a == b and len(set(a)) > 3


# --------------------------------------------------------------------------- distributions
def test_temperature_1_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    got = _empirical(_draws(logits, SamplingParams(temperature=1.0)), 6)
    assert _tv(got, logits.softmax(-1)) < 0.02


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for temp in (0.5, 2.0):
        got = _empirical(_draws(logits, SamplingParams(temperature=temp), seed=1), 6)
        assert _tv(got, (logits / temp).softmax(-1)) < 0.02
        # and it is measurably not the temperature-1 distribution
        assert _tv(got, logits.softmax(-1)) > 0.05


def test_top_k_3_stays_in_top_3() -> None:
    logits = torch.tensor([0.3, 2.0, -1.0, 1.9, 0.1, 1.8, 1.0, -0.5])
    draws = _draws(logits, SamplingParams(temperature=1.0, top_k=3), seed=2)
    top3 = {1, 3, 5}
    assert set(draws.tolist()) == top3
    expected = torch.full((8,), float("-inf"))
    expected[[1, 3, 5]] = logits[[1, 3, 5]]
    assert _tv(_empirical(draws, 8), expected.softmax(-1)) < 0.02


def test_top_k_larger_than_vocab_is_no_op() -> None:
    logits = _logits(b=2, v=10)
    out = filter_logits(logits, [SamplingParams(top_k=50), SamplingParams(top_k=-1)])
    assert torch.equal(out, logits)


def test_top_p_keeps_exactly_the_nucleus() -> None:
    # probabilities, deliberately not sorted: 0.25@0, 0.35@3, 0.2@1, 0.1@4, 0.06@2, 0.04@5
    probs = torch.tensor([0.25, 0.2, 0.06, 0.35, 0.1, 0.04])
    logits = probs.log()
    for top_p, nucleus in ((0.5, {0, 3}), (0.3, {3}), (0.65, {0, 1, 3}), (0.85, {0, 1, 3, 4})):
        kept = filter_logits(logits.view(1, -1), [SamplingParams(top_p=top_p)])[0]
        assert set(torch.isfinite(kept).nonzero().view(-1).tolist()) == nucleus, top_p
        assert torch.equal(kept[sorted(nucleus)], logits[sorted(nucleus)])
    draws = _draws(logits, SamplingParams(temperature=1.0, top_p=0.5), seed=3)
    assert set(draws.tolist()) == {0, 3}
    expected = torch.zeros(6)
    expected[[0, 3]] = torch.tensor([0.25, 0.35]) / 0.6
    assert _tv(_empirical(draws, 6), expected) < 0.02


def test_min_p_filter() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    kept = filter_logits(probs.log().view(1, -1), [SamplingParams(min_p=0.15)])[0]
    # limit = 0.15 * 0.5 = 0.075: 0.06 and 0.04 are dropped
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False]


def test_filters_compose_in_order() -> None:
    """temperature, then top-k, then top-p over the renormalised top-k mass."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    kept = filter_logits(probs.log().view(1, -1), [SamplingParams(top_k=2, top_p=0.5)])[0]
    # after top-k the mass is 0.4/0.7 = 0.571 >= 0.5: only token 0 survives
    assert torch.isfinite(kept).tolist() == [True, False, False, False]


# --------------------------------------------------------------------------- penalties
def test_repetition_penalty_on_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    prompt = token_counts([[0, 1]], 5)
    output = token_counts([[4]], 5)
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)],
                          prompt_counts_BV=prompt, output_counts_BV=output)
    # seen positive logit is divided (lowered), seen negative one multiplied (more negative);
    # unseen tokens are untouched.
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.25]]


def test_repetition_penalty_below_one_favours_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=0.5)],
                          prompt_counts_BV=token_counts([[0, 1]], 3), output_counts_BV=None)
    assert out.tolist() == [[4.0, -1.0, 1.0]]


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert int(sample(logits, params, [None])[0]) == 0
    seen = token_counts([[0]], 3)
    assert int(sample(logits, params, [None], prompt_counts_BV=seen)[0]) == 1
    assert int(sample(logits, params, [None], output_counts_BV=seen)[0]) == 1


def test_presence_and_frequency_penalties() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    output = token_counts([[0, 0, 0, 1]], 4)
    prompt = token_counts([[2, 2]], 4)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    out = apply_penalties(logits, params, prompt_counts_BV=prompt, output_counts_BV=output)
    # token 0: 1 - 3*0.25 - 0.5; token 1: 1 - 0.25 - 0.5; prompt-only token 2 is untouched.
    assert torch.allclose(out, torch.tensor([[-0.25, 0.25, 1.0, 1.0]]))
    only_presence = apply_penalties(logits, [SamplingParams(presence_penalty=1.5)],
                                    prompt_counts_BV=prompt, output_counts_BV=output)
    assert torch.allclose(only_presence, torch.tensor([[-0.5, -0.5, 1.0, 1.0]]))
    negative = apply_penalties(logits, [SamplingParams(frequency_penalty=-1.0)],
                               prompt_counts_BV=prompt, output_counts_BV=output)
    assert torch.allclose(negative, torch.tensor([[4.0, 2.0, 1.0, 1.0]]))


def test_token_counts() -> None:
    counts = token_counts([[1, 1, 3], [], [0]], 4)
    assert counts.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_penalties_are_per_row() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]] * 3)
    counts = token_counts([[0, 1]] * 3, 3)
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams(),
              SamplingParams(presence_penalty=1.0)]
    out = apply_penalties(logits, params, prompt_counts_BV=counts, output_counts_BV=counts)
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0], [1.0, -3.0, 1.0]]


# --------------------------------------------------------------------------- batches
def test_per_row_params_are_independent() -> None:
    logits = _logits(b=4, v=200, seed=5)
    params = [SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, top_k=1),
              SamplingParams(temperature=1.0, seed=11),
              SamplingParams(temperature=0.7, top_p=0.9, seed=12)]
    batch = sample(logits, params, _gens([None, 1, 11, 12]))
    assert int(batch[0]) == int(logits[0].argmax())
    assert int(batch[1]) == int(logits[1].argmax())
    for row in (2, 3):  # a row's draw does not depend on the other rows
        alone = sample(logits[row:row + 1], params[row:row + 1], _gens([11 + row - 2]))
        assert int(alone[0]) == int(batch[row])
    # reordering the batch keeps every row's result
    order = [3, 1, 2, 0]
    shuffled = sample(logits[order], [params[i] for i in order],
                      _gens([12, 1, 11, None]))
    assert shuffled.tolist() == batch[order].tolist()


def test_rows_with_different_filters_in_one_batch() -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.9, 0.1, 1.8]] * 3)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=1.0), SamplingParams(min_p=0.8)]
    out = filter_logits(logits, params)
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True, False, False]
    assert bool(torch.isfinite(out[1]).all())
    assert torch.isfinite(out[2]).tolist() == [False, True, False, True, False, True]


def test_sample_requires_one_param_and_generator_per_row() -> None:
    logits = _logits(b=2)
    with pytest.raises(ValueError):
        sample(logits, [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        sample(logits, [SamplingParams()] * 2, [None])


# --------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(stop=("ok", "")), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
])
def test_sampling_params_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalisation() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[5, 6])
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert not SamplingParams().greedy and SamplingParams(temperature=0).greedy
    with pytest.raises(AttributeError):
        p.max_tokens = 3  # type: ignore[misc]
