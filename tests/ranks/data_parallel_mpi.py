"""Data parallelism on however many ranks mpiexec gives (driven at 2 and 4 by tests/integration/test_data_parallel.py).

Every rank also trains the single-process reference itself (the whole global batch, no
communication), so the comparison trusts nothing it is testing. The data are the train job's:
`BatchSampler` global batches, a rank's rows from `micro_batch`.
Run by hand: mpiexec -n 2 python -m pytest --with-mpi -q tests/ranks/data_parallel_mpi.py
"""
import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=2)

STEPS, ROWS, SEQ, LR, CLIP = 10, 8, 16, 3e-3, 0.5
CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def world():
    from cke_dist.comm import init

    return init(timeout=60)


@pytest.fixture(scope="module")
def grid(world):
    from cke_dist.parallel import ProcessGrid

    return ProcessGrid(world)


@pytest.fixture(scope="module")
def sampler():
    from cke_dist.train.data import TRAIN, BatchSampler

    tokens = np.random.default_rng(123).integers(0, CFG["vocab_size"], 4000)
    return BatchSampler(tokens, ROWS, SEQ, seed=7, split=TRAIN)


def new_model(cfg=CFG, seed=0):
    from cke_dist.model import LlamaConfig, Model

    return Model.from_config(LlamaConfig.from_dict(cfg), seed=seed)


def adamw(model):
    from cke_dist.train.optim import AdamW

    return AdamW(model, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def train_dp(grid, sampler, accum, bucket_mb=0.02, steps=STEPS, seed=0):
    """`steps` AdamW steps of train_step on this rank's rows; returns (model, per-step losses, buckets)."""
    from cke_dist.parallel import GradBuckets, sync_params, train_step

    model = new_model(seed=seed + grid.dp_rank)  # different on purpose: sync_params must fix it
    sync_params(model, grid)
    opt = adamw(model)
    buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=bucket_mb)
    micro_rows = ROWS // accum
    losses, norms = [], []
    for step in range(steps):
        mbs = [sampler.micro_batch(step, k, micro_rows, grid.dp_rank, grid.dp) for k in range(accum)]
        loss, norm = train_step(model, opt, grid, mbs, LR, CLIP, buckets)
        losses.append(loss)
        norms.append(norm)
    return model, losses, norms


def train_single(sampler, steps=STEPS, seed=0):
    """The reference: one process, the whole global batch at once, plain forward_backward."""
    from cke_dist.parallel.step import clip_grad_norm

    model = new_model(seed=seed)
    opt = adamw(model)
    losses, norms = [], []
    for step in range(steps):
        model.zero_grad()
        losses.append(model.forward_backward(*sampler.batch(step)))
        norms.append(clip_grad_norm(model.grads, CLIP))
        opt.step(lr=LR)
    return model, losses, norms


@pytest.fixture(scope="module")
def reference(sampler):
    return train_single(sampler)


def gather_params(world, params):
    every = np.zeros(world.size * params.size, params.dtype)
    world.allgather(params, every)
    return every.reshape(world.size, -1)


@pytest.mark.parametrize("accum", [1, 2])
def test_matches_single_process_big_batch(world, grid, sampler, reference, accum):
    if ROWS % (accum * grid.dp):
        pytest.skip(f"{ROWS} rows do not split into {accum} micro-batches on {grid.dp} ranks")
    model, losses, norms = train_dp(grid, sampler, accum)
    ref_model, ref_losses, ref_norms = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=0)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5, atol=0)
    assert sum(n > CLIP for n in ref_norms) >= STEPS // 2, ref_norms  # the clip acted
    # what each rank logs (loss, grad norm) is bitwise the same everywhere
    logged = gather_params(world, np.array(losses + norms))
    assert (logged == logged[0]).all()
    # AdamW divides by sqrt(v), so a rounding difference in a tiny gradient moves a weight by more
    # than one ulp; measured here: max 4e-6, median 4e-9 (weights ~0.02, lr 3e-3)
    diff = np.abs(model.params - ref_model.params)
    assert diff.max() < 5e-5, diff.max()
    assert np.median(diff) < 1e-7, np.median(diff)
    # and the replicas are bitwise identical
    every = gather_params(world, model.params)
    assert (every == every[0]).all()


def test_same_layout_twice_is_bitwise_identical(grid, sampler):
    a, la, _ = train_dp(grid, sampler, accum=1, steps=4)
    b, lb, _ = train_dp(grid, sampler, accum=1, steps=4)
    assert la == lb
    np.testing.assert_array_equal(a.params, b.params)


def test_buckets_launch_during_backward(grid, sampler):
    """Overlap is real: most buckets start before backward reports its last slice; the no-overlap
    baseline (every bucket after backward) fails the same check, so the check can fail."""
    from cke_dist.parallel import GradBuckets, sync_params, train_step

    cfg = dict(CFG, num_hidden_layers=6, hidden_size=64, intermediate_size=192)
    model = new_model(cfg)
    sync_params(model, grid)
    opt = adamw(model)
    bucket_mb = model.params.nbytes / 2**20 / 12  # about 12 buckets, two per layer
    for overlap in (True, False):
        buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=bucket_mb, overlap=overlap)
        assert len(buckets.buckets) >= 10
        mbs = [sampler.micro_batch(0, 0, ROWS, grid.dp_rank, grid.dp)]
        train_step(model, opt, grid, mbs, LR, CLIP, buckets)
        backward_last_ready = buckets.ready_times[-1]
        assert len(buckets.ready_times) == cfg["num_hidden_layers"] + 2  # head+norm, each layer, embedding
        early = sum(t < backward_last_ready for t in buckets.launch_times)
        assert len(buckets.launch_times) == len(buckets.buckets)
        if overlap:
            assert early >= len(buckets.buckets) // 2, (early, len(buckets.buckets))
            # launches follow backward: each one comes after the callback that completed its bucket
            assert buckets.launch_times[0] >= buckets.ready_times[0]
        else:
            assert early == 0
            assert min(buckets.launch_times) >= buckets.backward_end


def test_accumulation_launches_only_on_last_micro_batch(grid, sampler):
    from cke_dist.parallel import GradBuckets, sync_params, train_step

    model = new_model()
    sync_params(model, grid)
    buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=0.02)
    calls = []
    orig = buckets.on_grad_ready

    def counting(start, stop):
        calls.append((start, stop))
        orig(start, stop)
    buckets.on_grad_ready = counting
    mbs = [sampler.micro_batch(0, k, ROWS // 2, grid.dp_rank, grid.dp) for k in range(2)]
    train_step(model, adamw(model), grid, mbs, LR, CLIP, buckets)
    # one backward's worth of callbacks: the buffer covered exactly once
    assert sum(b - a for a, b in calls) == model.num_params
    assert len(buckets.launch_times) == len(buckets.buckets)


def test_sync_params_and_divergence_named(world, grid):
    from cke_dist.parallel import check_params_in_sync, sync_params

    model = new_model(seed=world.rank)
    sync_params(model, grid)
    every = gather_params(world, model.params)
    assert (every == every[0]).all()
    np.testing.assert_array_equal(every[0], new_model(seed=0).params)
    # one replica drifts by one ulp in one weight: every rank learns which one
    bad = world.size - 1
    if world.rank == bad:
        model.params[17] = np.nextafter(model.params[17], np.float32(1))
    with pytest.raises(RuntimeError, match=rf"rank\(s\) {bad} differ from rank 0"):
        check_params_in_sync(model, grid)


def test_mismatched_model_configs_are_an_error_not_a_hang(world, grid):
    from cke_dist.parallel import sync_params

    cfg = dict(CFG, hidden_size=48) if world.rank == 1 else CFG
    model = new_model(cfg)
    with pytest.raises(ValueError, match="different sizes .*rank 1: .*same model config"):
        sync_params(model, grid)


def test_nonfinite_loss_stops_every_rank_before_the_update(grid, sampler):
    from cke_dist.parallel import GradBuckets, sync_params, train_step

    model = new_model()
    sync_params(model, grid)
    if grid.dp_rank == 0:
        model.named_params["model.norm.weight"][0] = np.nan  # only rank 0's loss goes bad
    before = model.params.copy()
    buckets = GradBuckets(model.grads, grid.dp_group)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_step(model, adamw(model), grid, [sampler.micro_batch(0, 0, ROWS, grid.dp_rank, grid.dp)], LR, CLIP,
                buckets)
    np.testing.assert_array_equal(model.params, before)


@pytest.mark.mpi(min_size=4)
def test_grid_groups_on_four_ranks(world):
    """dp x tp and dp x pp layouts: each group's members and a sum over it, against the layout formula."""
    from cke_dist.parallel import ProcessGrid

    if world.size != 4:
        pytest.skip("layout checked at exactly 4 ranks")
    for dp, pp, tp in [(2, 1, 2), (2, 2, 1), (1, 2, 2), (4, 1, 1)]:
        g = ProcessGrid(world, dp=dp, pp=pp, tp=tp)
        r = world.rank
        assert (g.dp_rank, g.pp_rank, g.tp_rank) == (r // (pp * tp), (r // tp) % pp, r % tp)
        assert g.rank_of(g.dp_rank, g.pp_rank, g.tp_rank) == r
        assert g.tp_group.ranks == tuple(range(r - r % tp, r - r % tp + tp))  # tp ranks adjacent
        for group, axis in ((g.dp_group, "dp"), (g.pp_group, "pp"), (g.tp_group, "tp")):
            x = np.array([r], np.int64)
            group.allreduce(x)
            assert x[0] == sum(group.ranks), (axis, group.ranks)


def test_zero1_matches_one_process_with_a_dp_th_of_the_optimizer_state(grid, sampler, reference):
    """parallel.zero = 1: gradients reduce-scattered, each rank updating its slice with 1/dp of the
    AdamW moments, parameters allgathered: equal to one process (and to zero = 0) within rounding."""
    from cke_dist.parallel import GradBuckets, ParallelGrads, Zero1, sync_params, train_step
    from cke_dist.train.optim import AdamW

    model = new_model(seed=grid.dp_rank)
    sync_params(model, grid)
    zero = Zero1(model, grid.dp_group)
    opt = AdamW(zero.shard, lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    buckets = GradBuckets(model.grads, None)
    grads = ParallelGrads(model, grid)
    losses = []
    for step in range(STEPS):
        mbs = [sampler.micro_batch(step, 0, ROWS, grid.dp_rank, grid.dp)]
        losses.append(train_step(model, opt, grid, mbs, LR, CLIP, buckets, grads, zero=zero)[0])
    ref_model, ref_losses, _ = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    diff = np.abs(model.params - ref_model.params)
    assert diff.max() < 5e-5 and np.median(diff) < 1e-7, diff.max()
    every = gather_params(grid.world, model.params)
    assert (every == every[0]).all()                       # the allgather leaves identical replicas
    # the moments: a dp-th on each rank, and together the one-process ones
    chunk = -(-model.num_params // grid.dp)
    assert zero.state_bytes(opt) == 2 * 4 * (zero.hi - zero.lo) and zero.hi - zero.lo <= chunk
    full = zero.full_state(opt)
    ref_opt_state = reference_opt_state(sampler)
    np.testing.assert_allclose(full["exp_avg"], ref_opt_state["exp_avg"], rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="reduce-scattered"):
        train_step(model, opt, grid, mbs, LR, CLIP, GradBuckets(model.grads, grid.dp_group), grads, zero=zero)


def reference_opt_state(sampler):
    """The one-process AdamW moments after STEPS steps (the reference run's optimizer)."""
    from cke_dist.parallel.step import clip_grad_norm

    model = new_model()
    opt = adamw(model)
    for step in range(STEPS):
        model.zero_grad()
        model.forward_backward(*sampler.batch(step))
        clip_grad_norm(model.grads, CLIP)
        opt.step(lr=LR)
    return opt.state_dict()


def test_zero1_pads_a_buffer_dp_does_not_divide(grid, sampler):
    """An odd parameter count: the slices are padded for the collectives; still equal to plain dp."""
    from cke_dist.parallel import GradBuckets, Zero1, sync_params, train_step
    from cke_dist.train.optim import AdamW

    cfg = dict(CFG, hidden_size=33, head_dim=10, num_attention_heads=3, num_key_value_heads=1, intermediate_size=60)
    runs = []
    for zero in (False, True):
        model = new_model(cfg)
        sync_params(model, grid)
        z = Zero1(model, grid.dp_group) if zero else None
        opt = AdamW(z.shard if z else model, lr=LR, weight_decay=0.1)
        buckets = GradBuckets(model.grads, None if z else grid.dp_group)
        for step in range(3):
            train_step(model, opt, grid, [sampler.micro_batch(step, 0, ROWS, grid.dp_rank, grid.dp)], LR, CLIP,
                       buckets, zero=z)
        runs.append(model.params.copy())
    assert model.num_params % grid.dp and not z._exact
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=5e-5)
