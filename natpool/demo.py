"""``natpool demo``: the loopback demo (:mod:`natpool.aio.demo`), or with ``--nat`` the same demo behind
two kernel NATs (:mod:`natpool.netlab.demo`).

The choice lives here, above both, because the NAT demo builds on the
loopback one: ``natpool.aio`` never imports ``natpool.netlab``.
"""

from __future__ import annotations

import argparse

from natpool.aio import demo as aio_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    aio_demo.add_arguments(parser)
    parser.add_argument("--nat", action="store_true",
                        help="run the pools behind two Linux kernel NATs (network namespaces, nftables masquerade, "
                             "conntrack; root only), with the routers' tables in the live view")


def run(args: argparse.Namespace) -> int:
    if not args.nat:
        return aio_demo.run(args)
    if not aio_demo.valid_arguments(args):
        return 2
    from natpool.netlab.demo import run_nat  # Linux/root-only machinery, imported only when asked for

    return run_nat(args)
