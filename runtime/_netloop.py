"""One network thread for the MQTT connections of many agents in one process.

paho's `loop_start` gives every client its own thread, which wakes at least once a second and on
every publish. A gateway or a simulator running hundreds of agents in one process pays for that in
context switches; `NetworkLoop` drives all their sockets from one thread with one `selectors`
selector through paho's external-loop API (`loop_read`, `loop_write`, `loop_misc` and the
socket callbacks), and reconnects dropped clients with the same backoff paho's own loop uses.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NetworkLoop"]

log = logging.getLogger("edgefleet.agent")

# How often each client's keepalive is checked. paho's own loop checks every second; a PINGREQ only
# has to go out within the keepalive (the broker waits 1.5 times that), so a few seconds late is fine.
_MISC_EVERY_S = 2.0
_SCAN_EVERY_S = 0.5


@dataclass(eq=False)
class _Entry:
    client: Any
    name: str
    min_delay: float
    max_delay: float
    leaving: bool = False  # its owner disconnected it: it must stay closed
    misc_at: float = 0.0
    retry_at: float = 0.0
    backoff: float = 0.0
    removed: bool = False
    sock: Any = None
    closed: threading.Event = field(default_factory=threading.Event)


class NetworkLoop:
    """Drives the network traffic of many paho clients from one thread.

    `add(client)` after `connect_async`: the loop opens the connection, and reopens it after a loss
    (backoff from RECONNECT_DELAY, doubling). `disconnect(client)` then `remove(client)`: the DISCONNECT
    is written, then the client is forgotten. Only paho's public API is used.
    """

    def __init__(self, name: str = "edgefleet-mqtt") -> None:
        self._sel = selectors.DefaultSelector()
        self._lock = threading.RLock()
        self._entries: dict[int, _Entry] = {}
        self._dirty: set[int] = set()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._scan_now = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------

    def add(self, client: Any, *, name: str = "?", reconnect_delay: tuple[float, float] = (1.0, 30.0)) -> None:
        """Take over CLIENT's network traffic; it must have been set up with `connect_async`. NAME: what
        logs call it."""
        entry = _Entry(client, name, *reconnect_delay)
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        with self._lock:
            self._entries[id(client)] = entry
            self._scan_now = True
        self._wake()

    def disconnect(self, client: Any) -> None:
        """Disconnect CLIENT for good (`client.disconnect()` alone would be reconnected by the loop)."""
        with self._lock:
            entry = self._entries.get(id(client))
            if entry is not None:
                entry.leaving = True
        client.disconnect()

    def remove(self, client: Any, timeout: float = 2.0) -> None:
        """Stop driving CLIENT: wait up to TIMEOUT for its socket to close (a `disconnect()` before
        this call gets its DISCONNECT written), then close it if still open."""
        with self._lock:
            entry = self._entries.get(id(client))
            if entry is None:
                return
            entry.removed = True
            open_ = entry.sock is not None
        if open_ and threading.current_thread() is not self._thread:
            self._wake()
            entry.closed.wait(timeout)
        with self._lock:
            self._entries.pop(id(client), None)
            sock = entry.sock
            if sock is not None:
                self._unregister(sock)
                entry.sock = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (clients still added are left as they are)."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- paho's socket callbacks (the socket is always the client's current one) -----------------

    def _on_open(self, client: Any, userdata: Any, sock: Any) -> None:
        with self._lock:
            entry = self._entries.get(id(client))
            if entry is None:
                return
            entry.sock = sock
            entry.closed.clear()
            self._sel.register(sock, selectors.EVENT_READ, entry)

    def _on_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # Called right before paho closes SOCK: it must leave the selector first.
        with self._lock:
            self._unregister(sock)
            entry = self._entries.get(id(client))
            if entry is not None and entry.sock is sock:
                entry.sock = None
                entry.retry_at = time.monotonic() + entry.backoff
                entry.closed.set()

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._mark(client)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._mark(client)

    # -- internals ------------------------------------------------------------------------------

    def _mark(self, client: Any) -> None:
        if threading.current_thread() is self._thread:
            with self._lock:
                self._dirty.add(id(client))
            return
        with self._lock:
            first = not self._dirty
            self._dirty.add(id(client))
        if first:
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or closed

    def _unregister(self, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def _apply_dirty(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            for key in dirty:
                entry = self._entries.get(key)
                if entry is None or entry.sock is None:
                    continue
                events = selectors.EVENT_READ
                if entry.client.want_write():
                    events |= selectors.EVENT_WRITE
                try:
                    self._sel.modify(entry.sock, events, entry)
                except (KeyError, ValueError, OSError):
                    pass

    def _run(self) -> None:
        scan_at = 0.0
        while not self._stop.is_set():
            self._apply_dirty()
            now = time.monotonic()
            try:
                ready = self._sel.select(max(0.0, min(_SCAN_EVERY_S, scan_at - now)))
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                raise
            for key, mask in ready:
                entry = key.data
                if entry is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                self._serve(entry, mask)
            now = time.monotonic()
            if now >= scan_at or self._scan_now:
                self._scan_now = False
                scan_at = now + _SCAN_EVERY_S
                self._scan(now)

    def _serve(self, entry: _Entry, mask: int) -> None:
        client = entry.client
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
                # TLS keeps decrypted bytes that select() does not see.
                sock = entry.sock
                while sock is not None and hasattr(sock, "pending") and sock.pending():
                    client.loop_read()
                    sock = entry.sock
            if mask & selectors.EVENT_WRITE and entry.sock is not None:
                client.loop_write()
        except Exception:  # one client's failure must not stop the others' traffic
            log.exception("MQTT client %s: network error", entry.name)

    def _scan(self, now: float) -> None:
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            client = entry.client
            if entry.removed:
                continue
            if entry.sock is None:
                if now >= entry.retry_at and not entry.leaving:
                    self._reconnect(entry, now)
                continue
            if client.is_connected():
                entry.backoff = 0.0
            if now >= entry.misc_at:
                entry.misc_at = now + _MISC_EVERY_S
                try:
                    client.loop_misc()
                except Exception:
                    log.exception("MQTT client keepalive failed")

    def _reconnect(self, entry: _Entry, now: float) -> None:
        client = entry.client
        entry.backoff = min(entry.max_delay, max(entry.min_delay, entry.backoff * 2))
        entry.retry_at = now + entry.backoff
        try:
            client.reconnect()
        except (OSError, ValueError) as exc:
            log.info("MQTT connect failed, retrying in %.0f s: %s", entry.backoff, exc)
