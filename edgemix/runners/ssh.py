"""SSH runner (Jetson, any Linux box): the OpenSSH client as a subprocess, no Python SSH library.

The system client is what users already configure (ProxyJump, agents, keys) and it classifies
failures in words we can read back. Every call is non-interactive (BatchMode=yes: a missing key
fails instead of prompting), bounded (ConnectTimeout, ServerAlive* for a link that dies mid-run,
and a subprocess timeout on every step) and records host keys in a known_hosts file edgemix
controls (StrictHostKeyChecking=accept-new: first contact is trusted, a changed key is refused).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgemix.errors import DeviceError, ToolchainError
from edgemix.runners.protocol import (DEVICE_SCRIPT, Artifact, Runner, Settings, device_args, finish_script,
                                      parse_device_output, parse_probe, probe_script, sha256_file)

DEFAULT_KNOWN_HOSTS = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "edgemix" / "known_hosts"

# ssh exits 255 for its own failures and prints one of these (OpenSSH ssh.c / sshconnect.c wording).
SSH_FAILURES = [
    (r"Could not resolve hostname|Name or service not known|Temporary failure in name resolution|"
     r"nodename nor servname", "DNS",
     "could not resolve the host name", "check the spelling of --host, or use an IP address"),
    (r"Connection refused", "connection refused",
     "nothing accepts SSH connections on that port", "is sshd running on the device, and is --port right?"),
    (r"Connection timed out|Operation timed out|timed out during banner exchange", "timeout",
     "the device did not answer in time", "is the device on and on this network?"),
    (r"Permission denied|Too many authentication failures", "authentication",
     "the device refused the login", "check the user name and --identity (its public key must be in the "
     "device's ~/.ssh/authorized_keys)"),
    (r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED", "host key mismatch",
     "the device's host key differs from the recorded one", "if the device was reinstalled, remove its line "
     "from the known_hosts file named above"),
    (r"No route to host|Network is unreachable", "network unreachable",
     "no network route to the device", "check the network / VPN"),
    (r"Connection closed|Connection reset|Broken pipe|kex_exchange_identification", "connection closed",
     "the connection was dropped", "the device may have rebooted or rejected the client; retry"),
]


def classify_ssh_error(stderr: str, endpoint: str, what: str, known_hosts: Path | None = None) -> DeviceError:
    """ssh exit 255 + its stderr -> a DeviceError naming what failed (DNS, refused, timeout, auth ...)."""
    text = stderr.strip()
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no message from ssh").strip()
    last = last[len("ssh: "):] if last.startswith("ssh: ") else last
    for pattern, kind, meaning, hint in SSH_FAILURES:
        if re.search(pattern, text, re.I):
            if kind == "host key mismatch" and known_hosts:
                hint = hint.replace("the known_hosts file named above", str(known_hosts))
            return DeviceError(f"{kind}: {meaning} (while {what}, {endpoint}; ssh said: {last})", hint=hint)
    return DeviceError(f"ssh failed while {what} ({endpoint}): {last}")


# [USER@]HOST: a name, an IPv4 address or a bracketed IPv6 address; nothing that ssh could read as
# an option (a leading "-") or that a shell would split (spaces, quotes, ";").
_DESTINATION = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._+-]*@)?(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.%a-z]+\])")


def check_destination(host: str, port: int) -> None:
    from edgemix.errors import UsageError

    if not _DESTINATION.fullmatch(host or ""):
        raise UsageError(f"--host {host!r} is not [USER@]HOST",
                         hint="e.g. --host nvidia@orin.local or --host ubuntu@192.168.1.20; a host name cannot "
                              "start with '-' or hold spaces")
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port (1..65535)", hint="sshd listens on 22 unless told otherwise")


class SshRunner(Runner):
    """One authenticated master connection per bench (ControlMaster), reused by every step: a
    handshake costs 0.3-1 s on a Jetson (0.7 s on this 2-core host), and a bench takes a dozen steps."""

    kind = "ssh"
    resumable = True  # `cat >> part` appends from where a dropped copy stopped

    def __init__(self, host: str, port: int = 22, identity: Path | None = None, python: str = "python3",
                 known_hosts: Path | None = None, connect_timeout: int = 10, remote_dir: str = "/tmp/edgemix",
                 ssh_config: str | None = None, ssh: str = "ssh", timeout_s: float = 300):
        self.host, self.port, self.identity, self.python = host, port, identity, python
        self.known_hosts = Path(known_hosts) if known_hosts else DEFAULT_KNOWN_HOSTS
        self.connect_timeout, self.remote_dir, self.ssh_config, self.ssh = connect_timeout, remote_dir, ssh_config, ssh
        self.endpoint = f"{host}:{port}"
        self.copy_timeout = timeout_s
        self._facts: dict = {}
        self._control: str | None = None  # folder of the master's socket while it runs

    def base_command(self) -> list[str]:
        cmd = [self.ssh, "-T", "-p", str(self.port)]
        if self.ssh_config:  # tests pass os.devnull so a user's ~/.ssh/config cannot change the run
            cmd += ["-F", self.ssh_config]
        if self.identity:
            cmd += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        for opt in ("BatchMode=yes", f"ConnectTimeout={self.connect_timeout}", "StrictHostKeyChecking=accept-new",
                    f"UserKnownHostsFile={self.known_hosts}", "ServerAliveInterval=5", "ServerAliveCountMax=3",
                    "LogLevel=ERROR"):
            cmd += ["-o", opt]
        if self._control:  # reuse the master; if it died, ssh falls back to a connection of its own
            cmd += ["-o", f"ControlPath={self._control}/%C", "-o", "ControlMaster=no"]
        return cmd + self.destination()

    def destination(self) -> list[str]:
        """"--" first: nothing from --host (or, after it, the remote command) is read as an ssh option."""
        return ["--", self.host]

    def _ssh(self, remote: str, what: str, timeout: float, stdin=None) -> subprocess.CompletedProcess:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        try:
            p = subprocess.run(self.base_command() + [remote], stdin=stdin, capture_output=True, text=True,
                               timeout=timeout)
        except FileNotFoundError:
            raise ToolchainError(f"the OpenSSH client '{self.ssh}' is not installed",
                                 hint="apt-get install openssh-client") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"timeout: {what} ({self.endpoint}) took longer than {timeout:.0f} s",
                              hint="raise the target's runner.timeout_s or pass --timeout") from None
        if p.returncode == 255:
            raise classify_ssh_error(p.stderr, self.endpoint, what, self.known_hosts)
        if p.returncode == 127:
            missing = re.search(r"([\w./-]+): (?:command )?not found", p.stderr)
            name = missing.group(1) if missing else shlex.split(remote)[0]
            hint = ("pass --python with the device's interpreter (it needs numpy and a runtime)"
                    if name == self.python else "install it on the device (coreutils)")
            raise DeviceError(f"missing binary on {self.endpoint}: '{name}' was not found (while {what})", hint=hint)
        return p

    # ---------------------------------------------------------------- the protocol's steps
    def check(self) -> None:
        self._start_master()
        # the tools the protocol needs, checked before anything is copied
        probe = (f"echo edgemix-ok; uname -sm; for b in {shlex.quote(self.python)} sha256sum; do "
                 "command -v \"$b\" >/dev/null 2>&1 || echo \"edgemix-missing $b\"; done")
        p = self._ssh(probe, "connecting", self.connect_timeout + 20)
        if "edgemix-ok" not in p.stdout:
            raise DeviceError(f"unexpected answer from {self.endpoint}: {(p.stdout + p.stderr).strip()[:200]!r}")
        missing = re.findall(r"^edgemix-missing (.+)$", p.stdout, re.M)
        if missing:
            hint = ("pass --python with the device's interpreter (it needs numpy and a runtime)"
                    if self.python in missing else "install coreutils on the device")
            raise DeviceError(f"missing binary on {self.endpoint}: {', '.join(missing)} not found", hint=hint)
        self._facts = {"uname": p.stdout.split("edgemix-ok", 1)[1].strip().splitlines()[0]}

    def _start_master(self) -> None:
        """`ssh -M -N -f`: authenticates, then backgrounds. Its stderr goes to a file, not a pipe,
        because the backgrounded master keeps the descriptor open and a pipe would never reach EOF."""
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        control = tempfile.mkdtemp(prefix="emx-ssh-")  # short: unix socket paths are limited to ~100 bytes
        cmd = self.base_command()[:-2] + ["-M", "-N", "-f", "-o", f"ControlPath={control}/%C",
                                           "-o", f"ControlPersist={int(self.connect_timeout) + 50}",
                                           *self.destination()]
        with tempfile.TemporaryFile(mode="w+") as err:
            try:
                p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                   timeout=self.connect_timeout + 20)
            except FileNotFoundError:
                shutil.rmtree(control, ignore_errors=True)
                raise ToolchainError(f"the OpenSSH client '{self.ssh}' is not installed",
                                     hint="apt-get install openssh-client") from None
            except subprocess.TimeoutExpired:
                shutil.rmtree(control, ignore_errors=True)
                raise DeviceError(f"timeout: connecting to {self.endpoint} took longer than "
                                  f"{self.connect_timeout + 20} s") from None
            err.seek(0)
            if p.returncode != 0:
                shutil.rmtree(control, ignore_errors=True)
                raise classify_ssh_error(err.read(), self.endpoint, "connecting", self.known_hosts)
        self._control = control

    def close(self) -> None:
        if self._control:
            subprocess.run(self.base_command()[:-2] + ["-O", "exit", *self.destination()], capture_output=True, timeout=20)
            shutil.rmtree(self._control, ignore_errors=True)
            self._control = None

    def host_facts(self) -> dict:
        return {"ssh": {"host": self.host, "port": self.port, **self._facts}}

    def payload(self, art: Artifact, settings: Settings, workdir: Path) -> list[tuple[Path, str, str]]:
        files = [(DEVICE_SCRIPT, DEVICE_SCRIPT.name, sha256_file(DEVICE_SCRIPT))]
        for role, path in art.paths.items():
            files.append((path, f"{art.folder.name}/{path.name}", art.sha256[role]))
        return files

    def probe(self, remote_dir: str, final: str, part: str) -> tuple[str | None, int]:
        p = self._ssh(probe_script(remote_dir, final, part), f"checking {final}", self.connect_timeout + 60)
        if p.returncode != 0:
            raise DeviceError(f"cannot write to {remote_dir} on {self.endpoint}: {p.stderr.strip()[:200]}",
                              hint="pass --remote-dir with a writable folder")
        return parse_probe(p.stdout)

    def send(self, local: Path, part: str, offset: int) -> int:
        redirect = ">>" if offset else ">"  # offset 0 starts the temp file afresh
        size = local.stat().st_size
        with open(local, "rb", buffering=0) as f:
            os.lseek(f.fileno(), offset, os.SEEK_SET)  # ssh reads the file descriptor from here on
            # the copy's own timeout: the runner's, at least 60 s + 1 s per MB for slow links
            timeout = max(self.copy_timeout, 60 + (size - offset) / 1e6)
            try:
                p = self._ssh(f"cat {redirect} {shlex.quote(part)}", f"copying {local.name}", timeout, stdin=f)
            except DeviceError as e:  # the link dropped mid-copy: what arrived stays for the next run
                e.message += f"; the bytes that arrived are kept as {part} and the next run resumes from them"
                raise
        if p.returncode != 0:
            raise DeviceError(f"copying {local.name} to {self.endpoint} failed: {p.stderr.strip()[:200]}")
        return size - offset

    def finish(self, part: str, final: str, sha256: str) -> tuple[bool, str]:
        p = self._ssh(finish_script(part, final, sha256), f"verifying {final}", self.connect_timeout + 120)
        out = p.stdout.strip()
        return out.endswith("ok"), out.replace("mismatch", "").strip()

    def cleanup(self, folders: list[str]) -> None:
        if folders:
            globs = " ".join(f"{shlex.quote(d)}/.*.part-*" for d in folders)
            self._ssh(f"rm -f {globs}", "removing stale partial copies", self.connect_timeout + 30)

    def execute(self, art: Artifact, settings: Settings) -> dict:
        d = settings.remote_dir
        ref = f"{d}/{art.folder.name}/{art.paths['reference_io'].name}" if "reference_io" in art.paths else None
        args = device_args(art, settings, f"{d}/{art.folder.name}/{art.model.name}", ref, f"{d}/engines")
        remote = " ".join(shlex.quote(a) for a in [self.python, f"{d}/{DEVICE_SCRIPT.name}", *args])
        p = self._ssh(remote, "running the benchmark", settings.timeout_s)
        return parse_device_output(p.stdout, p.stderr, p.returncode, self.endpoint, self.python)
