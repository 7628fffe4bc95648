"""A virtual cluster on one machine: N hosts that MPI, `transport=auto` and our tcp/shm links see as N hosts.

    from vcluster import VirtualCluster, unavailable
    with VirtualCluster(2, rate="1gbit") as vc:                 # hosts h0, h1; torn down on exit, also on error
        res = vc.run_mpi(2, ["-m", "pytest", ...])            # 2 ranks per host: ranks 0,1 on h0, 2,3 on h1
        vc.set_link("h1", up=False)                           # pull h1's cable; vc.shape("h1", "4mbit") slows it

Each host is
- a network namespace `cke-<tag>-h<i>` whose `eth0` is one end of a veth pair, the other end on a bridge
  `ckb<tag>` in the root namespace; addresses 10.77.X.(i+1)/24 (X picked free), the bridge 10.77.X.254
  (mpiexec, in the root namespace, listens there for its proxies: `-iface`);
- a UTS namespace (hostname h<i>), an IPC namespace, and a mount namespace with its own tmpfs on /dev/shm and
  its own /etc/hosts naming every host, so `socket.gethostname()` resolves to the host's veth address and
  bootstrap binds there, and shm between two hosts cannot work by accident;
- held by one `sleep` process (its pid is the handle `nsenter -t PID -u -m -n -i` enters);
- optionally limited by `tc tbf` on both ends of its veth (rate and burst, each direction).

mpiexec (hydra) starts its proxies through a generated launcher shim (`-launcher ssh -launcher-exec SHIM`):
hydra calls `SHIM -x HOST "proxy command"` as it would call ssh, and the shim runs the command inside that
host with nsenter. MPI itself runs over MPICH's ofi netmod with the tcp provider (the mpich wheel's default
UCX netmod refuses peers in another network namespace: "different pid namespaces").

Teardown (`close`, run by the context manager, atexit, and at the next start for clusters whose owner died)
kills every process in the hosts' namespaces, deletes the namespaces, veths and bridge, and the temp files.
Needs root, `ip netns`, `unshare`, `nsenter` and `tc`; `unavailable()` says why not when it cannot work.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mpirun import REPO, THREAD_VARS, mpiexec

STATE_DIR = Path("/run/cke-vcluster")
# MPI between namespaces: MPICH's ofi netmod over plain TCP (see the module note)
MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}
_live: dict[str, "VirtualCluster"] = {}


def _sh(*cmd, check=True, timeout=30) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


_reason: list = []


def unavailable() -> str | None:
    """None when a virtual cluster can be built here, else why not (for pytest.skip)."""
    if _reason:
        return _reason[0]
    why = None
    if os.geteuid() != 0:
        why = "the virtual cluster needs root (network, UTS and mount namespaces)"
    else:
        from shutil import which
        missing = [t for t in ("ip", "unshare", "nsenter", "tc") if which(t) is None]
        if missing:
            why = f"the virtual cluster needs {', '.join(missing)} (iproute2, util-linux)"
        else:
            probe = f"cke-probe-{os.getpid()}"
            res = _sh("ip", "netns", "add", probe, check=False)
            if res.returncode != 0:
                why = f"`ip netns add` fails here: {res.stderr.strip()}"
            else:
                res = _sh("nsenter", f"--net=/run/netns/{probe}", "unshare", "--uts", "--mount", "--ipc",
                          "--propagation", "private", "sh", "-c",
                          "hostname probe && mount -t tmpfs probe /dev/shm", check=False)
                _sh("ip", "netns", "del", probe, check=False)
                if res.returncode != 0:
                    why = f"UTS/mount namespaces do not work here (unshare): {res.stderr.strip()}"
    _reason.append(why)
    return why


@dataclass
class Host:
    name: str          # h0, h1, ...: its hostname, and what mpiexec's -hosts names
    index: int
    addr: str          # eth0's address inside the host
    netns: str         # ip netns name
    veth: str          # the root-namespace end of its veth pair (on the bridge)
    holder: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.holder.pid


class VirtualCluster:
    def __init__(self, n_hosts: int, rate: str | None = None, burst: str | None = None, shm_size: str = "4g"):
        if not 1 <= n_hosts <= 200:
            raise ValueError(f"n_hosts={n_hosts}: use 1..200")
        self.n = n_hosts
        self.rate, self.burst, self.shm_size = rate, burst, shm_size
        self.tag = secrets.token_hex(3)
        self.bridge = f"ckb{self.tag}"
        self.hosts: list[Host] = []
        self.dir: Path | None = None
        self.shim: Path | None = None
        self.subnet: int | None = None
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    # -- life cycle --------------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        why = unavailable()
        if why:
            raise RuntimeError(why)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        sweep_stale()
        self.dir = Path(tempfile.mkdtemp(prefix=f"cke-vcluster-{self.tag}-"))
        _live[self.tag] = self
        try:
            with open(STATE_DIR / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)   # another run picking a subnet at the same time
                self.subnet = _free_subnet()
                self.hosts = [Host(f"h{i}", i, f"10.77.{self.subnet}.{i + 1}", f"cke-{self.tag}-h{i}",
                                   f"ckv{self.tag}h{i}") for i in range(self.n)]
                self._save_state()
                _sh("ip", "link", "add", self.bridge, "type", "bridge")
                _sh("ip", "addr", "add", f"10.77.{self.subnet}.254/24", "dev", self.bridge)
            _sh("ip", "link", "set", self.bridge, "up")
            hosts_file = self.dir / "hosts"
            hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts))
            for h in self.hosts:
                self._make_host(h, hosts_file)
            self._write_shim()
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        return self

    def _make_host(self, h: Host, hosts_file: Path):
        _sh("ip", "netns", "add", h.netns)
        _sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        _sh("ip", "link", "set", h.veth, "master", self.bridge, "up")
        _sh("ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
        _sh("ip", "-n", h.netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", h.netns, "link", "set", "lo", "up")
        if self.rate:
            self.shape(h.name, self.rate, self.burst)
        script = (f"hostname {h.name} && mount -t tmpfs -o size={self.shm_size},mode=1777 cke-shm /dev/shm && "
                  f"mount --bind {shlex.quote(str(hosts_file))} /etc/hosts && echo ready && exec sleep infinity")
        h.holder = subprocess.Popen(["nsenter", f"--net=/run/netns/{h.netns}", "unshare", "--uts", "--mount",
                                     "--ipc", "--propagation", "private", "sh", "-c", script],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        self._save_state()
        line = h.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"host {h.name} did not come up: {line}{h.holder.stderr.read()}")

    def _write_shim(self):
        """hydra's ssh launcher calls `SHIM [-x ...] HOST "command"`: run the command inside HOST."""
        cases = "".join(f"  {h.name}) pid={h.pid};;\n" for h in self.hosts)
        self.shim = self.dir / "launch-in-host"
        self.shim.write_text(
            "#!/bin/sh\n# made by tests/helpers/vcluster.py: hydra calls this in place of ssh\n"
            'while [ "${1#-}" != "$1" ]; do shift; done   # ssh options (-x)\n'
            'host=$1; shift\ncase $host in\n' + cases +
            '  *) echo "vcluster shim: no host $host" >&2; exit 255;;\nesac\n'
            'exec nsenter -t "$pid" -u -m -n -i -- sh -c "$*"\n')
        self.shim.chmod(0o755)

    def _save_state(self):
        state = {"owner": os.getpid(), "bridge": self.bridge, "subnet": self.subnet,
                 "hosts": [{"netns": h.netns, "veth": h.veth, "holder": h.holder.pid if h.holder else None}
                           for h in self.hosts], "dir": str(self.dir)}
        (STATE_DIR / f"{self.tag}.json").write_text(json.dumps(state))

    def close(self):
        """Kill every process in the hosts, delete namespaces, links, bridge and files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:   # mpiexec processes this cluster started (in the root namespace)
            if p.poll() is None:
                _killpg(p.pid)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        _teardown(self.bridge, [h.netns for h in self.hosts], [h.veth for h in self.hosts],
                  [h.holder.pid for h in self.hosts if h.holder])
        for h in self.hosts:
            if h.holder is not None:
                try:
                    h.holder.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                for f in (h.holder.stdout, h.holder.stderr):
                    f.close()
        if self.dir is not None:
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()
        (STATE_DIR / f"{self.tag}.json").unlink(missing_ok=True)
        _live.pop(self.tag, None)

    # -- inside the hosts -----------------------------------------------------------------------------
    def host(self, name) -> Host:
        for h in self.hosts:
            if h.name == name or h.index == name:
                return h
        raise KeyError(f"no host {name!r} in this cluster ({', '.join(h.name for h in self.hosts)})")

    def exec(self, host, cmd, **kw) -> subprocess.CompletedProcess:
        """Run `cmd` (a list) inside a host, from the repo root."""
        h = self.host(host)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(["nsenter", "-t", str(h.pid), "-u", "-m", "-n", "-i", f"--wd={REPO}", "--", *cmd],
                              **kw)

    def pids(self, host=None) -> list[int]:
        """Processes in the hosts' network namespaces (every host, or one), holders left out."""
        hosts = self.hosts if host is None else [self.host(host)]
        out = []
        for h in hosts:
            res = _sh("ip", "netns", "pids", h.netns, check=False)
            out += [int(p) for p in res.stdout.split() if int(p) != h.pid]
        return out

    def shm_files(self, host, prefix="cke-shm-") -> list[str]:
        """Names under the host's own /dev/shm that start with prefix."""
        return sorted(f for f in os.listdir(f"/proc/{self.host(host).pid}/root/dev/shm") if f.startswith(prefix))

    # -- links ----------------------------------------------------------------------------------------
    def set_link(self, host, up: bool):
        """Pull (or plug back) a host's cable: its veth end on the bridge goes down (up)."""
        _sh("ip", "link", "set", self.host(host).veth, "up" if up else "down")

    def shape(self, host, rate: str | None, burst: str | None = None, latency: str = "200ms"):
        """tc tbf `rate` on both directions of a host's link (None: no limit). The burst defaults to 10 ms at
        the rate, at least 256 KiB (veth hands tbf GSO packets of up to 64 KiB)."""
        h = self.host(host)
        for ns, dev in ((None, h.veth), (h.netns, "eth0")):
            pre = ["tc"] + (["-n", ns] if ns else [])
            if rate is None:
                _sh(*pre, "qdisc", "del", "dev", dev, "root", check=False)
                continue
            b = burst or f"{max(_bits(rate) // 8 // 100, 256 << 10)}b"
            _sh(*pre, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", b, "latency", latency)

    # -- MPI ----------------------------------------------------------------------------------------
    def mpiexec_cmd(self, per_host, args, mpi_flags=(), python=True) -> list[str]:
        """`mpiexec` over the hosts: per_host ranks on each (an int, or a list per host), ranks in host order."""
        counts = [per_host] * self.n if isinstance(per_host, int) else list(per_host)
        if len(counts) != self.n or any(c < 0 for c in counts) or not sum(counts):
            raise ValueError(f"per_host={per_host!r}: one count per host ({self.n}), at least one rank")
        hosts = ",".join(f"{h.name}:{c}" for h, c in zip(self.hosts, counts) if c)
        return [mpiexec(), "-launcher", "ssh", "-launcher-exec", str(self.shim), "-iface", self.bridge,
                "-hosts", hosts, *mpi_flags, "-n", str(sum(counts)),
                *([sys.executable] if python else []), *map(str, args)]

    def env(self, env=None) -> dict:
        full = dict(os.environ)
        full.update({v: "1" for v in THREAD_VARS})
        full.update(MPI_ENV)
        full.update(env or {})
        return full

    def popen(self, per_host, args, env=None, mpi_flags=(), python=True, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.mpiexec_cmd(per_host, args, mpi_flags, python), cwd=REPO, env=self.env(env),
                                text=True, start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def run_mpi(self, per_host, args, timeout: float = 120, env=None, mpi_flags=(), python=True):
        """As mpirun.run_mpi, over the hosts; stdout+stderr merged into .stdout."""
        proc = self.popen(per_host, args, env, mpi_flags, python)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            out, _ = proc.communicate()
            raise AssertionError(f"{shlex.join(proc.args)} still running after {timeout}s; killed. "
                                 f"Output:\n{out[-6000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def _bits(rate: str) -> int:
    """'1gbit' -> 1e9, '4mbit' -> 4e6, '800kbit' -> 8e5 (tc's decimal units)."""
    r = rate.lower().removesuffix("bit").removesuffix("bps")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(r[-1:], 1)
    return int(float(r.rstrip("kmg")) * mult)


def _killpg(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _free_subnet() -> int:
    used = _sh("ip", "-4", "-o", "addr", "show").stdout
    taken = set()
    for f in STATE_DIR.glob("*.json"):
        try:
            taken.add(json.loads(f.read_text()).get("subnet"))
        except (OSError, ValueError):
            pass
    for x in range(1, 251):
        if f"10.77.{x}." not in used and x not in taken:
            return x
    raise RuntimeError("no free 10.77.X.0/24 subnet for a virtual cluster")


def _teardown(bridge, netns_names, veths, holders):
    for _ in range(50):   # kill until nothing is left (a dying proxy may still fork once)
        left = []
        for ns in netns_names:
            res = _sh("ip", "netns", "pids", ns, check=False)
            left += [int(p) for p in res.stdout.split()]
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not left:
            break
        time.sleep(0.05)
    for p in holders:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for ns in netns_names:
        _sh("ip", "netns", "del", ns, check=False)
    for v in veths:
        _sh("ip", "link", "del", v, check=False)
    _sh("ip", "link", "del", bridge, check=False)


def sweep_stale() -> list[str]:
    """Tear down clusters whose owning process is gone (a test run killed before its teardown)."""
    done = []
    for f in STATE_DIR.glob("*.json"):
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _alive(st["owner"]):
            continue
        _teardown(st["bridge"], [h["netns"] for h in st["hosts"]], [h["veth"] for h in st["hosts"]],
                  [h["holder"] for h in st["hosts"] if h["holder"]])
        d = Path(st.get("dir") or "/nonexistent")
        if d.is_dir() and d.name.startswith("cke-vcluster-"):
            for x in d.iterdir():
                x.unlink()
            d.rmdir()
        f.unlink(missing_ok=True)
        done.append(f.stem)
    return done


def leftovers(tag: str) -> list[str]:
    """What of cluster `tag` still exists (namespaces, links, state file): [] after a clean teardown."""
    found = [n for n in _sh("ip", "netns", "list").stdout.split() if n.startswith(f"cke-{tag}-")]
    found += [ln.split(":")[1].strip().split("@")[0] for ln in _sh("ip", "-o", "link", "show").stdout.splitlines()
              if tag in ln]
    if (STATE_DIR / f"{tag}.json").exists():
        found.append(str(STATE_DIR / f"{tag}.json"))
    return found
