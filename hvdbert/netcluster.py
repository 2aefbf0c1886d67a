"""Several hosts on one machine: Linux network namespaces with sshd, and links of a set rate.

Each host is a network namespace with its own hostname (a UTS namespace: Horovod's Gloo process
sets are built from the host name) and two interfaces with the same names on every host, as a
cluster has them: eth0 on a management network that the host names resolve to (SSH), and eth1 on
the training network. Both networks are bridges in a switch namespace of their own, so removing
the namespaces removes every link. Host names resolve through /etc/netns/NS/hosts, and SSH clients
in a host find the cluster's key and settings in /etc/netns/NS/ssh/ssh_config: `ip netns exec`
bind-mounts both over /etc, so nothing outside the namespaces changes. Traffic goes only to
loopback and to these hosts' addresses.

`Cluster.shape(rate)` sets every link's rate with tc's token bucket filter (tbf) on both of its
ends: the host's interface (what the host sends) and the switch's port (what it receives). The
kernels this runs on may lack netem, so a link has a rate but no added delay. tests/test_multihost.py
and the shaped-cluster benchmark (`python -m hvdbert.bench --hosts`) use it; it needs root.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hvdbert.scaling import rate_bits_per_s

SSHD = Path("/usr/sbin/sshd")
NETWORKS = {"eth0": "10.77.1", "eth1": "10.77.2"}  # management (SSH, host names), training


def unavailable() -> str | None:
    """Why namespaced hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "several hosts need root (network namespaces, sshd)"
    for tool in ("ip", "tc", "unshare", "ssh", "ssh-keygen", "mpirun"):
        if shutil.which(tool) is None:
            return f"several hosts need {tool} (make test installs openssh-server and iproute2)"
    if not SSHD.is_file():
        return f"several hosts need {SSHD} (Debian's openssh-server; make test installs it)"
    probe = f"hvdbert-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(*command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


class Cluster:
    """`names` hosts (host-a, host-b, ...), each with sshd; `close()` removes everything it made."""

    def __init__(self, workdir: Path, names: list[str]):
        self.workdir = workdir
        self.names = names
        self.tag = f"hb{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.namespaces: list[str] = []
        self.sshd: dict[str, subprocess.Popen] = {}
        self.made_etc_netns = not Path("/etc/netns").exists()
        self.address = {name: {dev: f"{net}.{k + 1}" for dev, net in NETWORKS.items()}
                        for k, name in enumerate(names)}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def _build(self) -> None:
        key = self.workdir / "id_ed25519"
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.workdir / "host_key"))
        shutil.copy(f"{key}.pub", self.workdir / "authorized_keys")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory

        run("ip", "netns", "add", self.switch)
        self.namespaces.append(self.switch)
        for dev in NETWORKS:
            run("ip", "-n", self.switch, "link", "add", f"br-{dev}", "type", "bridge")
            run("ip", "-n", self.switch, "link", "set", f"br-{dev}", "up")
        for name in self.names:
            ns = self.ns(name)
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            self.write_etc(name)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            for dev in NETWORKS:
                port = f"{name[-1]}-{dev}"  # the switch's end, e.g. a-eth1
                run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port,
                    "netns", self.switch)
                run("ip", "-n", self.switch, "link", "set", port, "master", f"br-{dev}")
                run("ip", "-n", self.switch, "link", "set", port, "up")
                run("ip", "-n", ns, "addr", "add", f"{self.address[name][dev]}/24", "dev", dev)
                run("ip", "-n", ns, "link", "set", dev, "up")
            self._start_sshd(name)
        for name in self.names:
            self._wait_for_ssh(name)

    def write_etc(self, name: str) -> None:
        """Host `name`'s hosts file and SSH client settings under /etc/netns (again, if something
        removed them: `ip netns exec` reads them at every call)."""
        etc = Path("/etc/netns") / self.ns(name)
        (etc / "ssh").mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"{self.address[host]['eth0']} {host}\n" for host in self.names))
        (etc / "ssh" / "ssh_config").write_text(
            f"Host *\n  IdentityFile {self.workdir / 'id_ed25519'}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n  ConnectTimeout 10\n")

    def _start_sshd(self, name: str) -> None:
        config = self.workdir / f"sshd-{name}.conf"
        config.write_text(
            f"ListenAddress {self.address[name]['eth0']}\nHostKey {self.workdir / 'host_key'}\n"
            f"PidFile {self.workdir / f'sshd-{name}.pid'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPrintMotd no\nMaxStartups 100\nMaxSessions 100\n")
        log = open(self.workdir / f"sshd-{name}.log", "w")
        self.sshd[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(name), "unshare", "--uts", "sh", "-c",
             f"hostname {name} && exec {SSHD} -D -e -f {config}"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def ensure_sshd(self) -> list[str]:
        """Start again the sshd of every host whose sshd has ended; returns those hosts' names."""
        restarted = [name for name, process in self.sshd.items() if process.poll() is not None]
        for name in restarted:
            self._start_sshd(name)
        for name in restarted:
            self._wait_for_ssh(name)
        return restarted

    def _wait_for_ssh(self, name: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            result = self.ssh(name, "hostname", check=False, timeout=15)
            if result.returncode == 0 and result.stdout.strip() == name:
                return
            if time.monotonic() > deadline:
                log = (self.workdir / f"sshd-{name}.log").read_text()
                raise RuntimeError(f"sshd on {name} did not answer: {result.stderr.strip()} {log[-500:]}")
            time.sleep(0.3)

    def ssh_command(self, name: str, command: str) -> list[str]:
        """The command line that runs `command` (a shell string) on host `name`, as a user would:
        an SSH session into it, from inside it."""
        return ["ip", "netns", "exec", self.ns(name), "ssh", name, command]

    def ssh(self, name: str, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(self.ssh_command(name, command), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"on {name}: {command}: exit {result.returncode}: {result.stderr[-2000:]}")
        return result

    def shape(self, rate: str | None, devices: tuple[str, ...] = tuple(NETWORKS)) -> None:
        """Every link of `devices` at `rate` (tc's notation: 100mbit, 1gbit), both ends; None removes
        the shaping. The bucket holds 4 ms at the rate, and at least 256 KiB: veth hands over segments
        of up to 64 KiB at once (GSO), and a bucket of a few of them lets TCP reach the rate (with 64
        KiB, 100 Mbit/s carried 40% of it). At most 100 ms of queue waits before a drop."""
        for name in self.names:
            for dev in devices:
                for ns, port in ((self.ns(name), dev), (self.switch, f"{name[-1]}-{dev}")):
                    run("tc", "-n", ns, "qdisc", "del", "dev", port, "root", check=False)
                    if rate is not None:
                        burst = max(256 * 1024, int(rate_bits_per_s(rate) / 8 * 0.004))
                        run("tc", "-n", ns, "qdisc", "add", "dev", port, "root", "tbf", "rate", rate,
                            "burst", str(burst), "latency", "100ms")

    def link(self, name: str, dev: str, up: bool) -> None:
        run("ip", "-n", self.ns(name), "link", "set", dev, "up" if up else "down")

    def bytes_sent(self, name: str, dev: str) -> int:
        result = run("ip", "netns", "exec", self.ns(name), "cat", f"/sys/class/net/{dev}/statistics/tx_bytes")
        return int(result.stdout)

    def pids(self, name: str) -> list[int]:
        result = run("ip", "netns", "pids", self.ns(name), check=False)
        return [int(p) for p in result.stdout.split()]

    def kill_processes(self, name: str, keep_sshd: bool = True) -> None:
        """End what runs on host `name` (left over from a failed test), sshd too unless kept."""
        sshd = self.sshd.get(name)
        for pid in self.pids(name):
            if keep_sshd and sshd is not None and pid == sshd.pid:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for name in self.names:
            if self.ns(name) in self.namespaces:
                self.kill_processes(name, keep_sshd=False)
        for process in self.sshd.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self.namespaces = []
        # /run/sshd stays, even when this cluster made it: every sshd on the machine needs it to accept
        # a connection (without it they reset each one at the key exchange), another cluster's too.
        if self.made_etc_netns:  # only when empty: another cluster may have its hosts' files there
            try:
                os.rmdir("/etc/netns")
            except OSError:
                pass


def quote(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)
