"""`cke-dist info` run as the real command: alone, as JSON, with a forced transport that cannot work, and under
mpiexec with ranks posing as two hosts (the per-pair plan rank 0 prints)."""
import json
import subprocess
import sys

import pytest
from mpirun import REPO, run_two_hosts, threads_env

from cke_dist.comm import rdma

INFO = [sys.executable, "-m", "cke_dist.cli", "info"]
PROBE = rdma.probe()


def _run(cmd, **env_extra):
    env = threads_env(**env_extra)
    env.pop("CKE_TRANSPORT", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_info_text_names_mpi_rdma_transport_and_threads():
    p = _run(INFO)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "MPI library:   MPICH" in out
    assert f"pyverbs:       {PROBE['version'] or 'not installed'}" in out
    for line in PROBE["checked"]:
        assert f"checked: {line}" in out
    assert "transport:     auto" in out and "shm for peers on this host" in out
    assert ("for peers on other hosts: tcp (rdma: no device here)" in out) == (PROBE["reason"] == "rdma: no device")
    assert "OMP_NUM_THREADS=1" in out and "CPUs usable" in out


def test_info_json_is_complete():
    p = _run(INFO + ["--json"])
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["mpi"]["world_size"] == 1 and info["mpi"]["library"].startswith("MPICH")
    assert info["rdma"]["ok"] == PROBE["ok"] and info["rdma"]["reason"] == PROBE["reason"]
    assert info["transport"] == {"requested": "auto", "ok": True, "plan": info["transport"]["plan"]}
    assert info["threads"]["NUMBA_NUM_THREADS"] == "1"


def test_info_forced_rdma_without_device_exits_1_with_checks():
    if PROBE["ok"]:
        pytest.skip("an RDMA device here: forced rdma is possible (covered by the rdma-marked tests)")
    p = _run(INFO + ["--transport", "rdma"])
    assert p.returncode == 1
    assert "transport:     rdma -- UNAVAILABLE" in p.stdout
    assert "transport=rdma cannot work here: rdma: no device. Checked: import pyverbs" in p.stdout


def test_info_bad_transport_name():
    p = _run(INFO + ["--transport", "carrier-pigeon"])
    assert p.returncode == 2 and "transport='carrier-pigeon' is not a transport" in p.stderr


def test_info_under_mpiexec_prints_the_plan_once():
    p = run_two_hosts(2, 1, INFO[1:])
    assert p.returncode == 0, p.stdout
    out = p.stdout
    assert out.count("MPI library:") == 1, "only rank 0 prints"
    assert "transport=auto: 3 ranks on 2 host(s) (hostA: ranks 0-1; hostB: ranks 2)" in out
    assert "shm: pairs 0-1 (same host)" in out
    if not PROBE["ok"]:
        assert "tcp: pairs 0-2 1-2 (remote; rdma: no device (rank 0 and 2 more))" in out or \
            "tcp: pairs 0-2 1-2 (remote; rdma: pyverbs not installed" in out


def test_info_describes_the_grid_and_each_groups_transport():
    """Two hosts of two ranks, --tp 2: tp groups stay on one host (shm), dp groups cross hosts (tcp)."""
    p = run_two_hosts(2, 2, INFO[1:] + ["--tp", "2"])
    assert p.returncode == 0, p.stdout
    assert "grid:          dp=2 x pp=1 x tp=2" in p.stdout
    assert "tp groups: [0, 1] over shm, [2, 3] over shm" in p.stdout
    assert "dp groups: [0, 2] over tcp, [1, 3] over tcp" in p.stdout or (
        PROBE["ok"] and "dp groups: [0, 2] over rdma, [1, 3] over rdma" in p.stdout)
    alone = _run(INFO + ["--tp", "2"])
    assert alone.returncode == 1 and "tp=2 x pp=1 does not divide the world of 1 rank(s)" in alone.stdout
