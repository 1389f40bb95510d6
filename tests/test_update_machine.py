"""The update machine without a broker: every move of the transition table, every move it refuses, the
persisted record, and a restart from every state an update persists (real slots, real bundles, real
ONNX Runtime sessions and a real HTTP download; no MQTT)."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import pytest

from edgefleet.protocol import BundleRef, Desired
from edgefleet.runtime import Agent
from edgefleet.runtime._config import AgentConfig, HealthPolicy
from edgefleet.runtime._slots import SlotInfo
from edgefleet.runtime._update import _MAX_RESUMES
from edgefleet.runtime._update_machine import (
    TRANSITIONS,
    IllegalTransition,
    UpdateEvent,
    UpdateMachine,
    UpdateRecord,
    UpdateState,
    UpdateStore,
)

from ._mqtt_driver import bundle_ref

S, E = UpdateState, UpdateEvent
_SLOT = SlotInfo("a", "m", "1.0.0", "0" * 64)
_DESIRED = Desired(BundleRef("m", "2.0.0", "http://127.0.0.1:1/m.efb", "1" * 64, 10), "update", "r1", 0.0)


def _machine(tmp_path: Path, state: UpdateState) -> tuple[UpdateMachine, list[tuple[str, str]]]:
    moves: list[tuple[str, str]] = []
    store = UpdateStore(tmp_path / "agent.json")
    record = UpdateRecord(state=state, target=None if state == S.IDLE else _DESIRED, committed=_SLOT)
    return UpdateMachine(store, record, lambda old, new, rec, why: moves.append((old.value, new.value))), moves


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS), ids=[f"{s}-{e}" for s, e in TRANSITIONS])
def test_every_move_of_the_table_is_made_and_persisted_once(tmp_path: Path, state, event) -> None:
    m, moves = _machine(tmp_path, state)
    new = m.fire(event)
    assert new == TRANSITIONS[(state, event)] == m.state
    on_disk = UpdateRecord.from_json((tmp_path / "agent.json").read_bytes())
    assert on_disk.state == new and on_disk.stores == 1
    assert moves == ([] if new == state else [(state.value, new.value)])


_ILLEGAL = [(s, e) for s, e in itertools.product(UpdateState, UpdateEvent) if (s, e) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "event"), _ILLEGAL, ids=[f"{s}-{e}" for s, e in _ILLEGAL])
def test_every_move_the_table_lacks_is_refused_and_changes_nothing(tmp_path: Path, state, event) -> None:
    m, moves = _machine(tmp_path, state)
    with pytest.raises(IllegalTransition, match=f"'{event}' has no move from state '{state}'"):
        m.fire(event, attempts=5)
    assert m.state == state and m.record.attempts == 0 and moves == []
    assert not (tmp_path / "agent.json").exists()


def test_the_table_reaches_every_state_and_idle_from_every_state() -> None:
    reached = {S.IDLE} | set(TRANSITIONS.values())
    assert reached == set(UpdateState)
    # From every state some path of moves leads back to idle: no state is a trap.
    back = {S.IDLE}
    while True:
        more = {s for (s, _), n in TRANSITIONS.items() if n in back} - back
        if not more:
            break
        back |= more
    assert back == set(UpdateState)


def test_update_cannot_change_the_state_or_invent_fields(tmp_path: Path) -> None:
    m, _ = _machine(tmp_path, S.DOWNLOADING)
    with pytest.raises(IllegalTransition):
        m.update(state=S.IDLE)
    with pytest.raises(TypeError, match="no field 'atempts'"):
        m.update(atempts=1)
    m.update(attempts=2)
    assert UpdateRecord.from_json((tmp_path / "agent.json").read_bytes()).attempts == 2


def test_an_offer_starts_a_fresh_count_and_commits_are_remembered(tmp_path: Path) -> None:
    m, _ = _machine(tmp_path, S.IDLE)
    m.record.resumes, m.record.attempts = 3, 4
    m.fire(E.OFFERED, target=_DESIRED)
    assert (m.record.resumes, m.record.attempts, m.record.target) == (0, 0, _DESIRED)
    for i in range(40):
        m.record.state = S.COMMITTING
        m.fire(E.COMMITTED, committed=SlotInfo("a", "m", f"1.0.{i}", f"{i:064x}"))
    assert len(m.record.history) == 32 and m.record.history[-1] == f"m:1.0.39:{39:064x}"


def test_record_round_trip_and_files_from_before_the_table(tmp_path: Path) -> None:
    rec = UpdateRecord(
        state=S.HEALTH_WATCH, committed=_SLOT, target=_DESIRED, previous=_SLOT, refused={"m:0.9.0": None}
    )
    assert UpdateRecord.from_json(rec.to_json()) == rec
    old = json.loads(rec.to_json())
    del old["resumes"], old["stores"]
    old["watch_restarts"] = 1
    got = UpdateRecord.from_json(json.dumps(old).encode())
    assert got.resumes == 1 and got.stores == 0 and got.previous == _SLOT


def test_an_unreadable_record_is_set_aside_and_the_device_starts_idle_on_its_active_slot(tmp_path: Path) -> None:
    p = tmp_path / "agent.json"
    p.write_text('{"state": "sideways"}')
    rec = UpdateStore(p).load(lambda: _SLOT)
    assert rec.state == S.IDLE and rec.committed == _SLOT
    assert (tmp_path / "agent.json.bad").read_text() == '{"state": "sideways"}' and not p.exists()


# -- restarts, driven step by step through the agent's parts with no broker ---------------------------
def _agent(data: Path, publisher, **health) -> Agent:
    policy = HealthPolicy(**{"window_s": 0.3, "min_calls": 5, "probe_interval_s": 0.0, **health})
    cfg = AgentConfig(device_id="dev-u", data_dir=data, trusted_keys=[publisher[2]], health=policy)
    return Agent(cfg)


def _events(agent: Agent) -> list[dict]:
    return [json.loads(body) for _, kind, _, body in agent.buffer.pending(limit=10_000) if kind == "events"]


def _run_to_idle(agent: Agent, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while agent.state != S.IDLE:
        assert time.monotonic() < deadline, f"stuck in {agent.state}"
        agent.updater.step()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, files, mlp_bundles, publisher) -> dict[UpdateState, Path]:
    """Data directories of a device updating v1 -> v2, copied as each state was persisted: what a crash
    right after that write leaves on disk. A second device, restarted twice in its health window, gives
    the rolling-back one."""
    root = tmp_path_factory.mktemp("snapshots")
    desired = Desired(BundleRef.parse(bundle_ref(mlp_bundles["2.0.0"], files.url), "test"), "update", "r1", 0.0)
    out: dict[UpdateState, Path] = {}
    agent = _agent(root / "run", publisher)
    agent.updater.install_initial(mlp_bundles["1.0.0"])
    agent.updater.consider(desired)
    while agent.state != S.IDLE:
        if agent.state not in out:
            out[agent.state] = shutil.copytree(root / "run", root / agent.state.value)
        agent.updater.step()
    agent.stop()
    # A crash in the health window, twice (max_restarts 1): the second restart rolls back.
    twice = shutil.copytree(out[S.HEALTH_WATCH], root / "watch-restarted")
    for restart in range(2):
        a = _agent(twice, publisher)
        # The second restart's first act is the move to rolling back; stop there, before its work.
        a.updater.recover(None) if restart == 0 else a.updater.resume()
        a.buffer.close()
    assert json.loads((twice / "agent.json").read_text())["state"] == "rolling_back"
    out[S.ROLLING_BACK] = twice
    return out


_BEFORE_IDLE = [s for s in UpdateState if s != S.IDLE]


@pytest.mark.parametrize("state", _BEFORE_IDLE, ids=[s.value for s in _BEFORE_IDLE])
def test_a_restart_in_every_persisted_state_finishes_the_update(tmp_path: Path, snapshots, state, publisher) -> None:
    data = shutil.copytree(snapshots[state], tmp_path / "data")
    agent = _agent(data, publisher)
    before = agent.persisted.stores
    agent.updater.recover(None)
    _run_to_idle(agent)
    rec = agent.persisted
    want = "1.0.0" if state == S.ROLLING_BACK else "2.0.0"
    assert agent.slots.active() is not None and agent.slots.active().version == want
    assert agent.model is not None and agent.model.manifest.version == want
    assert rec.committed is not None and rec.committed.version == want
    assert rec.target is None and rec.stores > before
    assert any(k.endswith(":2.0.0") for k in rec.refused) == (state == S.ROLLING_BACK)
    assert not list((data / "downloads").glob("*.efb*"))
    kinds = [e["type"] for e in _events(agent)]
    assert ("rolled_back" if state == S.ROLLING_BACK else "committed") in kinds
    agent.stop()


def test_a_bundle_that_kills_the_agent_every_time_is_given_up_before_the_switch(
    tmp_path: Path, snapshots, publisher
) -> None:
    data = shutil.copytree(snapshots[S.SMOKE_TEST], tmp_path / "data")
    for i in range(_MAX_RESUMES + 1):
        agent = _agent(data, publisher)
        agent.updater.recover(None)  # the smoke test would run next and kill the process again
        if i < _MAX_RESUMES:
            assert agent.state == S.SMOKE_TEST and agent.persisted.resumes == i + 1
            agent.buffer.close()
    assert agent.state == S.IDLE
    assert agent.slots.active().version == "1.0.0" and agent.model.manifest.version == "1.0.0"
    failed = [e for e in _events(agent) if e["type"] == "update_failed"]
    assert failed and f"restarted {_MAX_RESUMES + 1} times during smoke_test" in failed[-1]["reason"]
    assert agent.persisted.last_result["result"] == "failed"
    agent.stop()


def test_the_protocols_update_states_are_the_machines() -> None:
    """The state document's `update.state` is checked against edgefleet.protocol.UPDATE_STATES (the core
    install's copy, for third parties); the agent's machine must have exactly those states."""
    from edgefleet.protocol import UPDATE_STATES
    from edgefleet.runtime._update_machine import UpdateState

    assert tuple(s.value for s in UpdateState) == UPDATE_STATES
