"""How work is split: the process grid (dp x pp x tp), data-parallel buckets, tensor-parallel replicas,
pipeline schedules, ZeRO-1, and the training step that composes them."""
from .data_parallel import DEFAULT_BUCKET_MB, GradBuckets, average_over_dp, check_params_in_sync, sync_params
from .grid import ProcessGrid
from .pipeline import SCHEDULES, grid_stage, pipeline_loss, run_schedule, schedule
from .step import ParallelGrads, train_step
from .zero import Zero1

__all__ = ["DEFAULT_BUCKET_MB", "SCHEDULES", "GradBuckets", "ParallelGrads", "ProcessGrid", "average_over_dp",
           "check_params_in_sync", "grid_stage", "pipeline_loss", "run_schedule", "schedule", "sync_params",
           "train_step", "Zero1"]
