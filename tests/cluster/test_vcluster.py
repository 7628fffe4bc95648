"""The virtual cluster (tests/helpers/vcluster.py): 2 and 4 hosts on this machine, each with its own network namespace,
hostname, /dev/shm and address, MPI started through hydra's launcher shim. On it: transport=auto picks shm inside
a host and tcp across by itself; the collective suite, the dp, tp and pp suites (each against one process) and
the train job pass; a 1 Gbit/s link caps the allreduce bench near the link rate; teardown leaves nothing.

Skipped, with the reason, where the cluster cannot be built (not root, no `ip netns`, no namespaces).
"""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mpirun import PROGRAMS, RANKS, REPO, threads_env
from vcluster import VirtualCluster, leftovers, sweep_stale, unavailable


@pytest.fixture(autouse=True, scope="module")
def _needs_namespaces():
    why = unavailable()
    if why:
        pytest.skip(why)


def _pytest_on(vc, per_host, test_file, timeout=240, extra=(), env=None):
    res = vc.run_mpi(per_host, ["-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider", *extra,
                                str(RANKS / test_file)], timeout=timeout, env=env)
    assert res.returncode == 0, f"{test_file} on {per_host} rank(s) per host failed:\n{res.stdout[-8000:]}"
    n = sum(per_host) if isinstance(per_host, list) else per_host * vc.n
    assert res.stdout.count(" passed") == n and "failed" not in res.stdout, res.stdout[-4000:]
    return res


CASES = RANKS / "comm_cases_mpi.py"


def test_hosts_are_separate_and_auto_picks_shm_inside_tcp_across():
    with VirtualCluster(2) as vc:
        for h in vc.hosts:
            out = vc.exec(h.name, ["sh", "-c", "hostname; ip -4 -o addr show dev eth0; getent hosts h0 h1"]).stdout
            assert out.split()[0] == h.name, out
            assert f"inet {h.addr}/24" in out, out
        # each host has its own /dev/shm: a file made in h0's is in neither h1's nor this machine's
        name = f"cke-vcluster-probe-{os.getpid()}"
        assert vc.exec("h0", ["touch", f"/dev/shm/{name}"]).returncode == 0
        assert vc.shm_files("h0", prefix=name) == [name]
        assert vc.shm_files("h1", prefix=name) == [] and not os.path.exists(f"/dev/shm/{name}")
        assert vc.exec("h1", ["ls", f"/dev/shm/{name}"]).returncode != 0

        res = vc.run_mpi(2, [CASES, "links"], timeout=60, env={"CKE_TRANSPORT": "auto"})
        out = res.stdout
        assert res.returncode == 0, out[-4000:]
        # no CKE_COMM_INTERFACE, no CKE_COMM_HOSTNAME: the host's own name and address decide
        assert "transport=auto: 4 ranks on 2 host(s) (h0: ranks 0-1; h1: ranks 2-3)" in out, out
        assert "shm: pairs 0-1 2-3 (same host)" in out and "tcp: pairs 0-2 0-3 1-2 1-3 (remote;" in out, out
        a0, a1 = vc.hosts[0].addr, vc.hosts[1].addr
        assert f"rank 0 on h0 listens {a0} links 1:shm 2:tcp 3:tcp" in out, out
        assert f"rank 1 on h0 listens {a0} links 0:shm 2:tcp 3:tcp" in out, out
        assert f"rank 2 on h1 listens {a1} links 0:tcp 1:tcp 3:shm" in out, out
        assert f"rank 3 on h1 listens {a1} links 0:tcp 1:tcp 2:shm" in out, out
        assert vc.pids() == [], "processes of the finished job are left in the hosts"


@pytest.mark.parametrize("hosts, per_host", [(2, 2), (4, 1)], ids=["2hosts-x2", "4hosts-x1"])
def test_collectives_suite_across_hosts(hosts, per_host):
    """Every collective, op, dtype and length (tests/ranks/comm_collectives_mpi.py) with transport=auto: shm and tcp
    mixed on 2 hosts x 2 ranks, tcp only on 4 hosts x 1."""
    with VirtualCluster(hosts) as vc:
        _pytest_on(vc, per_host, "comm_collectives_mpi.py", env={"CKE_TRANSPORT": "auto"})


@pytest.mark.parametrize("suite", ["data_parallel_mpi.py", "tensor_parallel_mpi.py", "pipeline_mpi.py"])
def test_parallel_suites_across_hosts_match_one_process(suite):
    """dp, tp and pp training against one process (each suite trains the reference itself): on 2 hosts x 1 rank
    (every pair over tcp) and 2 hosts x 2 ranks (tp/pp groups inside a host over shm, dp across over tcp)."""
    with VirtualCluster(2) as vc:
        _pytest_on(vc, 1, suite)
        _pytest_on(vc, 2, suite)


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["data_parallel_mpi.py", "tensor_parallel_mpi.py", "pipeline_mpi.py"])
def test_parallel_suites_on_4_hosts(suite):
    with VirtualCluster(4) as vc:
        _pytest_on(vc, 1, suite)


def test_train_job_across_hosts_equals_one_process(tmp_path, corpus):
    """`cke-dist train` itself on 2 hosts x 2 ranks as dp=4, dp=2 x tp=2 and pp=2 x tp=2 (tp inside a host):
    the same losses and parameters as one plain process."""
    from jobs import TINY, checkpoint_params, logged_losses, run_job

    ref = run_job(tmp_path, "one", 1, "train.steps=4")
    assert ref.returncode == 0, ref.stdout[-3000:]
    with VirtualCluster(2) as vc:
        for name, sets in (("dp4", []), ("dp2tp2", ["parallel.tp=2"]), ("pp2tp2", ["parallel.pp=2", "parallel.tp=2"])):
            args = ["-m", "cke_dist.cli", "train", "--no-progress"]
            for s in [*TINY, f"data.path={tmp_path / 'corpus.txt'}", f"train.out_dir={tmp_path / name}",
                      "train.steps=4", *sets]:
                args += ["--set", s]
            res = vc.run_mpi(2, args, timeout=120, env={"CKE_COMM_TIMEOUT": "20"})
            assert res.returncode == 0, f"{name}: {res.stdout[-3000:]}"
            assert "4 ranks on 2 host(s)" in res.stdout, res.stdout[-3000:]
            np.testing.assert_allclose(logged_losses(tmp_path / name), logged_losses(tmp_path / "one"), rtol=2e-6,
                                       err_msg=name)
            np.testing.assert_allclose(checkpoint_params(tmp_path / name, 4), checkpoint_params(tmp_path / "one", 4),
                                       rtol=0, atol=5e-5, err_msg=name)


def _bench_busbw(vc):
    res = vc.run_mpi(1, ["bench/allreduce.py", "--sizes", "16M", "--no-gloo", "--budget", "2"], timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    row = re.search(r"16 MiB \|\s+\S+ m?s\s+(\S+)\s+(\S+) \|", res.stdout)
    assert row and "2 ranks on 2 host(s)" in res.stdout and "ours over tcp" in res.stdout, res.stdout[-3000:]
    return float(row.group(2)), res.stdout


@pytest.mark.slow
def test_allreduce_bus_bandwidth_sits_near_a_1_gbit_link():
    """With tc tbf at 1 Gbit/s on every link the bench's bus bandwidth is the link's 0.125 GB/s (a check that the
    test bed shapes what it claims); without the limit the same bench runs several times faster."""
    with VirtualCluster(2, rate="1gbit") as vc:
        limited, out = _bench_busbw(vc)
        print(f"bus bandwidth at 1 Gbit/s: {limited:.3f} GB/s\n{out}")
        assert 0.85 * 0.125 <= limited <= 1.02 * 0.125, out
        for h in vc.hosts:
            vc.shape(h.name, None)
        free, out = _bench_busbw(vc)
        print(f"bus bandwidth without a limit: {free:.3f} GB/s")
        assert free > 3 * limited, out


def test_teardown_after_a_failing_test_leaves_nothing(tmp_path):
    """A test body that raises with a job running and shm segments in use: every process in the hosts (mpiexec's
    proxies, the ranks, a stray sleeper) is killed, the namespaces, veths and bridge are deleted."""
    class Boom(Exception):
        pass

    pids = []
    with pytest.raises(Boom):
        with VirtualCluster(2) as vc:
            tag, holders = vc.tag, [h.pid for h in vc.hosts]
            proc = vc.popen(2, [CASES, "hold"], env={"CKE_COMM_QUIET": "1"})
            assert proc.stdout.readline().startswith("up")   # mpiexec may interleave the ranks' words
            vc.exec("h1", ["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo x > /dev/shm/cke-shm-left-behind"])
            pids = vc.pids()
            assert len(pids) >= 7, pids   # 2 proxies (and their shells), 4 ranks, the sleeper
            raise Boom("the test failed")
    assert leftovers(tag) == [], leftovers(tag)
    alive = [p for p in [*pids, *holders, proc.pid] if os.path.exists(f"/proc/{p}") and
             open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert alive == [], alive
    assert proc.poll() is not None


def test_a_killed_owner_is_swept_at_the_next_start():
    """pytest itself killed (SIGKILL: no finalizer runs): the next cluster start tears the orphan down."""
    owner = subprocess.Popen([sys.executable, str(PROGRAMS / "vcluster_owner.py")], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, start_new_session=True, env=threads_env())
    try:
        tag = owner.stdout.readline().strip()
        assert tag and leftovers(tag), "the owner did not build its cluster"
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
    time.sleep(0.1)
    assert tag in sweep_stale()
    assert leftovers(tag) == [], leftovers(tag)
