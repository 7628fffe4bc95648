"""Tensor parallelism on the ranks mpiexec gives (driven at 2 and 4 by tests/integration/test_tensor_parallel.py).

Every rank also computes the one-process reference itself (the whole model, no communication),
so the comparison trusts nothing it is testing. Shapes cover: Llama GQA untied, Qwen2 (q/k/v
biases, tied), tp above the KV-head count (replicated KV heads), GQA groups that straddle
ranks (12 query heads over 3 KV heads: at tp=2 and tp=4 a group is cut in two), a vocabulary
that tp does not divide, and Llama's o_proj bias.
Run by hand: mpiexec -n 2 python -m pytest --with-mpi -q tests/ranks/tensor_parallel_mpi.py
"""
import time

import numpy as np
import pytest
from mpirun import shared_dir

pytestmark = pytest.mark.mpi(min_size=2)

B, T, STEPS, LR, CLIP = 2, 12, 10, 3e-3, 0.5
BASE = dict(vocab_size=61, hidden_size=48, intermediate_size=70, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)
CONFIGS = {
    "llama-gqa-untied": dict(BASE),
    "qwen2-tied-bias": dict(BASE, model_type="qwen2", tie_word_embeddings=True),
    "llama-kv1-obias": dict(BASE, num_key_value_heads=1, attention_bias=True),   # tp > KV: replicas
    "llama-straddle": dict(BASE, hidden_size=96, num_attention_heads=12, num_key_value_heads=3),
}


@pytest.fixture(scope="module")
def world():
    from cke_dist.comm import init

    return init(timeout=60)


def config(name):
    from cke_dist.model import LlamaConfig

    return LlamaConfig.from_dict(CONFIGS[name])


def models(cfg, tp_group, seed=0):
    """(one-process model, this rank's shard), the same seed; biases made non-zero so they count."""
    from cke_dist.model import Model

    full = Model.from_config(cfg, seed=seed, init_std=0.1)
    shard = Model.from_config(cfg, seed=seed, tp_group=tp_group, init_std=0.1)
    rng = np.random.default_rng(5)
    for name, p in full.named_params.items():
        if name.endswith("bias"):
            p[...] = rng.standard_normal(p.shape).astype(np.float32) * 0.3
    shard.params[...] = shard.shard_flat(full.params)
    return full, shard


def batch(cfg, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))
    y[0, 3] = -100
    return x, y


@pytest.mark.parametrize("name", list(CONFIGS))
def test_init_is_the_one_process_init(world, name):
    from cke_dist.model import Model

    cfg = config(name)
    full = Model.from_config(cfg, seed=3)
    shard = Model.from_config(cfg, seed=3, tp_group=world)
    np.testing.assert_array_equal(shard.params, shard.shard_flat(full.params))
    np.testing.assert_array_equal(shard.gather_flat(shard.params), full.params)
    assert shard.num_params < full.num_params   # a shard, not a copy


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_loss_and_every_gradient_match_one_process(world, name):
    from cke_dist.parallel import ParallelGrads

    cfg = config(name)
    full, shard = models(cfg, world)
    x, y = batch(cfg)
    ref_logits = full.forward(x)
    np.testing.assert_allclose(shard.forward(x), ref_logits, rtol=1e-5, atol=1e-5)
    assert shard.loss(x, y) == pytest.approx(full.loss(x, y), rel=1e-6)
    full.zero_grad()
    shard.zero_grad()
    ref_loss = full.forward_backward(x, y)
    loss = shard.forward_backward(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    tg = ParallelGrads(shard)
    tg.sum_shared()
    got = shard.gather_flat(shard.grads)
    for n, (a, b) in full.param_offsets.items():
        ref = full.grads[a:b]
        np.testing.assert_allclose(got[a:b], ref, rtol=1e-4, atol=1e-5 * max(1e-3, np.abs(ref).max()), err_msg=n)
    assert tg.norm() == pytest.approx(float(np.sqrt((full.grads.astype(np.float64) ** 2).sum())), rel=1e-6)


@pytest.mark.parametrize("name", ["llama-kv1-obias", "llama-straddle"])
def test_packed_rows_match_one_process(world, name):
    """Packed rows (positions restarting per document, data.pack): the shards' loss and every gradient
    are the one-process model's, also where GQA groups straddle ranks (one attention call per row)."""
    from cke_dist.parallel import ParallelGrads

    cfg = config(name)
    full, shard = models(cfg, world)
    x, y = batch(cfg)
    pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1]])
    np.testing.assert_allclose(shard.forward(x, positions=pos), full.forward(x, positions=pos), rtol=1e-5, atol=1e-5)
    full.zero_grad()
    shard.zero_grad()
    assert shard.forward_backward(x, y, positions=pos) == pytest.approx(full.forward_backward(x, y, positions=pos),
                                                                         rel=1e-6)
    ParallelGrads(shard).sum_shared()
    got = shard.gather_flat(shard.grads)
    for n, (a, b) in full.param_offsets.items():
        ref = full.grads[a:b]
        np.testing.assert_allclose(got[a:b], ref, rtol=1e-4, atol=1e-5 * max(1e-3, np.abs(ref).max()), err_msg=n)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-tied-bias", "llama-straddle"])
def test_lm_head_in_chunks_matches_one_process(world, name):
    """The vocab-parallel LM head and loss in chunks of 5 token rows (each chunk's row stats summed
    over tp): the loss and every gradient of the one-process model run whole."""
    from cke_dist.parallel import ParallelGrads

    cfg = config(name)
    full, shard = models(cfg, world)
    shard.head_rows = 5
    x, y = batch(cfg)
    full.zero_grad()
    shard.zero_grad()
    assert shard.forward_backward(x, y) == pytest.approx(full.forward_backward(x, y), rel=1e-6)
    assert shard._acts_train.logits.shape[0] == 5
    ParallelGrads(shard).sum_shared()
    got = shard.gather_flat(shard.grads)
    for n, (a, b) in full.param_offsets.items():
        ref = full.grads[a:b]
        np.testing.assert_allclose(got[a:b], ref, rtol=1e-4, atol=1e-5 * max(1e-3, np.abs(ref).max()), err_msg=n)


def test_replicas_are_summed_where_kv_heads_are_shared(world):
    """The KV-replica case really has replicas (so the sum above was tested), and the aligned case none."""
    from cke_dist.parallel.step import replica_ranges

    _, kv1 = models(config("llama-kv1-obias"), world)
    assert replica_ranges(kv1) and replica_ranges(kv1)[0][0] == tuple(range(world.size))
    _, straddle = models(config("llama-straddle"), world)
    assert straddle.heads.segments() == [(0, straddle.heads.n_q, 0, straddle.heads.n_kv)] or \
        len(straddle.heads.segments()) > 1
    if world.size in (2, 4):   # 12 heads, groups of 4: rank 1 holds the end of one group and a part of the next
        assert any(len(h) > 1 for h, _ in replica_ranges(straddle))


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-tied-bias", "llama-kv1-obias", "llama-straddle"])
def test_ten_adamw_steps_with_clipping_match_one_process(world, name):
    from cke_dist.comm import init
    from cke_dist.parallel import GradBuckets, ProcessGrid, train_step
    from cke_dist.parallel.step import clip_grad_norm
    from cke_dist.train.optim import AdamW

    cfg = config(name)
    grid = ProcessGrid(init(), tp=world.size)
    full, shard = models(cfg, grid.tp_group)
    of, os_ = AdamW(full, lr=LR, weight_decay=0.1), AdamW(shard, lr=LR, weight_decay=0.1)
    buckets = GradBuckets(shard.grads, grid.dp_group)
    clipped = 0
    for step in range(STEPS):
        x, y = batch(cfg, seed=10 + step)
        full.zero_grad()
        ref_loss = full.forward_backward(x, y)
        ref_norm = clip_grad_norm(full.grads, CLIP)
        of.step(lr=LR)
        loss, norm = train_step(shard, os_, grid, [(x, y)], LR, CLIP, buckets)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-4)
        clipped += ref_norm > CLIP
    assert clipped >= STEPS // 2
    # AdamW divides by sqrt(v): a weight whose gradient is near zero moves by up to ~lr on a rounding
    # difference, so the max is loose and the median (almost every weight) is what is tight
    diff = np.abs(shard.gather_flat(shard.params) - full.params)
    assert diff.max() < 2e-4, diff.max()
    assert np.median(diff) < 1e-7, np.median(diff)
    # the moments too: they are what a resumed run continues from
    np.testing.assert_allclose(shard.gather_flat(os_.exp_avg), of.exp_avg, rtol=1e-3, atol=1e-6)
    # replicated tensors (norms, o_proj's bias) stay bitwise identical on every tp rank
    rep = np.concatenate([shard.named_params[s.name].reshape(-1) for s in shard.specs if s.dim is None])
    every = np.empty(world.size * rep.size, np.float32)
    world.allgather(rep, every)
    assert (every.reshape(world.size, -1) == rep).all()


def test_forward_backward_moves_exactly_the_megatron_minimum(world):
    """Per forward_backward: 2 allreduces of (tokens x hidden) per layer forward and 2 backward, the
    embedding's and the LM head input-gradient's, and three of (tokens,) in the cross-entropy."""
    cfg = config("llama-gqa-untied")
    _, shard = models(cfg, world)
    x, y = batch(cfg)
    shard.forward_backward(x, y)   # warm (allocations)
    world.reset_stats()
    shard.forward_backward(x, y)
    N, C, L = B * T, cfg.hidden_size, cfg.num_hidden_layers
    assert world.stats == {"allreduce": [4 * L + 2 + 3, (4 * L + 2) * N * C * 4 + 3 * N * 4]}, world.stats
    world.reset_stats()
    shard.loss(x, y)
    assert world.stats == {"allreduce": [2 * L + 1 + 3, (2 * L + 1) * N * C * 4 + 3 * N * 4]}, world.stats


def test_load_model_reads_only_this_ranks_slices(world, tmp_path_factory):
    import tracemalloc

    from cke_dist.model import Model, load_model

    cfg = config("llama-gqa-untied").replace(hidden_size=256, intermediate_size=512, vocab_size=1000,
                                              num_attention_heads=8, num_key_value_heads=4)
    full = Model.from_config(cfg, seed=4)
    d = shared_dir(world, tmp_path_factory) / "m"
    if world.rank == 0:
        full.save(d)
    world.barrier()
    import cke_dist.formats.gguf  # noqa: F401  (load_model imports it: module code is not tensor data)
    tracemalloc.start()
    shard = load_model(d, tp_group=world)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(shard.params, shard.shard_flat(full.params))
    # beyond the shard's own params + grads, only one tensor's slice is in flight at a time: reading
    # any whole tensor (the largest is the 1000 x 256 embedding) would exceed this
    transient = peak - shard.params.nbytes - shard.grads.nbytes
    largest = 1000 * 256 * 4
    assert transient < 0.75 * largest, (transient, largest)
    world.barrier()


def test_save_gathers_a_full_model_that_loads_in_one_process(world, tmp_path_factory):
    from cke_dist.model import load_model

    cfg = config("qwen2-tied-bias")
    full, shard = models(cfg, world)
    d = shared_dir(world, tmp_path_factory) / "m"
    shard.save(d)                  # collective: the shards are gathered, tp rank 0 writes
    world.barrier()
    np.testing.assert_array_equal(load_model(d).params, full.params)
    world.barrier()


def test_tp_allreduce_completes_while_dp_buckets_are_pending(world):
    """dp=2 x tp=2: a dp allreduce waits for a late peer; the tp allreduces issued after it finish
    meanwhile (each group has its own engine). With one engine for all groups they could not."""
    from cke_dist.parallel import ProcessGrid

    if world.size != 4:
        pytest.skip("needs dp=2 x tp=2")
    grid = ProcessGrid(world, tp=2)
    big = np.ones(1 << 16, np.float32)
    if grid.dp_rank == 1:
        time.sleep(1.5)            # the dp peer is late: rank's dp op stays pending
    h = grid.dp_group.allreduce(big, op="sum", async_op=True)
    t0 = time.monotonic()
    for _ in range(5):
        x = np.full(8, world.rank, np.float32)
        grid.tp_group.allreduce(x)
        assert (x == sum(grid.tp_group.ranks)).all()
    tp_s = time.monotonic() - t0
    if grid.dp_rank == 0:
        assert not h.is_completed(), "the dp op finished before the tp ops: nothing was shown"
        assert tp_s < 1.0, tp_s
    h.wait()
    assert (big == 2).all()
    world.barrier()


def test_dp2_tp2_matches_one_process_and_is_bitwise_repeatable(world):
    from cke_dist.comm import init
    from cke_dist.model import Model
    from cke_dist.parallel import GradBuckets, ProcessGrid, sync_params, train_step
    from cke_dist.parallel.step import clip_grad_norm
    from cke_dist.train.data import TRAIN, BatchSampler
    from cke_dist.train.optim import AdamW

    if world.size != 4:
        pytest.skip("needs dp=2 x tp=2")
    cfg = config("llama-kv1-obias")
    sampler = BatchSampler(np.random.default_rng(9).integers(0, cfg.vocab_size, 3000), 4, T, seed=2, split=TRAIN)

    def run():
        grid = ProcessGrid(init(), tp=2)
        model = Model.from_config(cfg, seed=grid.dp_rank, tp_group=grid.tp_group, init_std=0.1)  # fixed by sync
        sync_params(model, grid)
        opt = AdamW(model, lr=LR, weight_decay=0.1)
        buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=0.01)
        losses = [train_step(model, opt, grid, [sampler.micro_batch(s, 0, 4, grid.dp_rank, grid.dp)], LR, CLIP,
                             buckets)[0] for s in range(6)]
        return model, losses

    a, la = run()
    b, lb = run()
    assert la == lb
    np.testing.assert_array_equal(a.params, b.params)
    ref = Model.from_config(cfg, seed=0, init_std=0.1)
    opt = AdamW(ref, lr=LR, weight_decay=0.1)
    for s in range(6):
        ref.zero_grad()
        loss = ref.forward_backward(*sampler.batch(s))
        clip_grad_norm(ref.grads, CLIP)
        opt.step(lr=LR)
        assert la[s] == pytest.approx(loss, rel=1e-5)
    diff = np.abs(a.gather_flat(a.params) - ref.params)
    assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (diff.max(), np.median(diff))
