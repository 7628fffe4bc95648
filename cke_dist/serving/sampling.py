"""Next-token choice from one row of logits: logit bias, penalties, greedy, temperature, min-p,
top-k, top-p; and the log-probabilities a client asks for.

Rules it keeps:
- the order is vLLM's: logit_bias, then the repetition penalty (transformers' rule over prompt
  and output: a positive logit divided by it, a negative one multiplied), the frequency penalty
  (times each token's count in the output) and the presence penalty (once per token in the
  output), as OpenAI defines them; then temperature, min-p, top-k, top-p.
- temperature 0 is greedy: argmax of the biased and penalized logits, first index on ties.
- min-p keeps the tokens whose probability is at least min_p times the most likely one's.
- top-k then top-p, in that order (as transformers' logits processors), on
  temperature-scaled logits; the most likely token always survives.
- log-probabilities (`logprobs`) are the model's own: log-softmax of the raw logits in float64,
  before any bias, penalty or temperature (vLLM's default), so they score text, not the sampler.
- top-p keeps the smallest set of most likely tokens whose probability sums to
  >= p (within 1e-6); a token whose probability ties the last kept one is kept too, so the
  support never depends on sort order.
- all randomness comes from one numpy Generator seeded once per Sampler: the
  same seed and logits give the same ids.
Tests: tests/unit/test_sampling.py.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(lp: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (id, logprob), most likely first, lower id first on ties."""
    if n <= 0:
        return []
    idx = np.argpartition(-lp, min(n, lp.size) - 1)[:n]
    return [(int(i), float(lp[i])) for i in sorted(idx.tolist(), key=lambda i: (-lp[i], i))]


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
    """Chooses ids from logits rows; one per generation so a seed reproduces a whole run. The
    penalties need what came before: `prompt` once, and each chosen id through `accept`."""

    def __init__(self, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, min_p: float | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                 logit_bias: dict[int, float] | None = None, prompt=()):
        check_sampling_args(temperature, top_k, top_p)
        if min_p is not None and not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty!r}")
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None else float(top_p)
        self.min_p = None if not min_p else float(min_p)
        self.presence, self.frequency = float(presence_penalty), float(frequency_penalty)
        self.repetition = float(repetition_penalty)
        self.bias = {int(k): float(v) for k, v in (logit_bias or {}).items()}
        self.counts: dict[int, int] = {}              # output ids so far
        self.seen = set(int(i) for i in prompt)       # prompt and output ids (the repetition penalty)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def accept(self, tok: int) -> None:
        """tok was chosen: it counts for the penalties from now on."""
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.seen.add(tok)

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """Logits after bias and penalties (a float32 copy; the row itself when there are none)."""
        if not (self.bias or self.presence or self.frequency or self.repetition != 1.0):
            return logits
        z = np.array(logits, dtype=np.float32)
        for i, b in self.bias.items():
            z[i] += b
        if self.repetition != 1.0 and self.seen:
            ids = np.fromiter(self.seen, np.int64)
            v = z[ids]
            z[ids] = np.where(v > 0, v / self.repetition, v * self.repetition)
        if (self.presence or self.frequency) and self.counts:
            ids = np.fromiter(self.counts.keys(), np.int64)
            n = np.fromiter(self.counts.values(), np.float32)
            z[ids] -= self.frequency * n + self.presence
        return z

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """allowed: a bool mask of the tokens a grammar takes next (None: all)."""
        if not np.all(np.isfinite(logits)):
            bad = np.flatnonzero(~np.isfinite(logits))[:5].tolist()
            raise FloatingPointError(f"logits contain NaN/inf (first bad ids {bad}): the model's weights "
                                     "or inputs are broken")
        logits = self._adjusted(logits)
        if allowed is not None:
            if not allowed.any():
                raise ValueError("the grammar allows no token here")
            logits = np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32)
        if self.greedy:
            return int(np.argmax(logits))
        if self.min_p is not None:
            z = np.asarray(logits, dtype=np.float64) / self.temperature
            logits = np.where(z >= z.max() + np.log(self.min_p), logits, -np.inf)
        p = probabilities(logits, self.temperature, self.top_k, self.top_p)
        # inverse-CDF draw: one uniform per token, so the stream of draws is the same for any support
        u = self.rng.random()
        idx = int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))
        idx = min(idx, p.size - 1)
        while p[idx] == 0.0:         # u landed exactly on a boundary before a masked token
            idx -= 1
        return idx
