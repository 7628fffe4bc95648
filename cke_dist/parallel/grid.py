"""The process grid: world = dp x pp x tp, one communicator per axis.

Rank layout (Megatron's): tp ranks are adjacent, then pp, then dp, so that a
tensor-parallel group sits on one host when hosts hold consecutive ranks:

    rank = (dp_index * pp + pp_index) * tp + tp_index

Every rank builds every group with no communication (`split` needs none); each group gets its
own comm engine, so tp traffic never waits behind dp buckets (cke_dist.comm.group).
Tests: tests/unit/test_grid.py (one process), tests/ranks/data_parallel_mpi.py::test_grid_groups_on_four_ranks,
tests/integration/test_info.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GridShape:
    dp: int
    pp: int
    tp: int


class ProcessGrid:
    """Coordinates of this rank and its dp/pp/tp groups over a world communicator."""

    def __init__(self, world, dp: int | None = None, pp: int = 1, tp: int = 1):
        if pp < 1 or tp < 1:
            raise ValueError(f"pp={pp} and tp={tp} must be >= 1")
        if dp is None:
            if world.size % (pp * tp):
                raise ValueError(f"world size {world.size} is not divisible by pp*tp = {pp}*{tp}")
            dp = world.size // (pp * tp)
        if dp * pp * tp != world.size:
            raise ValueError(f"dp*pp*tp = {dp}*{pp}*{tp} = {dp * pp * tp} but the world has {world.size} "
                             f"ranks; launch with mpiexec -n {dp * pp * tp} or change the grid")
        self.world = world
        self.shape = GridShape(dp, pp, tp)
        r = world.rank
        self.tp_rank = r % tp
        self.pp_rank = (r // tp) % pp
        self.dp_rank = r // (tp * pp)
        self.dp_group = world.split([self.rank_of(d, self.pp_rank, self.tp_rank) for d in range(dp)])
        self.pp_group = world.split([self.rank_of(self.dp_rank, p, self.tp_rank) for p in range(pp)])
        self.tp_group = world.split([self.rank_of(self.dp_rank, self.pp_rank, t) for t in range(tp)])

    @staticmethod
    def axis_groups(size: int, pp: int = 1, tp: int = 1) -> dict[str, list[tuple[int, ...]]]:
        """axis -> the world ranks of each of its groups, for a world of `size` (no communicator needed)."""
        dp = size // (pp * tp)
        def rank(d, p, t):
            return (d * pp + p) * tp + t
        return {"dp": [tuple(rank(d, p, t) for d in range(dp)) for p in range(pp) for t in range(tp)],
                "pp": [tuple(rank(d, p, t) for p in range(pp)) for d in range(dp) for t in range(tp)],
                "tp": [tuple(rank(d, p, t) for t in range(tp)) for d in range(dp) for p in range(pp)]}

    def rank_of(self, dp_index: int, pp_index: int, tp_index: int) -> int:
        s = self.shape
        return (dp_index * s.pp + pp_index) * s.tp + tp_index

    @property
    def dp(self) -> int:
        return self.shape.dp

    def __repr__(self):
        s = self.shape
        return (f"ProcessGrid(dp={s.dp}, pp={s.pp}, tp={s.tp}; rank {self.world.rank} = "
                f"dp {self.dp_rank}, pp {self.pp_rank}, tp {self.tp_rank})")
