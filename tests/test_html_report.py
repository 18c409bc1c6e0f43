"""The HTML report: one self-contained file (no network: data-URI figures, inline style, a CSP that forbids
anything else) with the verdict, the tables, the figures, the provenance and the baseline comparison —
loaded in a real headless Chromium (Debian's ``chromium-headless-shell`` or ``chromium``) through the
DevTools protocol: no console error, no exception, every figure decoded with a natural size, and a
full-page screenshot kept as a test artefact (the path is printed; ``CONSERVCHECK_ARTIFACTS`` moves it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conservcheck.cli.app import app
from conservcheck.report.audit_report import AuditReport
from conservcheck.report.html import CSP

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CONSERVCHECK_ARTIFACTS", ROOT / "test-artifacts"))
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
runner = CliRunner()


@pytest.fixture(scope="module")
def page(funnel_reports, tmp_path_factory) -> Path:
    """``conservcheck report injected.json --baseline seed0.json --html`` on the funnel reports."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("html") / "report.html"
    args = ["report", funnel_reports["injected"], "--baseline", funnel_reports["seed0"], "--html", out]
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert f"html report: {out}" in r.stdout
    return out


def test_the_page_is_self_contained_and_complete(page, funnel_reports):
    text = page.read_text(encoding="utf-8")
    assert f'content="{CSP}"' in text
    # Nothing is fetched: no external URL in any src or href, every image an inline PNG.
    assert not re.search(r'(?:src|href)="(?!data:|#)', text)
    images = re.findall(r'<img src="([^"]+)"', text)
    report = AuditReport.from_json(funnel_reports["injected"])
    from conservcheck.report.html import figures

    assert len(images) == len(figures(report)) >= 4
    assert all(src.startswith("data:image/png;base64,") for src in images)
    for section in ("verdict", "baseline", "tables", "figures", "provenance"):
        assert f'<section id="{section}">' in text
    assert report.verdict.reason.split(":")[0] in text
    assert "Against the baseline" in text and "95% interval of the ratio" in text
    assert report.header["model"]["weights_sha256"] in text


# --------------------------------------------------------------------------------------------- browser


class Chromium:
    """A headless Chromium driven over the DevTools protocol (one page), collecting console errors."""

    def __init__(self, binary: str, profile: Path) -> None:
        import websocket

        self.proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
            targets = json.load(resp)
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.send(method)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(method)

    def open(self, path: Path, width: int = 1280) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
        self.events.clear()
        self.send("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error-level log entries (failed loads, CSP violations)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append(f"{details.get('text', '')} {details.get('exception', {}).get('description', '')}".strip())
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out

    def screenshot(self, path: Path) -> Path:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("websocket", reason="the DevTools client needs websocket-client (the test extra)")
    binary = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if binary is None:
        pytest.skip(
            "no Chromium on PATH: apt-get install chromium-headless-shell (.ci/run installs it, so CI runs this test)"
        )
    chrome = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield chrome
    chrome.close()


IMAGES = "Array.from(document.images, i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))"


def test_the_browser_check_catches_a_broken_page(browser, tmp_path):
    """The control: a script error and a missing image are caught, so a clean result below means something."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>notAFunction()</script></body></html>')
    browser.open(bad)
    errors = browser.errors()
    assert any("notAFunction" in e for e in errors), errors
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors), errors
    assert browser.evaluate(IMAGES) == [{"complete": True, "w": 0, "h": 0}]


def test_the_report_loads_without_errors_and_its_figures_render(browser, page, capsys):
    browser.open(page)
    assert browser.errors() == []
    images = browser.evaluate(IMAGES)
    assert len(images) >= 4
    assert all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    # Laid out as designed: two figures side by side at 1280 px, tables and sections in order.
    widths = browser.evaluate("Array.from(document.images, i => i.getBoundingClientRect().width)")
    assert all(300 < w < 640 for w in widths), widths
    sections = browser.evaluate("Array.from(document.querySelectorAll('section'), s => s.id)")
    assert sections == ["verdict", "baseline", "tables", "figures", "provenance"]
    assert "violation" in browser.evaluate("document.querySelector('.verdict').textContent")
    shot = browser.screenshot(ARTIFACTS / "html-report.png")
    assert shot.stat().st_size > 50_000
    with capsys.disabled():
        print(f"\nHTML report screenshot: {shot}")
