"""The training job end to end on tiny models: learning, accumulation, resume, CLI errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpirun import REPO, threads_env

from cke_dist import cli
from cke_dist.formats.checkpoint import find_checkpoint
from cke_dist.model import load_model
from cke_dist.train.config import load_config
from cke_dist.train.loop import resolve_config, train
from cke_dist.train.schedule import lr_at


TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.max_position_embeddings=64",
        "data.seq_len=32", "data.batch_size=4", "sample.max_new_tokens=0", "train.eval_tokens=256",
        "optim.warmup_steps=2", "optim.lr=1e-2", "optim.min_lr=1e-3"]


def _cfg(tmp_path, *extra, name="run"):
    return load_config(None, TINY + [f"train.out_dir={tmp_path / name}", *extra])


def _metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_schedule():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))          # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))    # cosine falls
    assert lrs[55] == pytest.approx(0.55) and lrs[100:] == [0.1] * 10
    assert lr_at(0, 1.0, 0.0, 0, 10) == pytest.approx(1.0)          # no warmup


def test_loss_drops_and_metrics_logged(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=40", "train.eval_every=20", "train.log_every=1", "train.checkpoint_every=0")
    result = train(cfg, progress=False)
    rows = _metrics(result["out_dir"])
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))
    # a baseline at step 0, then every eval_every steps
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 20, 40] and all(math.isfinite(v) for v in vals)
    assert vals[0] > 5.0
    # starts near ln(256) = 5.55 (uniform over bytes) and learns
    assert losses[0] > 5.0 and np.mean(losses[-5:]) < losses[0] - 1.5, losses
    assert vals[-1] < losses[0] - 1.5
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows if "loss" in r)
    # checkpoint only at the end; it is a HF dir that loads back to the trained parameters
    ckpt = result["checkpoint"]
    assert ckpt.name == "step_00000040" and find_checkpoint(result["out_dir"]) == ckpt
    np.testing.assert_array_equal(load_model(ckpt).params, result["model"].params)
    assert json.loads((ckpt / "cke_tokenizer.json").read_text()) == {"type": "bytes"}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 40 and state["data"]["next_step"] == 40 and state["config"]["train"]["steps"] == 40


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # 2 micro-batches of 4 rows are the same 8 rows as one batch of 8: same updates up to rounding
    cfg_a = _cfg(tmp_path, "train.steps=4", "data.batch_size=4", "data.grad_accum=2", name="a")
    a = train(cfg_a, progress=False)
    b = train(_cfg(tmp_path, "train.steps=4", "data.batch_size=8", "data.grad_accum=1", name="b"), progress=False)
    np.testing.assert_allclose(a["model"].params, b["model"].params, rtol=1e-5, atol=1e-6)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # sanity: the runs trained (their parameters left the initialisation)
    from cke_dist.model import LlamaConfig, Model
    init = Model.from_config(LlamaConfig.from_dict(cfg_a.model.hf_config()), seed=cfg_a.train.seed)
    assert np.abs(load_model(a["checkpoint"]).params - init.params).max() > 1e-3


@pytest.mark.parametrize("optim", [["optim.name=adamw", "optim.weight_decay=0.1"],
                                   ["optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.3", "optim.min_lr=0.03"]])
def test_resume_is_bitwise_identical(tmp_path, optim):
    """8 steps straight vs resume from the step-4 checkpoint: the same bits (deterministic kernels,
    exact optimizer state, batches and lr a function of the step)."""
    common = ["train.steps=8", "train.checkpoint_every=4", "data.grad_accum=2", "optim.grad_clip=0.5", *optim]
    full = train(_cfg(tmp_path, *common, name="full"), progress=False)
    step4 = Path(full["out_dir"]) / "checkpoints" / "step_00000004"
    assert step4.is_dir()
    cfg, ckpt = resolve_config(None, [f"train.out_dir={tmp_path / 'resumed'}"], step4)
    resumed = train(cfg, resume=ckpt, progress=False)
    assert resumed["checkpoint"].name == "step_00000008"
    np.testing.assert_array_equal(resumed["model"].params, full["model"].params)
    from cke_dist.formats.hf import read_safetensors
    opt_full = read_safetensors(full["checkpoint"] / "optimizer.safetensors")
    opt_res = read_safetensors(resumed["checkpoint"] / "optimizer.safetensors")
    per_param = 2 if "optim.name=adamw" in optim else 1    # AdamW's two moments, SGD's momentum
    assert opt_full.keys() == opt_res.keys() and len(opt_full) == per_param * len(full["model"].specs)
    for k in opt_full:
        np.testing.assert_array_equal(opt_res[k], opt_full[k], err_msg=k)
    assert [r for r in _metrics(resumed["out_dir"]) if "loss" in r][-1]["loss"] == full["loss"]


def test_resume_continues_in_its_run_dir_and_extends(tmp_path):
    first = train(_cfg(tmp_path, "train.steps=3"), progress=False)
    cfg, ckpt = resolve_config(None, ["train.steps=5"], first["out_dir"])
    again = train(cfg, resume=ckpt, progress=False)
    assert again["out_dir"] == first["out_dir"] and again["checkpoint"].name == "step_00000005"
    assert [r["step"] for r in _metrics(first["out_dir"]) if "loss" in r] == [3, 5]


def test_binary_token_corpus(tmp_path):
    ids = (np.arange(20000) * 31 % 300).astype(np.uint16)
    path = tmp_path / "ids.u16"
    ids.tofile(path)
    result = train(_cfg(tmp_path, "train.steps=3", "model.vocab_size=300", f"data.path={path}"), progress=False)
    assert not (result["checkpoint"] / "cke_tokenizer.json").exists()  # ids are not bytes: no byte tokenizer
    assert load_model(result["checkpoint"]).config.vocab_size == 300


def test_example_config_is_the_builtin_default():
    assert load_config(REPO / "examples" / "shakespeare_char.toml") == load_config()


def _cli(capsys, *argv):
    code = cli.main(["train", "--no-progress", *argv])
    return code, capsys.readouterr().err


def test_cli_bad_input_exits_2_with_a_named_cause(tmp_path, capsys):
    code, err = _cli(capsys, "--set", "optim.learning_rate=1")
    assert code == 2 and "optim.learning_rate" in err and "lr, min_lr" in err
    short = tmp_path / "short.txt"
    short.write_text("to be or not")
    code, err = _cli(capsys, *sum((["--set", s] for s in TINY), []), "--set", f"data.path={short}")
    assert code == 2 and "short.txt" in err and "shorter than one sequence" in err
    code, err = _cli(capsys, "--set", "data.path=no/such/file.txt")
    assert code == 2 and "no/such/file.txt" in err
    code, err = _cli(capsys, "--set", "model.num_attention_heads=3")
    assert code == 2 and "num_attention_heads" in err
    code, err = _cli(capsys, "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "nothing" in err


def test_packed_text_restarts_positions_after_each_end_of_text(tmp_path, capsys):
    """data.pack on text read with the model's tokenizer: the first step's loss is the model's on the
    same windows with positions restarting after each end-of-text; bytes (no end-of-text) refuse it."""
    from tiny import SENTENCES, make_hf_checkpoint, make_tokenizer_dir

    from cke_dist.formats.tokenizer import load_tokenizer
    from cke_dist.train.data import TRAIN, BatchSampler, doc_positions, open_corpus
    d = tmp_path / "m"
    make_hf_checkpoint(d, max_pos=64)
    make_tokenizer_dir(d)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES * 30))
    result = train(_cfg(tmp_path, "train.steps=1", "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=0",
                        f"model.init_from={d}", f"data.path={docs}", "data.pack=true"), progress=False)
    tok = load_tokenizer(d)
    corpus = open_corpus(docs, "auto", 0.1, 32, 300, tok, cache_dir=tmp_path / "cache", progress=False)
    x, y, pos = BatchSampler(corpus.train, 4, 32, 0, TRAIN, eos_id=tok.eos_token_id).batch(0)
    np.testing.assert_array_equal(pos, doc_positions(x, tok.eos_token_id))
    assert (pos == 0).sum() > 4                      # windows hold several documents
    model = load_model(d)
    want = model.loss(x, y, positions=pos)
    assert _metrics(result["out_dir"])[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert abs(model.loss(x, y) - want) > 1e-4      # the positions mattered
    code, err = _cli(capsys, *sum((["--set", s] for s in TINY), []), "--set", "data.pack=true",
                     "--set", f"train.out_dir={tmp_path / 'bytes'}")
    assert code == 2 and "data.pack" in err and "end-of-text" in err


def test_cli_resume_rejects_corruption_and_model_change(tmp_path, capsys):
    result = train(_cfg(tmp_path, "train.steps=2"), progress=False)
    ckpt = result["checkpoint"]
    code, err = _cli(capsys, "--resume", str(ckpt), "--set", "model.hidden_size=64")
    assert code == 2 and "model.hidden_size: checkpoint 32, now 64" in err
    blob = ckpt / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-100])
    code, err = _cli(capsys, "--resume", str(result["out_dir"]), "--set", "train.steps=4")
    assert code == 2 and "model.safetensors" in err and "truncated" in err


def test_console_script_runs(tmp_path):
    """The installed entry point as a user runs it: a tiny job, exit 0, checkpoint on disk."""
    args = [sys.executable, "-m", "cke_dist.cli", "train", "--no-progress", "--set", "train.steps=2",
            *sum((["--set", s] for s in TINY), []), "--set", f"train.out_dir={tmp_path / 'cli'}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli" / "checkpoints" / "step_00000002" / "manifest.json").is_file()
    assert "checkpoint" in proc.stderr


def test_sample_after_training(tmp_path, capsys):
    from cke_dist.serving.generate import generate

    result = train(_cfg(tmp_path, "train.steps=3", "sample.max_new_tokens=12", "sample.temperature=0",
                        "sample.prompt=To be"), progress=False)
    out = capsys.readouterr().out
    assert result["sample"].startswith("To be") and result["sample"] in out
    # greedy: the printed sample is what the saved checkpoint generates
    again = generate(load_model(result["checkpoint"]), list(b"To be"), 12, temperature=0)
    assert result["sample"] == "To be" + bytes(again).decode("utf-8", errors="replace")


def test_checkpoint_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    result = train(_cfg(tmp_path, "train.steps=3"), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["checkpoint"]).eval()
    x = np.random.default_rng(0).integers(0, 256, (2, 16))
    with torch.no_grad():
        want = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(result["model"].forward(x), want, rtol=1e-4, atol=1e-4)


def test_init_from_hf_dir_and_mismatched_tensors(tmp_path, capsys):
    first = train(_cfg(tmp_path, "train.steps=2", name="a"), progress=False)
    start = load_model(first["checkpoint"])
    again = train(_cfg(tmp_path, "train.steps=1", f"model.init_from={first['checkpoint']}", name="b"),
                  progress=False)
    assert again["model"].params.shape == start.params.shape
    assert not np.array_equal(again["model"].params, start.params)  # it trained on from there
    # a weights file whose tensors do not fit its config.json: exit 2 naming the dir and the tensor
    from cke_dist.formats.hf import read_hf_dir, write_hf_dir
    config, tensors = read_hf_dir(first["checkpoint"])
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    write_hf_dir(tmp_path / "bad", config, tensors)
    code, err = _cli(capsys, *sum((["--set", s] for s in TINY), []), "--set", f"model.init_from={tmp_path / 'bad'}",
                     "--set", f"train.out_dir={tmp_path / 'c'}")
    assert code == 2 and "bad" in err and "model.norm.weight" in err and "(7,)" in err


def test_ranks_with_different_configs_stop_at_start_naming_them(tmp_path):
    """Rank 1 launched with another optim.lr: both ranks stop at once with rank 1 named, no hang."""
    from mpirun import mpiexec
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(bytes(range(32, 120)) * 200)
    base = [sys.executable, "-m", "cke_dist.cli", "train", "--no-progress", "--set", f"data.path={corpus}",
            "--set", "train.steps=2", "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "sample.max_new_tokens=0"]
    cmd = [mpiexec(), "-n", "1", *base, ":", "-n", "1", *base, "--set", "optim.lr=1e-3"]
    env = threads_env()
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert out.count("rank(s) 1 run another config or code version than rank 0") == 2, out[-3000:]


SLOW_WRITE = ["model.hidden_size=1024", "model.intermediate_size=4096", "model.num_hidden_layers=8",
              "model.num_attention_heads=8", "model.num_key_value_heads=8", "model.max_position_embeddings=32",
              "data.seq_len=16", "data.batch_size=2", "train.steps=2", "train.checkpoint_every=1", "train.eval_every=0",
              "train.eval_tokens=32", "sample.max_new_tokens=0"]


@pytest.mark.slow
def test_a_checkpoint_slower_than_the_comm_deadline_does_not_abort_the_job(tmp_path):
    """A 134M-parameter checkpoint (1.6 GB with the moments, sha256 and fsync) takes rank 0 longer
    than a 2 s comm deadline; the other rank waits in a barrier with the checkpoint's own deadline
    instead of timing out in the next step. Given that same 2 s as train.checkpoint_timeout, the job
    fails in that barrier: the write really is slower than the deadline."""
    from mpirun import run_mpi

    from cke_dist.formats.checkpoint import verify_checkpoint
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"abcdefgh ijklmnop\n" * 2000)

    def job(name, *extra):
        args = ["-m", "cke_dist.cli", "train", "--no-progress", "--set", f"data.path={corpus}",
                "--set", f"train.out_dir={tmp_path / name}"]
        for s in [*SLOW_WRITE, *extra]:
            args += ["--set", s]
        return run_mpi(2, args, timeout=240, env={"CKE_COMM_TIMEOUT": "2"})

    ok = job("ok")
    assert ok.returncode == 0, ok.stdout[-3000:]
    verify_checkpoint(tmp_path / "ok" / "checkpoints" / "step_00000001")
    short = job("short", "train.checkpoint_timeout=2")
    assert short.returncode != 0 and "barrier failed: shm deadline passed" in short.stdout, short.stdout[-3000:]
