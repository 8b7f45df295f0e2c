"""What the benchmark runs: the proxies (installed from Debian when absent) and the loadgen."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
CONFIG_DIR = BENCH_DIR / "configs"
LOADGEN_SOURCE = BENCH_DIR / "loadgen.c"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


@dataclass(frozen=True)
class Target:
    """One row of the table: a proxy to start, or ``direct`` (no proxy, the ceiling)."""

    name: str
    binary: str | None  # None for direct
    package: str | None  # Debian package providing ``binary``; None if not apt-installable

    @property
    def is_proxy(self) -> bool:
        return self.binary is not None

    def argv(self, binary: str, port: int, workdir: Path) -> list[str]:
        """Command line that runs this proxy in the foreground on 127.0.0.1:``port``."""
        if self.name in CONFIGS:
            config = CONFIG_DIR / CONFIGS[self.name]
            return [binary, "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
        if self.name == "dante":
            template = (CONFIG_DIR / "danted.conf").read_text()
            config = workdir / "danted.conf"
            config.write_text(template.replace("@PORT@", str(port)))
            return [binary, "-f", str(config), "-p", str(workdir / "danted.pid")]
        if self.name == "microsocks":
            return [binary, "-i", "127.0.0.1", "-p", str(port)]
        raise ValueError(f"{self.name} is not a proxy")


#: socks64 as installed by default (one process), and with workers (issue 11)
CONFIGS = {
    "socks64": "socks64.yaml",
    "socks64-workers": "socks64-workers.yaml",  # workers: auto
}

TARGETS = {
    "direct": Target("direct", None, None),
    "socks64": Target("socks64", "socks64", None),
    "socks64-workers": Target("socks64-workers", "socks64", None),
    "dante": Target("dante", "danted", "dante-server"),
    "microsocks": Target("microsocks", "microsocks", "microsocks"),
}


def find_binary(target: Target, socks64: str | None) -> str | None:
    """Path of the target's binary; socks64 comes from the repository's venv by default."""
    if target.binary == "socks64":
        candidates = [socks64] if socks64 else [str(REPO_DIR / ".venv/bin/socks64")]
        for candidate in candidates:
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        return shutil.which("socks64")
    assert target.binary is not None
    return shutil.which(target.binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def install_packages(packages: list[str], log: Path) -> str | None:
    """apt-get install ``packages`` without starting their services; an error text or None.

    Debian starts dante-server's service on install; a policy-rc.d that answers 101 forbids
    that (it is left alone if the machine already has one).
    """
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get: install " + " ".join(packages) + " yourself"
    added_policy = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text("#!/bin/sh\n# socks64 bench: no service starts\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        added_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        with open(log, "ab") as out:
            for argv in (
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            ):
                done = subprocess.run(argv, stdout=out, stderr=out, env=env, timeout=600)
                if done.returncode != 0:
                    return f"{' '.join(argv)} failed ({done.returncode}); see {log}"
    finally:
        if added_policy:
            with contextlib.suppress(OSError):
                POLICY_RC_D.unlink()
    return None


def build_loadgen(cache_dir: Path) -> Path:
    """Compile bench/loadgen.c with the machine's gcc, once per source version."""
    source = LOADGEN_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    binary = cache_dir / f"loadgen-{digest}"
    if binary.exists():
        return binary
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler: apt-get install gcc")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".tmp")
    argv = [compiler, "-O2", "-pthread", "-o", str(partial), str(LOADGEN_SOURCE)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"compiling loadgen failed:\n{done.stderr}")
    partial.rename(binary)
    return binary


def version_of(target: Target, binary: str) -> str:
    """A short version string for the report header."""
    if target.package:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", target.package],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    if target.binary == "socks64":
        python = Path(binary).parent / "python"
        done = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('socks64'))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return "?"
