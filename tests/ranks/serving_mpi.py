"""The serving engine on the ranks mpiexec gives (driven at 2 and 4 by tests/integration/test_serving.py):
tp=2, pp=2 at 2 ranks; tp=2 x pp=2, tp=4, pp=4 at 4. The reference is the one-process model that
every rank computes itself (generate_batch over the whole model, no communication).
Run by hand: mpiexec -n 2 python -m pytest --with-mpi -q tests/ranks/serving_mpi.py
"""
import numpy as np
import pytest

from cke_dist.serving import Engine, Params

pytestmark = pytest.mark.mpi(min_size=2)

CFG = dict(vocab_size=61, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=48, rms_norm_eps=1e-5, tie_word_embeddings=True)
N_NEW = 12


@pytest.fixture(scope="module")
def world():
    from cke_dist.comm import init
    return init(timeout=60)


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    from mpirun import shared_dir

    from cke_dist.model import LlamaConfig, Model
    from cke_dist.model.inference import InferenceModel
    from cke_dist.model.load import save_quantized
    d = shared_dir(world, tmp_path_factory)
    if world.rank == 0:
        model = Model.from_config(LlamaConfig.from_dict(CFG), seed=3, init_std=0.2)
        model.save(d / "f32")
        save_quantized(InferenceModel.from_model(model, quantize="q8_0"), d / "q8")
        save_quantized(InferenceModel.from_model(model, quantize="q4_1"), d / "q4")
    world.barrier()
    return d


def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG["vocab_size"], n).tolist() for n in (5, 9, 1, 14, 7)]


def layouts(n):
    return [(t, n // t) for t in (1, 2, 4) if n % t == 0 and n // t <= CFG["num_hidden_layers"]]


def run_engine(world, path, tp, pp, params, max_batch=4, speculative_tokens=0):
    engine = Engine.build(path, world, tp=tp, pp=pp, max_batch=max_batch, speculative_tokens=speculative_tokens)
    if world.rank != 0:
        engine.run()
        return None
    engine.start()
    reqs = [engine.submit(p, Params(max_tokens=N_NEW, **params(i))) for i, p in enumerate(prompts())]
    outs = [list(r.stream(timeout=60)) for r in reqs]
    engine.shutdown(timeout=60)
    assert engine.error is None, engine.error
    return outs


def test_greedy_and_seeded_sampling_equal_one_process(world, model_dir):
    from cke_dist.model.load import load_inference_model
    from cke_dist.serving.generate import generate, generate_batch
    one = load_inference_model(model_dir / "f32")          # the whole model, no communication
    greedy = generate_batch(one, prompts(), N_NEW, temperature=0)
    sampled = [generate(one, p, N_NEW, temperature=0.9, top_p=0.95, seed=10 + i) for i, p in enumerate(prompts())]
    for tp, pp in layouts(world.size):
        got = run_engine(world, model_dir / "f32", tp, pp, lambda i: dict(temperature=0))
        if world.rank == 0:
            assert got == greedy, (tp, pp)
        got = run_engine(world, model_dir / "f32", tp, pp, lambda i: dict(temperature=0.9, top_p=0.95, seed=10 + i),
                         max_batch=2)    # 5 requests, 2 slots: requests join as others leave
        if world.rank == 0:
            assert got == sampled, (tp, pp)
        # prompt-lookup drafts checked in the same forward: the same tokens
        got = run_engine(world, model_dir / "f32", tp, pp, lambda i: dict(temperature=0), speculative_tokens=4)
        if world.rank == 0:
            assert got == greedy, (tp, pp)
        world.barrier()


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_quantized_shards_equal_one_process(world, model_dir, kind):
    """Q8_0 and Q4_1 directories, each rank reading its slices of the blocks, all requests batched
    (a row's numbers do not depend on the rows beside it)."""
    from cke_dist.model.load import load_inference_model
    from cke_dist.serving.generate import generate
    one = load_inference_model(model_dir / kind)
    want = [generate(one, p, N_NEW, temperature=0) for p in prompts()]
    for tp, pp in layouts(world.size):
        engine = Engine.build(model_dir / kind, world, tp=tp, pp=pp, max_batch=4)
        if world.rank != 0:
            engine.run()
            continue
        engine.start()
        reqs = [engine.submit(p, Params(max_tokens=N_NEW, temperature=0)) for p in prompts()]
        got = [list(r.stream(timeout=60)) for r in reqs]
        engine.shutdown(timeout=60)
        assert got == want, (tp, pp)


def test_each_rank_holds_only_its_part(world, model_dir):
    from cke_dist.model.load import load_inference_model
    whole = load_inference_model(model_dir / "f32").weight_bytes_per_token()
    tp, pp = 2, world.size // 2
    engine = Engine.build(model_dir / "f32", world, tp=tp, pp=pp)
    mine = engine.im.weight_bytes_per_token()
    assert mine < 0.75 * whole / (world.size / 2), (mine, whole)
    if world.rank == 0:
        engine.start()
        engine.shutdown(timeout=30)
    else:
        engine.run()


def test_embeddings_equal_one_process(world, model_dir):
    """Embedding requests (the prompt's mean final hidden state) mixed with generations, at every
    layout: each equals the one-process model's, and the generations stay the plain ones."""
    from cke_dist.model.load import load_inference_model
    from cke_dist.serving.generate import generate
    one = load_inference_model(model_dir / "f32")
    want = []
    for p in prompts():
        cache = one.new_cache(1, len(p))
        _, pooled = one.stage_forward(np.array(p), np.zeros(len(p), np.int64), np.arange(len(p)), cache,
                                      logits_rows=[], pool=[(0, len(p))])
        want.append(pooled[0])
    greedy = generate(one, prompts()[1], N_NEW, temperature=0)
    for tp, pp in layouts(world.size):
        engine = Engine.build(model_dir / "f32", world, tp=tp, pp=pp, max_batch=2)
        if world.rank != 0:
            engine.run()
            continue
        engine.start()
        gen = engine.submit(prompts()[1], Params(max_tokens=N_NEW, temperature=0))
        reqs = [engine.submit(p, Params(embed=True)) for p in prompts()]
        for r in reqs:
            assert list(r.stream(timeout=60)) == [] and r.finish == "stop"
        assert list(gen.stream(timeout=60)) == greedy, (tp, pp)
        engine.shutdown(timeout=60)
        np.testing.assert_allclose(np.stack([r.embedding for r in reqs]), np.stack(want), rtol=1e-4, atol=1e-5,
                                   err_msg=str((tp, pp)))
