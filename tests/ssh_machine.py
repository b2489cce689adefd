"""A machine to `ray up` against: this one, reached over ssh on a loopback address.

Ray's cluster launcher reaches machines over ssh and runs `ray stop` on them, which stops every Ray
process it can see. So the machine is an sshd in PID and mount namespaces of its own: its `ray stop`
sees only what it started, its /tmp (Ray's session files) is its own, and root's home is an
overlay whose writes land in a temporary directory (the node's identity, database and logs, the
copy of the checkout). It shares the network, so ports it opens are on this machine's loopback.
Killing the namespace's first process ends everything started in it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
UNSHARE = (
    "unshare",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
    "--mount",
    "--propagation",
    "private",
)

_SSHD_CONFIG = """\
ListenAddress {address}:22
HostKey /etc/ssh/host_key
PidFile none
AuthorizedKeysFile /etc/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
# One machine, so Ray's processes use the loopback address as the machine's (its head may start;
# a second machine's `ray start --address` would refuse).
SetEnv RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
"""

# Run as the namespaces' first process: sshd reads /etc/ssh (bound from the test's directory) for
# every connection, so its files are bound before /tmp is replaced.
_INIT = """\
set -e
mount -t overlay overlay -o lowerdir={home},upperdir={upper},workdir={work} {home}
rm -rf {home}/.ray {home}/.mycellm {home}/mycellm
mount --bind {sshd_dir} /etc/ssh
mount --bind {tmp} /tmp
exec {sshd} -D -e
"""


def missing_tools() -> list[str]:
    """What this machine lacks to play one (scripts/setup.sh --dev installs it)."""
    tools = [str(SSHD)] if not SSHD.exists() else []
    return tools + [tool for tool in ("ssh", "ssh-keygen", "rsync", "unshare") if shutil.which(tool) is None]


def _free_ssh_address() -> str:
    """A loopback address whose port 22 nothing listens on."""
    for last in range(1, 255):
        address = f"127.0.0.{last}"
        with socket.socket() as probe:
            try:
                probe.bind((address, 22))
            except OSError:
                continue
            return address
    raise RuntimeError("port 22 is taken on every 127.0.0.x address")


@dataclass
class SshMachine:
    address: str
    key: Path  # the private key root logs in with
    upper: Path  # what was written under root's home on the machine
    process: subprocess.Popen[bytes]

    def running(self) -> list[str]:
        """The command lines of what runs on the machine besides its sshd (zombies left out)."""
        try:
            namespace = os.stat(f"/proc/{self.process.pid}/ns/pid").st_ino
        except OSError:
            return []
        if namespace == os.stat("/proc/self/ns/pid").st_ino:  # not in its namespace yet
            return []
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if os.stat(entry / "ns" / "pid").st_ino != namespace:
                    continue
                command = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                )
            except OSError:
                continue
            if command and not command.startswith(f"{SSHD} -D"):
                found.append(command)
        return found

    def stop(self) -> None:
        """End the machine: its first process dies, and the kernel kills the rest of the namespace."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


def start_machine(directory: Path) -> SshMachine:
    for name in ("sshd", "upper", "work", "tmp"):
        (directory / name).mkdir(parents=True)
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    sshd_dir = directory / "sshd"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_dir / "host_key")], check=True
    )
    shutil.copy(key.with_suffix(".pub"), sshd_dir / "authorized_keys")
    address = _free_ssh_address()
    (sshd_dir / "sshd_config").write_text(_SSHD_CONFIG.format(address=address))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    init = _INIT.format(
        home=pwd.getpwuid(0).pw_dir,
        upper=directory / "upper",
        work=directory / "work",
        sshd_dir=sshd_dir,
        tmp=directory / "tmp",
        sshd=SSHD,
    )
    with (directory / "sshd.log").open("wb") as log:  # the child keeps its own copy
        process = subprocess.Popen(
            [*UNSHARE, "bash", "-c", init], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    machine = SshMachine(address=address, key=key, upper=directory / "upper", process=process)
    deadline = time.monotonic() + 30
    while b"Server listening" not in (directory / "sshd.log").read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            machine.stop()
            raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()}")
        time.sleep(0.1)
    return machine
