"""Find or start the PostgreSQL and Redis the service tier needs.

Order: a server already listening on the standard port; the machine's own cluster started with
its own tooling (Debian's pg_ctlcluster); a private server started from the installed binaries
in a temporary directory. With no binaries at all, the test run fails with the command that
installs them. It never skips.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

PG_INSTALL = "apt-get update && apt-get install -y postgresql"
REDIS_INSTALL = "apt-get update && apt-get install -y redis-server"


class ServiceUnavailable(RuntimeError):
    pass


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.2)
    raise ServiceUnavailable(f"{what} did not start listening on 127.0.0.1:{port} in {timeout}s")


@dataclass
class Started:
    """A server this test run started; stopped at the end of the run."""

    url: str
    stop_cmds: list[list[str]] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    tmpdirs: list[str] = field(default_factory=list)

    def stop(self) -> None:
        for cmd in self.stop_cmds:
            subprocess.run(cmd, check=False, capture_output=True)
        for p in self.procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for d in self.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def ensure_postgres() -> Started:
    """An admin URL (database `postgres`, user `postgres`) of a running PostgreSQL."""
    url = "postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    if port_open(5432):
        return Started(url.format(port=5432))
    clusters = glob.glob("/etc/postgresql/*/main")
    if clusters and shutil.which("pg_ctlcluster"):
        version = clusters[0].split("/")[3]
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            check=False,
            capture_output=True,
        )
        try:
            _wait_port(5432, 30, "PostgreSQL (pg_ctlcluster)")
            return Started(url.format(port=5432))
        except ServiceUnavailable:
            pass
    bindir = _pg_bin()
    if bindir is None:
        raise ServiceUnavailable(
            f"PostgreSQL is not running on 127.0.0.1:5432 and no server binaries were found; "
            f"install them with: {PG_INSTALL}"
        )
    # initdb and postgres refuse to run as root: run them as the postgres user.
    tmp = tempfile.mkdtemp(prefix="qf-pg-")
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(tmp, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = os.path.join(tmp, "data")
    subprocess.run(
        [*run_as, f"{bindir}/initdb", "-D", data, "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [*run_as, f"{bindir}/postgres", "-D", data, "-p", str(port), "-h", "127.0.0.1", "-k", tmp],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, 30, "PostgreSQL (private)")
    return Started(url.format(port=port), procs=[proc], tmpdirs=[tmp])


def ensure_redis() -> Started:
    if port_open(6379):
        return Started("redis://127.0.0.1:6379")
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable(
            f"Redis is not running on 127.0.0.1:6379 and redis-server is not installed; "
            f"install it with: {REDIS_INSTALL}"
        )
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, 15, "Redis")
    return Started(f"redis://127.0.0.1:{port}", procs=[proc])
