"""The dashboard in a real headless Chromium (Debian's chromium driven by Playwright): sign in, create a
rollout by clicking, watch it progress to completion, look at devices and drift. Screenshots are kept
in test-artifacts/dashboard/."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli
from .test_fleet_server import Server, _wait

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(exe).exists(), "chromium is not installed: make test installs the Debian package 'chromium'"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_create_a_rollout_by_clicking_and_watch_it_complete(
    tmp_path: Path, publisher, mlp_bundles: dict, browser
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = Server(tmp_path / "fleet", publisher)
    agents = []
    try:
        for v in ("1.0.0", "2.0.0"):
            assert server.cli("publish", str(mlp_bundles[v])).returncode == 0
        for i in range(4):
            dev = f"ui-{i}"
            cfg = tmp_path / dev / "device.toml"
            assert (
                run_cli(
                    "fleet",
                    "provision",
                    dev,
                    "--tags",
                    f"ui,half-{i % 2}",
                    "--data-dir",
                    str(server.data),
                    "--out",
                    str(cfg),
                    "--mqtt-port",
                    str(server.mqtt),
                ).returncode
                == 0
            )
            shutil.copy(mlp_bundles["1.0.0"], cfg.parent / "v1.efb")
            cfg.write_text(
                cfg.read_text().replace(
                    "[mqtt]",
                    'initial_bundle = "v1.efb"\nself_test_hz = 30\nwindow_s = 0.5\n\n'
                    "[health]\nwindow_s = 1.0\nmin_calls = 5\nprobe_interval_s = 0.05\n\n[mqtt]",
                )
            )
            agents.append(
                subprocess.Popen(
                    [str(Path(sys.executable).parent / "edgefleet"), "agent", "--config", str(cfg)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def versions() -> set:
            return {d["bundle_version"] for d in json.loads(server.cli("devices", "--json").stdout)}

        _wait(lambda: versions() == {"1.0.0"}, 60, "devices on v1")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/rollouts")
        assert "/login" in page.url  # signed out: sent to the sign-in page
        page.fill("input[name=token]", "eft_wrong")
        page.click("button[type=submit]")
        assert "not valid" in page.content()
        page.fill("input[name=token]", server.token)
        page.click("button[type=submit]")
        page.wait_for_selector("#online")
        _wait(lambda: page.reload() or page.inner_text("#online") == "4", 30, "overview shows four online")
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

        page.goto(server.url + "/rollouts")
        page.select_option("#bundle", "mlp:2.0.0")
        page.fill("#selector", "ui")
        page.fill("#stages", "50,100")
        page.fill("#min_stage_s", "2")
        page.screenshot(path=str(ARTIFACTS / "rollout-form.png"), full_page=True)
        page.click("#start")
        page.wait_for_selector("#state")
        assert "/rollouts/r-" in page.url
        seen = set()

        def progressed() -> bool:
            page.reload()
            state = page.inner_text("#state")
            seen.add(state)
            return state == "completed"

        _wait(progressed, 120, "rollout completed on the page")
        assert "running" in seen or page.inner_text("#stages").count("passed") == 2
        assert page.inner_text("#stages").count("passed") == 2
        page.screenshot(path=str(ARTIFACTS / "rollout-completed.png"), full_page=True)
        assert versions() == {"2.0.0"}
        # every device of the rollout, by stage (numbered from 0, as in its history and the API)
        assert page.locator("#rollout-devices tr").count() == 5 and "updated" in page.inner_text("#rollout-devices")
        assert page.inner_text("#stages").split("\n")[1].startswith("0 (50")

        page.goto(server.url + "/devices")
        assert page.locator("#devices tr").count() == 5 and "mlp 2.0.0" in page.inner_text("#devices")
        page.screenshot(path=str(ARTIFACTS / "devices.png"), full_page=True)
        # searched and filtered from the page's form (in SQL: a page of a large fleet reads that page)
        page.fill("#q", "UI-3")
        page.select_option("#online", "yes")
        page.click("#apply")
        page.wait_for_selector("#count")
        assert page.locator("#devices tr").count() == 2 and "ui-3" in page.inner_text("#devices")
        assert page.inner_text("#count").startswith("1 device")
        page.goto(server.url + "/devices?version=9.9.9")
        assert "no device matches" in page.inner_text("#devices")
        page.goto(server.url + "/devices/ui-0")
        assert "nothing refused" in page.inner_text("#refusals")
        # the device's own telemetry over time (issue 16: the device page had none), its state, its timeline
        assert page.locator("#history svg.chart").count() == 3
        assert (
            "mlp:2.0.0" in page.inner_text("#history")
            and page.locator("#history polyline, #history circle").count() >= 1
        )
        assert "UTC" in page.inner_text("#device-state") and "committed" in page.inner_text("#events")
        assert "2.0.0" in page.inner_text("#events")
        page.screenshot(path=str(ARTIFACTS / "device.png"), full_page=True)
        page.goto(server.url + "/?hours=1")
        # the fleet over time: calls, errors and p95 with a line per bundle version, devices online and
        # registered, updates ended by outcome; axes, the range picker
        assert page.locator("#history svg.chart").count() == 5 and "mlp:2.0.0" in page.inner_text("#history")
        assert (
            page.locator(
                "#history svg[aria-label='devices'] polyline, #history svg[aria-label='devices'] circle"
            ).count()
            >= 1
        )
        assert "committed" in (page.locator("#history svg[aria-label='updates ended']").text_content() or "")
        assert page.locator("#history polyline, #history circle").count() >= 1 and "24 h" in page.inner_text("#ranges")
        page.screenshot(path=str(ARTIFACTS / "overview-history.png"), full_page=True)
        # A shadow of v1 beside v2 on every device: the shadows page shows it and, once reported, its figures.
        r = server.cli("shadow", "create", "--bundle", "mlp:1.0.0", "--selector", "ui", "--sample-rate", "1",
                       "--duration", "3", "--json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        sid = json.loads(r.stdout)["id"]

        def reported() -> bool:
            page.goto(server.url + "/shadows")
            text = page.inner_text("main")
            return sid in text and "4/4 device(s) reported" in text

        _wait(reported, 60, "shadow reported on the page")
        assert "mlp:1.0.0" in page.inner_text("h2.shadow") and "overall" in page.inner_text("main")
        # over time, from the devices' progress reports: agreement, both p95s, output PSI
        assert page.locator(f"#history-{sid} svg.chart").count() == 3
        assert page.locator(f"#history-{sid} polyline, #history-{sid} circle").count() >= 3
        page.screenshot(path=str(ARTIFACTS / "shadows.png"), full_page=True)
        # started and stopped from the page; a bad form is one line on it
        page.fill("#selector", "nobody")
        page.click("#start")
        assert "matches no device" in page.inner_text("#error")
        page.select_option("#bundle", "mlp:1.0.0")
        page.fill("#selector", "ui")
        page.fill("#duration_s", "600")
        page.click("#start")
        page.wait_for_selector("form.inline button[id^=stop-]")
        page.click("form.inline button[id^=stop-]")
        page.wait_for_selector("h2.shadow")
        assert "stopped" in page.inner_text("h2.shadow") and not page.locator("button[id^=stop-]").count()
        page.goto(server.url + "/drift?bundle=mlp:2.0.0")
        page.wait_for_selector("#features")
        assert "brightness" in page.inner_text("#features") and page.locator("#features svg").count() >= 4
        page.screenshot(path=str(ARTIFACTS / "drift.png"), full_page=True)
        # one cohort against another on the same version, feature by feature
        page.goto(server.url + "/drift?bundle=mlp:2.0.0&tag=half-0&against=half-1")
        page.wait_for_selector("#versus")
        assert "brightness" in page.inner_text("#versus") and page.locator("#versus svg").count() >= 4
        page.screenshot(path=str(ARTIFACTS / "drift-cohorts.png"), full_page=True)
        # a bad form is refused on the page, not with a stack trace
        page.goto(server.url + "/rollouts")
        page.fill("#selector", "nobody")
        page.click("#start")
        assert "matches no device" in page.inner_text("#error")
    finally:
        for a in agents:
            a.send_signal(signal.SIGTERM)
        for a in agents:
            a.wait(20)
        server.stop()
