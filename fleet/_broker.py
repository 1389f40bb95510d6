"""The embedded broker: a supervised Mosquitto with a generated configuration.

Anonymous access is off; every device has its own password, and the ACL lets a device publish and
subscribe only under `edgefleet/v1/devices/<its id>/`. Devices connect to the public listener, where
a client's id is replaced by its username (`use_username_as_clientid`): a device's credentials cannot
take over another device's session, nor a server client's. The server's own clients connect to a second
listener on loopback that only the server user may use (its own password and ACL files); there it may
read and write the whole tree (and subscribe through `$share/...` for ingest workers).

With an external broker the same password and ACL files are kept (for a Mosquitto you run yourself
to read) and a reload command of your choice runs after every change instead of SIGHUP.
"""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from edgefleet import EdgefleetError
from edgefleet._fs import atomic_write, fsync_dir
from edgefleet.protocol import ROOT, check_device_id

__all__ = ["SERVER_USER", "Broker"]

log = logging.getLogger("edgefleet.fleet")

SERVER_USER = "edgefleet-server"
_PASSWD_LOCK = threading.Lock()


def _mosquitto() -> str:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise EdgefleetError("mosquitto is not installed: apt-get install mosquitto (or use --broker mqtt://HOST:PORT)")
    return exe


def _raise_fd_limit() -> None:
    """In the broker's process before it starts: one file descriptor per connected device, and the usual
    soft limit (1024) would refuse the thousand-and-first; raise it to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Broker:
    def __init__(
        self,
        directory: Path,
        port: int,
        host: str = "0.0.0.0",
        reload_command: str | None = None,
        *,
        embedded: bool = False,
        server_port: int | None = None,
        tls: tuple[Path, Path, Path | None] | None = None,
    ) -> None:
        """EMBEDDED: this broker is the server's own (`start` runs it), and the server user lives only in
        the server listener's password file, on SERVER_PORT (loopback). Otherwise (an external broker) it
        is also kept in the devices' password file, for a broker with one listener."""
        self.dir = directory
        self.embedded = embedded
        self.server_port = server_port
        self.tls = tls  # (cert, key, CA or None) for the devices' listener
        self.reload_command = reload_command
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.host = host
        self.passwd = self.dir / "passwd"
        self.acl = self.dir / "acl"
        self.server_passwd = self.dir / "server-passwd"
        self.server_acl = self.dir / "server-acl"
        self.conf = self.dir / "mosquitto.conf"
        self.pidfile = self.dir / "mosquitto.pid"
        self._reload_lock = threading.Lock()
        self._reload_at = 0.0
        self._reloader: threading.Thread | None = None
        self._reload_done = threading.Event()
        secret = self.dir / "server.secret"
        if not secret.exists():
            atomic_write(secret, secrets.token_urlsafe(24).encode(), mode=0o600)
        self.server_password = secret.read_text().strip()
        for f in (self.passwd, self.server_passwd):
            if not f.exists():
                f.touch(mode=0o600)
        self._edit_passwd([["-b", SERVER_USER, self.server_password]], path=self.server_passwd, reload=False)
        if embedded:
            self._edit_passwd([["-D", SERVER_USER]], check=False, reload=False)  # from before the split
        else:
            self._edit_passwd([["-b", SERVER_USER, self.server_password]], reload=False)
        self._write_acl()
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def _write_acl(self) -> None:
        server = f"user {SERVER_USER}\ntopic readwrite {ROOT}/#\n"
        atomic_write(self.server_acl, server.encode(), mode=0o600)
        # %u is the username, which is the device id: a device sees only its own prefix.
        text = (
            f"{'' if self.embedded else server}\n"
            f"pattern write {ROOT}/devices/%u/status\n"
            f"pattern write {ROOT}/devices/%u/state\n"
            f"pattern write {ROOT}/devices/%u/telemetry\n"
            f"pattern write {ROOT}/devices/%u/events\n"
            f"pattern read {ROOT}/devices/%u/desired\n"
            f"pattern read {ROOT}/devices/%u/commands\n"
            f"pattern read {ROOT}/devices/%u/refusals\n"
        )
        atomic_write(self.acl, text.encode(), mode=0o600)

    def listener_lines(self, port: int | str, server_port: int | str, host: str = "", server_host: str = "") -> str:
        """The two listeners: devices (client id = username) and the server's clients."""
        tls = ""
        if self.tls is not None:
            cert, key, ca = self.tls
            tls = f"certfile {Path(cert).resolve()}\nkeyfile {Path(key).resolve()}\n"
            tls += f"cafile {Path(ca).resolve()}\n" if ca else ""
        return (
            "per_listener_settings true\n"
            f"listener {port}{' ' + host if host else ''}\n"
            f"{tls}"
            "allow_anonymous false\n"
            "use_username_as_clientid true\n"
            f"password_file {self.passwd.resolve()}\n"
            f"acl_file {self.acl.resolve()}\n"
            f"listener {server_port}{' ' + server_host if server_host else ''}\n"
            "allow_anonymous false\n"
            f"password_file {self.server_passwd.resolve()}\n"
            f"acl_file {self.server_acl.resolve()}\n"
        )

    def _write_conf(self) -> None:
        assert self.server_port is not None
        text = (
            f"user {getpass.getuser()}\n"
            f"pid_file {self.pidfile}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            "log_type error\nlog_type warning\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
        ) + self.listener_lines(self.port, self.server_port, self.host, "127.0.0.1")
        atomic_write(self.conf, text.encode())

    def set_password(self, user: str, password: str) -> threading.Event:
        """Give USER this password; the returned event is set once the broker has been told to reload."""
        return self.set_passwords({user: password})

    def set_passwords(self, users: dict[str, str]) -> threading.Event:
        for user in users:
            if user == SERVER_USER:
                raise EdgefleetError(f"{SERVER_USER} is the fleet server's own user, not a device")
            check_device_id(user)
        return self._edit_passwd([["-b", u, pw] for u, pw in users.items()])

    def remove_user(self, user: str) -> threading.Event:
        return self._edit_passwd([["-D", user]], check=False)

    def _edit_passwd(
        self, edits: list[list[str]], check: bool = True, path: Path | None = None, reload: bool = True
    ) -> threading.Event:
        # mosquitto_passwd rewrites the file in place; a reload (SIGHUP) that reads it half-written drops,
        # and disconnects, every device past that point. Edit a copy and rename it over the file instead.
        path = path or self.passwd
        with _PASSWD_LOCK:
            tmp = path.with_name(path.name + ".tmp")
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o600)
            for args in edits:
                subprocess.run(["mosquitto_passwd", args[0], str(tmp), *args[1:]], check=check, capture_output=True)
            os.replace(tmp, path)
            fsync_dir(self.dir)
        if not reload:
            done = threading.Event()
            done.set()
            return done
        return self.reload_soon()

    def reload_soon(self, delay: float = 0.2) -> threading.Event:
        """Reload once, DELAY after the last of a burst of changes; the event is set after that reload.

        Mosquitto 2.0 stopped accepting new connections after hundreds of SIGHUPs in quick succession
        while refused clients retried (registering 300 devices one by one), so bursts are coalesced."""
        with self._reload_lock:
            self._reload_at = time.monotonic() + delay
            done = self._reload_done
            if self._reloader is None or not self._reloader.is_alive():
                self._reloader = threading.Thread(
                    target=self._reload_later, name="edgefleet-broker-reload", daemon=True
                )
                self._reloader.start()
        return done

    def _reload_later(self) -> None:
        while True:
            with self._reload_lock:
                wait = self._reload_at - time.monotonic()
                if wait <= 0:
                    done, self._reload_done = self._reload_done, threading.Event()
                    self._reloader = None
                    break
            time.sleep(wait)
        self.reload()
        time.sleep(0.1)  # SIGHUP is handled asynchronously; give the broker a moment to re-read
        done.set()

    def reload(self) -> None:
        """Make a running broker re-read passwords and ACLs (SIGHUP, or the external reload command)."""
        if self.reload_command:
            try:
                r = subprocess.run(self.reload_command, shell=True, capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                log.error("broker reload command timed out after 60 s: %s", self.reload_command)
                return
            if r.returncode != 0:
                err = (r.stderr or r.stdout).strip().splitlines()
                log.error("broker reload command failed (exit %d): %s", r.returncode, err[-1] if err else "")
            return
        if self.pidfile.exists():
            try:
                os.kill(int(self.pidfile.read_text().strip()), signal.SIGHUP)
            except (ValueError, ProcessLookupError, PermissionError):
                pass

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            [_mosquitto(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_raise_fd_limit,
        )

    def start(self, timeout: float = 10.0) -> None:
        import socket

        self._write_conf()
        self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.dir / "mosquitto.log").read_text()[-500:] if (self.dir / "mosquitto.log").exists() else ""
                raise EdgefleetError(f"mosquitto exited at start (port {self.port} in use?): {log.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise EdgefleetError(f"mosquitto did not listen on port {self.port} within {timeout} s")
        self._thread = threading.Thread(target=self._supervise, name="edgefleet-broker", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            if self.proc is not None and self.proc.poll() is not None:
                self.restarts += 1
                time.sleep(min(5.0, 0.5 * self.restarts))
                if not self._stop.is_set():
                    self._spawn()

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
