"""Pipeline parallelism (and 3D) on the ranks mpiexec gives: driven at 2, 3, 4 and 8 ranks by
tests/integration/test_pipeline.py. Every rank also trains the one-process reference itself.
Run by hand: mpiexec -n 4 python -m pytest --with-mpi -q tests/ranks/pipeline_mpi.py
"""
import numpy as np
import pytest

pytestmark = pytest.mark.mpi(min_size=2)

ROWS, SEQ, STEPS, ACCUM, LR, CLIP = 8, 12, 10, 4, 3e-3, 0.5
BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def world():
    from cke_dist.comm import init

    return init(timeout=60)


def sampler():
    from cke_dist.train.data import TRAIN, BatchSampler

    return BatchSampler(np.random.default_rng(3).integers(0, BASE["vocab_size"], 5000), ROWS, SEQ, seed=4, split=TRAIN)


def reference(cfg, steps=STEPS, accum=ACCUM):
    """One process: the whole global batch, K micro-batches at 1/K, clip, AdamW."""
    from cke_dist.model import Model
    from cke_dist.parallel.step import clip_grad_norm
    from cke_dist.train.optim import AdamW

    model = Model.from_config(cfg, seed=0, init_std=0.1)
    opt = AdamW(model, lr=LR, weight_decay=0.1)
    sm, losses = sampler(), []
    for step in range(steps):
        model.zero_grad()
        losses.append(sum(model.forward_backward(*sm.micro_batch(step, k, ROWS // accum, 0, 1), grad_scale=1 / accum)
                          for k in range(accum)) / accum)
        clip_grad_norm(model.grads, CLIP)
        opt.step(lr=LR)
    return model, losses


def train(cfg, grid, schedule_kind, steps=STEPS, accum=ACCUM, pp_layers=None):
    from cke_dist.model import Model
    from cke_dist.parallel import GradBuckets, ParallelGrads, grid_stage, sync_params, train_step
    from cke_dist.train.optim import AdamW

    model = Model.from_config(cfg, seed=0, init_std=0.1, tp_group=grid.tp_group,
                              stage=grid_stage(grid, cfg, pp_layers))
    sync_params(model, grid)
    opt = AdamW(model, lr=LR, weight_decay=0.1)
    buckets = GradBuckets(model.grads, grid.dp_group, bucket_mb=0.01)
    grads = ParallelGrads(model, grid)
    sm, losses = sampler(), []
    rows = ROWS // accum // grid.dp
    for step in range(steps):
        mbs = [sm.micro_batch(step, k, ROWS // accum, grid.dp_rank, grid.dp) for k in range(accum)]
        assert mbs[0][0].shape[0] == rows
        losses.append(train_step(model, opt, grid, mbs, LR, CLIP, buckets, grads, schedule=schedule_kind)[0])
    return model, losses


def full_params(model, grid, pp_layers=None):
    """The whole model's parameters, in the one-process layout, on pp stage 0 (None elsewhere)."""
    from cke_dist.model.layout import offsets, param_specs
    from cke_dist.parallel.pipeline import gather_stages

    got = gather_stages(model, grid, {"p": model.params}, pp_layers)
    if got is None:
        return None
    specs = param_specs(model.config)
    return np.concatenate([got["p"][s.name].reshape(-1) for s in specs]), offsets(specs)


def check_close(world, got, ref, losses, ref_losses):
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    if got is not None:
        diff = np.abs(got[0] - ref.params)
        assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (diff.max(), np.median(diff))


def cfg_of(**kw):
    from cke_dist.model import LlamaConfig

    return LlamaConfig.from_dict({**BASE, **kw})


@pytest.mark.parametrize("kind", ["1f1b", "gpipe", "zb"])
@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_matches_one_process(world, kind, tied):
    """pp = world size: every schedule, tied and untied embeddings, 10 AdamW steps, clipping, 4 micro-batches."""
    from cke_dist.parallel import ProcessGrid

    if world.size > BASE["num_hidden_layers"]:
        pytest.skip("more stages than layers")
    cfg = cfg_of(tie_word_embeddings=tied)
    grid = ProcessGrid(world, pp=world.size)
    model, losses = train(cfg, grid, kind)
    ref, ref_losses = reference(cfg)
    check_close(world, full_params(model, grid), ref, losses, ref_losses)
    if tied and grid.shape.pp > 1:   # both copies of the tied embedding stay equal
        from cke_dist.model.layout import EMBED
        emb = model.named_params.get(EMBED)
        buf = np.zeros(emb.size if emb is not None else 1, np.float32) if emb is not None else None
        if model.stage.first:
            grid.pp_group.send(emb.reshape(-1).copy(), grid.shape.pp - 1, tag=9)
        if model.stage.last:
            grid.pp_group.recv(buf, 0, tag=9)
            np.testing.assert_array_equal(buf, emb.reshape(-1))


def test_uneven_split_and_schedules_agree(world):
    """pp_layers sets an uneven split; 1f1b and zb give the same parameters (bitwise: the same sums
    in the same order, only at other times); the same layout twice is bitwise equal."""
    from cke_dist.parallel import ProcessGrid

    if world.size != 3:
        pytest.skip("the uneven split is checked at pp=3")
    cfg = cfg_of(num_hidden_layers=5)
    grid = ProcessGrid(world, pp=3)
    a, la = train(cfg, grid, "1f1b", steps=4, pp_layers=[1, 3, 1])
    assert (a.stage.l0, a.stage.l1) == [(0, 1), (1, 4), (4, 5)][grid.pp_rank]
    b, lb = train(cfg, grid, "zb", steps=4, pp_layers=[1, 3, 1])
    c, lc = train(cfg, grid, "1f1b", steps=4, pp_layers=[1, 3, 1])
    np.testing.assert_array_equal(a.params, c.params)
    assert la == lc
    np.testing.assert_array_equal(b.params, a.params)
    assert lb == la
    ref, ref_losses = reference(cfg, steps=4)
    check_close(world, full_params(a, grid, [1, 3, 1]), ref, la, ref_losses)


def test_1f1b_keeps_at_most_pp_micro_batches_alive(world):
    from cke_dist.model import Model
    from cke_dist.parallel import ProcessGrid, grid_stage, run_schedule, schedule

    cfg = cfg_of()
    if world.size > cfg.num_hidden_layers:
        pytest.skip("more stages than layers")
    grid = ProcessGrid(world, pp=world.size)
    model = Model.from_config(cfg, seed=0, stage=grid_stage(grid, cfg))
    sm = sampler()
    m = 8
    mbs = [sm.micro_batch(0, k, 1, 0, 1) for k in range(m)]
    model.zero_grad()
    _, stats = run_schedule(model, grid, mbs, "1f1b")
    p, s = grid.shape.pp, grid.pp_rank
    assert stats["peak_live"] == min(p - s, m), stats["peak_live"]
    model.zero_grad()
    _, stats = run_schedule(model, grid, mbs, "gpipe")
    assert stats["peak_live"] == m   # the baseline keeps every micro-batch
    assert schedule("1f1b", p, s, m).count(("F", 0)) == 1


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("layout", [(1, 2, 2), (2, 2, 1), (2, 2, 2)])
def test_composed_layouts_match_one_process(world, layout):
    """pp=2 x tp=2, dp=2 x pp=2 and (8 ranks) dp=2 x pp=2 x tp=2 against one process."""
    from cke_dist.parallel import ProcessGrid

    dp, pp, tp = layout
    if world.size != dp * pp * tp:
        pytest.skip(f"needs {dp * pp * tp} ranks")
    cfg = cfg_of(num_key_value_heads=1, tie_word_embeddings=True)   # tp=2 > 1 KV head: replicas too
    grid = ProcessGrid(world, dp=dp, pp=pp, tp=tp)
    model, losses = train(cfg, grid, "1f1b", steps=6, accum=2)
    ref, ref_losses = reference(cfg, steps=6, accum=2)
    check_close(world, full_params(model, grid) if grid.dp_rank == 0 else None, ref, losses, ref_losses)
