"""The shipped workflows and the LaVie nodes, run through a real ComfyUI server.

A tiny random model set is written into the server's lavie folder (`test-tiny/`, same layout as the
bundled lavie-tiny set); each shipped API workflow is pointed at it, shrunk to a few frames and
steps, queued through /prompt, and its outputs are checked. The UI-format workflows are converted to
API format here, with the server's /object_info for widget order, and must match the shipped API files.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest
import torch

from comfy_host import ExecutionFailed, PromptRejected

pytestmark = pytest.mark.host

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
API_WORKFLOWS = WORKFLOWS / "api"
STEMS = ("lavie_full_cascade", "lavie_base", "lavie_base_interpolation", "lavie_base_vsr", "lavie_lora",
         "lavie_long_video", "lavie_temporal_decode")
LAVIE_NODES = ("LaVieLoader", "LaVieComponentsLoader", "LaVieTextEncode", "LaVieSampler", "LaVieInterpolate",
               "LaVieUpscale", "LaVieDecode", "LaVieSaveVideo", "LaVieLoRALoader", "LaVieExtendVideo",
               "LaVieSlidingWindowSampler", "LaVieTemporalVAELoader")
LONG_FRAMES = 10
BUNDLED_DIR = "lavie-tiny"
TEST_DIR = "test-tiny"
FRAMES, SIZE, STEPS = 4, 32, 2
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


# ----------------------------------------------------------------------------- tiny model set
def write_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level CLIP BPE vocabulary with a few merges: enough to tokenize any prompt offline."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    chars = [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "model_max_length": 77}))
    return vocab


def make_tiny_models(root: Path, width: int = 32) -> dict[str, Path]:
    """Random tiny UNets, VAEs (x8, x4) and a CLIP text encoder in the pack's components layout."""
    from ckpt_factory import random_state_dict_for
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import lavie_core
    from lavie_core.vae import AutoencoderKL, VAEConfig

    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, kind in enumerate(lavie_core.KINDS):
        config = lavie_core.UNetConfig.tiny(kind, cross_attention_dim=width)
        with torch.device("meta"):
            unet = lavie_core.LaVieUNet(config)
        unet.load_state_dict(random_state_dict_for(unet, seed=i), assign=True)
        paths[kind] = root / f"{kind}.safetensors"
        lavie_core.save_unet(unet, paths[kind])
    for levels, name in ((4, "vae.safetensors"), (3, "vae_x4.safetensors")):
        torch.manual_seed(levels)
        vae = AutoencoderKL(VAEConfig.tiny(levels))
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / name))
        paths[name] = root / name
    text = root / "text_encoder"
    vocab = write_tokenizer(text)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )).save_pretrained(text)
    paths["text_encoder"] = text
    return paths


@pytest.fixture(scope="module")
def server(comfy_server):
    target = comfy_server.models_dir / "lavie" / TEST_DIR
    if not (target / "vsr.safetensors").exists():
        make_tiny_models(target)
    return comfy_server


# ----------------------------------------------------------------------------- graphs
def load_api(stem: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{stem}.json").read_text())


def shrink(graph: dict, prefix: str) -> dict:
    """Point a shipped graph at the test-tiny set and make it small and fast."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LaVieLoader":
            inputs["ckpt_name"] = inputs["ckpt_name"].replace(BUNDLED_DIR, TEST_DIR, 1)
        elif kind == "LaVieComponentsLoader":
            inputs["components"] = TEST_DIR
        elif kind == "LaVieSampler":
            inputs.update(frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS)
        elif kind == "LaVieSlidingWindowSampler":
            inputs.update(frames=LONG_FRAMES, context_length=FRAMES, context_overlap=2, width=SIZE, height=SIZE,
                          steps=STEPS)
        elif kind == "LaVieExtendVideo":
            inputs.update(total_frames=LONG_FRAMES, clip_frames=FRAMES, cond_frames=2, width=SIZE, height=SIZE,
                          steps=STEPS)
        elif kind in ("LaVieInterpolate", "LaVieUpscale"):
            inputs["steps"] = STEPS
        elif kind == "LaVieSaveVideo":
            inputs["filename_prefix"] = prefix
    return graph


def nodes_of(graph: dict, class_type: str) -> list[str]:
    return [k for k, v in graph.items() if v["class_type"] == class_type]


def saved_video(server, prompt_id: str) -> dict:
    ui = [out for out in server.outputs(prompt_id).values() if "video" in out]
    assert len(ui) == 1, server.outputs(prompt_id)
    return ui[0]


def read_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) read back by decoding every frame."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames, shape = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames, shape = frames + 1, frame.shape[:2]
    cap.release()
    return frames, *shape


def check_saved(server, prompt_id: str, frames: int, size: int) -> None:
    ui = saved_video(server, prompt_id)
    video = ui["video"][0]
    assert (video["frames"], video["height"], video["width"]) == (frames, size, size)
    path = server.output_dir / video["subfolder"] / video["filename"]
    assert path.suffix == ".mp4" and path.stat().st_size > 0
    assert read_video(path) == (frames, size, size)
    preview = server.temp_dir / ui["images"][0]["subfolder"] / ui["images"][0]["filename"]
    from PIL import Image

    with Image.open(preview) as im:
        assert im.format == "WEBP" and getattr(im, "n_frames", 1) == frames


# ----------------------------------------------------------------------------- UI -> API conversion
def _widget_names(spec: dict) -> list[tuple[str, bool]]:
    """(input name, has a control_after_generate companion) for every widget input, in UI order."""
    out = []
    for section in ("required", "optional"):
        for name, entry in (spec.get("input", {}).get(section) or {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                control = kind == "INT" and (name in ("seed", "noise_seed") or bool(options.get("control_after_generate")))
                out.append((name, control))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (litegraph serialisation) as the API graph the frontend would queue."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] not in object_info:
            continue  # muted/bypassed nodes, and front-end-only ones such as Note, are not queued
        spec = object_info[node["type"]]
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, control in _widget_names(spec):
            if values:
                inputs[name] = values.pop(0)
                if control and values:
                    values.pop(0)
        for section in ("required", "optional"):
            for name in spec.get("input", {}).get(section) or {}:
                if name in linked:
                    _, origin, slot, *_ = links[linked[name]]
                    inputs[name] = [str(origin), slot]
        graph[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return graph


# ----------------------------------------------------------------------------- tests
def test_object_info_lists_lavie_nodes_with_tooltips(server):
    info = server.object_info()
    for name in LAVIE_NODES:
        assert name in info, f"{name} missing from /object_info\n{server.log_tail()}"
        spec = info[name]
        assert spec["category"] == "LaVie"
        assert spec["description"], name
        for section in ("required", "optional"):
            for input_name, entry in (spec["input"].get(section) or {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    loader = info["LaVieLoader"]["input"]["required"]["ckpt_name"][0]
    assert f"{TEST_DIR}/base.safetensors" in loader
    assert not any("vae" in n or "text_encoder" in n for n in loader), loader
    assert TEST_DIR in info["LaVieComponentsLoader"]["input"]["required"]["components"][0]


def test_web_extension_is_served(server):
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/extensions/ComfyUI-LaVie/lavie.js", timeout=10) as r:
        assert b"LaVie" in r.read()


@pytest.mark.parametrize("stem", STEMS)
def test_ui_workflow_converts_to_shipped_api(server, stem):
    ui = json.loads((WORKFLOWS / f"{stem}.json").read_text())
    assert ui_to_api(ui, server.object_info()) == load_api(stem)


@pytest.mark.parametrize("stem", STEMS)
def test_workflows_default_to_bundled_tiny_set(stem):
    from importlib import util

    spec = util.spec_from_file_location("lavie_defaults", REPO_ROOT / "nodes" / "defaults.py")
    defaults = util.module_from_spec(spec)
    spec.loader.exec_module(defaults)
    graph = load_api(stem)
    for node in graph.values():
        if node["class_type"] == "LaVieLoader":
            assert node["inputs"]["ckpt_name"] in defaults.TINY_UNETS.values()
        if node["class_type"] == "LaVieComponentsLoader":
            assert node["inputs"]["components"] == defaults.TINY_DIR
        assert node["class_type"].startswith("LaVie") or node["class_type"] in ("PreviewImage", "SaveImage")


def test_base_workflow(server):
    graph = shrink(load_api("lavie_base"), f"base_{uuid.uuid4().hex[:6]}")
    for node in nodes_of(graph, "LaVieLoader"):
        del graph[node]["inputs"]["compile"]  # optional: prompts written before it existed still run
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=600)
    check_saved(server, prompt_id, FRAMES, SIZE)
    sampler = nodes_of(graph, "LaVieSampler")[0]
    bars = [p for p in server.progress(prompt_id) if p["node"] == sampler]
    assert [(p["value"], p["max"]) for p in bars] == [(i + 1, STEPS) for i in range(STEPS)]


@pytest.mark.parametrize(
    "stem,frames",
    [("lavie_lora", [FRAMES]), ("lavie_long_video", [LONG_FRAMES, LONG_FRAMES]), ("lavie_temporal_decode", [FRAMES])],
)
def test_application_workflows(server, stem, frames):
    graph = shrink(load_api(stem), f"{stem}_{uuid.uuid4().hex[:6]}")
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=600)
    videos = [out["video"][0] for out in server.outputs(prompt_id).values() if "video" in out]
    assert sorted(v["frames"] for v in videos) == sorted(frames), server.outputs(prompt_id)
    assert all((v["height"], v["width"]) == (SIZE, SIZE) for v in videos)


def test_base_interpolation_workflow(server):
    graph = shrink(load_api("lavie_base_interpolation"), f"interp_{uuid.uuid4().hex[:6]}")
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=600)
    check_saved(server, prompt_id, 4 * FRAMES - 3, SIZE)


def test_base_vsr_workflow(server):
    graph = shrink(load_api("lavie_base_vsr"), f"vsr_{uuid.uuid4().hex[:6]}")
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=600)
    check_saved(server, prompt_id, FRAMES, 4 * SIZE)


def test_full_cascade_workflow(server):
    graph = shrink(load_api("lavie_full_cascade"), f"cascade_{uuid.uuid4().hex[:6]}")
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=900)
    check_saved(server, prompt_id, 4 * FRAMES - 3, 4 * SIZE)
    upscale = nodes_of(graph, "LaVieUpscale")[0]
    assert any(p["node"] == upscale for p in server.progress(prompt_id))


def test_cancel_stops_sampling_between_steps(server):
    import time

    graph = shrink(load_api("lavie_base"), "cancel")
    sampler = nodes_of(graph, "LaVieSampler")[0]
    graph[sampler]["inputs"]["steps"] = 1000
    prompt_id = server.queue(graph)
    deadline = time.monotonic() + 300
    while not any(p["node"] == sampler for p in server.progress(prompt_id)):
        assert time.monotonic() < deadline, "no progress from LaVie Sampler"
        assert server.history(prompt_id) is None, "finished before it could be cancelled"
        time.sleep(0.05)
    server._request("POST", "/interrupt", {})
    entry = server.wait(prompt_id, timeout=300, check=False)
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    assert max(p["value"] for p in server.progress(prompt_id) if p["node"] == sampler) < 1000


def test_missing_model_file_is_a_node_error(server):
    graph = shrink(load_api("lavie_base"), "missing")
    loader = nodes_of(graph, "LaVieLoader")[0]
    graph[loader]["inputs"]["ckpt_name"] = f"{TEST_DIR}/no_such_model.safetensors"
    with pytest.raises(PromptRejected) as err:
        server.queue(graph)
    text = json.dumps(err.value.node_errors[loader])
    assert "no_such_model.safetensors" in text and "models/lavie" in text.replace("\\\\", "/")


def test_wrong_model_kind_is_an_execution_error(server):
    graph = shrink(load_api("lavie_base"), "wrong_kind")
    loader = nodes_of(graph, "LaVieLoader")[0]
    graph[loader]["inputs"]["ckpt_name"] = f"{TEST_DIR}/vsr.safetensors"
    with pytest.raises(ExecutionFailed) as err:
        server.run(graph, timeout=300)
    assert err.value.error["node_type"] == "LaVieSampler"
    message = err.value.error["exception_message"]
    assert "base" in message and "VSR" in message, message


def test_size_not_multiple_of_8_is_rejected(server):
    graph = shrink(load_api("lavie_base"), "bad_size")
    sampler = nodes_of(graph, "LaVieSampler")[0]
    graph[sampler]["inputs"]["width"] = 100
    with pytest.raises(PromptRejected) as err:
        server.queue(graph)
    text = json.dumps(err.value.node_errors[sampler])
    assert "width 100" in text and "multiple of 8" in text


def test_interpolation_needs_two_frames(server):
    graph = shrink(load_api("lavie_base_interpolation"), "one_frame")
    graph[nodes_of(graph, "LaVieSampler")[0]]["inputs"]["frames"] = 1
    with pytest.raises(ExecutionFailed) as err:
        server.run(graph, timeout=300)
    assert err.value.error["node_type"] == "LaVieInterpolate"
    assert "at least 2 frames" in err.value.error["exception_message"]


def test_core_vae_decode_reads_lavie_latent(server):
    """The LATENT convention (frames as batch, raw VAE latent) works with ComfyUI's own VAEDecode."""
    graph = shrink(load_api("lavie_base"), "core_decode")
    sampler = nodes_of(graph, "LaVieSampler")[0]
    components = nodes_of(graph, "LaVieComponentsLoader")[0]
    graph["900"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": [components, 1]}}
    graph["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0], "filename_prefix": "core_decode"}}
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=600)
    images = server.outputs(prompt_id)["901"]["images"]
    assert len(images) == FRAMES


# ----------------------------------------------------------------------------- front end in a browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required")

BROWSER_CHECK = """
(async () => {
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  for (let i = 0; i < 200 && !(window.app && window.app.graph && window.LiteGraph
       && LiteGraph.registered_node_types["LaVieSaveVideo"]); i++) await wait(100);
  const out = {extension: (app.extensions || []).some((e) => e.name === "LaVie.Frontend")};
  const sampler = LiteGraph.createNode("LaVieSampler");
  app.graph.add(sampler);
  const texts = [];
  const ctx = {save() {}, restore() {}, fillText(t) { texts.push(t); }};
  sampler.onDrawForeground(ctx);
  sampler.widgets.find((w) => w.name === "width").value = 100;
  sampler.onDrawForeground(ctx);
  out.texts = texts;
  out.samplerTaller = sampler.computeSize()[1] - LGraphNode.prototype.computeSize.call(sampler)[1];
  out.samplerWidgets = sampler.serialize().widgets_values.length;
  const saver = LiteGraph.createNode("LaVieSaveVideo");
  app.graph.add(saver);
  saver.onExecuted(VIDEO_MESSAGE);
  const video = saver.lavieVideo && saver.lavieVideo.video;
  out.src = video ? video.src : null;
  for (let i = 0; i < 100 && video && !video.videoWidth && !video.error; i++) await wait(100);
  out.videoSize = video ? [video.videoWidth, video.videoHeight] : null;
  out.videoShown = video ? video.style.display !== "none" : false;
  out.saverTall = saver.computeSize()[1];
  const broken = LiteGraph.createNode("LaVieSaveVideo");
  app.graph.add(broken);
  broken.onExecuted({video: [{filename: "no_such_video.mp4", subfolder: "", type: "output"}]});
  const missing = broken.lavieVideo && broken.lavieVideo.video;
  for (let i = 0; i < 100 && missing && !missing.error; i++) await wait(100);
  out.brokenNote = broken.lavieVideo && broken.lavieVideo.note.style.display !== "none";
  out.brokenHidden = missing ? missing.style.display === "none" : false;
  out.unrelated = [];
  for (const type of ["KSampler", "SaveImage"]) {
    const node = LiteGraph.createNode(type);
    if (node) { app.graph.add(node); node.onExecuted && node.onExecuted({images: []}); out.unrelated.push(type); }
  }
  return JSON.stringify(out);
})()
"""


def _cdp_session(port: int, timeout: float = 60):
    import time
    import urllib.request

    import websocket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages:
                return websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout,
                                                   suppress_origin=True)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("chromium did not open its debugging port")
        time.sleep(0.2)


def _cdp_call(ws, method: str, params: dict, events: list, counter=[0]) -> dict:
    counter[0] += 1
    ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
    while True:
        msg = json.loads(ws.recv())
        if msg.get("id") == counter[0]:
            return msg
        events.append(msg)


def test_frontend_extension_in_browser(server, tmp_path):
    import shutil
    import socket
    import subprocess
    import time

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("needs chromium (apt-get install chromium)")
    # A real saved webm (VP9 plays in Chromium) for the in-node player.
    graph = shrink(load_api("lavie_base"), f"browser_{uuid.uuid4().hex[:6]}")
    graph[nodes_of(graph, "LaVieSaveVideo")[0]]["inputs"]["format"] = "webm"
    prompt_id = server.queue(graph)
    server.wait(prompt_id, timeout=600)
    message = saved_video(server, prompt_id)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([browser, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                             f"--user-data-dir={tmp_path / 'profile'}", server.url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws = _cdp_session(port)
        events: list = []
        _cdp_call(ws, "Runtime.enable", {}, events)
        ready = "document.readyState === 'complete' && !!(window.app && window.app.graph)"
        for _ in range(300):
            probe = _cdp_call(ws, "Runtime.evaluate", {"expression": ready, "returnByValue": True}, events)
            if probe.get("result", {}).get("result", {}).get("value") is True:
                break
            time.sleep(0.1)
        script = BROWSER_CHECK.replace("VIDEO_MESSAGE", json.dumps(message))
        answer = _cdp_call(ws, "Runtime.evaluate", {"expression": script, "awaitPromise": True,
                                                    "returnByValue": True}, events)
        converted = {}
        for stem in STEMS:
            ui = (WORKFLOWS / f"{stem}.json").read_text()
            load = (f"(async () => {{ await app.loadGraphData({ui}); const p = await app.graphToPrompt();"
                    " return JSON.stringify(p.output); })()")
            reply = _cdp_call(ws, "Runtime.evaluate", {"expression": load, "awaitPromise": True,
                                                       "returnByValue": True}, events)
            assert "value" in reply.get("result", {}).get("result", {}), (stem, reply)
            converted[stem] = json.loads(reply["result"]["result"]["value"])
        ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "result" in answer and "exceptionDetails" not in answer["result"], answer
    result = json.loads(answer["result"]["result"]["value"])
    lavie_errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown" and "lavie" in json.dumps(e).lower()]
    assert not lavie_errors, lavie_errors
    assert result["extension"], result
    assert "after VSR x4: 2048x1280" in result["texts"] and "width must be a multiple of 8" in result["texts"]
    assert result["samplerTaller"] > 30
    # frames, width, height, steps, cfg, sampler_name, schedule, seed + its control widget
    assert result["samplerWidgets"] == 9
    video = message["video"][0]
    assert f"filename={video['filename']}" in result["src"] and "type=output" in result["src"]
    assert result["videoSize"] == [video["width"], video["height"]] and result["videoShown"], result
    assert result["brokenNote"] and result["brokenHidden"], result
    # The UI workflows load in the real front end, which queues exactly the shipped API graphs.
    for stem, graph in converted.items():
        for node in graph.values():
            node.pop("_meta", None)
        assert graph == load_api(stem), stem
    assert result["unrelated"] == ["KSampler", "SaveImage"]


def test_workflows_are_templates_where_the_host_serves_them(server):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{server.url}/workflow_templates", timeout=10) as r:
            templates = json.loads(r.read())
    except urllib.error.HTTPError as err:
        if err.code == 404:
            pytest.skip("this host has no custom node templates (added in later ComfyUI releases)")
        raise
    assert set(templates.get("ComfyUI-LaVie", [])) >= set(STEMS)
    assert not [t for t in templates.get("ComfyUI-LaVie", []) if t.startswith("api")]  # API files are not templates
