"""How work is split: the process grid (dp x pp x tp), data-parallel buckets, tensor-parallel gradients,
and the training step that composes them."""
from .data_parallel import (DEFAULT_BUCKET_MB, GradBuckets, average_over_dp, check_params_in_sync, sync_params,
                            train_step)
from .grid import ProcessGrid
from .tensor_parallel import TPGrads

__all__ = ["DEFAULT_BUCKET_MB", "GradBuckets", "ProcessGrid", "TPGrads", "average_over_dp", "check_params_in_sync",
           "sync_params", "train_step"]
