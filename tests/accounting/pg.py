"""A throwaway PostgreSQL server for tests: initdb in a temp dir, 127.0.0.1, a free port.

PostgreSQL refuses to run as root; as root the data directory is given to the
``postgres`` system user (created by the Debian package) and the server runs
under ``runuser``. Nothing is installed or configured system-wide.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN_DIRS = (
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
)


class PostgresUnavailable(RuntimeError):
    pass


def find_bin_dir() -> Path:
    for candidate in (os.environ.get("LABFLEET_PG_BIN", ""), *PG_BIN_DIRS):
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise PostgresUnavailable(
        "initdb not found (looked in LABFLEET_PG_BIN, /usr/lib/postgresql/*/bin, PATH); "
        "install the Debian package 'postgresql'"
    )


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str | None  # system user running the server (None: the current one)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://labfleet@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return [*prefix, *args]

    def start(self, timeout: float = 60) -> None:
        data = self.root / "data"
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "initdb"), "-D", str(data), "-U", "labfleet",
                "--auth=trust", "--no-sync", "-E", "UTF8",
            ),
            check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        self.process = subprocess.Popen(
            self._cmd(
                str(self.bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                "-p", str(self.port), "-k", str(self.root), "-c", "fsync=off",
                "-c", "max_connections=50",
            ),
            stdout=open(self.root / "server.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        import psycopg

        while True:
            try:
                psycopg.connect(
                    host="127.0.0.1", port=self.port, user="labfleet", dbname="postgres"
                ).close()
                return
            except psycopg.OperationalError as e:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise PostgresUnavailable(f"PostgreSQL did not start: {e}\n{log}") from e
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: "smart" shutdown is enough for a test DB
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(port: int) -> PostgresServer:
    bin_dir = find_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="labfleet-pg-"))
    user = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise PostgresUnavailable(
                "running as root and there is no 'postgres' system user to run the server as"
            ) from None
        os.chown(root, entry.pw_uid, entry.pw_gid)
        user = "postgres"
    server = PostgresServer(bin_dir, root, port, user)
    server.start()
    return server
