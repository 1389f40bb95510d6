"""The attack campaign of issue 15 as one index, and the broker's ACL as a matrix.

`CAMPAIGN` names, for every attack the issue lists and every decision it asked for, the tests that show it
held (they live beside the parts they attack; `test_every_attack_has_its_tests` fails when one goes
missing). The ACL matrix runs here, on the fleet server's real embedded Mosquitto: one device's
credentials against every kind of topic of its own and of another device, and against the wildcards and
system topics a hostile client would try. Publishing is judged by the broker's PUBACK; subscribing by what
is actually delivered (Mosquitto grants a subscription and withholds what the ACL denies), with the server
and the other device publishing on every topic meanwhile. Each cell is a case; the tally is printed."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.protocol import KINDS, topic

from .test_fleet_server import Server, _client, _provision, _wait

pytestmark = pytest.mark.slow

CAMPAIGN: dict[str, list[str]] = {
    "1 shared-subscription hijack": [
        "test_fleet_server::test_a_device_cannot_join_the_ingest_workers_shared_subscription"
    ],
    "2 client-id takeover": ["test_fleet_server::test_device_credentials_cannot_take_over_another_session"],
    "3 the loop dies, the process looks alive": [
        "test_agent::test_a_bad_order_or_a_failing_step_never_stops_the_loop",
        "test_agent::test_a_failed_write_during_an_update_is_survived_and_retried",
        "test_liveness::test_agent_status_tells_a_running_agent_from_a_stuck_and_a_gone_one",
        "test_liveness::test_the_fleet_marks_an_online_device_that_went_silent",
    ],
    "4 zip bomb before the signature": ["test_bundle_format::test_a_zip_bomb_is_refused_before_it_is_decompressed"],
    "5 slow retrieval": [
        "test_download::test_a_trickling_server_is_cut_off_and_the_part_file_kept",
        "test_agent::test_telemetry_keeps_flowing_during_a_slow_download",
        "test_agent::test_a_shadow_candidate_is_fetched_without_holding_up_the_loop",
    ],
    "6 endless data": ["test_download::test_endless_data_stops_at_the_announced_size"],
    "7 the token to any host": ["test_download::test_the_token_never_leaves_the_trusted_origin"],
    "8 telemetry poisoning": [
        "test_fleet_server::test_poisoned_windows_are_refused_and_never_reach_the_fleet_statistics",
        "test_rollout_gates::test_one_failing_rollout_does_not_hold_up_the_others",
        "test_conformance::test_the_fleet_server_reaches_every_verdict",
    ],
    "9 work before authentication": ["test_fleet_server::test_pages_check_the_token_before_doing_any_work"],
    "10 uploads read whole": ["test_fleet_server::test_pages_check_the_token_before_doing_any_work"],
    "11 stored names collide": ["test_fleet_server::test_bundles_whose_file_names_would_collide_are_stored_apart"],
    "(a) issued_at not enforced": ["test_agent::test_an_order_issued_long_ago_is_carried_out"],
    "(b) rollback only to what ran": ["test_agent::test_a_rollback_only_goes_back_to_a_bundle_the_device_ran"],
    "(c) events outlive windows": ["test_telemetry::test_a_full_buffer_gives_up_windows_before_events"],
    "(d) a buffer emptied or swapped": ["test_telemetry::test_a_buffer_emptied_or_swapped_while_closed_is_reported"],
    "(e) a corrected URL at once": ["test_agent::test_a_corrected_url_for_the_same_bundle_is_used_at_once"],
    "(f) /metrics and ids behind a token": ["test_fleet_server::test_pages_check_the_token_before_doing_any_work"],
    "(g) binds, TLS, plaintext warning": [
        "test_fleet_server::test_listen_addresses_plaintext_warning_and_open_metrics",
        "test_fleet_tls::test_https_and_mqtts_without_a_proxy",
    ],
    "(h) one agent per data directory": ["test_agent::test_one_agent_per_data_directory"],
    "kill -9 at every persisted state": ["test_agent::test_kill_9_during_update_leaves_a_consistent_device"],
    "disk errors at every write": [
        "test_agent::test_a_failed_write_during_an_update_is_survived_and_retried",
        "test_telemetry::test_a_disk_error_in_the_buffer_never_reaches_the_apps_call",
    ],
    "fuzzing": [
        "test_fuzz::test_bundle_reader_on_mutated_bundles",
        "test_fuzz::test_status_state_and_event_validators",
    ],
    "ACL matrix": ["test_attack_matrix::test_publish", "test_attack_matrix::test_subscribe"],
}


def test_every_attack_has_its_tests() -> None:
    import ast

    here = Path(__file__).parent
    for attack, tests in CAMPAIGN.items():
        for ref in tests:
            module, name = ref.split("::")
            tree = ast.parse((here / f"{module}.py").read_text())
            names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{attack}: {ref} is gone"


DEVICE_KINDS = [k for k, (direction, _, _) in KINDS.items() if direction == "device"]
SERVER_KINDS = [k for k, (direction, _, _) in KINDS.items() if direction == "server"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, publisher) -> Any:
    tmp = tmp_path_factory.mktemp("matrix")
    server = Server(tmp / "fleet", publisher)
    creds = {dev: _provision(server, tmp, dev) for dev in ("dev-a", "dev-b")}
    yield server, creds
    server.stop()


def _server_client(server: Server) -> mqtt.Client:
    secret = (server.data / "mosquitto" / "server.secret").read_text().strip()
    url = json.loads((server.data / "mosquitto" / "embedded.json").read_text())["url"]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"matrix-server-{time.time_ns()}", protocol=mqtt.MQTTv5)
    c.username_pw_set("edgefleet-server", secret)
    c.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
    c.loop_start()
    return c


# (topic as dev-a publishes it, allowed?)
PUBLISH = [(topic("dev-a", k), k in DEVICE_KINDS) for k in KINDS]
PUBLISH += [(topic("dev-b", k), False) for k in KINDS]
PUBLISH += [
    ("edgefleet/v1/devices/dev-b", False),
    ("edgefleet/v1/devices/dev-a/telemetry/extra", False),
    ("edgefleet/v1/broadcast", False),
    ("$SYS/broker/clients/connected", False),
    ("other/topic", False),
]


@pytest.mark.parametrize(("name", "allowed"), PUBLISH, ids=[p[0] for p in PUBLISH])
def test_publish(fleet: Any, name: str, allowed: bool) -> None:
    server, creds = fleet
    c, got = _client(server.mqtt, "dev-a", creds["dev-a"])
    try:
        info = c.publish(name, b"{}", qos=1)
        _wait(lambda: info.mid in got["puback"], 10, "puback")
        assert got["puback"][info.mid].is_failure is not allowed, got["puback"][info.mid]
    finally:
        c.loop_stop()
        c.disconnect()


# (filter dev-a subscribes to, topics of which it may receive messages)
OWN_ORDERS = {topic("dev-a", k) for k in SERVER_KINDS}
SUBSCRIBE = [
    ("#", OWN_ORDERS),
    ("edgefleet/#", OWN_ORDERS),
    ("edgefleet/v1/devices/+/+", OWN_ORDERS),
    ("edgefleet/v1/devices/dev-b/#", set()),
    ("$SYS/#", set()),
    ("$share/g/edgefleet/v1/devices/+/+", OWN_ORDERS),
    ("$share/edgefleet-ingest/edgefleet/v1/devices/+/+", OWN_ORDERS),
    *[(topic("dev-b", k), set()) for k in KINDS],
    *[(topic("dev-a", k), {topic("dev-a", k)} & OWN_ORDERS) for k in KINDS],
]


@pytest.mark.parametrize(("filt", "may"), SUBSCRIBE, ids=[s[0] for s in SUBSCRIBE])
def test_subscribe(fleet: Any, filt: str, may: set[str]) -> None:
    """What dev-a receives on FILT while the server writes every order topic of both devices and dev-b
    writes every topic of its own: only dev-a's own orders, ever."""
    server, creds = fleet
    a, _ = _client(server.mqtt, "dev-a", creds["dev-a"])
    b, _ = _client(server.mqtt, "dev-b", creds["dev-b"])
    srv = _server_client(server)
    seen: list[str] = []
    a.on_message = lambda cl, u, m: seen.append(m.topic)
    try:
        a.subscribe(filt, qos=1)
        time.sleep(0.3)
        marker = f"m-{time.time_ns()}".encode()
        for dev in ("dev-a", "dev-b"):
            for k in SERVER_KINDS:
                srv.publish(topic(dev, k), marker, qos=1).wait_for_publish(5)
        for k in DEVICE_KINDS:
            b.publish(topic("dev-b", k), b"{}", qos=1).wait_for_publish(5)
        if may:
            _wait(lambda: set(seen) >= may, 10, f"dev-a's own orders on {filt}")  # delivery works at all
        else:
            time.sleep(1.0)
        assert set(seen) <= may, sorted(set(seen) - may)
    finally:
        for c in (a, b, srv):
            c.loop_stop()
            c.disconnect()
