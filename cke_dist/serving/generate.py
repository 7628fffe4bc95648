"""Text generation from Python (the `cke-dist generate` command, any tp x pp layout, runs the
serving engine instead: cke_dist/cli/generate.py).

    from cke_dist.serving.generate import generate, stream_ids, generate_batch
    ids = generate(model, prompt_ids, max_new_tokens=32, temperature=0)        # greedy
    for tok in stream_ids(model, prompt_ids, 64, temperature=0.8, top_p=0.9, seed=1): ...
    outs = generate_batch(model, [ids_a, ids_b], 32)                            # prompts of any lengths

Rules it keeps:
- `model` is a cke_dist Model (used through views, no copy) or an InferenceModel.
- the prompt is prefilled in one pass (GEMMs), then one token per step (GEMVs).
- a generation ends for one reason, the return value of `stream_ids`: "stop" (a
  stop id was produced; it is yielded), "length" (max_new_tokens), or "context"
  (the sequence filled max_position_embeddings: a warning says so). A prompt
  longer than the context raises before any work.
- a batch runs each prompt's prefill in its own cache row, then decodes all
  live rows together; row i samples with seed + i, so it reproduces
  `generate(..., seed=seed + i)`.
Tests: tests/integration/test_generate.py.
"""
from __future__ import annotations

import warnings


from cke_dist.model.inference import InferenceModel
from cke_dist.serving.sampling import Sampler


def as_inference_model(model, quantize=None) -> InferenceModel:
    if isinstance(model, InferenceModel):
        if quantize not in (None, model.quantize):
            raise ValueError(f"model is already built as {model.quantize or 'float32'}; cannot apply "
                             f"quantize={quantize!r} to it")
        return model
    return InferenceModel.from_model(model, quantize=quantize)


def _check_prompt(im: InferenceModel, prompt_ids, what="prompt") -> list[int]:
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError(f"{what} is empty: generation needs at least one token to start from")
    ctx, V = im.max_context, im.config.vocab_size
    if len(ids) > ctx:
        raise ValueError(f"{what} has {len(ids)} tokens, more than the model's context of {ctx} "
                         f"(max_position_embeddings in config.json); shorten the prompt")
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ValueError(f"{what} has token id {bad[0]} outside the vocabulary [0, {V})")
    return ids


def _check_max_new(max_new_tokens):
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return int(max_new_tokens)


def stream_ids(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
               stop_ids=None):
    """Yield new token ids one at a time; the generator's return value is the stop reason."""
    im = as_inference_model(model)
    ids = _check_prompt(im, prompt_ids)
    max_new = _check_max_new(max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed)
    stop = set(int(i) for i in (stop_ids or ()))
    P, ctx = len(ids), im.max_context
    room = ctx - P                       # tokens that fit before the sequence fills the context
    n = min(max_new, room)
    if n <= 0:
        return ended("length" if max_new == 0 else "context", ctx)
    # the last token is never fed back, so the cache needs P + n - 1 positions
    cache = im.new_cache(1, P + n - 1)
    logits = im.prefill(cache, 0, ids)
    for i in range(n):
        tok = sampler(logits)
        yield tok
        if tok in stop:
            return "stop"
        if i + 1 < n:
            logits = im.decode(cache, [0], [tok])[0]
    return "length" if n == max_new else ended("context", ctx)


def ended(reason, ctx):
    if reason == "context":
        warnings.warn(f"generation stopped: the sequence reached the model's context of {ctx} tokens "
                      f"(max_position_embeddings)", stacklevel=3)
    return reason


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             stop_ids=None) -> list[int]:
    """The new ids only (including a stop id that ended it)."""
    return list(stream_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids))


def generate_batch(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                   stop_ids=None) -> list[list[int]]:
    """New ids for each prompt (prompts may differ in length); decode steps run all live rows at once."""
    im = as_inference_model(model)
    prompts = [_check_prompt(im, p, f"prompt {i}") for i, p in enumerate(prompts)]
    max_new = _check_max_new(max_new_tokens)
    B, ctx = len(prompts), im.max_context
    if B == 0:
        return []
    samplers = [Sampler(temperature, top_k, top_p, None if seed is None else seed + i) for i in range(B)]
    stop = set(int(i) for i in (stop_ids or ()))
    limits = [min(max_new, ctx - len(p)) for p in prompts]
    if any(lim < max_new for lim in limits):
        ended("context", ctx)
    cache = im.new_cache(B, max(1, max(len(p) + max(lim - 1, 0) for p, lim in zip(prompts, limits))))
    outs: list[list[int]] = [[] for _ in range(B)]
    live, logits = [], []
    for b, p in enumerate(prompts):
        if limits[b] > 0:
            live.append(b)
            logits.append(im.prefill(cache, b, p))
    while live:
        next_live, feed = [], []
        for b, row in zip(live, logits):
            tok = samplers[b](row)
            outs[b].append(tok)
            if tok not in stop and len(outs[b]) < limits[b]:
                next_live.append(b)
                feed.append(tok)
        live = next_live
        if live:
            logits = list(im.decode(cache, live, feed))
    return outs
