"""The `cke-dist serve` job: an OpenAI-compatible HTTP server over the continuous-batching engine.

    cke-dist serve --model DIR                                   # one process
    mpiexec -n 4 cke-dist serve --model DIR --tp 2 --pp 2 --port 8000

Every rank builds its part of the model (Engine.build, read by slice). Ranks other than 0 follow
rank 0's ticks (engine.run) and exit 0 when rank 0 shuts the engine down. Rank 0 answers HTTP
(serving/http.py) in a thread and runs the engine loop on its main thread until SIGINT/SIGTERM (an
orderly stop: exit 0)
or until the engine dies (a rank lost, a failed step): then every request in flight and every new
one gets 503 for a moment, and the job ends with a non-zero status (MPI Abort under mpiexec, so
no rank is left waiting).
Tests: tests/integration/test_serve.py.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from cke_kernels import THREAD_VARS

from cke_dist.cli import int_in

# after the engine dies: how long in-flight requests get to receive their 503, then how long new
# ones keep getting a 503 (rather than a refused connection) before the process ends
DRAIN_S = 5.0
LINGER_S = 2.0


def add_arguments(p):
    p.add_argument("--model", required=True, help="model directory (HF config.json + safetensors + tokenizer.json, "
                   "or a quantized copy from `cke-dist quantize`) or a GGUF file; its chat template serves chat")
    p.add_argument("--tp", type=int_in(1), default=1, help="tensor-parallel ranks (the world is tp x pp)")
    p.add_argument("--pp", type=int_in(1), default=1, help="pipeline stages")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="TCP port (0: any free one; the URL is printed)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 paths (default: $CKE_API_KEY; none: open)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: the directory name)")
    p.add_argument("--quantize", choices=["q8_0", "q4_0", "q4_1"], default=None,
                   help="quantize the linears at load time (a GGUF file keeps its own formats otherwise)")
    p.add_argument("--speculative-tokens", type=int_in(0, 7), default=0, metavar="K",
                   help="prompt-lookup speculative decoding: up to K draft tokens per step, taken from where the "
                        "last tokens occurred before in the context, checked in the same forward (0: off); the "
                        "output is the plain one, token for token")
    p.add_argument("--max-batch", type=int_in(1), default=16, help="requests decoded together (KV cache slots)")
    p.add_argument("--max-len", type=int_in(2), default=None,
                   help="context per request: prompt + completion tokens (default: max_position_embeddings)")
    p.add_argument("--threads", type=int_in(1), default=None, help="threads for BLAS and numba together, per rank")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to /v1/completions prompts "
                   "(chat templates place their own)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (larger: 413)")
    p.add_argument("--quiet", action="store_true", help="no access log line per request")


def run(args) -> int:
    from cke_dist.comm import init
    from cke_dist.formats.checkpoint import model_path
    from cke_dist.serving import Engine

    if args.threads is not None:
        from cke_kernels.threads import set_num_threads
        set_num_threads(args.threads)
    world = init()
    args.model = model_path(args.model)  # a run directory: its newest checkpoint
    if world.rank != 0:
        # Ctrl-C reaches every rank under mpiexec; rank 0 alone decides the stop and tells the others
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine = Engine.build(args.model, world, args.tp, args.pp, quantize=args.quantize, max_batch=args.max_batch,
                              max_len=args.max_len, speculative_tokens=args.speculative_tokens)
        engine.run()
        return 0

    from cke_dist.serving.chat import load_chat_template
    from cke_dist.serving.http import OpenAIServer
    from cke_dist.formats.tokenizer import load_tokenizer

    # everything that can fail on a bad argument fails before the weights are read
    tok = load_tokenizer(args.model)
    chat = load_chat_template(args.model)
    api_key = args.api_key or os.environ.get("CKE_API_KEY") or None
    # how the banner's curl names the key: never the key itself (logs are read by others)
    key_hint = None if api_key is None else ("$CKE_API_KEY" if not args.api_key else "<the --api-key value>")
    name = args.served_model_name or Path(args.model).resolve().name
    try:
        server = OpenAIServer((args.host, args.port), tok, name, chat_template=chat, api_key=api_key,
                              max_body=args.max_body, add_bos=args.add_bos, access_log=not args.quiet,
                              fingerprint=_fingerprint(args))
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e}") from None

    engine = Engine.build(args.model, world, args.tp, args.pp, quantize=args.quantize, max_batch=args.max_batch,
                          max_len=args.max_len, speculative_tokens=args.speculative_tokens)
    vocab = engine.vocab
    if vocab < getattr(tok, "vocab_size", 0):
        engine.start()
        engine.shutdown(timeout=30)
        raise ValueError(f"{args.model}: tokenizer has {tok.vocab_size} tokens, the model's vocab_size is only {vocab}")
    server.engine = engine

    # HTTP in a thread; the engine loop on the main thread (numba's parallel kernels pay ~0.5 ms a
    # launch off it: serving/engine.py). A signal stops the loop from its handler, on this thread.
    stopped_by_signal = threading.Event()

    def on_signal(*_):
        stopped_by_signal.set()
        engine.shutdown()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="cke-http", daemon=True).start()
    _banner(args, server, engine, world.size, chat is not None, key_hint)

    try:
        engine.run_main()
    except Exception:     # the requests got the error (503); it is printed below
        pass
    if stopped_by_signal.is_set() and engine.error is None:     # an orderly stop: every rank's loop ended
        print("cke-dist serve: stopping", file=sys.stderr, flush=True)
        server.shutdown()
        server.server_close()
        return 0

    print(f"cke-dist serve: {engine.error or 'the engine stopped'}; answering 503 and ending the job",
          file=sys.stderr, flush=True)
    server.wait_idle(DRAIN_S)
    time.sleep(LINGER_S)
    server.shutdown()
    server.server_close()
    if world.size > 1:
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)
    return 1


def _threads_line(args) -> str:
    import cke_dist.cli as cli
    if args.threads is not None:
        return f"{args.threads} thread{'s' * (args.threads > 1)} per rank (--threads)"
    if cli.DEFAULT_THREADS is not None:
        return cli.DEFAULT_THREADS[1] + " per rank"
    return "threads from the environment (" + ", ".join(f"{v}={os.environ[v]}" for v in THREAD_VARS
                                                      if v in os.environ) + ")"


def _fingerprint(args) -> str:
    """OpenAI's system_fingerprint: changes when what decides the outputs changes (our version, the
    weights file, load-time quantization, the layout), so a client can tell why answers moved."""
    from cke_dist import __version__
    p = Path(args.model).resolve()
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    ident = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    h = hashlib.sha256(repr((__version__, str(p), ident, args.quantize, args.tp, args.pp)).encode())
    return "fp_" + h.hexdigest()[:12]


def _banner(args, server, engine, size, has_chat, key_hint):
    host = args.host if ":" not in args.host else f"[{args.host}]"
    base = f"http://{host}:{server.port}"
    weights = args.quantize or engine.im.quantize or "float32"
    auth = f' -H "Authorization: Bearer {key_hint}"' if key_hint else ""
    lines = [
        f"cke-dist serve: {base}/v1 (OpenAI-compatible; GET {base}/health)",
        f"  model {server.model_name!r} from {args.model} ({weights}); layout tp={args.tp} x pp={args.pp} on {size} "
        f"rank{'s' if size > 1 else ''}; up to {engine.max_batch} requests at once, context {engine.max_len} tokens;"
        f" chat {'from the template' if has_chat else 'unavailable (no chat template)'}"
        f"{'; API key required' if key_hint else ''}",
        f"  {_threads_line(args)}",
        f"  try: curl {base}/v1/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'",
    ]
    print("\n".join(lines), flush=True)
