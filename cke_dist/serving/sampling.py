"""Next-token choice from one row of logits: greedy, temperature, top-k, top-p.

Rules it keeps:
- temperature 0 is greedy: argmax, first index on ties (as torch.argmax).
- top-k then top-p, in that order (as transformers' logits processors), on
  temperature-scaled logits; the most likely token always survives.
- top-p keeps the smallest set of most likely tokens whose probability sums to
  >= p (within 1e-6); a token whose probability ties the last kept one is kept too, so the
  support never depends on sort order.
- all randomness comes from one numpy Generator seeded once per Sampler: the
  same seed and logits give the same ids.
Tests: tests/unit/test_sampling.py.
"""
from __future__ import annotations

import numpy as np


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Copy of a 1-D float logits row with the tokens outside top-k / top-p set to -inf."""
    z = np.array(logits, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(f"filter_logits takes one row of logits, got shape {z.shape}")
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, z.size - top_k)[z.size - top_k]   # the k-th largest value
        z[z < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        p = _softmax(z)
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        # index of the first token at which the kept mass reaches top_p; the 1e-6 slack keeps a
        # mass that float32 logits put a hair under p (0.39999997 for 0.4) counting as reaching it
        last = int(np.searchsorted(csum, top_p - 1e-6, side="left"))
        last = min(last, z.size - 1)
        z[p < p[order[last]]] = -np.inf
    return z


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - np.max(z))
    return e / e.sum()


def probabilities(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> np.ndarray:
    """The distribution a Sampler draws from (float64, sums to 1). temperature must be > 0."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy: there is no distribution to return")
    z = np.asarray(logits, dtype=np.float64) / temperature
    return _softmax(filter_logits(z, top_k, top_p))


class Sampler:
    """Chooses ids from logits rows; one per generation so a seed reproduces a whole run."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None):
        check_sampling_args(temperature, top_k, top_p)
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        if not np.all(np.isfinite(logits)):
            bad = np.flatnonzero(~np.isfinite(logits))[:5].tolist()
            raise FloatingPointError(f"logits contain NaN/inf (first bad ids {bad}): the model's weights "
                                     "or inputs are broken")
        if self.greedy:
            return int(np.argmax(logits))
        p = probabilities(logits, self.temperature, self.top_k, self.top_p)
        # inverse-CDF draw: one uniform per token, so the stream of draws is the same for any support
        u = self.rng.random()
        idx = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
        idx = min(idx, p.size - 1)
        while p[idx] == 0.0:         # u landed exactly on a boundary before a masked token
            idx -= 1
        return idx
