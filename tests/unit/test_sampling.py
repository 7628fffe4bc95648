"""Sampling: greedy, seeded reproducibility, top-k / top-p support on crafted logits."""
import numpy as np
import pytest

from cke_dist.serving.sampling import Sampler, filter_logits, probabilities

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (a crafted row whose masses are easy to read)
P = np.array([0.15, 0.4, 0.05, 0.3, 0.1])
LOGITS = np.log(P).astype(np.float32)


def support(logits, **kw):
    return set(np.flatnonzero(np.isfinite(filter_logits(logits, **kw))).tolist())


def test_greedy_is_argmax_first_on_ties():
    s = Sampler(temperature=0)
    assert s(LOGITS) == 1
    assert s(np.array([1.0, 3.0, 3.0, 0.0], np.float32)) == 1


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {0, 1, 3}), (5, {0, 1, 2, 3, 4}),
                                         (50, {0, 1, 2, 3, 4})])
def test_top_k_support(k, expected):
    assert support(LOGITS, top_k=k) == expected


@pytest.mark.parametrize("p, expected", [
    (0.1, {1}),              # the top token alone already has 0.4
    (0.4, {1}),              # exactly reached by the top token
    (0.41, {1, 3}),
    (0.7, {1, 3}),           # 0.4 + 0.3
    (0.71, {0, 1, 3}),
    (0.95, {0, 1, 3, 4}),
    (0.96, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_support(p, expected):
    assert support(LOGITS, top_p=p) == expected


def test_top_p_keeps_ties_with_last_kept():
    logits = np.log(np.array([0.3, 0.3, 0.3, 0.1]))
    assert support(logits, top_p=0.35) == {0, 1, 2}


def test_top_k_then_top_p():
    # top-k 3 renormalises {0.4, 0.3, 0.15} -> top-p 0.8 needs 0.47 + 0.35 = 0.82
    assert support(LOGITS, top_k=3, top_p=0.8) == {1, 3}
    assert support(LOGITS, top_k=3, top_p=0.83) == {0, 1, 3}


def test_sampled_ids_stay_in_support_and_match_distribution():
    s = Sampler(temperature=1.0, top_k=3, seed=123)
    draws = np.array([s(LOGITS) for _ in range(4000)])
    assert set(draws.tolist()) <= {0, 1, 3}
    freq = np.bincount(draws, minlength=5) / draws.size
    expected = probabilities(LOGITS, 1.0, top_k=3)
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_temperature_sharpens():
    hot = probabilities(LOGITS, temperature=2.0)
    cold = probabilities(LOGITS, temperature=0.5)
    assert cold[1] > P[1] > hot[1]


def test_seeded_sampling_is_reproducible():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 97)).astype(np.float32)
    run = lambda seed: [Sampler(0.9, top_k=20, top_p=0.9, seed=seed)(r) for r in rows]
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=0),
                                dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_arguments_are_named(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        Sampler(**kw)


def test_nan_logits_raise():
    with pytest.raises(FloatingPointError, match="NaN"):
        Sampler(1.0, seed=0)(np.array([0.0, np.nan], np.float32))


# ---- bias, penalties, min-p: against transformers' processors where it has them -------------------

ROW = np.array([2.0, -1.0, 0.5, 1.5, -0.5, 0.0], np.float32)


def test_logit_bias_and_openai_penalties_by_hand():
    s = Sampler(temperature=0, logit_bias={4: 10.0})
    assert s(ROW) == 4
    s = Sampler(temperature=0, presence_penalty=0.6, frequency_penalty=0.5)
    for t in (0, 0, 3):
        s.accept(t)
    want = ROW.copy()
    want[0] -= 2 * 0.5 + 0.6      # twice in the output
    want[3] -= 1 * 0.5 + 0.6
    np.testing.assert_allclose(s._adjusted(ROW), want, rtol=0, atol=1e-6)
    assert s(ROW) == int(np.argmax(want)) == 2


def test_repetition_penalty_and_min_p_equal_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor
    prompt, out = [1, 2], [2, 5]
    s = Sampler(temperature=0, repetition_penalty=1.7, prompt=prompt)
    for t in out:
        s.accept(t)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), torch.tensor(ROW)[None])[0].numpy()
    np.testing.assert_allclose(s._adjusted(ROW), ref, rtol=1e-6)
    # min-p: the support it samples from is transformers' (temperature 1)
    keep = MinPLogitsWarper(0.3)(None, torch.tensor(ROW)[None])[0].numpy()
    s = Sampler(temperature=1.0, min_p=0.3, seed=0)
    drawn = {s(ROW) for _ in range(400)}
    assert drawn == set(np.flatnonzero(np.isfinite(keep)).tolist())


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="min_p"):
        Sampler(min_p=2.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        Sampler(repetition_penalty=0.0)
