"""`cke-dist generate --model DIR_OR_GGUF --prompt ... [--tp T --pp P]`: stream generated text through the
serving engine (any tp x pp layout: `mpiexec -n 4 cke-dist generate --model DIR --tp 2 --pp 2 --prompt ...`)."""
from __future__ import annotations

import os
import sys
import threading

import cke_dist.cli as cli
from cke_dist.cli import int_in
from cke_dist.comm import init
from cke_dist.formats.checkpoint import model_path
from cke_dist.formats.tokenizer import StopText, TextStream, load_tokenizer
from cke_dist.serving import Engine, Params
from cke_dist.serving.generate import ended


def add_arguments(p):
    p.add_argument("--model", required=True, help="model directory: HF (config.json + safetensors + "
                   "tokenizer.json), ours (cke_tokenizer.json), or a Q8_0 copy from `cke-dist quantize`")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (printed when all are done)")
    p.add_argument("--max-new-tokens", type=int_in(1), default=64, help="tokens to generate (>= 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable); "
                   "the tokenizer's end-of-sequence token always stops")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], default=None,
                   help="quantize the linears at load time (a GGUF file keeps its own formats otherwise)")
    p.add_argument("--threads", type=int_in(1), default=None, help="threads for BLAS and numba together")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument("--speculative-tokens", type=int_in(0, 7), default=0, metavar="K",
                   help="prompt-lookup speculative decoding: up to K draft tokens per step, taken from where the "
                        "last tokens occurred before in the context, checked in the same forward (0: off); the "
                        "output is the plain one, token for token")
    p.add_argument("--tp", type=int_in(1), default=1, help="tensor-parallel ranks (under mpiexec: -n tp*pp)")
    p.add_argument("--pp", type=int_in(1), default=1, help="pipeline stages; several prompts flow through them at once")


def run(args) -> int:
    """Every rank loads its slices (tp shard of its pipeline stage) and runs the serving engine;
    rank 0 submits the prompts (prompt i samples with seed + i, as generate_batch) and prints."""
    if args.threads is not None:
        from cke_kernels.threads import set_num_threads
        set_num_threads(args.threads)
    elif cli.DEFAULT_THREADS is not None and cli.DEFAULT_THREADS[0] < len(os.sched_getaffinity(0)):
        print(f"cke-dist generate: {cli.DEFAULT_THREADS[1]}", file=sys.stderr)   # fewer than the cores: say why
    world = init()
    args.model = model_path(args.model)  # a run directory: its newest checkpoint
    tok = load_tokenizer(args.model)     # before the weights (every rank alike): a missing tokenizer fails fast
    engine = Engine.build(args.model, world, tp=args.tp, pp=args.pp, quantize=args.quantize,
                          max_batch=len(args.prompt), speculative_tokens=args.speculative_tokens)
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
            outcome["rc"] = _print_generations(args, tok, engine)
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


def _print_generations(args, tok, engine) -> int:
    stop_ids = tuple(getattr(tok, "eos_token_ids", []) or [])
    prompts = [tok.encode(p, add_bos=args.add_bos) for p in args.prompt]
    for i, ids in enumerate(prompts):
        if len(ids) >= engine.max_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context of {engine.max_len} "
                             f"(max_position_embeddings in config.json) leaves no room to generate: shorten it")
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
        reason = ended("context", engine.max_len)
    out.write("\n")
    out.flush()
    print(f"[stopped: {reason}]", file=sys.stderr)
    return 0
