"""Parse `cke-dist generate --threads 1 --help` as the command does, then print the size of numba's
thread pool (tests/integration/test_generate.py: --threads sizes the pool before numba starts)."""
from cke_dist.cli import main

try:
    main(["generate", "--threads", "1", "--help"])
except SystemExit:
    pass
import numba  # noqa: E402  (after the command set the pool size: that is the test)

print("pool", numba.config.NUMBA_NUM_THREADS)
