"""Tensor parallelism: the multi-rank suite (tests/ranks/tensor_parallel_mpi.py at 2 and 4 ranks) and the layout rules
in one process."""
import numpy as np
import pytest
from jobs import checkpoint_params, logged_losses, run_job
from mpirun import RANKS, run_pytest_mpi


@pytest.mark.parametrize("n", [2, 4])
def test_tp_suite(n):
    res = run_pytest_mpi(n, RANKS / "tensor_parallel_mpi.py", timeout=400)
    assert "passed" in res.stdout and "failed" not in res.stdout


def cfg(**kw):
    from cke_dist.model import LlamaConfig

    base = dict(vocab_size=61, hidden_size=96, intermediate_size=70, num_hidden_layers=2, num_attention_heads=12,
                num_key_value_heads=3, max_position_embeddings=32)
    return LlamaConfig.from_dict({**base, **kw})


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6, 12])
def test_shards_tile_every_tensor_and_owned_rows_count_each_once(tp):
    """Over the tp ranks the shards cover every element of every tensor, and the owned ranges
    (what the grad norm sums) cover each element exactly once."""
    from cke_dist.model.layout import param_specs

    c = cfg()
    full = {s.name: s.full for s in param_specs(c)}
    held = {n: np.zeros(shape, np.int64) for n, shape in full.items()}
    owned = {n: np.zeros(shape, np.int64) for n, shape in full.items()}
    for r in range(tp):
        for s in param_specs(c, tp, r):
            s.take(held[s.name])[...] += 1
            lo, hi = s.owned_elems()
            mark = np.zeros(s.size, np.int64)
            mark[lo:hi] = 1
            s.take(owned[s.name])[...] += mark.reshape(s.shape)
    for n in full:
        assert held[n].min() >= 1, n
        np.testing.assert_array_equal(owned[n], 1, err_msg=n)
    if tp > 3:   # more ranks than KV heads: some KV rows are held twice (replicas)
        assert held["model.layers.0.self_attn.k_proj.weight"].max() > 1


def test_vocab_shards_differ_by_at_most_one_row_and_none_is_empty():
    from cke_dist.model.layout import split_range

    assert [split_range(61, 4, r) for r in range(4)] == [(0, 16), (16, 31), (31, 46), (46, 61)]
    assert [split_range(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert [split_range(13, 12, r)[1] - split_range(13, 12, r)[0] for r in range(12)] == [2] + [1] * 11


def test_gqa_segments():
    from cke_dist.model.layout import attention_heads

    c = cfg()   # 12 query heads, 3 KV heads: groups of 4
    assert attention_heads(c, 1, 0).segments() == [(0, 12, 0, 3)]
    assert attention_heads(c, 3, 1).segments() == [(0, 4, 0, 1)]
    # tp=2: rank 0 has heads 0-5 = all of group 0 and half of group 1
    h = attention_heads(c, 2, 0)
    assert (h.kv0, h.kv1) == (0, 2) and h.segments() == [(0, 4, 0, 1), (4, 6, 1, 2)]
    h = attention_heads(c, 6, 1)   # heads 2-3, both in group 0
    assert (h.kv0, h.kv1) == (0, 1) and h.segments() == [(0, 2, 0, 1)]


def test_a_tp_that_does_not_divide_the_heads_is_named():
    from cke_dist.model.layout import param_specs

    with pytest.raises(ValueError, match=r"tensor parallel size 5 does not divide num_attention_heads \(12\); "
                                         r"tp can be one of \[1, 2, 3, 4, 6, 12\]"):
        param_specs(cfg(), 5, 0)


# ---- the train job under mpiexec with parallel.tp ----------------------------------------------

def test_train_job_dp2_tp2_matches_one_process_and_resumes_bitwise(tmp_path, corpus):
    """mpiexec -n 4 cke-dist train --set parallel.tp=2 (dp=2 x tp=2) against one plain process;
    its checkpoint loads in one process; a tp=2 run resumed from step 3 equals the uninterrupted one
    bitwise; and the tp checkpoint resumes on another layout (one process) too."""
    ref = run_job(tmp_path, "one", 1, "train.steps=6")
    assert ref.returncode == 0, ref.stdout[-3000:]
    tp = run_job(tmp_path, "tp", 4, "train.steps=6", "parallel.tp=2")
    assert tp.returncode == 0, tp.stdout[-3000:]
    assert "grid dp=2 x pp=1 x tp=2 (dp over shm, tp over shm)" in tp.stdout
    np.testing.assert_allclose(logged_losses(tmp_path / "tp"), logged_losses(tmp_path / "one"), rtol=1e-5)
    diff = np.abs(checkpoint_params(tmp_path / "tp", 6) - checkpoint_params(tmp_path / "one", 6))
    assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (diff.max(), np.median(diff))

    # resume the dp=2 x tp=2 run from step 3 on the same layout: bitwise the uninterrupted run
    res = run_job(tmp_path, "tp_resumed", 4, "train.steps=6", "parallel.tp=2",
               resume=tmp_path / "tp" / "checkpoints" / "step_00000003")
    assert res.returncode == 0, res.stdout[-3000:]
    np.testing.assert_array_equal(checkpoint_params(tmp_path / "tp_resumed", 6), checkpoint_params(tmp_path / "tp", 6))
    # and on one process (the checkpoint is full tensors, optimizer moments included)
    res = run_job(tmp_path, "tp_to_one", 1, "train.steps=6", "parallel.tp=1",
               resume=tmp_path / "tp" / "checkpoints" / "step_00000003")
    assert res.returncode == 0, res.stdout[-3000:]
    diff = np.abs(checkpoint_params(tmp_path / "tp_to_one", 6) - checkpoint_params(tmp_path / "one", 6))
    assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (diff.max(), np.median(diff))


def test_a_grid_that_does_not_fit_is_an_error_on_every_rank(tmp_path, corpus):
    res = run_job(tmp_path, "bad", 3, "train.steps=2", "parallel.tp=2")
    assert res.returncode != 0
    msg = "parallel.tp = 2 x parallel.pp = 1 does not divide the world of 3 rank(s)"
    assert res.stdout.count(msg) == 3, res.stdout[-3000:]
    assert "set parallel.tp to one of [1, 3]" in res.stdout
    res = run_job(tmp_path, "bad2", 1, "train.steps=2", "parallel.tp=3")
    assert res.returncode == 2
    assert "parallel.tp = 3: must divide model.num_attention_heads (4): one of [1, 2, 4]" in res.stdout
