#!/usr/bin/env python3
"""ADDRESS ID lookups through the workers' shared table, as a worker makes them.

    .venv/bin/python bench/idtable_bench.py            # 20,000 IDs, 1,000,000 lookups
    .venv/bin/python bench/idtable_bench.py --ids 2000 --lookups 200000

A worker's table is a cache (``CachedIds``) in front of the supervisor's AddressTable,
reached over a Unix socketpair (``ControlLink``). Here the supervisor's end runs in a child
process, as in ``workers: N``. Three numbers per run:

* ``associate (miss)``: new IDs, each a round trip to the supervisor;
* ``lookup, first time (miss)``: IDs another worker made, each a round trip;
* ``lookup, seen (hit)``: IDs this worker has seen, answered from its cache: the figure
  the issue asks for (>= 200,000/s per worker); both through the awaitable ``lookup`` the
  session path uses and the synchronous ``cached`` the UDP path uses;
* the same lookups on the single-process table (``LocalIds``), for comparison.

Loopback only, bounded in count; owners and targets are documentation addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from addrmap import AddressTable, Owner
from translator.idtable import GRACE, CachedIds, LocalIds
from translator.idtable.supervised import LinkAuthority, serve_request
from translator.service.control import ControlLink

TTL = 600.0


def _owners(count: int) -> list[Owner]:
    return [Owner(str(IPv4Address("192.0.2.0") + (i % 250) + 1)) for i in range(count)]


def _targets(count: int) -> list[IPv6Address]:
    base = IPv6Address("2001:db8:b::")
    return [base + i for i in range(count)]


def _supervisor(sock: socket.socket) -> None:
    """The supervisor's end: an AddressTable served over the link until it closes."""
    table = AddressTable(
        clock=time.monotonic, ttl=TTL + GRACE, capacity=1_000_000, per_owner_quota=1_000_000
    )

    async def handle(kind: str, payload: object) -> object:
        return serve_request(table, kind, payload)

    async def main() -> None:
        link = ControlLink(sock, handle)
        await link.start()
        await link.closed.wait()

    asyncio.run(main())


async def _timed(label: str, count: int, run: object) -> tuple[str, float]:
    started = time.perf_counter()
    await run  # type: ignore[misc]
    elapsed = time.perf_counter() - started
    return label, count / elapsed


async def bench(ids: int, lookups: int) -> list[tuple[str, float]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = multiprocessing.get_context("fork").Process(target=_supervisor, args=(theirs,))
    child.start()
    theirs.close()
    link = ControlLink(ours)
    await link.start()
    worker = CachedIds(LinkAuthority(link), ttl=TTL, clock=time.monotonic)
    other = CachedIds(LinkAuthority(link), ttl=TTL, clock=time.monotonic)  # "another worker"
    owners, targets = _owners(ids), _targets(ids)
    results = []
    try:

        async def associate_all() -> None:
            for owner, target in zip(owners, targets, strict=True):
                await other.associate(owner, target)

        results.append(await _timed("associate (miss, a round trip)", ids, associate_all()))
        made = [(o, other.cached_id(o, t)) for o, t in zip(owners, targets, strict=True)]
        pairs = [(o, r) for o, r in made if r is not None]

        async def first_lookups() -> None:
            for owner, realid in pairs:
                assert await worker.lookup(owner, realid) is not None

        results.append(await _timed("lookup, first time (miss)", len(pairs), first_lookups()))
        rounds = max(1, lookups // len(pairs))

        async def seen_lookups() -> None:
            lookup = worker.lookup
            for _ in range(rounds):
                for owner, realid in pairs:
                    await lookup(owner, realid)

        results.append(
            await _timed("lookup, seen (hit), awaited", rounds * len(pairs), seen_lookups())
        )

        async def seen_cached() -> None:
            cached = worker.cached
            for _ in range(rounds):
                for owner, realid in pairs:
                    cached(owner, realid)

        results.append(
            await _timed("lookup, seen (hit), cached()", rounds * len(pairs), seen_cached())
        )
        local = LocalIds(AddressTable(clock=time.monotonic, ttl=TTL, per_owner_quota=1_000_000))
        local_pairs = [
            (o, await local.associate(o, t)) for o, t in zip(owners, targets, strict=True)
        ]

        async def local_lookups() -> None:
            lookup = local.lookup
            for _ in range(rounds):
                for owner, realid in local_pairs:
                    await lookup(owner, realid)

        results.append(
            await _timed("single process (LocalIds), awaited", rounds * len(pairs), local_lookups())
        )
    finally:
        await link.close()
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=20_000)
    parser.add_argument("--lookups", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    try:
        import uvloop

        results = uvloop.run(bench(args.ids, args.lookups))
    except ImportError:
        results = asyncio.run(bench(args.ids, args.lookups))
    print("| operation (one worker) | per second |")
    print("|---|---:|")
    for label, rate in results:
        print(f"| {label} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
