"""A real, headless ComfyUI server in a subprocess, for tests.

The host is the ComfyUI tree that tools/setup.sh installs into .hosts/comfyui. Everything a run
writes lives in one work directory:

    work_dir/custom_nodes/ComfyUI-LaVie -> this repository (symlink; the pack's folder name)
    work_dir/models/<folder>/            extra model search paths (tests drop checkpoints here)
    work_dir/output, input, temp/        ComfyUI's output, input and temp directories
    work_dir/extra_model_paths.yaml      registers the two above (--extra-model-paths-config)
    work_dir/server.log                  the server's stdout and stderr

    with ComfyServer() as server:
        prompt_id = server.queue(graph)
        entry = server.wait(prompt_id)          # raises ExecutionFailed on a node error
        files = server.output_files(prompt_id)
        bars = server.progress(prompt_id)       # websocket "progress" messages of that prompt
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import websocket  # websocket-client

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".hosts" / "comfyui"
PACK_FOLDER = "ComfyUI-LaVie"
# Extra search paths under work_dir/models. "lavie" is the pack's own folder; the pack must add its
# default path to any entry already there rather than replace it.
MODEL_FOLDERS = ("lavie", "checkpoints", "vae", "clip", "unet", "upscale_models")


class ComfyError(RuntimeError):
    """The server failed to start, died, or did not answer as expected."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400 (validation failed); `.response` holds the JSON answer."""

    def __init__(self, response: dict):
        self.response = response
        self.node_errors = response.get("node_errors", {})
        error = response.get("error", {})
        super().__init__(
            f"prompt rejected: {error.get('message', error)} {error.get('details', '')}\n"
            f"node_errors: {json.dumps(self.node_errors, indent=1)}"
        )


class ExecutionFailed(ComfyError):
    """The prompt ran and failed; `.entry` is its /history entry, `.error` the execution_error data."""

    def __init__(self, prompt_id: str, entry: dict):
        self.entry = entry
        self.error = {}
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind in ("execution_error", "execution_interrupted"):
                self.error = dict(data, kind=kind)
        e = self.error
        super().__init__(
            f"prompt {prompt_id} failed in node {e.get('node_id')} ({e.get('node_type')}): "
            f"{e.get('exception_type', e.get('kind'))}: {e.get('exception_message', '')}\n"
            + "".join(e.get("traceback", []))
        )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a CI runner, ``kill``) unwind like Ctrl-C, through ``stop`` and atexit.

    By default it ends Python at once, skipping both, and the server, in its own session, kept running and
    holding the GPU: a later run on the same card then saw a fraction of its memory. Left alone where the
    program has its own handler or this is not the main thread (signals can only be set there).
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, work_dir: str | Path | None = None, host_dir: Path = HOST_DIR,
                 pack_dir: Path = REPO_ROOT, python: str = sys.executable,
                 startup_timeout: float = 120.0, extra_args: tuple[str, ...] = (), cpu: bool = True):
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="comfy-host-")).resolve()
        self.host_dir = Path(host_dir)
        self.pack_dir = Path(pack_dir)
        self.python = python
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.cpu = cpu  # False: the host picks its GPU, as a user's ComfyUI does
        self.custom_nodes_dir = self.work_dir / "custom_nodes"
        self.models_dir = self.work_dir / "models"
        self.output_dir = self.work_dir / "output"
        self.input_dir = self.work_dir / "input"
        self.temp_dir = self.work_dir / "temp" / "temp"  # ComfyUI appends "temp" to --temp-directory
        self.log_path = self.work_dir / "server.log"
        self.port = 0
        self.url = ""
        self.client_id = uuid.uuid4().hex
        self._proc: subprocess.Popen | None = None
        self._ws: websocket.WebSocket | None = None
        self._listener: threading.Thread | None = None
        self._lock = threading.Lock()
        self._messages: dict[str | None, list[dict]] = {}
        self._done: dict[str, threading.Event] = {}
        self._running_prompt: str | None = None

    # ----------------------------------------------------------------- lifecycle
    def _prepare(self) -> Path:
        for d in (self.custom_nodes_dir, self.output_dir, self.input_dir):
            d.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes_dir / PACK_FOLDER
        if not link.is_symlink():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        config = {"lavie_tests": {
            "base_path": str(self.work_dir),
            "custom_nodes": "custom_nodes",
            **{name: f"models/{name}" for name in MODEL_FOLDERS},
        }}
        yaml_path = self.work_dir / "extra_model_paths.yaml"
        yaml_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        return yaml_path

    def start(self) -> "ComfyServer":
        if not (self.host_dir / "main.py").is_file():
            raise ComfyError(f"no ComfyUI host at {self.host_dir}: run `bash tools/setup.sh`")
        yaml_path = self._prepare()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(yaml_path),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.temp_dir.parent), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, cwd=self.host_dir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        atexit.register(self.stop)
        _stop_on_sigterm()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            self._check_alive()
            try:
                self._request("GET", "/system_stats", timeout=2)
                break
            except (OSError, ComfyError):
                if time.monotonic() > deadline:
                    message = f"server not ready after {self.startup_timeout}s\n{self.log_tail()}"
                    self.stop()
                    raise ComfyError(message)
                time.sleep(0.2)
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=10)
        self._ws.settimeout(None)
        self._listener = threading.Thread(target=self._listen, name="comfy-ws", daemon=True)
        self._listener.start()
        return self

    def stop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                ws.abort()  # wakes the listener thread out of recv()
                ws.shutdown()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._listener is not None:
            self._listener.join(timeout=5)
            self._listener = None
        atexit.unregister(self.stop)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _check_alive(self) -> None:
        if self._proc is None:
            raise ComfyError("server is not running")
        if self._proc.poll() is not None:
            raise ComfyError(f"server exited with code {self._proc.returncode}\n{self.log_tail()}")

    # ----------------------------------------------------------------- log
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "--- server log (tail) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    # ----------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def object_info(self) -> dict:
        return self._request("GET", "/object_info")

    def history(self, prompt_id: str) -> dict | None:
        """The /history entry of a finished prompt, None while it is queued or running."""
        return self._request("GET", f"/history/{prompt_id}").get(prompt_id)

    def queue(self, graph: dict) -> str:
        """Queue an API-format graph; returns its prompt_id. Raises PromptRejected on HTTP 400."""
        try:
            answer = self._request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            if err.code == 400:
                try:
                    raise PromptRejected(json.loads(body)) from None
                except json.JSONDecodeError:
                    pass
            raise ComfyError(f"POST /prompt: HTTP {err.code}: {body}\n{self.log_tail()}") from None
        prompt_id = answer["prompt_id"]
        with self._lock:
            self._done.setdefault(prompt_id, threading.Event())
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 600, check: bool = True) -> dict:
        """Wait until the prompt finished; returns its /history entry.

        With check=True a failed prompt raises ExecutionFailed (message: node, exception, traceback).
        Also waits for the prompt's final websocket message, so progress() is complete afterwards.
        """
        with self._lock:
            done = self._done.setdefault(prompt_id, threading.Event())
        deadline = time.monotonic() + timeout
        while (entry := self.history(prompt_id)) is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} not finished after {timeout}s\n{self.log_tail()}")
            done.wait(0.25)
        if self._listener is not None and self._listener.is_alive():
            done.wait(10)
        if check and entry.get("status", {}).get("status_str") == "error":
            raise ExecutionFailed(prompt_id, entry)
        return entry

    def run(self, graph: dict, timeout: float = 600, check: bool = True) -> dict:
        """queue() then wait()."""
        return self.wait(self.queue(graph), timeout=timeout, check=check)

    def outputs(self, prompt_id: str) -> dict:
        """{node_id: ui output} of a finished prompt, e.g. {"9": {"images": [{filename, ...}]}}."""
        entry = self.history(prompt_id)
        if entry is None:
            raise ComfyError(f"prompt {prompt_id} has no history (not finished?)")
        return entry["outputs"]

    def output_files(self, prompt_id: str) -> list[Path]:
        """Paths of every file the prompt's output nodes reported (images, gifs, videos...)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files = []
        for ui in self.outputs(prompt_id).values():
            for items in ui.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots[item.get("type", "output")]
                        files.append(root / item.get("subfolder", "") / item["filename"])
        return files

    # ----------------------------------------------------------------- websocket
    def _listen(self) -> None:
        ws = self._ws
        while ws is not None:
            try:
                opcode, data = ws.recv_data()
            except (websocket.WebSocketException, OSError):
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                msg = json.loads(data)
            elif opcode == websocket.ABNF.OPCODE_BINARY:  # preview image of the running prompt
                msg = {"type": "preview", "data": {"bytes": len(data), "prompt_id": self._running_prompt}}
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return
            else:
                continue
            msg["received"] = time.monotonic()
            payload = msg.get("data") or {}
            prompt_id = payload.get("prompt_id") if isinstance(payload, dict) else None
            with self._lock:
                if msg["type"] == "execution_start":
                    self._running_prompt = prompt_id
                self._messages.setdefault(prompt_id, []).append(msg)
                if msg["type"] == "executing" and payload.get("node") is None and prompt_id:
                    self._done.setdefault(prompt_id, threading.Event()).set()

    def messages(self, prompt_id: str) -> list[dict]:
        """Websocket messages ({"type", "data"}, plus "received": the client's time.monotonic() on arrival)
        received for one prompt, in order."""
        with self._lock:
            return list(self._messages.get(prompt_id, []))

    def progress(self, prompt_id: str) -> list[dict]:
        """Data of the prompt's "progress" messages: {"value", "max", "node", "prompt_id"}."""
        return [m["data"] for m in self.messages(prompt_id) if m["type"] == "progress"]

    # ----------------------------------------------------------------- pack import check
    def import_pack(self, timeout: float = 300) -> dict:
        """Import the pack the way the host does, in a fresh host interpreter (no server needed).

        Returns {"loaded": bool, "nodes": [NODE_CLASS_MAPPINGS keys], "display_names": {...},
        "output": the interpreter's output}.
        """
        self._prepare()
        result = self.work_dir / "import_pack.json"
        script = (
            "import asyncio, inspect, json, sys\n"
            "from comfy.cli_args import args\n"
            "args.cpu = True\n"
            "import nodes\n"
            "ok = nodes.load_custom_node(sys.argv[1])\n"
            "ok = asyncio.run(ok) if inspect.iscoroutine(ok) else ok\n"  # async in newer hosts
            f"mod = sys.modules.get({PACK_FOLDER!r})\n"
            "mapping = getattr(mod, 'NODE_CLASS_MAPPINGS', None) or {}\n"
            "names = getattr(mod, 'NODE_DISPLAY_NAME_MAPPINGS', None) or {}\n"
            "json.dump({'loaded': ok, 'nodes': sorted(mapping), 'display_names': names},"
            " open(sys.argv[2], 'w'))\n"
        )
        proc = subprocess.run(
            [self.python, "-c", script, str(self.custom_nodes_dir / PACK_FOLDER), str(result)],
            cwd=self.host_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"),
        )
        output = proc.stdout + proc.stderr
        if proc.returncode != 0 or not result.exists():
            raise ComfyError(f"importing the pack in the host failed (rc {proc.returncode}):\n{output}")
        return dict(json.loads(result.read_text()), output=output)
