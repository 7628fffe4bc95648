"""Reduction ops for the collectives: which dtypes, which ops, and in what order operands combine.

Rules: every caller of `combine(op, first, second, out)` fixes the operand
order by the layout alone (recursive doubling: the lower-ranked side first; the
ring: the incoming partial first), so a result never depends on timing;
`avg` is a sum divided once by the group size at the end (float dtypes only).
Tests: tests/ranks/comm_collectives_mpi.py, tests/unit/test_comm_single.py.
"""
from __future__ import annotations

import numpy as np

DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32), np.dtype(np.int64))
OPS = ("sum", "avg", "max", "min", "prod")
_UFUNC = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


def check_op(op: str, dtype) -> None:
    if op not in _UFUNC:
        raise ValueError(f"unknown reduction op {op!r}; use one of {', '.join(OPS)}")
    if op == "avg" and np.dtype(dtype).kind != "f":
        raise ValueError(f"op 'avg' needs a float buffer, got {np.dtype(dtype)}; use 'sum' and divide yourself")


def check_buffer(buf, name: str, writable: bool) -> np.ndarray:
    """The flat 1-D view of a buffer the collectives may use, or a clear error."""
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(buf).__name__}")
    if buf.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {buf.dtype}; supported: {', '.join(str(d) for d in DTYPES)}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name})")
    if writable and not buf.flags.writeable:
        raise ValueError(f"{name} is read-only; the result is written into it")
    return buf.reshape(-1)


def combine(op: str, first: np.ndarray, second: np.ndarray, out: np.ndarray) -> None:
    """out = first (op) second, elementwise."""
    _UFUNC[op](first, second, out=out)


def finish(op: str, buf: np.ndarray, n: int) -> None:
    if op == "avg" and n > 1:
        np.divide(buf, buf.dtype.type(n), out=buf)
