"""LoRA on the real model (smol2: SmolLM2 cut to 2 layers) against `peft`: logits and adapter
gradients, the CLI fine-tune whose checkpoint is a PEFT adapter directory, its merged exports and
resume, and every layout equal to one process."""
import json
import subprocess
import sys

import numpy as np
import pytest
from finetune_job import run_train, train_args, write_chats
from mpirun import REPO, threads_env

from cke_dist.formats.checkpoint import find_checkpoint
from cke_dist.model import load_model
from cke_dist.model.lora import TARGETS, LoraModel, LoraSettings

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _peft_model(base_dir, settings):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    cfg = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                          target_modules=list(settings.targets))
    return peft.get_peft_model(hf, cfg)


def _batch(vocab, B=2, T=24, seed=0):
    tok = np.random.default_rng(seed).integers(0, vocab, (B, T + 1))
    y = tok[:, 1:].copy()
    y[0, :5] = -100
    return tok[:, :-1], y


def test_logits_and_adapter_gradients_equal_peft(smol2):
    """Every projection adapted, B non-zero (PEFT starts it at zero, which would hide half the
    math): the logits, the loss and every adapter gradient equal peft's on the same weights."""
    settings = LoraSettings(4, 8.0, 0.0, TARGETS)
    lm = LoraModel(load_model(smol2), settings, seed=3)
    r = np.random.default_rng(1)
    for name, v in lm.named_params.items():
        if ".lora_B." in name:
            v[...] = 0.02 * r.standard_normal(v.shape)
    pm = _peft_model(smol2, settings)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(lm.named_params[name.replace(".default", "")]))
    x, y = _batch(lm.config.vocab_size)
    lm.zero_grad()
    loss = lm.forward_backward(x, y)
    logits = pm(input_ids=torch.from_numpy(x)).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5 * abs(ref.item())
    lg = logits.detach().numpy()
    assert np.abs(lm.forward(x) - lg).max() < 1e-4 * np.abs(lg).max()
    grads = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if "lora_" in n}
    assert sorted(grads) == sorted(lm.named_grads)
    for name, g in grads.items():
        assert np.abs(lm.named_grads[name] - g).max() < 1e-4 * np.abs(g).max(), name
    assert lm.base.grads is None            # the base keeps no gradient buffer


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_base_is_lora_on_its_dequantized_weights(smol2, kind):
    """QLoRA: a base held as `kind` blocks trains exactly as LoRA on a float base whose projections
    are those blocks dequantized (same loss, same adapter gradients), and it holds far fewer bytes."""
    from cke_dist.formats.quant import Quant
    from cke_dist.model.layout import layer_names
    settings = LoraSettings(4, 8.0, 0.0, TARGETS)
    quant = LoraModel(load_model(smol2), settings, seed=3)
    float_bytes = sum(v.nbytes for v in quant.base.named_params.values())
    quant.base.quantize_frozen(kind)
    ref_base = load_model(smol2)
    for i in range(ref_base.config.num_hidden_layers):
        for role in ("qkv", "o", "gate_up", "down"):
            for name in layer_names(ref_base.config, i)[role]:
                w = ref_base.named_params[name]
                w[...] = Quant.of(np.ascontiguousarray(w), kind).dequantized()
    ref = LoraModel(ref_base, settings, seed=3)
    r = np.random.default_rng(1)
    for name, v in ref.named_params.items():
        if ".lora_B." in name:
            v[...] = quant.named_params[name][...] = 0.02 * r.standard_normal(v.shape)
    x, y = _batch(ref.config.vocab_size)
    for m in (quant, ref):
        m.zero_grad()
    assert quant.forward_backward(x, y) == pytest.approx(ref.forward_backward(x, y), rel=1e-6)
    assert np.abs(quant.grads - ref.grads).max() <= 1e-5 * np.abs(ref.grads).max()
    rest = sum(v.nbytes for v in quant.base.named_params.values())     # embedding, norms: float32
    assert quant.base.params is None                                    # the float32 buffer is gone
    held = sum(q.nbytes for W in quant.base._p["layers"] for q in W._q.values())
    assert held < (0.29 if kind == "q8_0" else 0.16) * (float_bytes - rest)   # 9 or 5 bits a weight


def test_bad_lora_settings_are_one_line_errors(smol2, tmp_path):
    data = write_chats(tmp_path / "chat.jsonl")
    for sets, want in ((["lora.rank=4", "lora.targets=q_proj,wq"], "unknown 'wq'"),
                       (["lora.rank=-1"], "lora.rank = -1: must be >= 0")):
        res = run_train(1, train_args(smol2, data, tmp_path / "out", *sets))
        assert res.returncode == 2 and want in res.stdout, res.stdout[-2000:]
        assert "Traceback" not in res.stdout
    res = subprocess.run([sys.executable, "-m", "cke_dist.cli", "train", "--set", "lora.rank=8"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=threads_env())
    assert res.returncode == 2 and "set model.init_from" in res.stderr, res.stderr[-2000:]


def test_lora_fine_tune_checkpoint_is_a_peft_adapter(smol2, tmp_path):
    """The CLI trains adapters only (on a Q8_0 base); the checkpoint is an adapter directory peft loads onto the base
    with our logits; export merges it (hf: transformers reads it with the same logits) or writes
    PEFT's files; generate runs on it; a resumed run continues its steps."""
    data = write_chats(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    sets = ["lora.rank=8", "lora.alpha=16", "lora.targets=all-linear", "optim.lr=1e-2", "optim.min_lr=1e-2",
            f"data.val_path={data}", "lora.quantize_base=q8_0", "sample.max_new_tokens=4"]
    res = run_train(1, train_args(smol2, data, out, *sets))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "trainable of" in res.stdout and "--- sample" in res.stdout
    ckpt = find_checkpoint(out)
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    adapter_bytes = (ckpt / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.05 * sum(p.stat().st_size for p in smol2.glob("*.safetensors"))
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(smol2.resolve())

    ours = load_model(ckpt)                                    # the base with the adapters merged
    assert np.abs(ours.params - load_model(smol2).params).max() > 1e-4   # the steps moved the weights
    x, _ = _batch(ours.config.vocab_size, seed=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smol2, torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, ckpt)
    with torch.no_grad():
        ref = pm(input_ids=torch.from_numpy(x)).logits.numpy()
    assert np.abs(ours.forward(x) - ref).max() < 1e-4 * np.abs(ref).max()

    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    for fmt, dst in (("hf", merged), ("peft", adapters)):
        exp = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(out), str(dst), "--format", fmt],
                             cwd=REPO, capture_output=True, text=True, timeout=300, env=threads_env())
        assert exp.returncode == 0, exp.stderr[-2000:]
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32,
                                                                attn_implementation="eager")(
            input_ids=torch.from_numpy(x)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    pm2 = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        smol2, torch_dtype=torch.float32, attn_implementation="eager"), adapters)
    with torch.no_grad():
        assert np.abs(pm2(input_ids=torch.from_numpy(x)).logits.numpy() - ref).max() < 1e-4 * np.abs(ref).max()

    # the merged GGUF: transformers' GGUF loader reads our logits; llama.cpp (where installed) our
    # token ids and our greedy tokens
    gguf = tmp_path / "tuned.gguf"
    exp = subprocess.run([sys.executable, "-m", "cke_dist.cli", "export", str(out), str(gguf), "--format", "gguf"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=threads_env())
    assert exp.returncode == 0, exp.stderr[-2000:]
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name,
                                                                torch_dtype=torch.float32)(
            input_ids=torch.from_numpy(x)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        from cke_dist.formats.tokenizer import load_tokenizer
        from cke_dist.serving.generate import generate
        prompt = "<|im_start|>user\nWhat do bees make?<|im_end|>\n<|im_start|>assistant\n"
        ids = load_tokenizer(gguf).encode(prompt)
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        theirs = [t for _, t in zip(range(4), llm.generate(ids, temp=0.0, top_k=1))]
        assert theirs == generate(load_model(gguf), ids, 4, temperature=0)

    gen = subprocess.run([sys.executable, "-m", "cke_dist.cli", "generate", "--model", str(out), "--prompt", "Hi",
                          "--max-new-tokens", "3", "--temperature", "0"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=threads_env())
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]

    resumed = run_train(1, ["-m", "cke_dist.cli", "train", "--no-progress", "--resume", str(out),
                            "--set", "train.steps=5"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert find_checkpoint(out).name == "step_00000005"


# ---- every layout trains the adapters as one process does -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layout", [("dp2", 2, []), ("tp3", 3, ["parallel.tp=3"]),
                                    ("pp2", 2, ["parallel.pp=2", "parallel.schedule=zb"]),
                                    ("dp2-zero1", 2, ["parallel.zero=1"])], ids=lambda x: x[0])
def test_lora_on_a_layout_equals_one_process(smol2, tmp_path_factory, layout):
    """The same LoRA job (every projection, dropout on, 3 AdamW steps) in one process and in the
    layout: every adapter tensor agrees (dropout masks do not depend on the layout)."""
    from cke_dist.formats.hf import open_hf_tensors
    name, n, sets = layout
    tmp = tmp_path_factory.getbasetemp() / "lora_layouts"
    tmp.mkdir(exist_ok=True)
    data = write_chats(tmp / "chat.jsonl")
    job = ["data.batch_size=2", "data.grad_accum=2", f"data.val_path={data}", "lora.rank=4",
           "lora.targets=all-linear", "lora.dropout=0.1", "optim.lr=1e-2", "optim.min_lr=1e-2",
           # Adam divides by sqrt(v) + eps: an element whose gradient is ~1e-9 of rounding noise would
           # turn that noise into a visible step; a larger eps keeps the comparison about the math
           "optim.eps=1e-6"]
    if not (tmp / "one").is_dir():
        one = run_train(1, train_args(smol2, data, tmp / "one", *job))
        assert one.returncode == 0, one.stdout[-3000:]
    res = run_train(n, train_args(smol2, data, tmp / name, *job, *sets))
    assert res.returncode == 0, res.stdout[-3000:]
    ref, got = open_hf_tensors(find_checkpoint(tmp / "one")), open_hf_tensors(find_checkpoint(tmp / name))
    assert sorted(ref) == sorted(got)
    moved = 0.0
    for t in ref:
        a, b = ref.read(t), got.read(t)
        # 3 steps of lr 1e-2 move an element ~3e-2; summation orders differ by ~1e-5 after Adam
        assert np.abs(a - b).max() < 5e-5, t
        if ".lora_B." in t:
            moved = max(moved, float(np.abs(a).max()))
    assert moved > 1e-4                     # B left zero: the steps trained the adapters
