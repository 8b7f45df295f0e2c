"""The loopback Kerberos realm and the RFC 1961 test client's GSS-API plumbing, without a
SOCKS gateway: what MIT Kerberos and python-gssapi do for the cases the gateway's tests
rely on (names, wrong service, expiry, no ticket, wrap/unwrap), and the client's framing
against a minimal fake server."""

from __future__ import annotations

import ast
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gssapi
import gssapi.exceptions
import pytest
from gssapi.raw.misc import GSSError

from tests import rfc1961client as client
from tests.krb5realm import KerberosLab, running_realm

ALICE = "alice@SOCKS64.TEST"


def acceptor(keytab: Path, name: str | None = None) -> client.Context:
    """An acceptor on ``keytab`` (as the gateway will be), raising step errors at once."""
    gss_name = None if name is None else gssapi.Name(name, gssapi.NameType.hostbased_service)
    creds = gssapi.Credentials(usage="accept", store={"keytab": str(keytab)}, name=gss_name)
    return client.Context(creds=creds, usage="accept")


def established(
    lab: KerberosLab, udp: bool = False
) -> tuple[gssapi.SecurityContext, gssapi.SecurityContext]:
    initiator = client.init_context(lab.ccache("alice"), udp=udp)
    accepting = acceptor(lab.keytab)
    reply = accepting.step(initiator.step())
    assert initiator.step(reply) is None
    assert initiator.complete and accepting.complete
    return initiator, accepting


# -- the realm ---------------------------------------------------------------------------


def test_the_session_points_kerberos_at_the_realm(krb5_realm: KerberosLab) -> None:
    realm = krb5_realm.realm
    assert os.environ["KRB5_CONFIG"] == str(realm.krb5_conf)
    assert os.environ["KRB5RCACHEDIR"] == str(realm.rcache_dir)
    assert "KRB5CCNAME" not in realm.env and "KRB5CCNAME" not in os.environ
    conf = realm.krb5_conf.read_text()
    for line in ("dns_lookup_kdc = false", "rdns = false", "clockskew = 3"):
        assert line in conf
    assert f"kdc = 127.0.0.1:{realm.port}" in conf
    assert f"kdc_tcp_listen = 127.0.0.1:{realm.port}" in realm.kdc_conf.read_text()


def test_the_gateway_keytab_holds_only_its_service(krb5_realm: KerberosLab) -> None:
    listing = krb5_realm.realm.run("klist", "-k", str(krb5_realm.keytab))
    principals = {line.split()[-1] for line in listing.splitlines()[3:] if line.strip()}
    assert principals == {"rcmd/localhost@SOCKS64.TEST"}


def test_fresh_ccache_is_a_new_file_with_a_tgt(krb5_realm: KerberosLab) -> None:
    path = krb5_realm.fresh_ccache("bob")
    assert path not in (krb5_realm.ccache("bob"), krb5_realm.ccache("alice"))
    assert "Default principal: bob@SOCKS64.TEST" in krb5_realm.realm.run("klist", str(path))


@pytest.mark.usefixtures("krb5_realm")  # its skip-or-fail when the tools are missing
def test_a_realm_of_its_own_starts_and_is_cleaned_up(tmp_path: Path) -> None:
    started = time.monotonic()
    with running_realm(tmp_path) as realm:
        elapsed = time.monotonic() - started
        realm.add_principal("carol", "pw")
        ccache = realm.kinit("carol", "pw", realm.directory / "carol.ccache", lifetime="5m")
        assert ccache.is_file()
        process = realm._process
        assert process is not None and realm.running
    assert process.poll() is not None
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 10, elapsed


# -- GSS-API facts the gateway relies on ---------------------------------------------------


def test_the_acceptor_sees_alice(krb5_realm: KerberosLab) -> None:
    _initiator, accepting = established(krb5_realm)
    assert str(accepting.initiator_name) == ALICE
    assert str(accepting.target_name) == "rcmd/localhost@SOCKS64.TEST"
    assert gssapi.RequirementFlag.out_of_sequence_detection in accepting.actual_flags


@pytest.mark.parametrize("name", ["rcmd", "rcmd@localhost"])
def test_a_service_name_without_host_accepts_any_host(krb5_realm: KerberosLab, name: str) -> None:
    """MIT: host-based "rcmd" with no host matches rcmd/ANYHOST in the keytab."""
    accepting = acceptor(krb5_realm.keytab, name)
    accepting.step(client.init_context(krb5_realm.ccache("alice")).step())
    assert str(accepting.initiator_name) == ALICE


def test_a_service_name_without_host_accepts_another_host(
    krb5_realm: KerberosLab, tmp_path: Path
) -> None:
    realm = krb5_realm.realm
    realm.add_principal("rcmd/gw.socks64.test")
    keytab = realm.keytab(tmp_path / "gw.keytab", "rcmd/gw.socks64.test")
    token = client.init_context(krb5_realm.ccache("bob"), "rcmd@gw.socks64.test").step()
    accepting = acceptor(keytab, "rcmd")
    accepting.step(token)
    assert str(accepting.target_name) == "rcmd/gw.socks64.test@SOCKS64.TEST"


def test_an_acceptor_name_for_another_host_has_no_key(krb5_realm: KerberosLab) -> None:
    with pytest.raises(gssapi.exceptions.MissingCredentialsError, match="No key table entry"):
        acceptor(krb5_realm.keytab, "rcmd@otherhost")


def test_a_ticket_for_another_service_is_refused(krb5_realm: KerberosLab) -> None:
    token = client.init_context(krb5_realm.ccache("alice"), "HTTP@localhost").step()
    with pytest.raises(GSSError, match="not found in keytab") as caught:
        acceptor(krb5_realm.keytab).step(token)
    assert caught.value.maj_code == 0xD0000  # GSS_S_FAILURE


def test_python_gssapi_defers_step_errors_by_default(krb5_realm: KerberosLab) -> None:
    """A plain gssapi.SecurityContext returns the KRB-ERROR token and raises later."""
    token = client.init_context(krb5_realm.ccache("alice"), "HTTP@localhost").step()
    creds = gssapi.Credentials(usage="accept", store={"keytab": str(krb5_realm.keytab)})
    deferring = gssapi.SecurityContext(creds=creds, usage="accept")
    assert deferring.step(token)  # an error token, no exception yet
    with pytest.raises(GSSError, match="not found in keytab"):
        _ = deferring.complete


def test_no_ticket_fails_in_the_client(krb5_realm: KerberosLab) -> None:
    with pytest.raises(gssapi.exceptions.MissingCredentialsError, match="No credentials cache"):
        client.init_context(krb5_realm.no_ticket_ccache)


def test_an_unknown_service_fails_in_the_client(krb5_realm: KerberosLab) -> None:
    context = client.init_context(krb5_realm.ccache("alice"), "nosuch@localhost")
    with pytest.raises(GSSError, match="not found in Kerberos database"):
        context.step()


def test_a_token_accepted_twice_is_a_replay(krb5_realm: KerberosLab) -> None:
    token = client.init_context(krb5_realm.ccache("alice")).step()
    acceptor(krb5_realm.keytab).step(token)
    with pytest.raises(GSSError, match="Request is a replay"):
        acceptor(krb5_realm.keytab).step(token)


@pytest.mark.parametrize("confidential", [False, True])
def test_wrap_and_unwrap(krb5_realm: KerberosLab, confidential: bool) -> None:
    initiator, accepting = established(krb5_realm)
    wrapped = initiator.wrap(b"level octet", confidential)
    assert wrapped.encrypted is confidential
    assert (b"level octet" in wrapped.message) is not confidential
    unwrapped = accepting.unwrap(bytes(wrapped.message))
    assert unwrapped.message == b"level octet" and unwrapped.encrypted is confidential


def test_unwrap_of_an_integrity_token_overwrites_its_input(krb5_realm: KerberosLab) -> None:
    """MIT unwraps a conf=False token in place: the bytes object passed is changed."""
    initiator, accepting = established(krb5_realm)
    token = initiator.wrap(b"hello", False).message
    copy = bytes(bytearray(token))
    assert accepting.unwrap(token).message == b"hello"
    assert token != copy
    with pytest.raises(gssapi.exceptions.DuplicateTokenError):
        accepting.unwrap(copy)


def test_unwrap_out_of_order_with_sequence_flag(krb5_realm: KerberosLab) -> None:
    initiator, accepting = established(krb5_realm)
    tokens = [initiator.wrap(b"m%d" % n, False).message for n in range(4)]
    assert accepting.unwrap(tokens[0]).message == b"m0"
    with pytest.raises(gssapi.exceptions.TokenTooEarlyError):  # GSS_S_GAP_TOKEN
        accepting.unwrap(tokens[2])
    with pytest.raises(gssapi.exceptions.TokenTooLateError):  # GSS_S_UNSEQ_TOKEN
        accepting.unwrap(tokens[1])
    assert accepting.unwrap(tokens[3]).message == b"m3"


def test_unwrap_out_of_order_with_replay_flag_only(krb5_realm: KerberosLab) -> None:
    """The UDP case (no sequence flag): reordering passes, a duplicate does not."""
    initiator, accepting = established(krb5_realm, udp=True)
    assert gssapi.RequirementFlag.out_of_sequence_detection not in accepting.actual_flags
    tokens = [initiator.wrap(b"m%d" % n, True).message for n in range(3)]
    assert [accepting.unwrap(tokens[n]).message for n in (0, 2, 1)] == [b"m0", b"m2", b"m1"]
    with pytest.raises(gssapi.exceptions.DuplicateTokenError):
        accepting.unwrap(tokens[2])


def test_garbage_does_not_unwrap(krb5_realm: KerberosLab) -> None:
    _initiator, accepting = established(krb5_realm)
    with pytest.raises(GSSError):
        accepting.unwrap(os.urandom(64))


# -- the client's framing against a fake server ----------------------------------------
# TEST DOUBLE of the client only: just enough RFC 1961 server to show the client frames
# and wraps as the RFC says. It is not a model of the gateway.


class FakeRfc1961Server:
    """One connection: greeting, context, level, one request, then an echo (CONNECT)
    or one echoed datagram (UDP ASSOCIATE)."""

    def __init__(self, keytab: Path) -> None:
        self.keytab = keytab
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(10)
        self.seen: dict[str, Any] = {"tokens": []}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.listener.getsockname()[1])

    def close(self) -> None:
        self.listener.close()
        self.udp.close()
        self.thread.join(10)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                self._session(conn)
            except Exception as error:  # reported to the test through ``seen``
                self.seen["error"] = repr(error)

    def _session(self, conn: socket.socket) -> None:
        stream = conn.makefile("rb")
        _version, count = stream.read(2)
        offered = stream.read(count)
        if 1 not in offered:
            conn.sendall(b"\x05\xff")
            return
        conn.sendall(b"\x05\x01")
        context = acceptor(self.keytab)
        while not context.complete:
            token = self._message(stream, 1)
            try:
                reply = context.step(token)
            except GSSError:
                conn.sendall(b"\x01\xff")
                return
            conn.sendall(client.frame(1, reply or b""))
        self.seen["initiator"] = str(context.initiator_name)
        level = context.unwrap(self._message(stream, 2)).message[0]
        self.seen["level"] = level
        conn.sendall(client.frame(2, context.wrap(bytes([level]), False).message))
        conf = level == 2

        def read() -> bytes:
            token = self._message(stream, 3)
            self.seen["tokens"].append(len(token))
            return context.unwrap(token).message

        def write(data: bytes) -> None:
            conn.sendall(client.frame(3, context.wrap(data, conf).message) if level else data)

        if level:
            request = read()  # the client wraps the whole request in one token
        else:
            request = stream.read(4)
            request += stream.read({1: 6, 4: 18}.get(request[3]) or stream.peek(1)[0] + 3)
        self.seen["request"] = request
        if request[1] == 3:  # UDP ASSOCIATE: our UDP socket is the relay
            write(
                b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", self.udp.getsockname()[1])
            )
            datagram, peer = self.udp.recvfrom(65600)
            framed = datagram[:2] == b"\x01\x03"
            plain = context.unwrap(datagram[4:]).message if framed else datagram
            self.seen["datagram"] = plain
            answer = plain.upper()
            if framed:
                answer = client.frame(3, context.wrap(answer, conf).message)
            self.udp.sendto(answer, peer)
            return
        write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90")
        while True:
            if level:
                if not stream.peek(1):
                    return
                write(read())
            else:
                data = stream.read1(65536)
                if not data:
                    return
                write(data)

    @staticmethod
    def _message(stream: Any, mtyp: int) -> bytes:
        head = stream.read(4)
        assert head[:2] == bytes([1, mtyp]), head
        (length,) = struct.unpack("!H", head[2:])
        data: bytes = stream.read(length)
        return data


@pytest.fixture
def fake_server(krb5_realm: KerberosLab) -> Iterator[FakeRfc1961Server]:
    server = FakeRfc1961Server(krb5_realm.keytab)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("level", [0, 1, 2])
def test_client_connect_and_relay(
    krb5_realm: KerberosLab, fake_server: FakeRfc1961Server, level: int
) -> None:
    payload = os.urandom(150_000)  # several tokens each way at level 1/2
    ccache = krb5_realm.ccache("alice")
    with client.negotiated_client(fake_server.address, ccache, level) as socks:
        assert socks.connect("web4.test", 80) == ("127.0.0.1", 8080)
        socks.sendall(payload)
        socks.sock.shutdown(socket.SHUT_WR)
        assert socks.recv_until_eof() == payload
    seen = fake_server.seen
    assert "error" not in seen, seen
    assert seen["initiator"] == ALICE and seen["level"] == level
    assert seen["request"] == b"\x05\x01\x00\x03\x09web4.test\x00\x50"
    if level:
        assert len(seen["tokens"]) == 1 + 3 and max(seen["tokens"]) == 0xFFFF  # request, data


@pytest.mark.parametrize("level", [0, 2])
def test_client_udp_associate(
    krb5_realm: KerberosLab, fake_server: FakeRfc1961Server, level: int
) -> None:
    ccache = krb5_realm.ccache("bob")
    with client.negotiated_client(fake_server.address, ccache, level, udp=True) as socks:
        relay = socks.udp_associate(announce=level == 2)
        try:
            relay.sendto(b"query", ("::1", 53))
            assert relay.recvfrom() == (b"QUERY", ("::1", 53))
            port = relay.sock.getsockname()[1]
        finally:
            relay.close()
    assert fake_server.seen["datagram"] == b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x00\x35query"
    announced = b"\x7f\x00\x00\x01" + struct.pack("!H", port) if level else bytes(6)
    assert fake_server.seen["request"] == b"\x05\x03\x00\x01" + announced


def test_client_with_a_token_built_in_advance(
    krb5_realm: KerberosLab, fake_server: FakeRfc1961Server
) -> None:
    context, token = client.prebuilt_first_token(krb5_realm.ccache("alice"))
    with client.GssSocksClient(fake_server.address) as socks:
        socks.greet()
        assert socks.establish_context(context, token).complete
        assert socks.negotiate_level(1) == 1
        assert socks.connect("::1", 443) == ("127.0.0.1", 8080)
    assert fake_server.seen["request"] == b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x01\xbb"


@pytest.mark.parametrize("hook", ["garbage token", "length 300"])
def test_client_sees_an_abort(
    krb5_realm: KerberosLab, fake_server: FakeRfc1961Server, hook: str
) -> None:
    with client.GssSocksClient(fake_server.address, krb5_realm.ccache("alice")) as socks:
        assert socks.greet() == 1
        if hook == "garbage token":
            socks.send_context_token(b"garbage")
        else:
            socks.send_context_length(300)
        with pytest.raises(client.GatewayAbort, match="01 FF"):
            socks.read_gss_message(1)


def test_client_sends_a_garbage_encapsulated_message(
    krb5_realm: KerberosLab, fake_server: FakeRfc1961Server
) -> None:
    with client.negotiated_client(fake_server.address, krb5_realm.ccache("alice"), 2) as socks:
        socks.connect("web4.test", 80)
        socks.send_garbage_encapsulated()
        assert socks.recv() == b""  # the fake could not unwrap it and hung up
    assert "InvalidTokenError" in fake_server.seen["error"]


def test_client_sees_no_acceptable_method(fake_server: FakeRfc1961Server) -> None:
    with client.GssSocksClient(fake_server.address) as s, pytest.raises(client.NoAcceptableMethod):
        s.greet(b"\x00")


def test_the_client_imports_nothing_from_the_project() -> None:
    """Independent on purpose: a framing bug in the gateway must not be mirrored."""
    tree = ast.parse(Path(client.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not {name.split(".")[0] for name in names} & {"translator", "addrmap", "tests"}
