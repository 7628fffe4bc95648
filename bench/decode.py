"""Decode bench: tokens/s of greedy generation (batch 1), ours in float32 and Q8_0 against
transformers' LlamaForCausalLM.generate (torch eager, same weights) and against the
memory-bandwidth roofline, all measured in one run.

    python bench/decode.py                 # Llama-3.2-1B shape, random weights (~7 GB of RAM)
    python bench/decode.py --small         # a small model, for a quick check that it all runs
                                           # (its weights fit in L3, so "% roofline" means nothing)
    python bench/decode.py --gemv          # only the GEMVs: float32 vs Q8_0 on 1B-shaped matrices

Per thread count (--threads 1,2): a read bandwidth B measured here (numba, parallel sum over
a buffer far larger than the caches), then for each implementation the median time of one
decode step over --new-tokens steps after a --prompt-len prefill. The roofline of a format is
B / (bytes of weights one decode step reads); "% roofline" = our tokens/s / that roofline.
Ratios are computed within the run; these machines are noisy, so trust medians and ratios,
not absolute times. For 1-thread numbers run `--threads 1` on its own: the pools are sized for the
largest count asked, and an idle worker spinning beside a 1-thread decode slows it. Targets
(issue 15): float32 >= 85% of its roofline; Q8_0 >= 70% of its roofline and >= 2.8x our float32.
"""
import argparse
import sys
import time

from common import LLAMA_1B, read_bandwidth, thread_env


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a small model (hidden 512, 4 layers, vocab 32000)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-torch", action="store_true", help="skip transformers")
    p.add_argument("--gemv", action="store_true",
                   help="micro-benchmark the decode GEMVs instead (8192x2048, 2048x8192, "
                        "a quarter of the 128256x2048 LM head)")
    p.add_argument("--gemv-mib", type=int, default=1024,
                   help="float32 bytes cycled through per shape in --gemv (far beyond L3: DRAM speed)")
    p.add_argument("--bandwidth-mib", type=int, default=2048, help="buffer size of the bandwidth probe")
    p.add_argument("--smoke", action="store_true", help="seconds: --small, 1 thread, 4 tokens, no torch (checks it runs)")
    a = p.parse_args()
    if a.smoke:
        a.small, a.threads, a.new_tokens, a.no_torch, a.bandwidth_mib = True, "1", 4, True, 64
    return a


args = parse()
THREADS = [int(t) for t in args.threads.split(",")]
thread_env(max(THREADS))   # pools are sized at import: the largest count, then set_num_threads picks per run

import numpy as np  # noqa: E402

from cke_dist.model import LlamaConfig, Model  # noqa: E402
from cke_dist.model.inference import InferenceModel  # noqa: E402
from cke_dist.serving.sampling import Sampler  # noqa: E402
from cke_kernels.threads import set_num_threads  # noqa: E402

SMALL = dict(LLAMA_1B, vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)


def our_decode(im, prompt, n_new):
    """(median seconds per decode step, generated ids), greedy."""
    pick = Sampler(temperature=0)
    cache = im.new_cache(1, len(prompt) + n_new)
    tok = pick(im.prefill(cache, 0, prompt))
    ids, times = [tok], []
    for _ in range(n_new - 1):
        t0 = time.perf_counter()
        logits = im.decode(cache, [0], [tok])[0]
        tok = pick(logits)
        times.append(time.perf_counter() - t0)
        ids.append(tok)
    return float(np.median(times)), ids


def torch_model(model):
    """transformers' LlamaForCausalLM sharing our float32 weights (no copy)."""
    import torch
    import transformers
    hcfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_dict().items()
                                       if k not in ("architectures",)}, attn_implementation="eager")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hcfg)
    state = {k: torch.from_numpy(v) for k, v in model.named_params.items()}
    if hcfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, assign=True, strict=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg)   # its buffer was on the meta device
    hf.tie_weights()
    return hf.eval()


def torch_decode(hf, prompt, n_new):
    """(median seconds per decode step, generated ids) of hf.generate, timed by a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamp(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    s = Stamp()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                          pad_token_id=0, streamer=s)
    # put #0 is the prompt, #1 the first token (after prefill); gaps after that are decode steps
    return float(np.median(np.diff(s.t[1:]))), out[0, len(prompt):].tolist()


def gemv_bench():
    """ms per call of the float32 and the Q8_0 GEMV (M=1), cycling through copies of the matrix
    whose float32 total is --gemv-mib, so weights come from DRAM as in a real decode step."""
    from cke_kernels.decode_matvec import f32_matvec
    from cke_kernels.q8_0 import q8_0_matvec, quantize_q8_0
    rng = np.random.default_rng(0)
    print("| threads | shape (N x K) | f32 ms | f32 GB/s | Q8_0 ms | Q8_0 GB/s | Q8_0 / f32 speed |")
    print("|---|---|---|---|---|---|---|")
    for n, k in ((8192, 2048), (2048, 8192), (128256 // 4, 2048)):
        copies = max(2, args.gemv_mib * 2**20 // (4 * n * k))
        ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
        qs = [quantize_q8_0(w) for w in ws]
        x = rng.standard_normal((1, k), dtype=np.float32)
        out = np.empty((1, n), np.float32)
        for t in THREADS:
            set_num_threads(t)
            f32_matvec(ws[0], x, out)
            q8_0_matvec(*qs[0], x, out)
            best = {}
            for _ in range(5):          # interleaved rounds, best of each: a shared machine drifts
                for name, fn in (("f32", lambda i: f32_matvec(ws[i], x, out)),
                                 ("q8", lambda i: q8_0_matvec(*qs[i], x, out))):
                    t0 = time.perf_counter()
                    for i in range(copies):
                        fn(i)
                    best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / copies)
            b32, b8 = 4 * n * k, qs[0][0].nbytes + qs[0][1].nbytes
            print(f"| {t} | {n} x {k} | {best['f32'] * 1e3:.2f} | {b32 / best['f32'] / 1e9:.1f} | "
                  f"{best['q8'] * 1e3:.2f} | {b8 / best['q8'] / 1e9:.1f} | {best['f32'] / best['q8']:.2f}x |",
                  flush=True)
        ws, qs = [], []             # free this shape's copies before the next
    return 0


def main():
    if args.gemv:
        return gemv_bench()
    cfg = LlamaConfig.from_dict(SMALL if args.small else LLAMA_1B)
    t0 = time.perf_counter()
    model = Model.from_config(cfg, seed=0)
    f32 = InferenceModel.from_model(model)
    q8 = f32.to_quantized("q8_0")
    print(f"model: {'small' if args.small else 'Llama-3.2-1B shape'}, {model.num_params / 1e9:.3f} B params, "
          f"random weights (built + quantized in {time.perf_counter() - t0:.0f} s); batch 1, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, greedy", flush=True)
    hf = None if args.no_torch else torch_model(model)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    probe = np.ones(args.bandwidth_mib * 2**20 // 4, np.float32)
    bytes_f32, bytes_q8 = f32.weight_bytes_per_token(), q8.weight_bytes_per_token()
    print(f"weights read per decode step: float32 {bytes_f32 / 2**30:.2f} GiB, Q8_0 {bytes_q8 / 2**30:.2f} GiB")
    # quality of Q8_0 on this model: random weights give nearly flat logits, so top-1 agreement is a
    # weak signal here; the cosine of the prompt's logits is the stable one
    lf = f32.prefill(f32.new_cache(1, len(prompt)), 0, prompt, all_logits=True)
    lq = q8.prefill(q8.new_cache(1, len(prompt)), 0, prompt, all_logits=True)
    cos = (lf * lq).sum(1) / np.linalg.norm(lf, axis=1) / np.linalg.norm(lq, axis=1)
    print(f"Q8_0 vs float32 prompt logits: min cosine {cos.min():.5f}, top-1 agreement "
          f"{np.mean(lf.argmax(1) == lq.argmax(1)):.2f}")
    rows = []
    for n in THREADS:
        set_num_threads(n)
        if hf is not None:
            import torch
            torch.set_num_threads(n)
        bw = read_bandwidth(probe)
        s32, ids32 = our_decode(f32, prompt, args.new_tokens)
        s8, ids8 = our_decode(q8, prompt, args.new_tokens)
        bw = (bw + read_bandwidth(probe)) / 2          # before and after, for a drifting machine
        row = dict(threads=n, bw=bw, f32=1 / s32, q8=1 / s8, roof32=bw / bytes_f32, roof8=bw / bytes_q8,
                   agree=float(np.mean(np.array(ids8) == np.array(ids32))))
        if hf is not None:
            st, idst = torch_decode(hf, prompt, args.new_tokens)
            row.update(torch=1 / st, same=idst == ids32)
        rows.append(row)
        print_row(row)
    print()
    print("| threads | read GB/s | torch tok/s | f32 tok/s | f32 / torch | f32 % roofline | Q8_0 tok/s | "
          "Q8_0 / f32 | Q8_0 % roofline | f32 tokens == torch | Q8_0 top-1 == f32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("torch")
        cells = [r["threads"], f"{r['bw'] / 1e9:.1f}", "-" if t is None else f"{t:.2f}", f"{r['f32']:.2f}",
                 "-" if t is None else f"{r['f32'] / t:.2f}x", f"{100 * r['f32'] / r['roof32']:.0f}%",
                 f"{r['q8']:.2f}", f"{r['q8'] / r['f32']:.2f}x", f"{100 * r['q8'] / r['roof8']:.0f}%",
                 "-" if t is None else ("yes" if r["same"] else "NO"), f"{100 * r['agree']:.0f}%"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


def print_row(r):
    t = f", torch {r['torch']:.2f} tok/s" if "torch" in r else ""
    print(f"threads {r['threads']}: bandwidth {r['bw'] / 1e9:.1f} GB/s, f32 {r['f32']:.2f} tok/s "
          f"(roofline {r['roof32']:.2f}), Q8_0 {r['q8']:.2f} tok/s (roofline {r['roof8']:.2f}){t}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
