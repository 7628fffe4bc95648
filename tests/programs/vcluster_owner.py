"""Start a 2-host virtual cluster, print its tag and sleep: the test SIGKILLs this owner and checks that
the next cluster start sweeps what it left (tests/cluster/test_vcluster.py)."""
import time

from vcluster import VirtualCluster

vc = VirtualCluster(2).start()
print(vc.tag, flush=True)
time.sleep(300)
