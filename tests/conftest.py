"""Test set-up shared by every test file.

Several MPI ranks share two cores here: each process gets one BLAS and one numba
thread before numpy is imported, or they fight over the cores.
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")
