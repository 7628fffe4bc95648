"""Text generation: the Python API and the `cke-dist generate` job (any tp x pp layout, through
the serving engine: `mpiexec -n 4 cke-dist generate --model DIR --tp 2 --pp 2 --prompt ...`).

    from cke_dist.generate import generate, stream_ids, generate_batch
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
Tests: tests/test_generate.py.
"""
from __future__ import annotations

import sys
import threading
import warnings


from .model.decode import InferenceModel
from .sampling import Sampler


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
        return _ended("length" if max_new == 0 else "context", ctx)
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
    return "length" if n == max_new else _ended("context", ctx)


def _ended(reason, ctx):
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
        _ended("context", ctx)
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


# ---- the `cke-dist generate` job -----------------------------------------------------------------

def add_arguments(p):
    p.add_argument("--model", required=True, help="model directory: HF (config.json + safetensors + "
                   "tokenizer.json), ours (cke_tokenizer.json), or a Q8_0 copy from `cke-dist quantize`")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (printed when all are done)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable); "
                   "the tokenizer's end-of-sequence token always stops")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], default=None,
                   help="quantize the linears at load time (a GGUF file keeps its own formats otherwise)")
    p.add_argument("--threads", type=int, default=None, help="threads for BLAS and numba together")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (under mpiexec: -n tp*pp)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages; several prompts flow through them at once")


class StopText:
    """Holds back streamed text that might be the start of a stop string; cuts at the first match."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                self.hit, out, self.pending = True, self.pending[:i], ""
                return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def run(args) -> int:
    """Every rank loads its slices (tp shard of its pipeline stage) and runs the serving engine;
    rank 0 submits the prompts (prompt i samples with seed + i, as generate_batch) and prints."""
    from .comm import init
    from .serving import Engine, Params
    from .tokenizer import TextStream, load_tokenizer
    if args.threads is not None:
        from cke_kernels.threads import set_num_threads
        set_num_threads(args.threads)
    world = init()
    tok = load_tokenizer(args.model)     # before the weights (every rank alike): a missing tokenizer fails fast
    engine = Engine.build(args.model, world, tp=args.tp, pp=args.pp, quantize=args.quantize,
                          max_batch=len(args.prompt))
    if engine.vocab < getattr(tok, "vocab_size", 0):
        raise ValueError(f"{args.model}: tokenizer has {tok.vocab_size} tokens, the model's vocab_size is only "
                         f"{engine.vocab}")
    if world.rank != 0:
        engine.run()
        return 0
    # the printing in a thread, the engine loop on the main thread (numba's kernels are slower off it)
    outcome: dict = {}

    def client():
        try:
            outcome["rc"] = _print_generations(args, tok, engine, Params, TextStream)
        except BaseException as e:      # re-raised on the main thread once the loop has stopped
            outcome["error"] = e
        finally:
            engine.shutdown()
    printer = threading.Thread(target=client, name="cke-generate-client")
    printer.start()
    try:
        engine.run_main()
    finally:
        printer.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["rc"]


def _print_generations(args, tok, engine, Params, TextStream) -> int:
    stop_ids = tuple(getattr(tok, "eos_token_ids", []) or [])
    prompts = [tok.encode(p, add_bos=args.add_bos) for p in args.prompt]
    for i, ids in enumerate(prompts):
        if len(ids) >= engine.max_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context of {engine.max_len} "
                             f"(max_position_embeddings in config.json) leaves no room to generate: shorten it")
    if args.max_new_tokens == 0:
        return 0
    reqs = [engine.submit(ids, Params(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p,
                                      seed=None if args.seed is None else args.seed + i, stop_ids=stop_ids))
            for i, ids in enumerate(prompts)]
    if len(reqs) > 1:
        for text, ids, req in zip(args.prompt, prompts, reqs):
            stream = TextStream(tok, context=ids)
            body = "".join(stream.push(i) for i in req.stream() if i not in stop_ids) + stream.flush()
            for s in args.stop:
                body = body.split(s)[0] if s else body
            print(f"{text}{body}\n---")
        return 0
    req = reqs[0]
    out, stream, cut = sys.stdout, TextStream(tok, context=prompts[0]), StopText(args.stop)
    out.write(args.prompt[0])
    out.flush()
    for t in req.stream():
        if t in stop_ids:
            continue
        out.write(cut.push(stream.push(t)))
        out.flush()
        if cut.hit:
            req.cancel()
            break
    if not cut.hit:
        out.write(cut.push(stream.flush()) + cut.flush())
    reason = "stop" if cut.hit else req.finish
    if reason == "length" and req.limit < args.max_new_tokens:
        reason = _ended("context", engine.max_len)
    out.write("\n")
    out.flush()
    print(f"[stopped: {reason}]", file=sys.stderr)
    return 0
