"""The reference tables in docs/ say what the code does (issue 14): every device.toml setting the agent knows is
in docs/device-agent.md's example with its default where one is shown, and nothing there is unknown to it;
every rollout gate is in docs/fleet.md's table with its default; every command the protocol accepts is in
docs/topics.md. A field added to the code and not to the docs (or the other way) fails here."""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

from edgefleet.fleet._gates import Gates
from edgefleet.protocol import COMMANDS
from edgefleet.runtime import AgentConfig
from edgefleet.runtime._config import HealthPolicy, MqttConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Example values in the docs that are placeholders, not the default (a real device sets them).
_EXAMPLE_ONLY = set(
    "device_id data_dir trusted_keys initial_bundle tags accelerators threads http_token token_origins http_ca "
    "host port tls ca cert key username password".split()
)


def _example_toml() -> dict:
    text = (DOCS / "device-agent.md").read_text()
    block = re.search(r"```toml\n(device_id = .*?)```", text, re.S)
    assert block, "docs/device-agent.md lost its device.toml reference"
    return tomllib.loads(block.group(1))


def _default(f) -> object:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def test_device_toml_reference_lists_every_setting_with_its_default() -> None:
    doc = _example_toml()
    for section, cls in ((doc, AgentConfig), (doc["mqtt"], MqttConfig), (doc["health"], HealthPolicy)):
        known = {f.name: f for f in fields(cls) if f.name not in ("mqtt", "health")}
        shown = {k for k in section if k not in ("mqtt", "health")}
        assert shown - set(known) == set(), f"documented but unknown to {cls.__name__}: {shown - set(known)}"
        assert set(known) - shown == set(), f"{cls.__name__} settings missing from the docs: {set(known) - shown}"
        for name in shown - _EXAMPLE_ONLY:
            want = _default(known[name])
            got = section[name]
            if name == "download_bytes_per_s":
                want = want or 0  # None (no cap) is written 0 in the example
            assert got == want, f"{cls.__name__}.{name}: docs say {got!r}, the default is {want!r}"


def test_gate_table_lists_every_gate_with_its_default() -> None:
    text = (DOCS / "fleet.md").read_text()
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", text, re.M)
    documented: dict[str, str] = {}
    for names, defaults in rows:
        keys = re.findall(r"`(\w+)`", names)
        values = [v.strip() for v in defaults.split(",")]
        if len(keys) == len(values):
            documented.update(zip(keys, values, strict=True))
    gates = Gates().to_dict()
    missing = set(gates) - set(documented) - {"min_stage_s"}  # min_stage_s: a flag of its own (--gate), below
    assert missing == set(), f"gates missing from docs/fleet.md's table: {missing}"
    for k, v in documented.items():
        if k in gates:
            assert float(v) == float(gates[k]), f"gate {k}: docs say {v}, the default is {gates[k]}"
    assert "min_stage_s" in text


def test_every_command_is_documented() -> None:
    text = (DOCS / "topics.md").read_text()
    for c in COMMANDS:
        assert f"- `{c}`" in text, f"command {c} is not in docs/topics.md"


def _section(title: str) -> str:
    text = (DOCS / "topics.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_event_table_lists_every_event_type_with_its_bundle_fields() -> None:
    from edgefleet.protocol import BUNDLE_FIELDS

    rows = re.findall(r"^\| (`[^|]+`) \| ([^\n]+) \|$", _section("Events"), re.M)
    documented: dict[str, set[str]] = {}
    for types, text in rows:
        # `name` (bundle object...) marks a field that names a bundle
        bundles = set(re.findall(r"`(\w+)` \(bundle object", text))
        for t in re.findall(r"`(\w+)`", types):
            documented[t] = bundles
    assert set(documented) == set(BUNDLE_FIELDS), set(documented) ^ set(BUNDLE_FIELDS)
    for t, names in BUNDLE_FIELDS.items():
        assert documented[t] == set(names), f"{t}: docs name bundles in {documented[t]}, the code in {set(names)}"


def test_state_table_lists_every_field_the_reader_checks() -> None:
    import inspect

    from edgefleet import _messages

    documented = set(re.findall(r"^\| `(\w+)` \|", _section("Device state"), re.M))
    checked = set(re.findall(r"""s(?:\.get)?\(?\[?["'](\w+)["']""", inspect.getsource(_messages.parse_state)))
    checked |= {"schema", "device_id", "ts", *_messages._STATE_OBJECTS}
    assert checked - documented == set(), f"checked, not documented: {checked - documented}"
    assert documented - checked == set(), f"documented, not checked: {documented - checked}"


def test_telemetry_example_has_every_required_window_field() -> None:
    import json as _json

    from edgefleet._telemetry import _REQUIRED

    block = re.search(r"```json\n(\{\"schema\": \"edgefleet.telemetry/1\".*?)```", _section("Telemetry window"), re.S)
    assert block, "docs/topics.md lost its telemetry window example"
    example = _json.loads(re.sub(r"\[\.\.\.[^\]]*\]", "[]", block.group(1)).replace('"3f9c..."', '"k"'))
    assert set(_REQUIRED) <= set(example), set(_REQUIRED) - set(example)
