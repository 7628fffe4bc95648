"""The serving engine: continuous batching in one process, and at tp / pp / both (tests/ranks/serving_mpi.py)."""
import threading

import numpy as np
import pytest
from mpirun import RANKS, REPO, run_pytest_mpi

from cke_dist.comm import init
from cke_dist.formats.tokenizer import load_tokenizer
from cke_dist.model import LlamaConfig, Model
from cke_dist.model.inference import InferenceModel
from cke_dist.serving import Engine, EngineError, Params
from cke_dist.serving.generate import generate, generate_batch

CFG = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=40, rms_norm_eps=1e-5)


@pytest.mark.parametrize("n", [2, 4])
def test_serving_suite(n):
    res = run_pytest_mpi(n, RANKS / "serving_mpi.py", timeout=300)
    assert "passed" in res.stdout and "failed" not in res.stdout


@pytest.fixture
def engine():
    model = Model.from_config(LlamaConfig.from_dict(CFG), seed=1, init_std=0.2)
    e = Engine(InferenceModel.from_model(model), init(), max_batch=2, heartbeat=0.05)
    e.start()
    yield e
    e.shutdown(timeout=10)


def test_requests_join_and_leave_the_batch_and_equal_generate(engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 61, n).tolist() for n in (3, 8, 1, 5, 12)]
    reqs = [engine.submit(p, Params(max_tokens=6 + i, temperature=0)) for i, p in enumerate(prompts)]
    outs = [list(r.stream(timeout=30)) for r in reqs]
    assert outs == [generate(engine.im, p, 6 + i, temperature=0) for i, p in enumerate(prompts)]
    assert [r.finish for r in reqs] == ["length"] * 5
    # 5 requests through 2 slots: some waited for a slot, all ran
    assert generate_batch(engine.im, prompts, 6, temperature=0) == [o[:6] for o in outs]


def test_stop_ids_cancel_and_context(engine):
    p = [1, 2, 3]
    first = generate(engine.im, p, 8, temperature=0)
    r = engine.submit(p, Params(max_tokens=8, temperature=0, stop_ids=(first[2],)))
    assert list(r.stream(timeout=30)) == first[:first.index(first[2]) + 1] and r.finish == "stop"
    ctx = engine.submit(list(range(36)), Params(max_tokens=100, temperature=0))
    assert len(list(ctx.stream(timeout=30))) == 4 and ctx.finish == "length"   # the context holds 40
    with pytest.raises(ValueError, match="the prompt has 40 tokens; the context holds 40"):
        engine.submit(list(range(40)), Params(max_tokens=1))


def test_a_cancelled_request_leaves_and_frees_its_slot():
    model = Model.from_config(LlamaConfig.from_dict(CFG), seed=1, init_std=0.2)
    e = Engine(InferenceModel.from_model(model), init(), max_batch=1, heartbeat=0.05)
    gone = e.submit([1, 2], Params(max_tokens=30, temperature=0))
    kept = e.submit([3, 4], Params(max_tokens=5, temperature=0))
    gone.cancel()                  # before the loop runs: it never takes the one slot
    e.start()
    assert list(gone.stream(timeout=30)) == [] and gone.finish == "cancelled"
    assert list(kept.stream(timeout=30)) == generate(e.im, [3, 4], 5, temperature=0)
    e.shutdown(timeout=10)
    assert not e._thread.is_alive() and e.error is None


def test_a_failed_engine_fails_its_requests():
    """What a dead rank does to rank 0's engine (a CommError in its loop): every request, queued or
    new, raises EngineError with the reason."""
    model = Model.from_config(LlamaConfig.from_dict(CFG), seed=1, init_std=0.2)
    e = Engine(InferenceModel.from_model(model), init(), max_batch=1, heartbeat=0.05)
    r = e.submit([1, 2], Params(max_tokens=5, temperature=0))
    e._fail("the engine stopped: CommError: rank 1 died")
    with pytest.raises(EngineError, match="rank 1 died"):
        list(r.stream(timeout=30))
    with pytest.raises(EngineError, match="rank 1 died"):
        e.submit([1], Params(max_tokens=1))
    assert r.finish == "error" and e.error and not e.alive


def _generate_cli(n, model, *args):
    import subprocess
    import sys

    from mpirun import run_mpi
    argv = ["-m", "cke_dist.cli", "generate", "--model", str(model), "--temperature", "0", "--max-new-tokens", "12",
            *args]
    if n == 1:
        res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout
    res = run_mpi(n, argv, timeout=120, env={"CKE_COMM_TIMEOUT": "30", "CKE_COMM_QUIET": "1"})
    assert res.returncode == 0, res.stdout[-3000:]
    return res.stdout


@pytest.mark.parametrize("n, layout", [(2, ["--tp", "2"]), (4, ["--tp", "2", "--pp", "2"])])
def test_generate_command_on_a_grid_prints_what_one_process_prints(tmp_path, n, layout):
    """mpiexec -n N cke-dist generate --tp T --pp P: the same text as one process, streamed (one
    prompt) and batched (three prompts flowing through the stages together)."""
    model = Model.from_config(LlamaConfig.from_dict(dict(CFG, vocab_size=256, num_hidden_layers=4)), seed=2,
                              init_std=0.2)
    model.save(tmp_path)
    (tmp_path / "cke_tokenizer.json").write_text('{"type": "bytes"}')
    one = _generate_cli(1, tmp_path, "--prompt", "hello")
    assert one.startswith("hello") and len(one) > len("hello\n")
    assert one in _generate_cli(n, tmp_path, "--prompt", "hello", *layout)
    three = ["--prompt", "ab", "--prompt", "the cat", "--prompt", "x"]
    batched = _generate_cli(1, tmp_path, *three)
    assert batched.count("---") == 3
    assert batched in _generate_cli(n, tmp_path, *three, *layout)


# ---- batch invariance: a request's numbers do not depend on what it is batched with ---------------

@pytest.mark.parametrize("quantize", [None, "q8_0", "q4_1"])
def test_a_row_gets_the_same_logits_whatever_it_is_batched_with(quantize):
    """A decode row alone, beside 9 other decode rows, and beside a 30-token prompt: the same bits.
    Before, more rows than the row kernel's limit sent the whole call through BLAS (float32) or
    through float activations instead of quantized ones (Q8_0/Q4): other numbers for the same row."""
    cfg = LlamaConfig.from_dict({**CFG, "max_position_embeddings": 64})
    im = InferenceModel.from_model(Model.from_config(cfg, seed=1, init_std=0.2), quantize=quantize)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 61, 4 + i).tolist() for i in range(10)]
    long_prompt = rng.integers(0, 61, 30).tolist()
    nxt = rng.integers(0, 61, 10)

    def primed():
        cache = im.new_cache(11, 64)
        for row, p in enumerate(prompts):
            im.prefill(cache, row, p)
        return cache

    def step(cache, rows, with_prompt=False):
        ids, seq, pos = list(nxt[rows]), list(rows), [len(prompts[r]) for r in rows]
        if with_prompt:
            ids, seq, pos = ids + long_prompt, seq + [10] * 30, pos + list(range(30))
        return im.forward(np.array(ids), np.array(seq), np.array(pos), primed() if cache is None else cache)

    alone = np.stack([step(None, [r])[0] for r in range(10)])
    together = step(None, list(range(10)))
    beside_prompt = step(None, [0, 1], with_prompt=True)
    assert np.array_equal(together, alone)
    assert np.array_equal(beside_prompt[:2], alone[:2])
    prompt_alone = im.forward(np.array(long_prompt), np.full(30, 10), np.arange(30), primed())
    assert np.array_equal(beside_prompt[2:], prompt_alone)


def test_concurrent_greedy_requests_on_a_gguf_equal_each_alone(smollm2):
    """SmolLM2's Q4_1 GGUF: 6 greedy chat requests at once give each the tokens it gets alone (4/8
    did before: a prompt joining the batch moved every decode row onto float activations)."""
    tok = load_tokenizer(smollm2)
    e = Engine.build(smollm2, init(), max_batch=6)
    e.start()
    try:
        prompts = [tok.encode(f"<|im_start|>user\nTell me about topic number {i} in {'one' if i % 2 else 'a single'} "
                              f"sentence{', please' * i}.<|im_end|>\n<|im_start|>assistant\n") for i in range(6)]
        alone = [list(e.submit(p, Params(max_tokens=16, temperature=0)).stream(timeout=60)) for p in prompts]
        together = [None] * 6

        def one(i):
            together[i] = list(e.submit(prompts[i], Params(max_tokens=16, temperature=0)).stream(timeout=60))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
    finally:
        e.shutdown(timeout=30)


# ---- speculative decoding (prompt lookup) ----------------------------------------------------------

def test_prompt_lookup_drafts_what_followed_the_last_match():
    from cke_dist.serving.engine import prompt_lookup
    assert prompt_lookup([5, 6, 7, 8, 9, 1, 5, 6, 7], 3) == [8, 9, 1]       # 3-gram 5 6 7
    assert prompt_lookup([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]             # the most recent 1 2
    assert prompt_lookup([1, 2, 3, 4], 3) == []                              # nothing repeats
    assert prompt_lookup([3, 9, 3, 9], 5) == [3, 9]                          # runs into the end
    assert prompt_lookup([1, 2, 1, 2], 0) == []


@pytest.mark.parametrize("quantize", [None, "q4_1"])
def test_speculative_decoding_gives_the_plain_tokens_and_logprobs(quantize):
    """Greedy, seeded sampling with penalties, and log-probabilities: the same with drafts as
    without, and drafts were accepted (the path ran)."""
    cfg = LlamaConfig.from_dict({**CFG, "max_position_embeddings": 96})
    im = InferenceModel.from_model(Model.from_config(cfg, seed=1, init_std=0.2), quantize=quantize)
    rng = np.random.default_rng(5)
    motif = rng.integers(0, 61, 6).tolist()
    prompts = [motif * 4 + rng.integers(0, 61, 3).tolist() + motif[:3], rng.integers(0, 61, 9).tolist(), motif * 2]
    settings = [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=3, frequency_penalty=0.3),
                dict(temperature=0, logprobs=2)]

    def run(k):
        e = Engine(im, init(), max_batch=3, heartbeat=0.05, speculative_tokens=k)
        e.start()
        try:
            reqs = [e.submit(p, Params(max_tokens=40, **kw)) for p in prompts for kw in settings]
            return [(list(r.stream(timeout=60)), r.logprobs) for r in reqs], e.accepted_tokens_total
        finally:
            e.shutdown(timeout=10)
    plain, _ = run(0)
    spec, accepted = run(5)
    assert accepted > 0
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert [lp for _, lp in spec] == [lp for _, lp in plain]


def test_a_request_that_fails_alone_leaves_the_engine_serving(engine):
    """A grammar that allows nothing (its sampler raises): that request ends with an error, the
    engine and the request beside it go on."""
    class Nothing:
        done = False

        def allowed(self):
            return np.zeros(61, bool)

        def accept(self, tok):
            raise AssertionError("never reached")

    bad = engine.submit([1, 2, 3], Params(max_tokens=4, temperature=0, constraint=Nothing()))
    good = engine.submit([4, 5], Params(max_tokens=4, temperature=0))
    with pytest.raises(EngineError, match="the grammar allows no token"):
        list(bad.stream(timeout=30))
    assert list(good.stream(timeout=30)) == generate(engine.im, [4, 5], 4, temperature=0) and engine.alive
