"""TLS for the reference TCP signalling: the certificate authenticates the hello's identity (loopback only).

The certificates are made per test session with the ``openssl`` command
(a throwaway CA, EC keys: a fraction of a second); without it these tests skip.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from natpool.aio.tcp import IncomingChannel, TcpSignalling, TcpSignallingServer, cert_identities
from natpool.errors import ChannelBroken, DropReason
from tests.support.aio import run as _run

BOUND = 10.0
SECRET = b"alice-bob secret, 32 bytes long!"


def run(coro: Awaitable[Any]) -> Any:
    return _run(coro, BOUND)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=natpool test CA")
    for name in ("alice", "bob", "carol", "mallory"):
        sh("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
           "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return d


def server_ctx(pki: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ctx(pki: Path, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if name is not None:
        ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    return ctx


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str | None, bytes]] = []

    async def __call__(self, ch: IncomingChannel) -> None:
        with contextlib.suppress(ChannelBroken):
            msg = await ch.recv()
            self.seen.append((ch.peer, ch.peer_identity, msg))
            await ch.send(b"ok:" + msg)


@pytest.mark.parametrize("persistent", [True, False])
def test_client_certificates_authenticate_both_ends_without_secrets(pki: Path, persistent: bool) -> None:
    async def main() -> None:
        rec = Recorder()
        async with TcpSignallingServer(rec, identity="bob", ssl=server_ctx(pki, "bob")) as server, \
                TcpSignalling("alice", {"bob": server.address}, ssl=client_ctx(pki, "alice"),
                              persistent=persistent) as sig:
            ch = await sig.open("bob")
            assert ch.peer_identity == "bob"
            await ch.send(b"x")
            assert await ch.recv() == b"ok:x"
            await ch.close()
        assert rec.seen == [("alice", "alice", b"x")]
        assert server.stats.authenticated == 1 and not server.drops

    run(main())


def test_a_certificate_for_another_identity_is_refused(pki: Path) -> None:
    async def main() -> None:
        rec = Recorder()
        async with TcpSignallingServer(rec, identity="bob", ssl=server_ctx(pki, "bob")) as server:
            # mallory's valid certificate, but a hello claiming alice
            async with TcpSignalling("alice", {"bob": server.address}, ssl=client_ctx(pki, "mallory")) as sig:
                ch = await sig.open("bob")
                with pytest.raises(ChannelBroken):  # the server closes the connection after the hello
                    await ch.send(b"lock")
                    await ch.recv()
            # no client certificate at all: the TLS handshake fails, nothing reaches the hello
            async with TcpSignalling("alice", {"bob": server.address}, ssl=client_ctx(pki, None)) as sig:
                with contextlib.suppress(ChannelBroken):  # TLS 1.3 may report the refusal after the handshake
                    ch = await sig.open("bob")
                    await ch.send(b"lock")
                    await ch.recv()
        assert rec.seen == []
        assert server.drops == {DropReason.UNEXPECTED_PEER: 1}
        assert server.stats.authenticated == 0

    run(main())


def test_the_client_refuses_a_server_whose_certificate_names_someone_else(pki: Path) -> None:
    async def main() -> None:
        rec = Recorder()
        async with TcpSignallingServer(rec, identity="carol", ssl=server_ctx(pki, "carol")) as server:
            async with TcpSignalling("alice", {"bob": server.address}, ssl=client_ctx(pki, "alice")) as sig:
                with pytest.raises(ChannelBroken, match="cannot reach"):
                    await sig.open("bob")  # check_hostname: the certificate does not name bob
            relaxed = client_ctx(pki, "alice")
            relaxed.check_hostname = False  # still verified against the CA, so natpool checks the name itself
            async with TcpSignalling("alice", {"bob": server.address}, ssl=relaxed) as sig:
                with pytest.raises(ChannelBroken, match="does not name 'bob'"):
                    await sig.open("bob")
                assert sig.drops == {DropReason.UNEXPECTED_PEER: 1}
        assert rec.seen == []

    run(main())


def test_tls_and_secrets_together_both_must_pass(pki: Path) -> None:
    async def main() -> None:
        rec = Recorder()
        async with TcpSignallingServer(rec, identity="bob", secrets={"alice": SECRET},
                                       ssl=server_ctx(pki, "bob")) as server:
            async with TcpSignalling("alice", {"bob": server.address}, secrets={"bob": SECRET},
                                     ssl=client_ctx(pki, "alice")) as sig:
                ch = await sig.open("bob")
                await ch.send(b"both")
                assert await ch.recv() == b"ok:both"
            # alice's secret leaked to mallory, who still only has her own certificate
            async with TcpSignalling("alice", {"bob": server.address}, secrets={"bob": SECRET},
                                     ssl=client_ctx(pki, "mallory")) as sig:
                with pytest.raises(ChannelBroken):
                    await sig.open("bob")
        assert rec.seen == [("alice", "alice", b"both")]
        assert server.drops == {DropReason.UNEXPECTED_PEER: 1}

    run(main())


def test_a_verifying_tls_context_is_enough_to_serve_beyond_loopback(pki: Path) -> None:
    server = TcpSignallingServer(Recorder(), host="0.0.0.0", identity="bob", ssl=server_ctx(pki, "bob"))
    assert server.ssl is not None  # constructed: no LocalError, no unauthenticated warning needed


def test_cert_identities_reads_subject_alt_names_and_common_name() -> None:
    cert = {"subject": ((("countryName", "XX"),), (("commonName", "bob"),)),
            "subjectAltName": (("DNS", "bob.example"), ("IP Address", "192.0.2.1"), ("URI", "natpool:bob"))}
    assert cert_identities(cert) == {"bob", "bob.example", "natpool:bob"}
    assert cert_identities({}) == frozenset() and cert_identities(None) == frozenset()
