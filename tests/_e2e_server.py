"""A real ComfyUI server for the tests, and a small client for it (one place for both).

`start_server()` runs ComfyUI's own `main.py` (CPU, loopback, a free port, a fresh base
directory) with this pack and the test-only tiny loaders (`tests/comfy_test_nodes`) symlinked
into its custom_nodes, under `python -O` (ComfyUI asserts Mochi's full feed-forward width; the
tiny DiT needs the assert off). `ComfyServer` queues API prompts (`POST /prompt`), waits for
`/history/<id>`, interrupts, cancels, watches progress over the websocket and converts UI
workflows to API prompts through the real frontend (`ui-to-api.mjs`).

Needs ComfyUI (COMFYUI_DIR); the frontend conversion also Node.js with playwright-core
(NODE_PATH) and Chromium, as `../shared/tools/comfyui-setup --browser` installs them.
`missing()` skips on a user's machine without them and fails in CI (CI set).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"
PACK_DIR_NAME = "dreamrelation"  # a valid Python package name: ComfyUI imports the folder by it
TEST_NODES_DIR_NAME = "dreamrelation_test_nodes"


class PromptRejected(AssertionError):
    """POST /prompt answered 400: `error` and per-node `node_errors` as ComfyUI gives them."""

    def __init__(self, body: dict) -> None:
        self.body = body
        super().__init__(f"POST /prompt rejected the prompt: {json.dumps(body)[:3000]}")


def missing(reason: str) -> None:
    """Skip on a user's machine without the tooling; in CI (which installs it) fail instead."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI must run the ComfyUI server tests: {reason}")
    pytest.skip(reason)


def find_ui_to_api() -> Path | None:
    for cand in (ROOT.parent / "shared" / "tools" / "ui-to-api.mjs", Path(os.environ.get("DR_UI_TO_API", "/nonexistent"))):
        if cand.is_file():
            return cand
    return None


def frontend_problem() -> str | None:
    """Why workflows cannot be loaded in the real frontend here, or None."""
    if find_ui_to_api() is None:
        return "ui-to-api.mjs not found (../shared/tools, or DR_UI_TO_API)"
    if not os.environ.get("NODE_PATH") or shutil.which("node") is None:
        return "Node.js / NODE_PATH with playwright-core missing: run comfyui-setup --browser and export NODE_PATH"
    if not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        return "Chromium missing: run comfyui-setup --browser"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One prompt's entry in /history (or what a timeout left)."""

    prompt_id: str
    history: dict

    @property
    def status(self) -> str:  # "success" / "error"
        return self.history.get("status", {}).get("status_str", "")

    @property
    def messages(self) -> list[tuple[str, dict]]:
        return [(m[0], m[1]) for m in self.history.get("status", {}).get("messages", [])]

    @property
    def outputs(self) -> dict[str, dict]:
        """node id -> its UI output (images, text, ...)."""
        return self.history.get("outputs", {})

    @property
    def error(self) -> dict | None:
        """The execution_error message (node_id, node_type, exception_message, ...), if any."""
        return next((m for kind, m in self.messages if kind == "execution_error"), None)

    @property
    def interrupted(self) -> bool:
        return any(kind == "execution_interrupted" for kind, _ in self.messages)

    def texts(self) -> list[str]:
        """Every string the nodes showed in their UI outputs (`text`, Preview Any, ...)."""
        found: list[str] = []

        def walk(v) -> None:
            if isinstance(v, str):
                found.append(v)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list | tuple):
                for x in v:
                    walk(x)

        for out in self.outputs.values():
            for key, value in out.items():
                if key not in ("images", "animated", "gifs", "video", "audio"):
                    walk(value)
        return found

    def files(self, base: Path) -> list[Path]:
        """Files the outputs name (images, videos), resolved in the server's folders."""
        paths = []
        for out in self.outputs.values():
            for key in ("images", "gifs", "video", "videos"):
                for item in out.get(key, []) or []:
                    if isinstance(item, dict) and "filename" in item:
                        paths.append(base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
        return paths

    def describe(self) -> str:
        err = self.error
        if err:
            return (f"{self.status}: {err.get('node_type')} #{err.get('node_id')}: {err.get('exception_type')}: "
                    f"{err.get('exception_message')}\n{''.join(err.get('traceback', []))[-2500:]}")
        return f"{self.status}: {[k for k, _ in self.messages]}"


@dataclass
class Progress:
    """Progress messages of the server's websocket, kept while `ComfyServer.watch` runs."""

    events: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def values(self, node: str | None = None) -> list[int]:
        with self.lock:
            return [e["value"] for e in self.events if node is None or str(e.get("node")) == str(node)]


class ComfyServer:
    def __init__(self, url: str, base: Path, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.base, self.proc, self.log = url, base, proc, log
        self.client_id = uuid.uuid4().hex
        self._api_cache: dict[tuple[str, float], dict] = {}

    # --- folders of this server ---------------------------------------------------------------
    def models(self, folder: str) -> Path:
        p = self.base / "models" / folder
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def input(self) -> Path:
        return self.base / "input"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    # --- HTTP -----------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None = None, timeout: float = 30) -> bytes:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def queue(self, prompt: dict) -> str:
        """POST /prompt; the prompt id. Raises PromptRejected (with node_errors) on a 400."""
        try:
            body = json.loads(self.post("/prompt", {"prompt": prompt, "client_id": self.client_id}))
        except urllib.error.HTTPError as e:
            raise PromptRejected(json.loads(e.read() or b"{}")) from None
        if body.get("node_errors"):
            raise PromptRejected(body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120) -> Run:
        """The prompt's /history entry once it has finished (success, error or interrupted)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return Run(prompt_id, entry)
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI server died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; server log:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120) -> Run:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (of that prompt only when it is the one running)."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id: str, timeout: float = 120) -> None:
        """Take a queued prompt out of the queue, or interrupt it while it runs, until it is gone."""
        self.post("/queue", {"delete": [prompt_id]})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            queue = self.get("/queue")
            running = any(item[1] == prompt_id for item in queue.get("queue_running", []))
            pending = any(item[1] == prompt_id for item in queue.get("queue_pending", []))
            if not running and not pending:
                return
            if pending:
                self.post("/queue", {"delete": [prompt_id]})
            else:
                self.interrupt(prompt_id)
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} still queued/running after {timeout:.0f} s")

    # --- progress over the websocket ----------------------------------------------------------
    @contextmanager
    def watch(self, on_progress: Callable[[dict], None] | None = None) -> Iterator[Progress]:
        """Collect this client's `progress` messages ({value, max, node, prompt_id}) while inside;
        `on_progress` is called with each, from the listener thread."""
        import aiohttp

        progress = Progress()
        ready, stop = threading.Event(), threading.Event()
        failure: list[BaseException] = []

        async def listen() -> None:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}") as ws:
                    ready.set()
                    while not stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                return
                            continue  # binary preview images
                        data = json.loads(msg.data)
                        if data.get("type") == "progress":
                            with progress.lock:
                                progress.events.append(data["data"])
                            if on_progress is not None:
                                on_progress(data["data"])

        def thread_main() -> None:
            try:
                asyncio.run(listen())
            except BaseException as e:  # reported to the test below
                failure.append(e)
                ready.set()

        t = threading.Thread(target=thread_main, daemon=True)
        t.start()
        if not ready.wait(15) or failure:
            raise AssertionError(f"websocket to {self.url} failed: {failure}")
        try:
            yield progress
        finally:
            stop.set()
            t.join(10)
        if failure:
            raise failure[0]

    # --- the real frontend -------------------------------------------------------------------
    def to_api(self, workflow: Path, workdir: Path) -> dict:
        """The API prompt the real frontend makes of a UI workflow (cached per file version)."""
        workflow = Path(workflow)
        key = (str(workflow), workflow.stat().st_mtime)
        if key not in self._api_cache:
            problem = frontend_problem()
            if problem:
                missing(problem)
            out = workdir / f"{workflow.stem}.api.json"
            proc = subprocess.run(
                ["node", str(find_ui_to_api()), self.url, str(workflow), str(out), str(workdir / f"{workflow.stem}.png")],
                capture_output=True, text=True, timeout=180,
            )
            if proc.returncode != 0:
                raise AssertionError(f"ui-to-api failed on {workflow.name} ({proc.returncode}): "
                                     f"{proc.stdout[-2000:]} {proc.stderr[-2000:]}")
            api = json.loads(out.read_text())
            self._api_cache[key] = api.get("output", api)
        return json.loads(json.dumps(self._api_cache[key]))  # a fresh copy to edit


@contextmanager
def start_server(base: Path, comfyui: Path, ready_timeout: float = 240) -> Iterator[ComfyServer]:
    """ComfyUI's main.py on a free loopback port with the pack and the tiny test loaders
    installed; stopped (by its PID) on exit."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / TEST_NODES_DIR_NAME).symlink_to(TEST_NODES, target_is_directory=True)
    for sub in ("input", "output", "models"):
        (base / sub).mkdir(exist_ok=True)
    port = free_port()
    log_path = base / "server.log"
    log = open(log_path, "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-O", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--disable-auto-launch", "--base-directory", str(base), "--database-url", f"sqlite:///{base}/comfyui.db"],
        cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    server = ComfyServer(f"http://127.0.0.1:{port}", base, proc, log_path)
    try:
        end = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI server exited ({proc.returncode}):\n{server.log_tail()}")
            try:
                server.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > end:
                    raise AssertionError(f"ComfyUI server did not answer within {ready_timeout:.0f} s:\n"
                                         f"{server.log_tail()}") from None
                time.sleep(0.3)
        yield server
    finally:
        proc.terminate()  # the server we started, by its own handle
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
