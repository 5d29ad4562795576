"""The real ComfyUI host loads the pack, and the test harness works end to end (core nodes only)."""

from __future__ import annotations

import os
import uuid

import pytest
from PIL import Image

from comfy_host import PACK_FOLDER, ExecutionFailed, PromptRejected

pytestmark = pytest.mark.host


def test_pack_imports_without_failure(comfy_server):
    log = comfy_server.log()
    pack_path = os.path.join("custom_nodes", PACK_FOLDER)
    timing_lines = [line for line in log.splitlines()
                    if "seconds" in line and line.rstrip().endswith(pack_path)]
    assert len(timing_lines) == 1, f"pack not listed in the import times\n{comfy_server.log_tail()}"
    assert "IMPORT FAILED" not in timing_lines[0], comfy_server.log_tail(120)
    assert f"Cannot import {comfy_server.custom_nodes_dir / PACK_FOLDER}" not in log


def test_object_info_lists_every_pack_node(comfy_server):
    pack = comfy_server.import_pack()
    assert pack["loaded"], f"the host could not import the pack:\n{pack['output']}"
    info = comfy_server.object_info()
    assert "SaveImage" in info
    missing = [name for name in pack["nodes"] if name not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{comfy_server.log_tail()}"
    for name, display in pack["display_names"].items():
        assert name in pack["nodes"], f"display name for unknown node {name}"
        assert info[name]["display_name"] == display


def test_core_graph_runs_end_to_end(comfy_server):
    prefix = f"harness_{uuid.uuid4().hex[:8]}"
    graph = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 48, "batch_size": 3, "color": 0xFF8000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
        # Core node that reports a progress bar and sends previews: proves progress collection.
        "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }
    prompt_id = comfy_server.queue(graph)
    entry = comfy_server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "success"

    files = comfy_server.output_files(prompt_id)
    assert len(files) == 3 and all(f.name.startswith(prefix) for f in files), files
    for f in files:
        with Image.open(f) as img:
            assert img.size == (64, 48)
            assert img.convert("RGB").getpixel((10, 10)) == (255, 128, 0)

    bars = [p for p in comfy_server.progress(prompt_id) if p["node"] == "3"]
    assert [(p["value"], p["max"]) for p in bars] == [(0, 3), (1, 3), (2, 3)]
    types = [m["type"] for m in comfy_server.messages(prompt_id)]
    assert types.count("preview") == 3
    assert types[0] == "execution_start" and types[-1] == "executing"


def test_rejected_prompt_reports_node_errors(comfy_server):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(PromptRejected) as err:
        comfy_server.queue(graph)
    assert "1" in err.value.node_errors
    assert "width" in str(err.value)


def test_failing_node_raises_execution_error(comfy_server):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": 0}},
        # Reflect padding wider than the image: fails at run time, not at validation.
        "2": {"class_type": "ImageSharpen",
              "inputs": {"image": ["1", 0], "sharpen_radius": 5, "sigma": 1.0, "alpha": 1.0}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    prompt_id = comfy_server.queue(graph)
    entry = comfy_server.wait(prompt_id, timeout=120, check=False)
    assert entry["status"]["status_str"] == "error"
    with pytest.raises(ExecutionFailed) as err:
        comfy_server.wait(prompt_id)
    assert err.value.error["node_type"] == "ImageSharpen"
    assert err.value.error["exception_message"] in str(err.value)
    assert "execution_error" in [m["type"] for m in comfy_server.messages(prompt_id)]


def test_sigterm_stops_the_server_it_started(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from comfy_host import HOST_DIR

    if not (HOST_DIR / "main.py").is_file():
        pytest.skip(f"ComfyUI test host not installed at {HOST_DIR}")
    tools = Path(__file__).resolve().parents[1] / "tools"
    script = (f"import sys, time; sys.path.insert(0, {str(tools)!r}); from comfy_host import ComfyServer\n"
              f"s = ComfyServer(work_dir={str(tmp_path)!r}).start(); print(s._proc.pid, flush=True); time.sleep(600)")
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(runner.stdout.readline())
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        runner.kill()
    with pytest.raises(ProcessLookupError):  # a zombie would still answer; stop() waited for it
        os.kill(server_pid, 0)
