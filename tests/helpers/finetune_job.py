"""The fine-tuning tests' shared parts: chat data, `smol2` (the real model cut to 2 layers: its real
embedding, tokenizer and chat template, so several ranks train it in seconds) and a train job run
in one process or under mpiexec."""
import dataclasses
import json
import subprocess
import sys

from mpirun import REPO, run_mpi, threads_env

from cke_dist.model import load_model

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs has a spider?",
             "What do bees make?", "Which planet is red?", "What is 2 + 2?", "Say hello in Spanish.",
             "What is ice made of?"]
ANSWERS = ["Paris.", "Blue.", "Eight.", "Honey.", "Mars.", "Four.", "Hola.", "Frozen water."]


def chats():
    """Conversations: plain, with a system prompt, and two turns (two assistant spans)."""
    out = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
           for q, a in zip(QUESTIONS, ANSWERS)]
    out[1]["messages"].insert(0, {"role": "system", "content": "Answer in one word."})
    out[2]["messages"] += [{"role": "user", "content": "And an insect?"}, {"role": "assistant", "content": "Six."}]
    return out


def write_chats(path):
    path.write_text("".join(json.dumps(c) + "\n" for c in chats()))
    return path


def make_smol2(smollm2, d):
    """SmolLM2's first 2 layers as a Hugging Face directory with the real tokenizer files."""
    from cke_dist.formats.tokenizer import tokenizer_files
    from cke_dist.model import Model
    full = load_model(smollm2)
    small = Model.from_config(dataclasses.replace(full.config, num_hidden_layers=2))
    for name, p in small.named_params.items():
        p[...] = full.named_params[name]
    small.save(d)
    for name, data in tokenizer_files(smollm2).items():
        (d / name).write_bytes(data)
    return d


def train_args(model, data, out, *sets, fmt="chat"):
    args = ["-m", "cke_dist.cli", "train", "--no-progress"]
    for s in [f"model.init_from={model}", f"data.path={data}", f"data.format={fmt}", f"train.out_dir={out}",
              "data.seq_len=48", "data.batch_size=4", "data.grad_accum=1", "train.steps=3", "train.eval_every=0",
              "train.log_every=1", "optim.warmup_steps=0", "optim.lr=1e-3", "optim.min_lr=1e-3",
              "sample.max_new_tokens=0", *sets]:
        args += ["--set", s]
    return args


def run_train(n, args, timeout=300):
    if n == 1:
        res = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                             env=threads_env())
        res.stdout += res.stderr
        return res
    return run_mpi(n, args, timeout=timeout, env={"CKE_COMM_TIMEOUT": "60"})


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


