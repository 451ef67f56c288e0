"""QUIC (aioquic) over a leased pair: the NAT-traversed socket carries a real connection.

After the handover each side holds a lease whose UDP socket is still bound
to the port the NAT mapping is keyed on. ``lease.set_protocol`` gives the
leased transport to any asyncio datagram protocol, replaying what arrived
before; here that is aioquic: the responder's lease gets a ``QuicServer``,
the initiator's a client ``QuicConnectionProtocol`` that connects to
``lease.remote_addr``. Both ends then echo one stream, including a payload
of many datagrams' worth. The certificate is self-signed, made on the fly.

Needs the ``quic`` extra: ``pip install 'natpool[quic]'``.
Run: ``python examples/quic_over_lease.py``
"""

from __future__ import annotations

import asyncio
import datetime

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from loopback_pairs import add_pairs

from natpool import AsyncPairPool, PairConfig
from natpool.aio.tcp import TcpSignalling, TcpSignallingServer

ALPN = ["natpool-echo"]
NAME = "bob.natpool.test"


def self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server side: send every stream back to the client."""
    async def run() -> None:
        writer.write(await reader.read())
        writer.write_eof()
    asyncio.ensure_future(run())  # noqa: RUF006  (aioquic's stream handler is a plain callback)


async def main() -> None:
    cfg = PairConfig(ping_interval=0.05)  # fast pings, for the demo only
    async with AsyncPairPool("alice", cfg) as alice, AsyncPairPool("bob", cfg) as bob, \
            TcpSignallingServer(bob.serve_handover) as signalling_server:
        alice.signalling = TcpSignalling("alice", {"bob": signalling_server.address})
        await add_pairs(alice, bob, 1)
        client_lease = await alice.take_any("bob")
        server_lease = await bob.accept()

        cert, key = self_signed()
        server_cfg = QuicConfiguration(is_client=False, alpn_protocols=ALPN, certificate=cert, private_key=key)
        client_cfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=NAME)
        client_cfg.load_verify_locations(cadata=cert.public_bytes(serialization.Encoding.PEM))

        server = QuicServer(configuration=server_cfg, stream_handler=echo)
        server_lease.set_protocol(server)  # bob's leased socket now serves QUIC
        client = QuicConnectionProtocol(QuicConnection(configuration=client_cfg))
        client_lease.set_protocol(client)  # alice's leased socket now speaks QUIC to bob's mapping
        client.connect(client_lease.remote_addr)
        await asyncio.wait_for(client.wait_connected(), 10)

        for message in (b"hello over a leased NAT pair", bytes(range(256)) * 64):
            reader, writer = await client.create_stream()
            writer.write(message)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 10)
            assert reply == message, "echo differs"
            what = reply.decode() if len(reply) < 100 else "binary, more than ten QUIC packets"
            print(f"QUIC stream echoed {len(reply):,} bytes between {client_lease.local_addr} and "
                  f"{client_lease.remote_addr}: {what}")
        print(f"QUIC on the leased pair {client_lease.nonce:#x}: alice {client_lease.role}, bob {server_lease.role}; "
              f"send before the mapping deadline (in {client_lease.mapping_deadline - alice.now():.1f} s)")

        client.close()
        await client.wait_closed()
        server.close()
        client_lease.close()
        server_lease.close()


if __name__ == "__main__":
    asyncio.run(main())
