"""The console in a real headless browser (Debian's chromium, driven over the DevTools protocol):
it lists edits with their metrics and the version timeline, compares two versions' answers side
by side, and restores a version. Screenshots go to CONSOLE_SCREENSHOTS (a directory; default:
the test's temporary directory)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import websocket
from conftest import IN_CI
from service_support import free_port_in, server, tiny_server_env, tiny_settings, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """A headless chromium page, driven with DevTools protocol commands."""

    def __init__(self, profile: Path):
        port = free_port_in(8250, 8300)
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", f"--remote-debugging-port={port}", "--remote-allow-origins=*",
             f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def page_socket():
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=1).json()
            except httpx.HTTPError:
                return None
            return next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"), None)

        self.socket = websocket.create_connection(wait_until(page_socket, 30, what="chromium"), timeout=30)
        self.next_id = 0
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, what: str, timeout: float = 30):
        return wait_until(lambda: self.eval(expression), timeout, 0.05, what)

    def screenshot(self, path: Path) -> None:
        height = self.eval("document.documentElement.scrollHeight")
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        message = "chromium is not installed (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message + " (CI=true: it must be there)")
        pytest.skip(message)
    page = Browser(tmp_path / "profile")
    yield page
    page.close()


def test_console_edits_metrics_compare_and_restore(browser, tiny_sharp_dir, tmp_path):
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port_in()
    env = tiny_server_env(tiny_settings(tiny_sharp_dir, tmp_path / "data"), EVALUATE_ON_APPLY="true")
    (tmp_path / "data").mkdir()
    with server(env, tmp_path / "server.log", port) as client:
        edit = client.wait(client.edit("Danielle Darrieux", "The mother tongue of {subject} is", "English")["id"], timeout=120)
        assert edit["status"] == "applied", edit
        prompt = "The mother tongue of Danielle Darrieux is"
        answers = [prompt + client.generate(prompt, max_new_tokens=16, version=v)["text"] for v in (1, 2)]
        assert answers[0] != answers[1]

        browser.send("Page.navigate", url=f"http://127.0.0.1:{port}/console/")
        browser.wait("document.body?.dataset.loaded === 'true'", "the console to load")
        assert browser.eval("[...document.querySelectorAll('#versions li strong')].map(e => e.textContent)") == ["v2", "v1"]
        assert browser.eval("document.querySelector('#versions li.current').dataset.version") == "2"
        row = browser.eval("[...document.querySelectorAll('#edits tbody td')].map(e => e.textContent)")
        assert row[:2] == [str(edit["id"]), "applied"] and "English" in row[2] and row[3] == "v2"

        browser.eval("document.querySelector('#edits tbody tr').click()")
        browser.wait("document.querySelector('#metrics dl') !== null", "the edit's metrics")
        metrics = client.metrics(edit["id"])
        shown = browser.eval("Object.fromEntries([...document.querySelectorAll('#metrics dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent]))")
        assert shown["reliability"] == f"{metrics['reliability']:.3f}"

        # Before/after: v1 and v2 side by side, each as the API generates it.
        assert browser.eval("[document.querySelector('#version-a').value, document.querySelector('#version-b').value]") == ["1", "2"]
        browser.eval("document.querySelector('#compare button').click()")
        browser.wait("document.querySelector('#answer-b-title').textContent.includes('tokens')"
                     " && document.querySelector('#answer-a-title').textContent.includes('tokens')", "both answers")
        assert browser.eval("[document.querySelector('#answer-a').textContent, document.querySelector('#answer-b').textContent]") == answers
        browser.screenshot(shots / "console.png")

        browser.eval("document.querySelector('#versions li[data-version=\"1\"] button.restore').click()")
        browser.wait("document.querySelector('#versions li.current')?.dataset.version === '3'", "the restore")
        assert client.version(3)["kind"] == "restore" and client.version(3)["restored_from"] == 1
        assert browser.eval("document.querySelector('#notice').textContent") == "v1 restored as v3"
        assert client.generate(prompt, max_new_tokens=16)["text"] == answers[0][len(prompt):]
        browser.screenshot(shots / "console-restored.png")
