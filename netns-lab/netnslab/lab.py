"""Build, drive and tear down a lab: one network namespace per node, veths between them.

Build order: namespaces and their sysctls, veth pairs, addresses, then *poll* until every
link is up and every address has left DAD; then routes; then services, each polled until
it answers. The state file is saved after every step, and any failure (or Ctrl-C) tears
down what was built before the exception propagates.

Teardown works from the state alone: stop the tracked processes (TERM, then KILL), kill
anything else still running inside the lab's namespaces, remove the namespaces (their
veths go with them), remove the state directory.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netnslab import netlink, procs, services
from netnslab.state import STATE_ROOT, LabState, iter_states, namespace_name, new_run_id
from netnslab.timing import Clock, poll_until
from netnslab.topology import Node, Service, Topology, load_topology, parse_topology

SERVICE_ORDER = {"dnsmasq": 0, "testserver": 1, "socks64": 2}
SERVICE_READY_TIMEOUT = 20.0


#: ``ip netns exec NS`` bind-mounts files of /etc/netns/NS over /etc (resolv.conf here)
NETNS_ETC = Path("/etc/netns")


def write_resolv_conf(namespace: str, nameservers: list[str]) -> None:
    """The resolv.conf programs in ``namespace`` see (through ``ip netns exec``)."""
    directory = NETNS_ETC / namespace
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"nameserver {server}" for server in nameservers]
    (directory / "resolv.conf").write_text("\n".join([*lines, "options timeout:2 attempts:1", ""]))


class LabError(RuntimeError):
    """The lab could not be built or driven as asked."""


@dataclass
class TeardownReport:
    """What a teardown did, and whatever it could not remove (should be empty)."""

    run_id: str
    stopped: int = 0
    stragglers_killed: int = 0
    namespaces_removed: int = 0
    leftovers: list[str] = field(default_factory=list)


def node_sysctls(node: Node) -> dict[str, str | int]:
    """The sysctls that make a node what the topology says it is."""
    values: dict[str, str | int] = {
        "net.ipv4.ip_forward": int(node.forwarding),
    }
    if node.ipv6:
        values.update(
            {
                "net.ipv6.conf.all.forwarding": int(node.forwarding),
                "net.ipv6.conf.default.forwarding": int(node.forwarding),
                # The lab has no routers advertising anything; never autoconfigure.
                "net.ipv6.conf.all.accept_ra": 0,
                "net.ipv6.conf.default.accept_ra": 0,
                # Addresses survive a link flap, like a real host with static config.
                "net.ipv6.conf.all.keep_addr_on_down": 1,
                "net.ipv6.conf.default.keep_addr_on_down": 1,
            }
        )
    else:
        values.update(
            {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}
        )
    return values


def _tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Lab:
    """A built (or being built) lab. Create with `Lab.up` or find a running one with `attach`."""

    def __init__(self, topology: Topology, state: LabState, clock: Clock | None = None) -> None:
        self.topology = topology
        self.state = state
        self._clock = clock
        self._atexit: Callable[[], object] | None = None

    # --- construction ------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        topology: Topology | str | Path | None = None,
        *,
        start_services: bool = True,
        tolerate_service_failures: bool = False,
        root: Path | None = None,
        teardown_at_exit: bool = False,
        clock: Clock | None = None,
    ) -> Lab:
        """Build a lab from a topology (object, name or path) and return it running.

        On any failure, including KeyboardInterrupt, everything built so far is removed
        before the exception propagates. With ``tolerate_service_failures`` a service that
        does not start is recorded in ``service_failures`` instead (used by the test suite,
        so that checks not needing that service still run). ``teardown_at_exit`` registers
        an atexit hook so the lab never outlives the process.
        """
        if not isinstance(topology, Topology):
            topology = load_topology(topology)
        run_id = new_run_id()
        base = root or STATE_ROOT
        state = LabState(
            run_id=run_id,
            directory=base / run_id,
            topology_name=topology.name,
            topology_source=str(topology.source) if topology.source else None,
            topology_document=topology.document,
            namespaces={n: namespace_name(run_id, n) for n in topology.nodes},
            ephemeral=teardown_at_exit,
        )
        lab = cls(topology, state, clock=clock)
        if teardown_at_exit:
            lab._register_atexit()
        try:
            state.save()
            lab._build_network()
            if start_services:
                lab._start_services(tolerate_service_failures)
            state.phase = "up"
            state.save()
        except BaseException:
            if os.getpid() == state.owner_pid:  # never from a forked pyroute2 helper
                lab.teardown()
            raise
        return lab

    @classmethod
    def attach(cls, run_id: str | None = None, root: Path | None = None) -> Lab:
        """The running lab ``run_id``, or the newest one this user brought up with ``lab up``."""
        candidates = [
            s
            for s in iter_states(root, uid=None if run_id else _uid())
            if (s.run_id == run_id if run_id else s.phase == "up" and not s.ephemeral)
        ]
        if not candidates:
            raise LabError(
                f"no lab {run_id} is running" if run_id else "no lab is running (lab up)"
            )
        state = candidates[-1]
        document = state.topology_document
        if document is None:
            raise LabError(f"lab {state.run_id}: state file has no topology")
        topology = parse_topology(document, default_name=state.topology_name)
        return cls(topology, state)

    def _register_atexit(self) -> None:
        self._atexit = self.teardown
        atexit.register(self._atexit)

    # --- names and addresses ----------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.state.run_id

    @property
    def directory(self) -> Path:
        return self.state.directory

    @property
    def service_failures(self) -> dict[str, str]:
        """``"node/service" -> reason`` for services that did not start."""
        return self.state.service_failures

    def namespace(self, node: str) -> str:
        """The namespace name of a node."""
        try:
            return self.state.namespaces[node]
        except KeyError:
            raise LabError(f"no node {node!r} in topology {self.topology.name}") from None

    def address(self, node: str, version: int) -> str:
        """The node's first address of IP ``version`` (text, no prefix)."""
        return self.topology.address(node, version)

    def service(self, node: str, name: str) -> Service:
        """The service ``name`` declared on ``node``."""
        for service in self.topology.nodes[node].services:
            if service.name == name:
                return service
        raise LabError(f"node {node} has no service {name!r}")

    def service_process(self, node: str, name: str) -> procs.TrackedProcess | None:
        """The tracked process of a service, if it was started."""
        for proc in self.state.processes:
            if proc.node == node and proc.name == name:
                return proc
        return None

    # --- building --------------------------------------------------------------------

    def _build_network(self) -> None:
        topo = self.topology
        for node in topo.nodes.values():
            ns = self.namespace(node.name)
            self.state.inodes[node.name] = netlink.create_namespace(ns)
            self.state.save()
            netlink.write_sysctls(ns, node_sysctls(node))
            netlink.configure_interface(ns, "lo", node.loopback)
            if node.nameservers:
                write_resolv_conf(ns, [str(a) for a in node.nameservers])
        for link in topo.links:
            netlink.add_veth(
                self.namespace(link.a.node),
                link.a.ifname,
                self.namespace(link.b.node),
                link.b.ifname,
            )
            for end in (link.a, link.b):
                netlink.configure_interface(self.namespace(end.node), end.ifname, end.addresses)
        for node in topo.nodes.values():
            self.wait_node_usable(node.name)
            for route in node.routes:
                netlink.replace_route(self.namespace(node.name), str(route.to), str(route.via))
        self._verify_sysctls()
        self.state.phase = "network-up"
        self.state.save()

    def wait_node_usable(self, node: str, timeout: float = 10.0) -> None:
        """Poll until the node's links are up and its addresses are past DAD."""
        ns = self.namespace(node)
        ifnames = [link.end(node).ifname for link in self.topology.links_of(node)]
        netlink.wait_links_up(ns, ifnames, timeout=timeout, clock=self._clock)
        wanted = [str(a.ip) for a in self.topology.addresses(node)]
        netlink.wait_addresses_usable(ns, wanted, timeout=timeout, clock=self._clock)

    def _verify_sysctls(self) -> None:
        # The whole point of the gateway node is that nothing bypasses the proxy: check the
        # kernel really has forwarding as the topology says, rather than trusting the write.
        for node in self.topology.nodes.values():
            expected = {k: str(v) for k, v in node_sysctls(node).items()}
            actual = netlink.read_sysctls(self.namespace(node.name), expected)
            wrong = {k: actual[k] for k in expected if actual[k] != expected[k]}
            if wrong:
                raise LabError(f"node {node.name}: sysctls not applied: {wrong}")

    def _start_services(self, tolerate_failures: bool) -> None:
        pending = sorted(
            self.topology.services(), key=lambda pair: SERVICE_ORDER.get(pair[1].kind, 9)
        )
        for node, service in pending:
            try:
                self.start_service(node, service.name)
            except LabError as exc:
                if not tolerate_failures:
                    raise
                self.state.service_failures[f"{node}/{service.name}"] = str(exc)
                self.state.save()

    def start_service(self, node: str, name: str, timeout: float = SERVICE_READY_TIMEOUT) -> None:
        """Start one declared service and poll until it answers. Raises `LabError`."""
        service = self.service(node, name)
        ns = self.namespace(node)
        argv = services.service_argv(service, node, self.directory)
        log = self.directory / f"{node}-{service.name}.log"
        tracked, _child = procs.spawn(
            ns, node, service.name, argv, log, services.child_environment()
        )
        self.state.processes = [
            p for p in self.state.processes if not (p.node == node and p.name == name)
        ]
        self.state.processes.append(tracked)
        self.state.save()

        def ready() -> bool:
            if not procs.is_running(tracked):
                raise LabError(
                    f"{node}/{name} exited during start-up; log {log}:\n{_tail(str(log))}"
                )
            return services.service_ready(ns, service)

        if not poll_until(ready, timeout=timeout, interval=0.1, clock=self._clock):
            raise LabError(
                f"{node}/{name} did not answer within {timeout}s; log {log}:\n{_tail(str(log))}"
            )
        self.state.service_failures.pop(f"{node}/{name}", None)
        self.state.save()

    def stop_service(self, node: str, name: str) -> None:
        """Stop one service (TERM, then KILL)."""
        proc = self.service_process(node, name)
        if proc is not None:
            procs.stop_processes([proc], clock=self._clock)

    def signal_service(self, node: str, name: str, signum: int) -> None:
        """Send a signal to a running service (SIGSTOP / SIGCONT to freeze it, for example)."""
        proc = self.service_process(node, name)
        if proc is None or not procs.send_signal(proc, signum):
            raise LabError(f"{node}/{name} is not running")

    def log_tail(self, node: str, name: str, lines: int = 20) -> str:
        """The last lines of a service's log."""
        proc = self.service_process(node, name)
        return _tail(proc.log, lines) if proc else ""

    # --- driving -----------------------------------------------------------------------

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``node``."""
        return procs.netns_command(self.namespace(node), argv)

    def exec(
        self,
        node: str,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``node`` to completion; output captured as text."""
        return subprocess.run(
            self.command(node, argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=services.child_environment(),
            check=False,
        )

    @contextlib.contextmanager
    def popen(self, node: str, argv: Sequence[str]) -> Iterator[subprocess.Popen[bytes]]:
        """Start a helper inside ``node`` with piped (binary) output; killed on leaving."""
        child = subprocess.Popen(
            self.command(node, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=services.child_environment(),
        )
        try:
            yield child
        finally:
            if child.poll() is None:
                child.kill()
            child.communicate(timeout=10)

    def set_link(self, node: str, peer: str, up: bool) -> None:
        """Set ``node``'s interface toward ``peer`` down or up; up waits until usable again."""
        link = self.topology.link_between(node, peer)
        netlink.set_link_state(self.namespace(node), link.end(node).ifname, up)
        if up:
            for end in (link.a, link.b):
                # Restore addresses and routes the kernel may have dropped while down.
                netlink.configure_interface(self.namespace(end.node), end.ifname, end.addresses)
            for end in (link.a, link.b):
                self.wait_node_usable(end.node)
                for route in self.topology.nodes[end.node].routes:
                    netlink.replace_route(self.namespace(end.node), str(route.to), str(route.via))

    def delete_route(self, node: str, dst: str) -> bool:
        """Remove a route (CIDR) from ``node``; returns False if it was not there."""
        return netlink.delete_route(self.namespace(node), str(ipaddress.ip_network(dst)))

    def restore_routes(self, node: str) -> None:
        """Re-apply every route the topology declares for ``node``."""
        for route in self.topology.nodes[node].routes:
            netlink.replace_route(self.namespace(node), str(route.to), str(route.via))

    # --- teardown ----------------------------------------------------------------------

    def teardown(self) -> TeardownReport:
        """Remove everything this lab created. Safe to call twice and on a partial lab."""
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if os.getpid() != self.state.owner_pid and self.state.phase != "up":
            raise LabError("a lab being built is torn down only by the process building it")
        return teardown_state(self.state, clock=self._clock)

    def leftovers(self) -> list[str]:
        """Anything of this lab that still exists (empty after a clean teardown)."""
        return find_leftovers(self.state)


def teardown_state(state: LabState, clock: Clock | None = None) -> TeardownReport:
    """Tear down a lab described by its state. Tolerates anything already gone."""
    # A second Ctrl-C must not leave a half-removed lab behind: finish first.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        report = TeardownReport(run_id=state.run_id)
        state.phase = "tearing-down"
        with contextlib.suppress(OSError):
            state.save()
        running = [p for p in state.processes if procs.is_running(p)]
        report.stopped = len(running)
        procs.stop_processes(running, clock=clock)
        for node, ns in state.namespaces.items():
            inode = netlink.namespace_inode(ns) or state.inodes.get(node)
            if inode is None:
                continue
            stragglers = netlink.pids_in_namespace(inode)
            report.stragglers_killed += len(stragglers)
            procs.kill_pids(stragglers, clock=clock)
        for ns in state.namespaces.values():
            if netlink.remove_namespace(ns):
                report.namespaces_removed += 1
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        report.leftovers = find_leftovers(state)
        if not report.leftovers:
            shutil.rmtree(state.directory, ignore_errors=True)
        return report
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def find_leftovers(state: LabState) -> list[str]:
    """Namespaces, processes and host interfaces of this run that still exist."""
    found: list[str] = []
    for node, ns in state.namespaces.items():
        if netlink.namespace_exists(ns):
            found.append(f"namespace {ns}")
        inode = state.inodes.get(node)
        if inode is not None:
            found.extend(f"pid {pid} in {ns}" for pid in netlink.pids_in_namespace(inode))
    found.extend(
        f"process {p.pid} ({p.node}/{p.name})" for p in state.processes if procs.is_running(p)
    )
    found.extend(
        f"{NETNS_ETC / ns}" for ns in state.namespaces.values() if (NETNS_ETC / ns).exists()
    )
    # veths are created inside the lab's namespaces and never exist in the host's; check.
    host_links = _host_ifnames()
    found.extend(f"host interface {name}" for name in host_links if state.run_id in name)
    return found


def teardown_all(root: Path | None = None, uid: int | None = None) -> list[TeardownReport]:
    """Tear down every lab of ``uid`` (default: this user) under ``root``.

    An ephemeral lab whose owner is still running (a test session, a one-off ``lab run``)
    is left to its owner, which removes it on exit; one whose owner died is removed.
    """
    return [
        teardown_state(state)
        for state in iter_states(root, uid=uid if uid is not None else _uid())
        if not (state.ephemeral and state.owner_alive())
    ]


def _host_ifnames() -> list[str]:
    try:
        return sorted(p.name for p in Path("/sys/class/net").iterdir())
    except OSError:
        return []


def _uid() -> int:
    return os.getuid()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
