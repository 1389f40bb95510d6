"""A device written from docs/topics.md, docs/bundle-format.md and docs/device-agent.md alone: the standard
library, paho-mqtt and cryptography (Ed25519), and nothing of edgefleet (tests/test_independent_device.py
checks this file's imports). It plays a device maker's own agent: it reads the device.toml that `fleet
provision` wrote, reports status and state, sends telemetry windows for the bundle it runs, and takes an
update the fleet orders: download with its token, check size and sha256, verify the bundle (signature by a
trusted key, every member's hash), switch, and report the outcome with the documented events."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import threading
import time
import tomllib
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ROOT = "edgefleet/v1"
# docs/topics.md: inner latency edges 10^(k/10) ms for k = -20..40, so 62 bins.
LATENCY_EDGES_MS = [10 ** (k / 10) for k in range(-20, 41)]


def canonical(obj: Any) -> bytes:
    # docs/bundle-format.md "Canonical JSON": sorted keys, no whitespace, UTF-8, shortest floats.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def split(total: int, proportions: list[float]) -> list[int]:
    """TOTAL counts in proportion (largest remainder): a histogram on the baseline's bins."""
    s = sum(proportions) or 1.0
    raw = [total * p / s for p in proportions]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


class IndieDevice:
    def __init__(self, config: Path) -> None:
        self.dir = config.parent
        self.cfg = tomllib.loads(config.read_text())
        self.id: str = self.cfg["device_id"]
        self.keys = [self._public_key(self.dir / k) for k in self.cfg["trusted_keys"]]
        self.active: dict[str, Any] | None = None  # {"name", "version", "sha256"} and its manifest
        self.manifest: dict[str, Any] = {}
        self.update_state = "idle"
        self.rollout: str | None = None
        self.refusals: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        m = self.cfg["mqtt"]
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(m["username"], m["password"])
        # the last will: the broker says offline for a device that vanishes
        self.client.will_set(self.topic("status"), json.dumps(self._status(False)), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.host, self.port = m["host"], int(m["port"])

    # -- the contract --------------------------------------------------------------------------------
    def topic(self, kind: str) -> str:
        return f"{ROOT}/devices/{self.id}/{kind}"

    def _status(self, online: bool) -> dict[str, Any]:
        return {"schema": "edgefleet.status/1", "device_id": self.id, "online": online, "ts": time.time()}

    def state(self) -> dict[str, Any]:
        active = None
        if self.active is not None:
            model = self.manifest["models"][0]
            active = {"bundle": self.active["name"], "version": self.active["version"], "model_id": model["id"],
                      "backend": "indie", "accelerator": "cpu", "fallbacks": []}  # fmt: skip
        return {
            "schema": "edgefleet.state/1",
            "device_id": self.id,
            "agent_version": "indie-0.1",
            "tags": [],
            "active": active,
            "committed": self.active,
            "staged": None,
            "update": {"state": self.update_state, "rollout": self.rollout, "last_result": None, "refused": {}},
            "ts": time.time(),
        }

    def named(self) -> dict[str, Any]:
        assert self.active is not None
        return {"name": self.active["name"], "version": self.active["version"]}

    def publish(self, kind: str, doc: dict[str, Any], retain: bool = False) -> None:
        self.client.publish(self.topic(kind), json.dumps(doc), qos=1, retain=retain).wait_for_publish(10)

    def event(self, typ: str, **fields: Any) -> None:
        ev = {"schema": "edgefleet.event/1", "key": f"{self.id}:ev:{secrets.token_hex(8)}", "device_id": self.id,
              "type": typ, "ts": time.time(), **fields}  # fmt: skip
        with self.lock:
            self.events.append(ev)
        self.publish("events", ev)

    def window(self, calls: int, *, bins_off: bool = False) -> dict[str, Any]:
        """One telemetry window of CALLS predictions that look like the bundle's baseline."""
        assert self.active is not None
        base = self.manifest["drift_baseline"]
        now = time.time()
        latency = [0] * (len(LATENCY_EDGES_MS) + 1)
        latency[next(i for i, e in enumerate(LATENCY_EDGES_MS) if e > 0.5)] = calls  # about 0.5 ms each
        inputs = {f["name"]: split(calls, f["proportions"]) for f in base["inputs"]}
        if bins_off:
            name = next(iter(inputs))
            inputs[name] = inputs[name][:-1]  # one bin short of the baseline's
        outputs = {k: split(calls, v["proportions"]) for k, v in base["outputs"].items() if isinstance(v, dict)}
        return {
            "schema": "edgefleet.telemetry/1",
            "key": f"{self.id}:{int(now * 1000)}:{secrets.token_hex(6)}",
            "device_id": self.id,
            "bundle": {**self.named(), "model_id": self.manifest["models"][0]["id"]},
            "backend": "indie",
            "accelerator": "cpu",
            "fallbacks": [],
            "start": now - 1.0,
            "end": now,
            "calls": calls,
            "samples": calls,
            "summarised": calls,
            "errors": {},
            "nan_outputs": 0,
            "latency_ms": {"counts": latency, "sum": 0.5 * calls, "max": 0.6},
            "inputs": inputs,
            "outputs": outputs,
        }

    # -- bundles -------------------------------------------------------------------------------------
    @staticmethod
    def _public_key(path: Path) -> tuple[str, Ed25519PublicKey]:
        key = serialization.load_pem_public_key(path.read_bytes())
        assert isinstance(key, Ed25519PublicKey)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()[:16], key

    def verify(self, data: bytes) -> dict[str, Any]:
        """docs/bundle-format.md: the signature over manifest.json's bytes by the trusted key its key_id names,
        then every listed member's size and sha256."""
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            body = zf.read("manifest.json")
            sig = json.loads(zf.read("manifest.sig"))
            if canonical(json.loads(body)) != body or canonical(sig) != zf.read("manifest.sig"):
                raise ValueError("manifest or signature not in canonical form")
            key = next((k for kid, k in self.keys if kid == sig["key_id"]), None)
            if key is None:
                raise ValueError(f"signed by untrusted key {sig['key_id']}")
            import base64

            key.verify(base64.b64decode(sig["signature"]), body)  # raises InvalidSignature
            manifest = json.loads(body)
            if not manifest["format_version"].startswith("1."):
                raise ValueError("unsupported format version")
            for f in manifest["files"]:
                member = zf.read(f["path"])
                if len(member) != f["size"] or hashlib.sha256(member).hexdigest() != f["sha256"]:
                    raise ValueError(f"member {f['path']} does not match the manifest")
        return manifest

    def install(self, path: Path) -> None:
        """The factory image: a bundle already on the device."""
        data = path.read_bytes()
        self.manifest = self.verify(data)
        self.active = {"name": self.manifest["name"], "version": self.manifest["version"],
                       "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip

    def _download(self, ref: dict[str, Any]) -> bytes:
        req = urllib.request.Request(ref["url"])
        origins = {"{0.scheme}://{0.netloc}".format(urlsplit(o)) for o in self.cfg.get("token_origins", [])}
        if "{0.scheme}://{0.netloc}".format(urlsplit(ref["url"])) in origins:
            req.add_header("Authorization", f"Bearer {self.cfg['http_token']}")
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read(ref["size"] + 1)
        if len(data) != ref["size"] or hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise ValueError("download does not match the desired state's size and sha256")
        return data

    def _move(self, to: str, target: dict[str, Any]) -> None:
        self.event("update_state", from_state=self.update_state, to_state=to, target=target, rollout=self.rollout)
        self.update_state = to
        self.publish("state", self.state(), retain=True)

    def _update(self, desired: dict[str, Any]) -> None:
        ref, self.rollout = desired["bundle"], desired.get("rollout")
        if self.active is not None and ref["sha256"] == self.active["sha256"]:
            return
        try:
            self._move("downloading", ref)
            data = self._download(ref)
            self._move("verifying", ref)
            manifest = self.verify(data)
            self._move("switching", ref)
            self.manifest, self.active = manifest, {"name": ref["name"], "version": ref["version"],
                                                    "sha256": ref["sha256"]}  # fmt: skip
            self._move("committing", ref)
            self.event("committed", bundle=ref, rollout=self.rollout)
            self._move("idle", ref)
        except Exception as exc:  # a device reports any failure and carries on
            self.event("update_failed", target=ref, rollout=self.rollout, reason=str(exc).splitlines()[0])
            self.update_state = "idle"
            self.publish("state", self.state(), retain=True)

    # -- MQTT ----------------------------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        for kind in ("desired", "commands", "refusals"):
            client.subscribe(self.topic(kind), qos=1)
        client.publish(self.topic("status"), json.dumps(self._status(True)), qos=1, retain=True)
        client.publish(self.topic("state"), json.dumps(self.state()), qos=1, retain=True)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        doc = json.loads(msg.payload) if msg.payload else None
        if kind == "desired" and doc and doc.get("schema") == "edgefleet.desired/1":
            # not in paho's network thread: the update publishes and waits for acknowledgements
            threading.Thread(target=self._update, args=(doc,), daemon=True).start()
        elif kind == "refusals" and doc and doc.get("schema") == "edgefleet.refusal/1":
            with self.lock:
                self.refusals.append(doc)
        elif kind == "commands" and doc and doc.get("command") == "report":
            threading.Thread(target=self._report, args=(doc["id"],), daemon=True).start()

    def _report(self, command_id: str) -> None:
        self.publish("state", self.state(), retain=True)
        self.event("command_done", command_id=command_id, command="report")

    def start(self) -> None:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
