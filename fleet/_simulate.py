"""`edgefleet fleet simulate`: N devices in one process, each a real agent (real MQTT connection, real
runtime, real update state machine) registered through the server's API, with drift and failure
injection. Tests, the demo and the benchmarks drive fleets with it."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._fs import atomic_write
from edgefleet.runtime import Session

__all__ = ["PER_PROCESS", "Simulation", "StandinSession", "parse_drift", "run_sharded", "standin_factory"]

log = logging.getLogger("edgefleet.fleet.simulate")


def parse_drift(specs: list[str]) -> dict[str, float]:
    """'TAG:SHIFT' -> {TAG: SHIFT}: devices with TAG see inputs shifted by SHIFT (in input units)."""
    out = {}
    for s in specs:
        tag, _, shift = s.partition(":")
        try:
            out[tag] = float(shift)
        except ValueError as exc:
            raise InputError(f"--drift {s!r}: use TAG:SHIFT, e.g. night:-0.3") from exc
    return out


class StandinSession(Session):
    """A fast stand-in predictor for large simulated fleets: answers with the bundle's own golden
    outputs (a golden input gets its own expected output, so the smoke test passes and two versions
    answer the same traffic as their real models would; any other input gets a row chosen by its
    bytes) after LATENCY_MS. The bundle around it is verified and handled for real."""

    backend = "standin"
    backend_version = "1"
    accelerator = "standin"
    fixed_batch = None

    def __init__(self, bundle: Any, entry: Any, latency_ms: float = 0.0) -> None:
        from edgefleet._quant import quantize

        self.fallbacks: list[str] = []
        self.latency_s = latency_ms / 1000
        expected = bundle.load_array(entry.golden_outputs).astype(np.float32)
        spec = entry.outputs[0]
        self._rows = quantize(expected, spec) if spec.scale is not None else expected.astype(spec.dtype)
        # The golden inputs as the session receives them: those are answered with their own outputs.
        gx = bundle.golden_inputs().astype(np.float32)
        sin = entry.inputs[0]
        gq = quantize(gx, sin) if sin.scale is not None else gx.astype(sin.dtype)
        self._index = {gq[i].tobytes(): i for i in range(len(gq))}

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.latency_s:
            time.sleep(self.latency_s)
        x = inputs[0]
        if len(x) == len(self._rows):
            return [self._rows.copy()]
        idx = [self._index.get(row.tobytes(), hash(row.tobytes()) % len(self._rows)) for row in x]
        return [self._rows[idx]]

    def close(self) -> None:
        pass


def standin_factory(latency_ms: float = 0.0) -> Any:
    def make(bundle: Any, entry: Any, options: Any) -> StandinSession:
        return StandinSession(bundle, entry, latency_ms)

    return make


@dataclass
class Simulation:
    server: str
    token: str
    devices: int
    bundle: str | None = None
    tags: list[str] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)
    fail_rate: float = 0.0
    rate_hz: float = 5.0
    prefix: str = "sim"
    cohorts: int = 2
    workdir: Path | None = None
    health: dict[str, float] = field(default_factory=dict)
    # Inputs the devices see, drawn at random (an .npz with 'x', and 'y' for --feedback).
    inputs: Path | None = None
    # Without inputs: replay the bundle's few golden inputs (a smoke test; drift statistics show drift).
    golden_inputs: bool = False
    # A fast stand-in predictor instead of the real runtime backend, for fleets of thousands.
    standin: bool = False
    # Take over devices of this prefix that are online (another simulator's): new credentials cut it off.
    replace: bool = False
    # Share of calls whose true label (the inputs' 'y') the device's app feeds back, as an app that learns
    # the outcome does (agent.feedback); needs --inputs with labels.
    feedback: float = 0.0
    # Raw samples kept on each device per hour, and whether devices send them when the fleet asks.
    capture_per_hour: float = 0.0
    capture_upload: bool = False

    def _api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server.rstrip("/") + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        return json.loads(self._fetch(req))

    def _fetch(self, req: urllib.request.Request) -> bytes:
        """The response body, or one InputError naming the server and what it said (unreachable, a wrong
        token, an unknown bundle) instead of urllib's traceback."""
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("detail", exc.reason)
            except ValueError:
                detail = exc.reason
            hint = " (check --token)" if exc.code == 401 else ""
            raise InputError(
                f"fleet server {self.server} refused {req.full_url}: HTTP {exc.code}: {detail}{hint}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"cannot reach the fleet server at {self.server}: {reason} (check --server)") from exc

    def _device_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:04d}" for i in range(self.devices)]

    def _check_not_running(self) -> None:
        """Registering a device gives it new credentials, which cut off whoever runs it now."""
        ids = set(self._device_ids())
        online = sorted(d["id"] for d in self._api("GET", "/api/devices") if d.get("id") in ids and d.get("online"))
        if online:
            raise InputError(
                f"{len(online)} of the devices this would register are online ({online[0]} ...): another "
                "simulator runs them; choose another --prefix, or pass --replace to take them over"
            )

    def start(self) -> None:
        from edgefleet.runtime import Agent, AgentConfig, HealthPolicy, MqttConfig, NetworkLoop

        if not 0 <= self.fail_rate < 1:
            raise InputError("--fail-rate must be in [0, 1)")
        if not 0 <= self.feedback <= 1:
            raise InputError("--feedback must be a share of calls in [0, 1]")
        if self.capture_per_hour < 0:
            raise InputError("--capture-per-hour must be >= 0")
        self._data: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        if self.inputs is not None:
            try:
                with np.load(self.inputs, allow_pickle=False) as npz:
                    self._data = npz["x"].astype(np.float32)
                    if "y" in npz.files:
                        self._labels = npz["y"].astype(np.int64).reshape(-1)
            except (OSError, KeyError, ValueError) as exc:
                raise InputError(f"--inputs {self.inputs}: need an .npz with an array 'x' ({exc})") from exc
            if not len(self._data):
                raise InputError(f"--inputs {self.inputs}: 'x' holds no inputs")
            if self._labels is not None and len(self._labels) != len(self._data):
                raise InputError(
                    f"--inputs {self.inputs}: 'y' has {len(self._labels)} labels for {len(self._data)} inputs"
                )
        if self.feedback and self._labels is None:
            raise InputError("--feedback needs --inputs with the true labels as an array 'y'")
        if self._data is None and not (self.standin or self.golden_inputs):
            # A bundle's golden sample is a handful of inputs: replayed, its histograms are spikes the drift
            # monitor rightly calls drift on every feature of every cohort.
            raise InputError(
                "fleet simulate needs --inputs X.npz: inputs like the bundle's evaluation data (the --eval file "
                "of edgefleet build, e.g. build/demo/v1/data/eval.npz after make demo); --golden-inputs replays "
                "the bundle's few golden inputs instead, which the fleet's drift statistics will flag as drift"
            )
        cohort_tags = {f"cohort-{i}" for i in range(min(self.cohorts, self.devices))}
        carried = set(self.tags) | cohort_tags
        for tag in self.drift:
            if tag not in carried:
                raise InputError(
                    f"--drift {tag}: no simulated device carries tag '{tag}' (they carry "
                    f"{', '.join(sorted(carried))}); give it to every device with --tags, or shift a cohort"
                )
        if self.devices > PER_PROCESS:
            raise InputError(
                f"{self.devices} devices in one process is more than {PER_PROCESS}: "
                "use 'edgefleet fleet simulate', which splits larger fleets over processes"
            )
        if not self.replace:
            self._check_not_running()
        # All devices of this process share one MQTT network thread (a device runs its own).
        self._network = NetworkLoop("edgefleet-sim-mqtt")
        self.dir = Path(self.workdir or tempfile.mkdtemp(prefix="edgefleet-sim-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        initial = None
        if self.bundle:
            name, _, version = self.bundle.partition(":")
            initial = self.dir / f"{name}-{version}.efb"
            if not initial.exists():
                req = urllib.request.Request(
                    f"{self.server.rstrip('/')}/bundles/{name}/{version}.efb",
                    headers={"Authorization": f"Bearer {self.token}"},
                )
                atomic_write(initial, self._fetch(req))
        self.agents: list[Any] = []
        self.cohort_of: dict[str, str] = {}
        wanted = [
            {"id": dev, "tags": [*self.tags, f"cohort-{i % self.cohorts}"]} for i, dev in enumerate(self._device_ids())
        ]
        # One call per 200 devices: each is one broker reload, and the credentials work when it returns.
        regs = [
            r
            for k in range(0, len(wanted), 200)
            for r in self._api("POST", "/api/devices", {"devices": wanted[k : k + 200]})
        ]
        health: dict[str, Any] = {"window_s": 3.0, "min_calls": 10, "probe_interval_s": 0.1}
        if self.standin:
            # The stand-in takes no time: latency differences are scheduling noise among the devices
            # sharing this process, so only a gross slowdown counts (every other health check applies).
            health["p95_slack_ms"] = 50.0
            # Hundreds of devices update at once on a few cores: probe less often over a longer window.
            health.update(window_s=5.0, probe_interval_s=0.2)
        # Every registration carries the same trusted keys: written once for all devices.
        keys = []
        for kname, pem in regs[0]["trusted_keys"].items():
            (self.dir / kname).write_text(pem)
            keys.append(self.dir / kname)
        ca = None
        if regs[0]["mqtt"].get("ca_pem"):
            ca = str(self.dir / "broker-ca.pem")
            Path(ca).write_text(regs[0]["mqtt"]["ca_pem"])
        for i, reg in enumerate(regs):
            dev = reg["device_id"]
            cohort = f"cohort-{i % self.cohorts}"
            m = reg["mqtt"]
            cfg = AgentConfig(
                device_id=dev,
                data_dir=self.dir / dev,
                trusted_keys=keys,
                mqtt=MqttConfig(
                    host=m["host"],
                    port=int(m["port"]),
                    username=m["username"],
                    password=m["password"],
                    tls=bool(m.get("tls")),
                    ca=ca,
                ),
                health=HealthPolicy(**{**health, **self.health}),
                window_s=5.0 if self.standin else 2.0,
                # One thread per session: dozens of devices share this process's cores.
                threads=1,
                initial_bundle=initial,
                tags=[*self.tags, cohort],
                feedback_calls=1000 if self.feedback else 0,
                capture_per_hour=self.capture_per_hour,
                capture_upload=self.capture_upload,
                http_token=reg.get("http_token"),
                token_origins=list(reg.get("token_origins") or []),
                # a server on https:// with the broker's own CA (the embedded broker with --tls-cert)
                http_ca=Path(ca)
                if ca and any(o.startswith("https://") for o in reg.get("token_origins") or [])
                else None,
            )
            agent = Agent(cfg, session_factory=standin_factory() if self.standin else None, network=self._network)
            agent.start()
            self.agents.append(agent)
            self.cohort_of[dev] = cohort
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._traffic, name="edgefleet-sim-traffic", daemon=True)
        self._thread.start()

    def _traffic(self) -> None:
        rng = np.random.default_rng(0)
        period = 1.0 / max(self.rate_hz, 0.1)
        while not self._stop.is_set():
            t0 = time.monotonic()
            for a in self.agents:
                m = a.model
                if m is None:
                    continue
                xs = self._data if self._data is not None else m.bundle.golden_inputs()
                if xs is None:
                    continue
                i = int(rng.integers(len(xs)))
                x = xs[i : i + 1].astype(np.float32)
                shift = sum(v for k, v in self.drift.items() if k in a.config.tags)
                x = x + np.float32(shift)
                try:
                    if self.fail_rate and random.random() < self.fail_rate:
                        a.predict(x[:, :0])  # a malformed call: counted as an error in telemetry
                    else:
                        a.predict(x)
                        if self._labels is not None and self.feedback and rng.random() < self.feedback:
                            call = a.last_call_id
                            if call is not None:
                                a.feedback(call, int(self._labels[i]))
                except Exception:
                    pass
            self._stop.wait(max(0.0, period - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for a in self.agents:
            a.stop()
        self._network.close()

    def versions(self) -> dict[str, str | None]:
        return {a.device_id: (a.model.info.version if a.model else None) for a in self.agents}


def run(sim: Simulation, duration: float | None, as_json: bool = False) -> None:
    """Run SIM for DURATION seconds, or until Ctrl-C or SIGTERM (either stops the devices cleanly). AS_JSON:
    a JSON line when the devices run (`started`: ids, workdir) and one when they stopped (`stopped`: each
    device's bundle version), instead of the sentence."""
    import json
    import signal

    # SIGTERM as well as Ctrl-C: a shell without job control starts background jobs with SIGINT
    # ignored, and Python keeps it ignored, so SIGINT alone could not stop a simulator started that way.
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    sim.start()
    if as_json:
        ids = [a.device_id for a in sim.agents]
        print(json.dumps({"event": "started", "devices": ids, "workdir": str(sim.dir)}), flush=True)
    else:
        print(f"simulating {sim.devices} devices in {sim.dir}; Ctrl-C stops", flush=True)
    try:
        deadline = None if duration is None else time.monotonic() + duration
        while not term.is_set() and (deadline is None or time.monotonic() < deadline):
            term.wait(1)
    except KeyboardInterrupt:
        pass
    finally:
        versions = sim.versions()
        sim.stop()
        if as_json:
            print(json.dumps({"event": "stopped", "versions": versions}), flush=True)


# Devices per process: the agents' own threads (one each; their MQTT traffic shares one NetworkLoop)
# hold one GIL, so larger fleets are split over processes to use every core.
PER_PROCESS = 100


def run_sharded(argv: list[str], devices: int, prefix: str, workdir: str | None) -> int:
    """Run `edgefleet fleet simulate` ARGV as several processes of at most PER_PROCESS devices each
    (device ids PREFIX<k>-NNNN); Ctrl-C or SIGTERM stops them all."""
    import signal
    import subprocess
    import sys

    shards = -(-devices // PER_PROCESS)
    base = Path(workdir or tempfile.mkdtemp(prefix="edgefleet-sim-"))
    rest = _without(argv, ("--devices", "--prefix", "--workdir"))
    procs = []
    for k in range(shards):
        n = devices // shards + (1 if k < devices % shards else 0)
        cmd = [sys.executable, "-m", "edgefleet", *rest, "--devices", str(n), "--prefix", f"{prefix}{k}"]
        cmd += ["--workdir", str(base / f"shard-{k}")]
        procs.append(subprocess.Popen(cmd))
    if "--json" not in argv:  # with it, each process prints its own JSON lines
        print(f"simulating {devices} devices in {shards} processes under {base}; Ctrl-C stops", flush=True)

    def stop(*_: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # SIGINT may be ignored in them (see run)

    signal.signal(signal.SIGTERM, stop)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        stop()
        codes = [p.wait() for p in procs]
    return max(codes)


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if a.split("=", 1)[0] in options:
            continue
        out.append(a)
    return out
