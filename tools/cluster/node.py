"""The test cluster's one real node: containerd + kubelet + kube-proxy on a host-only bridge.

Loaded by cluster.py from its folder.  The real node sits beside KWOK's fake
fleet in the same cluster and runs real containers (runc); it is tainted
``labfleet.io/real-node=true:NoSchedule`` so only pods that ask for it land
there (``pod_placement()`` gives the toleration and node selector).

What it makes, and what tear-down removes again (``stop`` then ``leftovers``):

- processes: a lock holder, containerd (private config, socket, root and
  state under ``<state>/real-node``), kubelet, kube-proxy, the containerd
  shims and the containers they run;
- mounts under ``<state>/real-node`` (overlay rootfs, kubelet volumes, pod
  network namespaces: containerd mounts those under its own state dir);
- the bridge ``lfrn0`` (10.244.0.1/24) with a route for the service range,
  the pods' veths, forwarding switched on for that bridge alone
  (``net.ipv4.conf.lfrn0.forwarding=1``; the global ``ip_forward`` is left
  as it was);
- iptables: ``FORWARD -i lfrn0 ! -o lfrn0 -j DROP`` in the mangle and filter
  tables (nothing from a pod leaves the machine) and the ``KUBE-*`` chains
  kubelet and kube-proxy make (IPv4 and IPv6);
- the cgroup ``/labfleet-real-node`` in every v1 hierarchy (kubelet's
  ``cgroupRoot``);
- kernel tunables kubelet sets (``kernel.panic``, ``vm.overcommit_memory``, ...):
  recorded before the start and put back.

kube-proxy's chains are global, so one real node per machine: a lock
(``/run/labfleet-real-node.lock``) is held by a small process for the node's
life; a new owner first cleans up after a previous owner that died without
its tear-down.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

Progress = Callable[[str], None]


def _load_parts():
    name = "labfleet_cluster_node_parts"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("node_parts.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


parts = _load_parts()
# re-exported: cluster.py and the tests use them through this module
NODE_NAME, BRIDGE, POD_CIDR, NODE_IP = parts.NODE_NAME, parts.BRIDGE, parts.POD_CIDR, parts.NODE_IP
SERVICE_CIDR, CNI_NETWORK, NODE_LABEL, TAINT = (
    parts.SERVICE_CIDR,
    parts.CNI_NETWORK,
    parts.NODE_LABEL,
    parts.TAINT,
)
PAUSE_IMAGE, CGROUP_ROOT, SYSCTLS = parts.PAUSE_IMAGE, parts.CGROUP_ROOT, parts.SYSCTLS
FORWARD_RULE, FORWARD_TABLES, CNI_BIN = parts.FORWARD_RULE, parts.FORWARD_TABLES, parts.CNI_BIN
LOCK_FILE, OWNER_FILE, ENV_VAR = parts.LOCK_FILE, parts.OWNER_FILE, parts.ENV_VAR
NodeError = parts.NodeError
pod_placement = parts.pod_placement
pause_archive = parts.pause_archive

# --------------------------------------------------------------------------
# small helpers


def _run(*cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def node_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "real-node"


def _sysctl_read(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _sysctl_write(name: str, value: str) -> None:
    Path("/proc/sys", name).write_text(value + "\n")


def _cgroup_roots() -> list[Path]:
    """The cgroup v1 hierarchies (plus the v2 root on a unified host)."""
    roots = []
    for line in Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if f[2] in ("cgroup", "cgroup2"):
            roots.append(Path(f[1]))
    return roots


def _mounts_under(prefix: Path) -> list[str]:
    out = []
    p = str(prefix).rstrip("/") + "/"
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target.startswith(p) or target == p.rstrip("/"):
            out.append(target)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def _shims(sock: Path) -> list[int]:
    """containerd shims of *this* node's containerd (they name its socket)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            args = _cmdline(int(entry))
            if args and "containerd-shim" in args[0] and str(sock) in args:
                out.append(int(entry))
    return out


def _descendants(pids: list[int]) -> list[int]:
    kids = _children_map()
    out: list[int] = []
    todo = list(pids)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _iptables_tools() -> list[str]:
    return [t for t in ("iptables", "ip6tables") if shutil.which(t)]


def _kube_chains(tool: str) -> dict[str, list[str]]:
    """KUBE-* chains per table, and the rules elsewhere that jump to them."""
    found: dict[str, list[str]] = {}
    for table in ("filter", "nat", "mangle", "raw"):
        r = _run(tool, "-w", "-t", table, "-S", check=False)
        if r.returncode != 0:
            continue
        hits = [ln for ln in r.stdout.splitlines() if "KUBE-" in ln]
        if hits:
            found[table] = hits
    return found


def _forward_rule_present(table: str) -> bool:
    cmd = ("iptables", "-w", "-t", table, "-C", "FORWARD", *FORWARD_RULE)
    return _run(*cmd, check=False).returncode == 0


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _bridge_ports() -> list[str]:
    d = Path("/sys/class/net", BRIDGE, "brif")
    return sorted(os.listdir(d)) if d.is_dir() else []


# --------------------------------------------------------------------------
# can it run here?


def requested_mode() -> str:
    """``auto`` (default: where root and the kernel allow), ``1`` (must) or ``0`` (never)."""
    v = os.environ.get(ENV_VAR, "auto").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return "1"
    if v in ("0", "false", "no", "off"):
        return "0"
    return "auto"


def unavailable_reason(binaries: dict[str, Path] | None) -> str | None:
    """Why a real node cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "not root (containerd, the bridge and iptables need root)"
    for tool in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables"):
        if shutil.which(tool) is None:
            return f"'{tool}' not on PATH (bash tools/bootstrap.sh installs containerd, runc)"
    for plugin in ("bridge", "host-local"):
        if not (CNI_BIN / plugin).is_file():
            return f"CNI plugin {CNI_BIN / plugin} missing (Debian containernetworking-plugins)"
    if binaries is None or not all(p.is_file() for p in binaries.values()):
        return "kubelet/kube-proxy/pause not built (bash tools/cluster/build.sh)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay filesystem"
    if not _cgroup_roots():
        return "no cgroup filesystem mounted"
    if not Path("/proc/sys/net/ipv4/conf").is_dir():
        return "no IPv4 network sysctls (/proc/sys/net/ipv4/conf)"
    ours = {ipaddress.ip_network(POD_CIDR), ipaddress.ip_network(SERVICE_CIDR)}
    r = _run("ip", "-4", "-o", "route", "show", "table", "all", check=False)
    for line in r.stdout.splitlines():
        dst, dev = line.split()[0], (line.split(" dev ") + [""])[1].split(" ")[0]
        if dev == BRIDGE or dst in ("default", "broadcast", "local", "unreachable"):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if any(net.overlaps(o) for o in ours):
            return f"{dst} (dev {dev}) overlaps the real node's ranges {POD_CIDR}/{SERVICE_CIDR}"
    return None


# --------------------------------------------------------------------------
# the lock


@dataclasses.dataclass
class Plan:
    """A real node about to start: the lock is held (``lock_fd``) by this process."""

    state_dir: Path
    binaries: dict[str, Path]
    lock_fd: int


def acquire(state_dir: Path, binaries: dict[str, Path], wait: float, progress: Progress) -> Plan:
    """Take the machine-wide lock (waiting up to ``wait`` s); clean up after a dead owner."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                owner = OWNER_FILE.read_text().strip() if OWNER_FILE.exists() else "?"
                raise NodeError(
                    f"another real-node cluster runs on this machine (state {owner}; "
                    f"lock {LOCK_FILE}): one at a time, kube-proxy's chains are global"
                ) from None
            time.sleep(1)
    previous = OWNER_FILE.read_text().strip() if OWNER_FILE.exists() else ""
    if previous:
        progress(f"real node: cleaning up after a previous owner that did not stop ({previous})")
        try:
            sweep(Path(previous), progress)
        except NodeError as e:
            os.close(fd)
            raise NodeError(f"leftovers of a previous real node ({previous}): {e}") from None
    OWNER_FILE.write_text(f"{Path(state_dir).resolve()}\n")
    return Plan(Path(state_dir).resolve(), binaries, fd)


def release(plan: Plan) -> None:
    try:
        os.close(plan.lock_fd)
    except OSError:
        pass


def ctr(state_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ctr`` against this node's containerd, namespace k8s.io."""
    sock = node_dir(state_dir) / "containerd.sock"
    return _run("ctr", "--address", str(sock), "--namespace", "k8s.io", *args, timeout=timeout)


def import_image(state_dir: Path, archive: Path, name: str | None = None) -> None:
    """Import an image archive (OCI or docker, e.g. ``podman save``) into the node."""
    extra = ["--index-name", name] if name else []
    ctr(state_dir, "images", "import", *extra, "--no-unpack=false", str(archive))


# --------------------------------------------------------------------------
# start


def start(plan: Plan, cluster, procs, free_port, wait, progress: Progress) -> dict:
    """Start containerd, kubelet and kube-proxy; return the node's facts (for cluster.json)."""
    t0 = time.monotonic()
    state_dir = plan.state_dir
    rn = node_dir(state_dir)
    for sub in ("containerd", "runc", "cni/net.d", "cni/ipam", "kubelet", "pod-logs", "pki"):
        (rn / sub).mkdir(parents=True, exist_ok=True)
    before = {k: _sysctl_read(k) for k in SYSCTLS}
    (rn / "sysctl-before.json").write_text(json.dumps(before, indent=1))

    # the lock outlives this process: a small holder inherits the locked descriptor
    procs.start(
        "real-node-lock",
        [shutil.which("sleep") or "/bin/sleep", "infinity"],
        pass_fds=(plan.lock_fd,),
    )
    release(plan)

    progress(f"real node: bridge {BRIDGE} {NODE_IP}/24, services {SERVICE_CIDR}")
    _setup_network()
    for root in _cgroup_roots():
        d = root / CGROUP_ROOT.lstrip("/")
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset child starts empty
            if (root / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((root / f).read_text())

    sock = rn / "containerd.sock"
    (rn / "containerd.toml").write_text(parts.containerd_config(rn))
    (rn / "cni" / "net.d" / "10-labfleet.conflist").write_text(
        json.dumps(parts.cni_config(rn), indent=1)
    )
    progress("real node: starting containerd")
    procs.start("containerd", ["containerd", "--config", str(rn / "containerd.toml")])
    wait(
        "containerd socket",
        lambda: sock.exists() and ctr(state_dir, "version", timeout=5).returncode == 0,
        30,
        procs,
        "containerd",
    )
    archive = rn / "pause.oci.tar"
    pause_archive(plan.binaries["pause"], archive)
    import_image(state_dir, archive)

    ports = {"kubelet-healthz": free_port(), "proxy-healthz": free_port(), "proxy-metrics": 0}
    ports["proxy-metrics"] = free_port()
    (rn / "kubelet.yaml").write_text(
        json.dumps(parts.kubelet_config(rn, cluster.ca_file, ports["kubelet-healthz"]), indent=1)
    )
    (rn / "kube-proxy.yaml").write_text(
        json.dumps(
            parts.kube_proxy_config(
                cluster.kubeconfig, ports["proxy-healthz"], ports["proxy-metrics"]
            ),
            indent=1,
        )
    )
    progress("real node: starting kubelet and kube-proxy")
    procs.start(
        "kubelet",
        [
            str(plan.binaries["kubelet"]),
            "--config",
            str(rn / "kubelet.yaml"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--root-dir",
            str(rn / "kubelet"),
            "--cert-dir",
            str(rn / "pki"),
            "--hostname-override",
            NODE_NAME,
            "--node-ip",
            NODE_IP,
            "--node-labels",
            f"{NODE_LABEL[0]}={NODE_LABEL[1]},labfleet.io/node-class=real",
            "--v=1",
        ],
    )
    procs.start(
        "kube-proxy",
        [str(plan.binaries["kube-proxy"]), "--config", str(rn / "kube-proxy.yaml"), "--v=1"],
    )
    t_kubelet = time.monotonic()

    def ready() -> bool:
        r = cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if r.returncode != 0:
            return False
        conds = json.loads(r.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    wait(f"node {NODE_NAME} Ready", ready, 90, procs, "kubelet", interval=0.5)
    ready_s = time.monotonic() - t_kubelet
    wait(
        "kube-proxy synced",
        lambda: (
            _run(
                "curl", "-sf", f"http://127.0.0.1:{ports['proxy-healthz']}/healthz", check=False
            ).returncode
            == 0
        ),
        60,
        procs,
        "kube-proxy",
    )
    info = {
        "name": NODE_NAME,
        "node_ip": NODE_IP,
        "pod_cidr": POD_CIDR,
        "service_cidr": SERVICE_CIDR,
        "bridge": BRIDGE,
        "containerd_socket": str(sock),
        "pause_image": PAUSE_IMAGE,
        "ports": ports,
        "ready_after_kubelet_s": round(ready_s, 1),
        "start_s": round(time.monotonic() - t0, 1),
    }
    (rn / "node.json").write_text(json.dumps(info, indent=1))
    progress(f"real node {NODE_NAME} Ready ({info['start_s']}s; {ready_s:.1f}s after kubelet)")
    return info


def _setup_network() -> None:
    if _link_exists(BRIDGE):
        raise NodeError(f"bridge {BRIDGE} already exists (another real node, or leftovers)")
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # service addresses go to the bridge, never to the default route
    _run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)
    # forwarding for this bridge alone; the global ip_forward stays as it is (0)
    _sysctl_write(f"net/ipv4/conf/{BRIDGE}/forwarding", "1")
    for table in FORWARD_TABLES:
        _run("iptables", "-w", "-t", table, "-I", "FORWARD", "1", *FORWARD_RULE)


# --------------------------------------------------------------------------
# stop


def present(state_dir: Path) -> bool:
    return (node_dir(state_dir) / "sysctl-before.json").exists()


def drain(state_dir: Path, kubectl: Callable[..., subprocess.CompletedProcess], progress) -> None:
    """Delete the pods on the node through the API while kubelet still runs (best effort)."""
    sel = f"spec.nodeName={NODE_NAME}"
    kubectl("cordon", NODE_NAME, check=False, timeout=15)
    kubectl(
        "delete", "pods", "-A", "--field-selector", sel, "--wait=false",
        "--grace-period=1", check=False, timeout=20,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = kubectl("get", "pods", "-A", "--field-selector", sel, "-o", "name", check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return
        time.sleep(0.5)
    progress("real node: pods still on the node after 20 s; removing them through containerd")


def _stop_tasks(state_dir: Path) -> None:
    """Kill and delete every container task through containerd (unmounts their rootfs)."""
    r = ctr(state_dir, "tasks", "ls", "-q", timeout=20)
    ids = r.stdout.split()
    for cid in ids:
        ctr(state_dir, "tasks", "kill", "-s", "SIGKILL", "--all", cid, timeout=20)
    deadline = time.monotonic() + 15
    for cid in ids:
        while time.monotonic() < deadline:
            try:
                ctr(state_dir, "tasks", "delete", cid, timeout=20)
                break
            except NodeError as e:
                if "not found" in str(e):
                    break
                time.sleep(0.3)


def stop(state_dir: Path, kubectl, stop_groups, progress: Progress) -> None:
    """Drain, stop the node's processes, sweep everything it made; raise on leftovers."""
    state_dir = Path(state_dir)
    t0 = time.monotonic()
    if kubectl is not None:
        drain(state_dir, kubectl, progress)
    stop_groups(["kube-proxy", "kubelet"])
    if (node_dir(state_dir) / "containerd.sock").exists():
        try:
            _stop_tasks(state_dir)
        except (NodeError, subprocess.TimeoutExpired) as e:
            progress(f"real node: containerd task clean-up: {e}")
    stop_groups(["containerd"])
    # the bridge, the chains, the cgroup root and the sysctls are the machine's: leave
    # them to a newer owner if this node lost the lock (its holder killed by hand)
    owner = OWNER_FILE.read_text().strip() if OWNER_FILE.exists() else ""
    mine = owner in ("", str(state_dir.resolve()))
    if not mine:
        progress(f"real node: {owner} owns the machine now; removing only this node's own")
    try:
        sweep(state_dir, progress, machine_wide=mine)
    finally:
        stop_groups(["real-node-lock"])
        if owner and mine:
            OWNER_FILE.unlink(missing_ok=True)
    left = leftovers(state_dir, machine_wide=mine)
    if left:
        raise NodeError(f"real node left behind: {left}")
    progress(f"real node stopped and cleaned up ({time.monotonic() - t0:.1f}s)")


def sweep(state_dir: Path, progress: Progress, machine_wide: bool = True) -> None:
    """Remove whatever a real node with this state dir made (idempotent).

    ``machine_wide=False``: only its processes and mounts, not the bridge, the
    KUBE-* chains, the cgroup root or the sysctls (only the lock's owner may)."""
    rn = node_dir(state_dir)
    sock = rn / "containerd.sock"
    # this node's daemons if still there (an owner killed without its tear-down:
    # their command lines name its state dir), its shims and their containers
    mark = str(rn) + "/"
    own = [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and int(e) != os.getpid() and any(mark in a for a in _cmdline(int(e)))
    ]
    victims = _descendants(_shims(sock) + own)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while victims and time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and _alive(p) for p in victims):
            break
        time.sleep(0.1)
    # mounts, deepest first (overlay rootfs, kubelet volumes, netns bind mounts)
    for target in sorted(_mounts_under(rn), key=len, reverse=True):
        if _run("umount", target, check=False).returncode != 0:
            _run("umount", "-l", target, check=False)
    for link in _log_links(rn):
        link.unlink(missing_ok=True)
    if machine_wide:
        _sweep_machine(rn, progress)


def _log_links(rn: Path) -> list[Path]:
    d = Path("/var/log/containers")
    if not d.is_dir():
        return []
    return [p for p in d.iterdir() if p.is_symlink() and os.readlink(p).startswith(f"{rn}/")]


def _host_files() -> list[Path]:
    """Files kubelet and containerd's CNI make at fixed paths (not under their roots)."""
    files = list(Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*"))
    sock = Path("/var/lib/kubelet/device-plugins/kubelet.sock")
    return files + ([sock] if sock.exists() or sock.is_symlink() else [])


def _sweep_machine(rn: Path, progress: Progress) -> None:
    # pod veths, the bridge (its address, route and forwarding sysctl go with it)
    for port in _bridge_ports():
        _run("ip", "link", "del", port, check=False)
    if _link_exists(BRIDGE):
        _run("ip", "link", "del", BRIDGE, check=False)
    # iptables: the bridge's drop rule and every KUBE-* chain
    for table in FORWARD_TABLES:
        while _forward_rule_present(table):
            _run("iptables", "-w", "-t", table, "-D", "FORWARD", *FORWARD_RULE, check=False)
    for tool in _iptables_tools():
        _flush_kube_chains(tool)
    # kubelet's cgroup root, deepest first
    for root in _cgroup_roots():
        top = root / CGROUP_ROOT.lstrip("/")
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(d)
            _rmdir(top)
    # files at fixed host paths: CNI results cached by containerd's CNI library
    # (named after the network) and kubelet's device-plugin socket
    for f in _host_files():
        f.unlink(missing_ok=True)
    # kernel tunables kubelet changed
    before_file = rn / "sysctl-before.json"
    if before_file.exists():
        for name, value in json.loads(before_file.read_text()).items():
            if value is not None and _sysctl_read(name) not in (None, value):
                progress(f"real node: restoring {name} = {value} (was {_sysctl_read(name)})")
                try:
                    _sysctl_write(name, value)
                except OSError as e:
                    progress(f"real node: cannot restore {name}: {e}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _rmdir(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _flush_kube_chains(tool: str) -> None:
    for table, lines in _kube_chains(tool).items():
        # rules in built-in (or any) chains that jump to KUBE-* chains first
        for ln in lines:
            if ln.startswith("-A ") and not ln.split()[1].startswith("KUBE-"):
                args = ln.split()
                args[0] = "-D"
                _run(tool, "-w", "-t", table, *_unquote(args), check=False)
        chains = [ln.split()[1] for ln in lines if ln.startswith("-N KUBE-")]
        for c in chains:
            _run(tool, "-w", "-t", table, "-F", c, check=False)
        for c in chains:
            _run(tool, "-w", "-t", table, "-X", c, check=False)


def _unquote(args: list[str]) -> list[str]:
    """iptables -S quotes comments; rejoin them into one argument."""
    out: list[str] = []
    buf: list[str] | None = None
    for a in args:
        if buf is not None:
            buf.append(a)
            if a.endswith('"'):
                out.append(" ".join(buf)[1:-1])
                buf = None
        elif a.startswith('"') and not (a.endswith('"') and len(a) > 1):
            buf = [a]
        else:
            out.append(a[1:-1] if len(a) > 1 and a[0] == a[-1] == '"' else a)
    return out


def leftovers(state_dir: Path, machine_wide: bool = True) -> dict[str, object]:
    """What of a real node is still on the machine (empty when clean); with
    ``machine_wide=False`` only its processes, mounts and netns."""
    rn = node_dir(Path(state_dir))
    left: dict[str, object] = {}
    procs = _descendants(_shims(rn / "containerd.sock"))
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            args = _cmdline(int(entry))
            if any(str(rn) in a for a in args):
                procs.append(int(entry))
    if procs:
        left["processes"] = sorted(set(procs))
    if m := _mounts_under(rn):
        left["mounts"] = m
    # kubelet links every container's log into /var/log/containers, whatever its root dir
    if links := _log_links(rn):
        left["log_links"] = [str(p) for p in links]
    netns = [
        ln.split()[1]
        for ln in Path("/proc/mounts").read_text().splitlines()
        if ln.split()[2] == "nsfs" and ln.split()[1].startswith(str(rn))
    ]
    if netns:
        left["netns"] = netns
    if not machine_wide:
        return left
    if files := _host_files():
        left["host_files"] = [str(f) for f in files]
    if _link_exists(BRIDGE):
        left["bridge"] = BRIDGE
    veths = [
        n
        for n in os.listdir("/sys/class/net")
        if (Path("/sys/class/net", n, "master").exists())
        and os.path.basename(os.readlink(Path("/sys/class/net", n, "master"))) == BRIDGE
    ]
    if veths:
        left["veths"] = veths
    chains = {t: _kube_chains(t) for t in _iptables_tools()}
    chains = {t: c for t, c in chains.items() if c}
    if chains:
        left["iptables"] = chains
    rules = [t for t in FORWARD_TABLES if _forward_rule_present(t)]
    if rules:
        left["forward_rule"] = {t: " ".join(FORWARD_RULE) for t in rules}
    cg = [str(r / CGROUP_ROOT.lstrip("/")) for r in _cgroup_roots()]
    cg = [c for c in cg if Path(c).exists()]
    if cg:
        left["cgroups"] = cg
    before_file = rn / "sysctl-before.json"
    if before_file.exists():
        changed = {
            k: (v, _sysctl_read(k))
            for k, v in json.loads(before_file.read_text()).items()
            if v is not None and _sysctl_read(k) not in (None, v)
        }
        if changed:
            left["sysctls"] = changed
    return left


def kube_chain_names() -> list[str]:
    """Every KUBE-* chain on the machine (both iptables families)."""
    out = []
    for tool in _iptables_tools():
        for table, lines in _kube_chains(tool).items():
            out += [f"{tool}/{table}/{ln.split()[1]}" for ln in lines if ln.startswith("-N ")]
    return out


if __name__ == "__main__":  # pragma: no cover - manual clean-up
    if len(sys.argv) == 3 and sys.argv[1] == "sweep":
        # only under the machine-wide lock: the sweep removes every KUBE-* chain
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"a real node is running ({OWNER_FILE.read_text().strip()}): not sweeping")
        sweep(Path(sys.argv[2]), print)
        print(json.dumps(leftovers(Path(sys.argv[2])), indent=1))
    else:
        print(f"usage: {sys.argv[0]} sweep STATE_DIR", file=sys.stderr)
        sys.exit(2)
