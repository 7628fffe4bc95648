"""Pipeline parallelism: the multi-rank suite (tests/pp_mpi.py at 2, 3, 4 and 8 ranks), the schedules
and the stage split in one process."""
import pytest

from mpirun import REPO, run_pytest_mpi


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_pp_suite(n):
    res = run_pytest_mpi(n, REPO / "tests" / "pp_mpi.py", timeout=400)
    assert "passed" in res.stdout and "failed" not in res.stdout


def test_schedules_run_every_op_once_in_dependency_order():
    from cke_dist.parallel import schedule

    for kind in ("1f1b", "gpipe", "zb"):
        for p in (1, 2, 3, 4):
            for m in (1, 2, 5, 8):
                for s in range(p):
                    ops = schedule(kind, p, s, m)
                    want = {"F", "B"} | ({"W"} if kind == "zb" else set())
                    assert sorted(ops) == sorted((o, i) for o in want for i in range(m)), (kind, p, s, m)
                    for o, i in ops:   # B after its F, W after its B
                        if o != "F":
                            assert ops.index(("F" if o == "B" else "B", i)) < ops.index((o, i))
                    assert ops[-1][0] != "F"


def test_1f1b_and_zb_orders():
    from cke_dist.parallel import schedule

    # stage 0 of 2, 4 micro-batches: one warm-up forward, then one forward and one backward in turn
    assert schedule("1f1b", 2, 0, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2),
                                         ("B", 3)]
    # the last stage: forward then backward of each micro-batch
    assert schedule("1f1b", 2, 1, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    # zb: stage 0 runs each W at once; the last stage (s = 1) holds one back and runs it at the end
    assert [op for op in schedule("zb", 2, 0, 2) if op[0] != "F"] == [("B", 0), ("W", 0), ("B", 1), ("W", 1)]
    assert schedule("zb", 2, 1, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("W", 0), ("W", 1)]
    with pytest.raises(ValueError, match="parallel.schedule = 'pipedream': one of 1f1b, gpipe, zb"):
        schedule("pipedream", 2, 0, 2)


def test_stage_split():
    from cke_dist.model.layout import stage_layers

    # the embedding and the head count as a layer's work each: 8 layers + 2 over 2 stages
    assert stage_layers(8, 2) == [(0, 4), (4, 8)]
    assert stage_layers(4, 3) == [(0, 1), (1, 3), (3, 4)]
    assert stage_layers(5, 3, [1, 3, 1]) == [(0, 1), (1, 4), (4, 5)]
    with pytest.raises(ValueError, match=r"parallel.pp_layers = \[2, 2\]: needs 3 counts"):
        stage_layers(4, 3, [2, 2])
    with pytest.raises(ValueError, match=r"parallel.pp_layers = \[0, 4\]"):
        stage_layers(4, 2, [0, 4])
    with pytest.raises(ValueError, match="pipeline parallel size 5 exceeds num_hidden_layers \\(4\\)"):
        stage_layers(4, 5)
