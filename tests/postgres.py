"""A throwaway PostgreSQL server for the test session: initdb + pg_ctl on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SUPERUSER = "postgres"
SYSTEM_USER = "postgres"
DEBIAN_ROOT = Path("/usr/lib/postgresql")

# Durability is worthless for a cluster that lives for one test session; these make it fast.
# The time zone is deliberately not UTC, so that code which assumes the server runs in UTC fails here.
SETTINGS = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
jit = off
timezone = 'Asia/Kolkata'
"""


class PostgresError(RuntimeError):
    """The test PostgreSQL server could not be found, started, used or stopped."""


def find_binaries() -> Path:
    """The directory holding initdb and pg_ctl: the newest Debian install, else whatever PATH has."""
    candidates = sorted(
        DEBIAN_ROOT.glob("*/bin"),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.name)],
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl", "createdb", "dropdb")):
            return directory
    raise PostgresError(
        f"no PostgreSQL server binaries (initdb, pg_ctl) in {DEBIAN_ROOT}/*/bin or on PATH: "
        "run `bash scripts/setup.sh --dev` (as root it installs the Debian package `postgresql`)"
    )


def _system_user() -> pwd.struct_passwd:
    """The unprivileged user the server runs as when we are root (PostgreSQL refuses to run as root)."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        # The Debian package creates it; binaries from elsewhere may not have.
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return pwd.getpwnam(SYSTEM_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One cluster in a fresh temp directory, reachable as SUPERUSER over TCP on 127.0.0.1 with a password."""

    def __init__(self, bin_dir: Path, root: Path, owner: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data_dir = root / "data"
        self.log_file = root / "server.log"
        self.owner = owner
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.started = False
        self.startup_s = 0.0
        self._watchdog: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, timeout_s: float = 60.0) -> PostgresServer:
        """initdb + pg_ctl start; raises PostgresError with the server log when it does not come up."""
        began = time.perf_counter()
        bin_dir = find_binaries()
        owner = _system_user() if os.geteuid() == 0 else None
        server = cls(bin_dir, Path(tempfile.mkdtemp(prefix="mycellm-postgres-")), owner)
        try:
            server._watch()
            server._initdb(timeout_s)
            server._start(timeout_s)
        except BaseException:
            with contextlib.suppress(PostgresError):
                server.stop()
            raise
        server.startup_s = time.perf_counter() - began
        return server

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its name."""
        name = name or f"test_{uuid.uuid4().hex[:16]}"
        self._client("createdb", name)
        return name

    def drop_database(self, name: str) -> None:
        # --force: a connection a test forgot to close must not make the drop fail.
        self._client("dropdb", "--force", name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory; safe to call more than once."""
        failure = ""
        try:
            if self.started:
                for mode in ("fast", "immediate"):
                    result = self._run(
                        ["pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30"], 40
                    )
                    if result.returncode == 0:
                        failure = ""
                        break
                    failure += f"pg_ctl stop -m {mode}: {result.stdout}{result.stderr}"
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait(10)
        if failure:
            raise PostgresError(f"cannot stop the test PostgreSQL server: {failure}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no server log: {error})"

    def _watch(self) -> None:
        # A test run killed outright (SIGKILL, SIGTERM, a second Ctrl-C) never reaches stop(): this
        # process outlives it, in its own session, and then stops the server and removes the directory.
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, str(os.getpid()), str(self.bin_dir), str(self.root)]
            + ([] if self.owner is None else [str(self.owner.pw_uid), str(self.owner.pw_gid)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _initdb(self, timeout_s: float) -> None:
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(self.password)
        password_file.chmod(0o600)
        if self.owner is not None:
            os.chown(password_file, self.owner.pw_uid, self.owner.pw_gid)
        result = self._run(
            [
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={password_file}",
                # The socket lives in our 0700 directory; over TCP everyone needs the password.
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout_s,
        )
        password_file.unlink()
        if result.returncode != 0:
            raise PostgresError(f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        with (self.data_dir / "postgresql.conf").open("a") as config:
            config.write(SETTINGS.format(socket_dir=self.root))

    def _start(self, timeout_s: float) -> None:
        for _attempt in range(3):
            # Another process may take the port between the probe and the bind: then try another one.
            self.port = _free_port()
            self.started = True
            result = self._run(
                [
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    f"-p {self.port}",
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                ],
                timeout_s + 10,
            )
            if result.returncode == 0:
                return
            log = self.log_tail()
            if "could not bind" not in log and "could not create any TCP/IP sockets" not in log:
                raise PostgresError(
                    f"the test PostgreSQL server did not start (pg_ctl exit {result.returncode}, "
                    f"waiting at most {timeout_s:.0f} s): {result.stdout}{result.stderr}\n"
                    f"end of the server log:\n{log}"
                )
            self._run(["pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w"], 40)
            self.started = False
        raise PostgresError(f"no free port for the test PostgreSQL server:\n{self.log_tail()}")

    def _client(self, program: str, *arguments: str) -> None:
        result = self._run(
            [program, "-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER, *arguments], 60
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{program} {' '.join(arguments)} failed: {result.stdout}{result.stderr}\n"
                f"server log:\n{self.log_tail()}"
            )

    def _run(self, command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        environment |= {"LC_ALL": "C", "HOME": str(self.root)}
        try:
            return subprocess.run(
                [str(self.bin_dir / command[0]), *command[1:]],
                cwd=self.root,
                env=environment,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                user=None if self.owner is None else self.owner.pw_uid,
                group=None if self.owner is None else self.owner.pw_gid,
                extra_groups=None if self.owner is None else [],
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PostgresError(f"{command[0]} failed: {error}\nserver log:\n{self.log_tail()}") from error


def _clean_up_after(parent: int, bin_dir: Path, root: Path, owner: tuple[int, int] | None) -> None:
    """The watchdog: wait for the test process to end, then stop its server if it is still there."""
    while os.getppid() == parent and root.exists():
        time.sleep(1)
    if (root / "data" / "postmaster.pid").exists():
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "stop", "-D", str(root / "data"), "-m", "immediate", "-w"],
            cwd=root,
            capture_output=True,
            timeout=60,
            check=False,
            user=None if owner is None else owner[0],
            group=None if owner is None else owner[1],
            extra_groups=None if owner is None else [],
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    _parent, _bin_dir, _root, *_owner = sys.argv[1:]
    _clean_up_after(
        int(_parent), Path(_bin_dir), Path(_root), (int(_owner[0]), int(_owner[1])) if _owner else None
    )
