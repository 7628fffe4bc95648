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
