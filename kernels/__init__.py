"""Single-node fused kernels: pure functions on numpy arrays (no MPI, no models)."""
