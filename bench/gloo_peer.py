"""The peer both distributed benches measure against: torch.distributed with the gloo backend,
set up on the ranks mpiexec started (rank 0 picks a free loopback port and broadcasts it over MPI)."""
import os
import socket


def setup_gloo(comm):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    return torch, dist
