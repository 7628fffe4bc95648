"""A process that dies by SIGKILL holding shm state (tests/integration/test_shm_link.py):

    python tests/programs/shm_peer.py attach NAME   # attach to segment NAME, then die while the test waits
    python tests/programs/shm_peer.py create        # create a segment, print its name, die before any peer
"""
import os
import signal
import sys
import time

from cke_dist.comm import shm

if sys.argv[1] == "attach":
    shm._attach(sys.argv[2])
    time.sleep(0.3)
else:
    name = f"{shm.PREFIX}{os.getpid()}-killed-0-1"
    shm._create(name, 2, 4096)
    print(name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
