"""Where the server's MQTT clients connect: the embedded Mosquitto or an external broker by URL."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet import InputError

__all__ = ["BrokerEndpoint"]

_SCHEMES = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerEndpoint:
    """Host, port, TLS and credentials of one broker, as the server's paho clients use them."""

    host: str
    port: int
    tls: bool = False
    ca: str | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(
        cls, url: str, *, ca: str | None = None, username: str | None = None, password: str | None = None
    ) -> BrokerEndpoint:
        """`mqtt://[USER[:PASSWORD]@]HOST[:PORT]` or `mqtts://...` (TLS; CA file, else the system's CAs).

        Credentials given as arguments win over those in the URL; a password may also come from the
        environment variable EDGEFLEET_BROKER_PASSWORD, so it need not appear in a process list.
        """
        u = urllib.parse.urlsplit(url)
        if u.scheme not in _SCHEMES:
            raise InputError(f"broker {url!r} is not valid: use 'embedded', mqtt://HOST:PORT or mqtts://HOST:PORT")
        try:
            port = u.port or _SCHEMES[u.scheme]
        except ValueError as exc:
            raise InputError(f"broker {url!r} has an invalid port: use mqtts://HOST:PORT") from exc
        if not u.hostname:
            raise InputError(f"broker {url!r} names no host: use mqtts://HOST:PORT")
        tls = u.scheme == "mqtts"
        if ca is not None:
            if not tls:
                raise InputError("--broker-ca is for a TLS broker: use an mqtts:// URL")
            if not Path(ca).is_file():
                raise InputError(f"broker CA file {ca} does not exist")
        user = username or (urllib.parse.unquote(u.username) if u.username else None)
        pw = password or (urllib.parse.unquote(u.password) if u.password else None)
        pw = pw or os.environ.get("EDGEFLEET_BROKER_PASSWORD") or None
        return cls(u.hostname, port, tls, str(Path(ca).resolve()) if ca else None, user, pw)

    def configure(self, client: Any) -> None:
        """Apply credentials and TLS to a paho client before it connects."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(ca_certs=self.ca)

    def url(self) -> str:
        """The URL without credentials, for logs and the device configs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"
