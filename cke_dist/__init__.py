"""cke-dist: distributed CPU training and inference for Llama-family models.

The public face, importable without loading every layer (numba and mpi4py load
only when the names that need them are first used):

    import cke_dist as cd
    world = cd.init()                          # under mpiexec, or one plain process
    model = cd.Model.from_config(cfg, seed=0)  # or cd.load_model("hf_dir")
    loss = model.forward_backward(tokens, targets)
    cd.AdamW(model, lr=3e-4).step()
    model.save("out_dir")

Generation lives in its module (`from cke_dist.serving.generate import generate`): the
package attribute `cke_dist.serving.generate` is that module, as Python's import sets it.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "init": "cke_dist.comm",
    "Communicator": "cke_dist.comm",
    "LlamaConfig": "cke_dist.model",
    "Model": "cke_dist.model",
    "load_model": "cke_dist.model",
    "AdamW": "cke_dist.train.optim",
    "SGD": "cke_dist.train.optim",
    "clip_grad_norm": "cke_dist.parallel.step",
    "load_tokenizer": "cke_dist.formats.tokenizer",
    "ProcessGrid": "cke_dist.parallel.grid",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cke_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
