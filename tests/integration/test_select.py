"""Transport selection: the per-pair plan from gathered facts, the fallback on this machine (pyverbs installed,
no RDMA device), forced transports that cannot work, and the drivers for tests/ranks/select_mpi.py (real ranks,
one host and two hosts posed through CKE_COMM_HOSTNAME).
"""
import json
import subprocess
import sys

import pytest
from mpirun import RANKS, run_pytest_mpi, run_two_hosts

from cke_dist.comm import rdma, select
from cke_dist.comm.errors import TransportUnavailable

NO_DEVICE = {"ok": False, "reason": "rdma: no device", "version": "56.0rc1", "devices": [], "use": None,
             "checked": ["import pyverbs: ok (version 56.0rc1)",
                         "RDMA devices: none (get_device_list() raised PyverbsRDMAError: Failed to get devices list)"]}
DEVICE = {"ok": True, "reason": "rdma: mlx5_0 port 1", "version": "56.0rc1", "checked": [],
          "devices": [{"name": "mlx5_0", "ports": []}],
          "use": {"device": "mlx5_0", "port": 1, "gid_index": 0, "lid": 7, "gid": "fe80::1", "mtu": 5}}


def facts(hosts, probes):
    return [{"host": h, "rdma": p} for h, p in zip(hosts, probes)]


def test_resolve_transport_argument_env_and_bad_value(monkeypatch):
    monkeypatch.delenv("CKE_TRANSPORT", raising=False)
    assert select.resolve_transport(None) == "auto"
    monkeypatch.setenv("CKE_TRANSPORT", "SHM")
    assert select.resolve_transport(None) == "shm"
    assert select.resolve_transport("tcp") == "tcp"  # the argument wins over the environment
    monkeypatch.setenv("CKE_TRANSPORT", "infiniband")
    with pytest.raises(ValueError, match=r"CKE_TRANSPORT='infiniband'.*auto, tcp, shm, rdma"):
        select.resolve_transport(None)
    with pytest.raises(ValueError, match=r"transport='udp'"):
        select.resolve_transport("udp")


def test_auto_no_device_one_host_is_all_shm():
    p = select.plan("auto", facts(["a"] * 3, [NO_DEVICE] * 3))
    assert set(p.kind.values()) == {"shm"} and len(p.kind) == 3
    assert p.peers(1, "shm") == [0, 2]


def test_auto_no_device_two_hosts_mixes_shm_and_tcp_and_says_why():
    p = select.plan("auto", facts(["a", "a", "b", "b"], [NO_DEVICE] * 4))
    assert p.of(0, 1) == "shm" and p.of(3, 2) == "shm"
    assert all(p.of(a, b) == "tcp" for a in (0, 1) for b in (2, 3))
    assert "rdma: no device" in p.reason[(0, 2)]
    text = "\n".join(p.describe())
    assert "shm: pairs 0-1 2-3 (same host)" in text
    assert "tcp: pairs 0-2 0-3 1-2 1-3 (remote; rdma: no device (rank 0 and 3 more))" in text
    assert "a: ranks 0-1; b: ranks 2-3" in text


def test_auto_uses_rdma_between_hosts_only_when_every_rank_has_a_device():
    p = select.plan("auto", facts(["a", "a", "b"], [DEVICE] * 3))
    assert p.of(0, 1) == "shm" and p.of(0, 2) == "rdma" and p.of(1, 2) == "rdma"
    p = select.plan("auto", facts(["a", "a", "b"], [DEVICE, DEVICE, NO_DEVICE]))
    assert p.of(0, 2) == "tcp" and "rdma: no device (rank 2)" in p.reason[(0, 2)]


def test_forced_tcp_and_forced_rdma_with_devices():
    assert set(select.plan("tcp", facts(["a", "b"], [DEVICE] * 2)).kind.values()) == {"tcp"}
    assert set(select.plan("rdma", facts(["a", "a"], [DEVICE] * 2)).kind.values()) == {"rdma"}


def test_forced_rdma_without_device_lists_what_was_checked():
    with pytest.raises(TransportUnavailable) as ei:
        select.plan("rdma", facts(["a", "a", "b"], [NO_DEVICE] * 3))
    msg = str(ei.value)
    assert "transport=rdma cannot work here: rdma: no device" in msg
    assert "ranks 0-1 on a: import pyverbs: ok (version 56.0rc1); RDMA devices: none" in msg
    assert "ranks 2 on b" in msg and "Use transport=auto" in msg


def test_forced_shm_across_hosts_is_an_error():
    with pytest.raises(TransportUnavailable, match=r"transport=shm cannot connect rank 0 \(host a\) and rank 1 "
                                                   r"\(host b\)"):
        select.plan("shm", facts(["a", "b"], [NO_DEVICE] * 2))


def test_single_rank_plan_is_empty():
    p = select.plan("rdma", facts(["a"], [NO_DEVICE]))  # nothing to connect: not an error
    assert p.kind == {}


def test_probe_on_this_machine_reports_why_not():
    got = rdma.probe()
    if got["ok"]:
        pytest.skip(f"this machine has an RDMA device ({got['reason']}): the no-device path cannot be shown here")
    assert got["reason"] in ("rdma: no device", "rdma: pyverbs not installed") or got["reason"].startswith(
        "rdma: no active port")
    assert got["checked"] and got["checked"][0].startswith("import pyverbs")


def test_probe_without_pyverbs_says_not_installed():
    code = ("import sys, json; sys.modules['pyverbs'] = None; "  # the import of pyverbs now fails
            "from cke_dist.comm import rdma; print(json.dumps(rdma.probe()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout)
    assert got["ok"] is False and got["reason"] == "rdma: pyverbs not installed"
    assert "pip install 'cke-dist[rdma]'" in got["checked"][0]


def test_local_facts_host_override(monkeypatch):
    monkeypatch.setenv("CKE_COMM_HOSTNAME", "posing-host")
    f = select.local_facts("tcp")
    assert f["host"] == "posing-host" and f["rdma"]["ok"] is False and "not probed" in f["rdma"]["reason"]


PYTEST_MPI = ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", str(RANKS / "select_mpi.py")]


def test_mpi_select_one_host():
    res = run_pytest_mpi(3, RANKS / "select_mpi.py", env={"CKE_COMM_HOSTNAME": ""})
    assert " passed" in res.stdout


def test_mpi_select_two_posed_hosts():
    """Ranks 0-1 pose as host A and 2-3 as host B."""
    res = run_two_hosts(2, 2, PYTEST_MPI)
    # exit 0 from mpiexec: every rank's pytest ran its tests and passed (pytest exits 5 on none collected)
    assert res.returncode == 0, res.stdout[-8000:]
    assert " passed" in res.stdout
