"""rdma: the driver for tests/ranks/rdma_mpi.py, plus what one process can check.

On a machine without an RDMA device (CI, here) the real-device tests are skipped with the reason printed by
`pytest -rs`; the fallback (queue pairs that do not come up -> tcp under auto) and the forced-rdma error run
everywhere. Where a device exists, the same command runs the link tests on it.
"""
import json

import pytest
from mpirun import RANKS, run_pytest_mpi

from cke_dist.comm import rdma

PROBE = rdma.probe()


def test_probe_is_plain_data_with_what_was_checked():
    assert json.loads(json.dumps(PROBE)) == PROBE  # it travels in the bootstrap facts
    assert PROBE["checked"], "the probe must say what it looked at"
    if PROBE["ok"]:
        assert PROBE["use"]["device"] and PROBE["use"]["port"] >= 1
    else:
        assert PROBE["use"] is None and PROBE["reason"].startswith("rdma: ")


def test_connect_with_no_usable_device_reports_every_peer_failed():
    from mpi4py import MPI

    if PROBE["ok"]:
        pytest.skip("this machine has an RDMA device")
    links, failed = rdma.connect_rdma(MPI.COMM_SELF, [], ["here"], PROBE)
    assert links == {} and failed == {}  # no peers: nothing to set up, nothing failed
    # with real peers (2 ranks): every pair is reported failed on both ends, with the reason
    from mpirun import RANKS, run_mpi
    res = run_mpi(2, [RANKS / "comm_cases_mpi.py", "rdma_fails"], timeout=60)
    assert res.returncode == 0 and res.stdout.count("failed reported") == 2, res.stdout[-3000:]


@pytest.mark.rdma
@pytest.mark.skipif(not PROBE["ok"], reason=f"no usable RDMA device here ({PROBE['reason']}: "
                                            f"{'; '.join(PROBE['checked'])})")
def test_device_opens_and_registers_memory():
    """A real device: context, PD, CQs, an RC QP in INIT and registered rings come up and close cleanly."""
    dev = rdma._Device(PROBE["use"])
    v = rdma._Verbs(dev.pd, dev.ctx, PROBE["use"], 2, 1 << 16, link=None)
    try:
        ep = v.endpoint()
        assert ep["qpn"] > 0 and ep["rx_rkey"] and ep["credit_rkey"]
        v.tx.view[:] = 7  # the registered staging memory is ours to write
        assert int(v.tx.view.sum()) == 7 * 2 * (1 << 16)
    finally:
        v.close()


def test_mpi_rdma_suite():
    res = run_pytest_mpi(2, RANKS / "rdma_mpi.py", extra=["-rs"], env={"CKE_COMM_HOSTNAME": ""})
    assert " passed" in res.stdout
    if not PROBE["ok"]:  # the device tests must say why they did not run
        assert "SKIPPED" in res.stdout and "no usable RDMA device" in res.stdout
