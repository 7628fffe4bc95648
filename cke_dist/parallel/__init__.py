"""How work is split: the process grid (dp x pp x tp), data-parallel buckets, the tensor-parallel
group every tp collective goes through, pipeline schedules, ZeRO-1, and the training step that
composes them.

The names below load with their module on first use: the model imports tensor_parallel (it sits
under the model: a model is built with its tp group), and must not pull in the rest of this
package, which is built on the model.
"""
import importlib

_EXPORTS = {
    "DEFAULT_BUCKET_MB": "data_parallel", "GradBuckets": "data_parallel", "average_over_dp": "data_parallel",
    "check_params_in_sync": "data_parallel", "sync_params": "data_parallel",
    "ProcessGrid": "grid",
    "SCHEDULES": "pipeline", "grid_stage": "pipeline", "pipeline_loss": "pipeline", "run_schedule": "pipeline",
    "schedule": "pipeline",
    "ParallelGrads": "step", "train_step": "step",
    "TensorParallel": "tensor_parallel",
    "Zero1": "zero",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cke_dist.parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cke_dist.parallel.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
