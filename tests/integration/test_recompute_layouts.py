"""train.recompute on the layouts: the same job in one process (every cache kept) and recomputing in
dp=2 x tp=2, dp=4 and a zero-bubble pp=2, every parameter compared after 4 AdamW steps; and on one
layout recompute="full" against "none", bitwise."""
import numpy as np
from jobs import checkpoint_params, logged_losses, run_job

STEPS = "train.steps=4"


def test_recompute_on_layouts_equals_one_process(tmp_path, corpus):
    ref = run_job(tmp_path, "one", 1, STEPS)
    assert ref.returncode == 0, ref.stdout[-3000:]
    one = checkpoint_params(tmp_path / "one", 4)
    for name, n, sets in [("dp2tp2_full", 4, ["parallel.tp=2", "train.recompute=full"]),
                          ("dp4_full", 4, ["train.recompute=full"]),
                          ("pp2zb_full", 2, ["parallel.pp=2", "parallel.schedule=zb", "train.recompute=full"])]:
        res = run_job(tmp_path, name, n, STEPS, *sets)
        assert res.returncode == 0, res.stdout[-3000:]
        np.testing.assert_allclose(logged_losses(tmp_path / name), logged_losses(tmp_path / "one"), rtol=1e-5)
        diff = np.abs(checkpoint_params(tmp_path / name, 4) - one)
        assert diff.max() < 2e-4 and np.median(diff) < 1e-7, (name, diff.max(), np.median(diff))
    # recomputing repeats the same ops on the same inputs: nothing changes, not even rounding
    res = run_job(tmp_path, "pp2zb_none", 2, STEPS, "parallel.pp=2", "parallel.schedule=zb")
    assert res.returncode == 0, res.stdout[-3000:]
    np.testing.assert_array_equal(checkpoint_params(tmp_path / "pp2zb_none", 4),
                                  checkpoint_params(tmp_path / "pp2zb_full", 4))


def test_a_bad_recompute_is_named(tmp_path, corpus):
    res = run_job(tmp_path, "bad", 1, STEPS, "train.recompute=some")
    assert res.returncode == 2
    assert "train.recompute" in res.stdout and "must be none or full" in res.stdout, res.stdout[-2000:]
