"""The process grid in one plain process (a size-1 world); the multi-rank layouts are in tests/ranks/data_parallel_mpi.py
(test_grid_groups_on_four_ranks, run at 4 ranks by tests/integration/test_data_parallel.py)."""
import pytest

from cke_dist.comm import init
from cke_dist.parallel import ProcessGrid


def test_one_process_is_a_1x1x1_grid():
    g = ProcessGrid(init())
    assert (g.dp, g.shape.pp, g.shape.tp) == (1, 1, 1)
    assert (g.dp_rank, g.pp_rank, g.tp_rank) == (0, 0, 0)
    assert g.dp_group.size == g.pp_group.size == g.tp_group.size == 1
    assert g.rank_of(0, 0, 0) == 0
    assert "dp=1, pp=1, tp=1" in repr(g)


@pytest.mark.parametrize("kw, msg", [
    (dict(dp=2), r"dp\*pp\*tp = 2\*1\*1 = 2 but the world has 1 ranks; launch with mpiexec -n 2"),
    (dict(tp=2), r"world size 1 is not divisible by pp\*tp = 1\*2"),
    (dict(pp=0), r"pp=0 and tp=1 must be >= 1"),
])
def test_impossible_grids_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ProcessGrid(init(), **kw)
