"""A small MPI job that fails on purpose; tests/cluster/test_comm_faults.py runs it under mpiexec.

    mpiexec -n 3 python tests/ranks/comm_fault_mpi.py die       # rank 2 exits mid-run
    mpiexec -n 2 python tests/ranks/comm_fault_mpi.py stall     # rank 1 stops answering
    mpiexec -n 2 python tests/ranks/comm_fault_mpi.py mismatch  # ranks disagree on the length
"""
import os
import sys
import time

import numpy as np

from cke_dist.comm import CommError, init


def main(mode):
    world = init()  # deadline from CKE_COMM_TIMEOUT, abort_on_error on
    x = np.ones(1 << 20, np.float32)
    if mode == "die":
        for i in range(5):
            if i == 2 and world.rank == 2:
                os._exit(3)  # no goodbye, no MPI_Finalize: its sockets just close
            world.allreduce(x)
        print(f"rank {world.rank}: finished, which it must not", flush=True)
    elif mode == "stall":
        for i in range(5):
            if i == 2 and world.rank == 1:
                time.sleep(120)  # alive, connected, silent: only a deadline can notice
            try:
                world.allreduce(x)
            except CommError as e:
                # caught and the process returns normally: the exit rule must still abort the job
                print(f"rank {world.rank}: caught {type(e).__name__} op={e.op} peer={e.peer} host={e.host}",
                      flush=True)
                return
    elif mode == "mismatch":
        backing = np.full(14, -1.0, np.float32)
        view = backing[2:12] if world.rank == 0 else backing[2:13]
        view[:] = 1.0
        try:
            world.allreduce(view)
        finally:
            intact = (backing[:2] == -1).all() and (backing[2 + view.size:] == -1).all()
            print(f"rank {world.rank}: sentinel {'intact' if intact else 'OVERWRITTEN'}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}: use die, stall or mismatch")


if __name__ == "__main__":
    main(sys.argv[1])
