"""How bytes move: `init()` gives the world communicator; collectives run over per-peer Links.

    from cke_dist.comm import init
    world = init()                      # under mpiexec, or a size-1 world in one plain process
    world.allreduce(buf, op="avg")      # in place; async_op=True returns a handle with wait()
    tp = world.split([0, 1])            # sub-group reusing the connections (None on non-members)

Knows nothing of models or kernels. See bootstrap.py (setup, settings, abort),
group.py (groups, ordering, async), collectives.py (algorithms), tcp.py (transport).
"""
from cke_dist.comm.bootstrap import init
from cke_dist.comm.errors import CommError, CommTimeout, FrameError, PeerLost, TransportUnavailable
from cke_dist.comm.group import Communicator, Handle

__all__ = ["init", "Communicator", "Handle", "CommError", "CommTimeout", "FrameError", "PeerLost",
           "TransportUnavailable"]
