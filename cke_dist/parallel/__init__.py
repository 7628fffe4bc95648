"""How work is split: the process grid (dp x pp x tp) and data-parallel training steps."""
from .data_parallel import (DEFAULT_BUCKET_MB, GradBuckets, average_over_dp, check_params_in_sync, dp_step,
                            sync_params)
from .grid import ProcessGrid

__all__ = ["DEFAULT_BUCKET_MB", "GradBuckets", "ProcessGrid", "average_over_dp", "check_params_in_sync",
           "dp_step", "sync_params"]
