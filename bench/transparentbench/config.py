"""The lab's fixed facts and the run's sizes, shared by every other module of the bench.

Where the topology file and the repository's venv are, the addresses and ports the lab
declares (the client's SOCKS proxy, the IPv6-only server, the pool DNS46 answers from), the
two paths and three workloads measured and their targets, the result types, the FULL and
QUICK workload sizes, and ``say``: a progress line on stderr (stdout is the report).
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from typing import Any

from relaybench.targets import BENCH_DIR, REPO_DIR

TOPOLOGY = BENCH_DIR / "configs" / "transparent-lab.yaml"
VENV = REPO_DIR / ".venv"
NAME = "sink.lab.test"  # AAAA only, in the lab's dnsmasq
SERVER = "2001:db8:5e6::10"  # s6
PROXY = "192.0.2.1:1080"  # gw's SOCKS listener on the client link
POOL = ipaddress.ip_network("198.18.0.0/15")
ECHO_PORT, SINK_PORT, SESSION_PORT = 5001, 5002, 5003  # loadgen serve, inside s6
METRICS_URL = "http://127.0.0.1:9464/metrics"  # inside gw only
DNS_TTL = 300  # dnsmasq --local-ttl: the gateway's resolver cache holds the name

PATHS = ("transparent", "socks")
PATH_LABEL = {"transparent": "transparent", "socks": "SOCKS"}
WORKLOADS = ("bulk1", "bulk8", "sessions")
# the targets, as the lowest acceptable transparent / SOCKS ratio of the rate
TARGETS = {"bulk1": 0.90, "bulk8": 0.90, "sessions": 0.80}

Result = dict[str, Any]
Runs = dict[str, dict[str, list[Result]]]  # path -> workload -> one result per run


@dataclass(frozen=True)
class Sizes:
    """Workload parameters; FULL for the record, QUICK to see that everything works."""

    session_seconds: float
    session_max: int
    concurrency: int
    payload: int
    bulk_bytes: int
    bulk_seconds: float
    warmup_sessions: int


FULL = Sizes(8.0, 400_000, 64, 64, 4 << 30, 60.0, 500)
QUICK = Sizes(1.0, 20_000, 64, 64, 256 << 20, 10.0, 100)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
