"""The pack on the ComfyUI canvas, in a real headless Chromium against the real test server.

For every shipped UI-format workflow: rewrite it to the test-tiny model set and small sizes, drop the
file onto the canvas the way a user does (a `drop` event carrying a File), check the graph the page
built (every node type registered, no missing-nodes dialog, no errored node, the LaVie nodes' widgets
shown with tooltips from the node definitions the page loaded), queue it from the page, wait for the
LaVie Save Video node to show its result (animated preview and the in-node video player of js/lavie.js),
and save screenshots under artifacts/screenshots/.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path

import pytest

from browser import Chromium, chromium_or_skip, image_stats
from comfy_host import ComfyError, ExecutionFailed
from test_workflows import (FRAMES, LAVIE_NODES, LONG_FRAMES, SIZE, STEMS, TEST_DIR, WIDGET_TYPES, _widget_names,
                            make_tiny_models, shrink, ui_to_api)

pytestmark = pytest.mark.host

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
EXTENSION = "LaVie.Frontend"
EXTENSION_URL = "/extensions/ComfyUI-LaVie/lavie.js"
# Frames and (square) size every LaVie Save Video node of a shrunk workflow writes.
EXPECTED = {
    "lavie_full_cascade": (4 * FRAMES - 3, 4 * SIZE),
    "lavie_base": (FRAMES, SIZE),
    "lavie_base_interpolation": (4 * FRAMES - 3, SIZE),
    "lavie_base_vsr": (FRAMES, 4 * SIZE),
    "lavie_lora": (FRAMES, SIZE),
    "lavie_long_video": (LONG_FRAMES, SIZE),
    "lavie_temporal_decode": (FRAMES, SIZE),
}
# Saved as webm (VP9 plays in any Chromium); the others keep the shipped mp4.
WEBM = {"lavie_full_cascade"}
PAGE_TIMEOUT = 180
RUN_TIMEOUT = 420
# Screen-space variance floors: a canvas with only its background grid is far below these.
MIN_STD_PAGE = 12.0
MIN_STD_NODE = 10.0

SETUP_JS = """
(async () => {
  const {api} = await import("/scripts/api.js");
  const t = window.__lavieTest = {events: []};
  for (const type of ["execution_start", "executing", "executed", "execution_cached", "execution_error",
                      "execution_interrupted"]) {
    api.addEventListener(type, (e) => t.events.push({type, detail: e.detail === undefined ? null
                                                      : JSON.parse(JSON.stringify(e.detail))}));
  }
  t.dialog = () => {
    const el = app.ui.dialog.element;
    return el && getComputedStyle(el).display !== "none" ? el.textContent : null;
  };
  // Frame every node inside the canvas, left of the menu panel, then draw synchronously.
  t.fit = () => {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph._nodes) {
      const b = n.getBounding();
      x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
      x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
    }
    const menu = document.querySelector(".comfy-menu");
    const right = menu ? Math.max(0, window.innerWidth - menu.getBoundingClientRect().left) + 10 : 0;
    const pad = 24, w = app.canvasEl.clientWidth - right - 2 * pad, h = app.canvasEl.clientHeight - 2 * pad;
    const scale = Math.min(1, w / (x1 - x0), h / (y1 - y0));
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [pad / scale - x0 + (w / scale - (x1 - x0)) / 2,
                            pad / scale - y0 + (h / scale - (y1 - y0)) / 2];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    return scale;
  };
  t.screenRect = (n) => {
    const b = n.getBounding();
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([b[0], b[1]]);
    const r = app.canvasEl.getBoundingClientRect();
    const s = app.canvas.ds.scale;
    return [r.left + x, r.top + y, b[2] * s, b[3] * s];
  };
  t.state = () => ({
    token: app.graph.extra?.lavie_test ?? null,
    dialog: t.dialog(),
    missingDialog: !!document.querySelector(".comfy-missing-nodes") && t.dialog() !== null,
    lastNodeErrors: app.lastNodeErrors ?? null,
    lastExecutionError: app.lastExecutionError ?? null,
    scale: app.canvas.ds.scale,
    nodes: app.graph._nodes.map((n) => ({
      id: n.id, type: n.type, comfyClass: n.comfyClass ?? null, mode: n.mode,
      registered: Object.prototype.hasOwnProperty.call(LiteGraph.registered_node_types, n.type),
      hasErrors: !!n.has_errors, color: n.color ?? null, bgcolor: n.bgcolor ?? null,
      size: [n.size[0], n.size[1]], minSize: n.computeSize ? Array.from(n.computeSize()) : null,
      values: n.serialize().widgets_values ?? null,
      def: n.constructor.nodeData ? {input: n.constructor.nodeData.input} : null,
      widgets: (n.widgets || []).map((w) => ({
        name: w.name, type: w.type, hidden: w.type === "converted-widget" || w.type === "hidden" || !!w.hidden,
        tooltip: w.tooltip ?? w.options?.tooltip ?? null})),
      rect: t.screenRect(n),
    })),
  });
  t.results = () => app.graph._nodes.filter((n) => n.type === "LaVieSaveVideo").map((n) => {
    const player = n.lavieVideo, v = player?.video;
    const r = v ? v.getBoundingClientRect() : null;
    return {
      id: n.id, rect: t.screenRect(n),
      elements: (n.widgets || []).filter((w) => w.element).map((w) => {
        const e = w.element.getBoundingClientRect();
        return {name: w.name, shown: !w.element.hidden && getComputedStyle(w.element).display !== "none",
                rect: [e.left, e.top, e.width, e.height], y: w.y ?? null, computedHeight: w.computedHeight ?? null};
      }),
      imgs: (n.imgs || []).map((i) => ({src: i.src, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
      player: v ? {
        src: v.src, title: v.title, display: v.style.display, error: v.error ? v.error.code : null,
        readyState: v.readyState, paused: v.paused, currentTime: v.currentTime,
        videoWidth: v.videoWidth, videoHeight: v.videoHeight, connected: v.isConnected,
        rect: [r.left, r.top, r.width, r.height],
        note: player.note.style.display !== "none" ? player.note.textContent : null,
        widget: (n.widgets || []).some((w) => w === player.widget),
      } : null,
    };
  });
  return true;
})()
"""

PAGE_STATE_JS = """({
  readyState: document.readyState, app: !!window.app, graph: !!window.app?.graph, canvas: !!window.app?.canvas,
  lavieTypes: window.LiteGraph
    ? Object.keys(LiteGraph.registered_node_types).filter((k) => k.startsWith("LaVie")) : null,
  extensions: (window.app?.extensions || []).map((e) => e.name),
  dialog: window.app?.ui?.dialog?.element?.textContent ?? null,
})"""

DROP_JS = """
((text, name) => {
  app.ui.dialog.close();
  const file = new File([text], name, {type: "application/json"});
  const data = new DataTransfer();
  data.items.add(file);
  const r = app.canvasEl.getBoundingClientRect();
  const at = {bubbles: true, cancelable: true, composed: true, dataTransfer: data,
              clientX: r.left + r.width / 2, clientY: r.top + r.height / 2};
  for (const type of ["dragenter", "dragover", "drop"]) app.canvasEl.dispatchEvent(new DragEvent(type, at));
  return data.files.length;
})(%s, %s)
"""

# True once every LaVie Save Video node shows its animated preview and its player has a source that
# either loaded a frame or failed (an mp4 codec this browser lacks). Drawing builds the preview.
RESULT_READY_JS = """
(() => {
  app.canvas.draw(true, true);
  const saves = app.graph._nodes.filter((n) => n.type === "LaVieSaveVideo");
  return saves.length > 0 && saves.every((n) => {
    const v = n.lavieVideo?.video;
    const shown = (n.imgs || []).length > 0 && n.imgs.every((i) => i.complete && i.naturalWidth > 0);
    return shown && v && v.src && (v.error || (v.readyState >= 2 && (v.currentTime > 0 || WANT_PLAYING === false)));
  });
})()
"""


# ----------------------------------------------------------------------------- workflow rewriting
def shrink_ui(workflow: dict, object_info: dict, prefix: str, fmt: str | None = None) -> dict:
    """The UI-format workflow with the same widget values that shrink() gives its API graph."""
    workflow = copy.deepcopy(workflow)
    graph = shrink(ui_to_api(workflow, object_info), prefix)
    for node in workflow["nodes"]:
        api = graph.get(str(node["id"]))
        if api is None:
            continue
        if fmt and node["type"] == "LaVieSaveVideo":
            api["inputs"]["format"] = fmt
        values = node.get("widgets_values") or []
        i = 0
        for name, control in _widget_names(object_info[node["type"]]):
            if i >= len(values):
                break
            values[i] = api["inputs"][name]
            i += 2 if control else 1
    return workflow


def widget_inputs(spec: dict) -> dict[str, list]:
    """{input name: definition} of every input shown as a widget."""
    out = {}
    for section in ("required", "optional"):
        for name, entry in (spec.get("input", {}).get(section) or {}).items():
            if isinstance(entry[0], list) or entry[0] in WIDGET_TYPES:
                out[name] = entry
    return out


def all_inputs(spec: dict) -> dict[str, list]:
    return {name: entry for section in ("required", "optional")
            for name, entry in (spec.get("input", {}).get(section) or {}).items()}


def wait_finished(server, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
    """The prompt's /history entry once it is there (the page, not the harness, queued it)."""
    deadline = time.monotonic() + timeout
    while (entry := server.history(prompt_id)) is None:
        server._check_alive()
        if time.monotonic() > deadline:
            raise ComfyError(f"prompt {prompt_id} not finished after {timeout}s\n{server.log_tail()}")
        time.sleep(0.2)
    if entry.get("status", {}).get("status_str") == "error":
        raise ExecutionFailed(prompt_id, entry)
    return entry


def crop_box(rect, size) -> tuple[int, int, int, int]:
    x, y, w, h = rect
    box = (max(0, int(x)), max(0, int(y)), min(size[0], int(x + w)), min(size[1], int(y + h)))
    assert box[2] - box[0] > 8 and box[3] - box[1] > 8, f"{rect} is not on screen"
    return box


def inside(inner, outer, slack: float = 2.0) -> bool:
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack
            and inner[0] + inner[2] <= outer[0] + outer[2] + slack
            and inner[1] + inner[3] <= outer[1] + outer[3] + slack)


def check_layout(stem: str, result: dict) -> None:
    """The save node's DOM widgets (player, animated preview) sit inside it, one below the other,
    and a playing video gets room for its frame."""
    node = f"{stem}: LaVie Save Video {result['id']}"
    shown = [e for e in result["elements"] if e["shown"] and e["rect"][2] > 0 and e["rect"][3] > 0]
    for element in shown:
        assert inside(element["rect"], result["rect"]), \
            f"{node}: DOM widget {element['name']} at {element['rect']} lies outside the node at {result['rect']}"
    shown.sort(key=lambda e: e["rect"][1])
    for upper, lower in zip(shown, shown[1:]):
        overlap = upper["rect"][1] + upper["rect"][3] - lower["rect"][1]
        assert overlap <= 1, f"{node}: DOM widgets {upper['name']} and {lower['name']} overlap by {overlap:.0f}px " \
                             f"({upper['rect']} / {lower['rect']})"
    player = result["player"]
    if player["error"] is None:
        x, y, width, height = player["rect"]
        frame = width * player["videoHeight"] / player["videoWidth"]
        assert height >= 0.5 * frame and height >= 40, \
            f"{node}: the video plays in a {width:.0f}x{height:.0f} box; its frame needs about {width:.0f}x{frame:.0f}"


def check_screenshot(path: Path, rects: dict[str, list]) -> dict:
    """The PNG shows a drawn graph: varied pixels overall and inside each given node rectangle."""
    stats = image_stats(path)
    assert stats["std"] > MIN_STD_PAGE and stats["colors"] > 200, (path, stats)
    for label, rect in rects.items():
        local = image_stats(path, crop_box(rect, stats["size"]))
        assert local["std"] > MIN_STD_NODE, (path, label, rect, local)
    return stats


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(comfy_server):
    target = comfy_server.models_dir / "lavie" / TEST_DIR
    if not (target / "vsr.safetensors").exists():
        make_tiny_models(target)
    return comfy_server


@pytest.fixture(scope="module")
def chromium():
    """Path of the system Chromium (skips without one, fails under CI=true); checked before the server starts."""
    return chromium_or_skip()


@pytest.fixture(scope="module")
def page(chromium, server, tmp_path_factory):
    """One Chromium for the module, showing the ComfyUI page with the LaVie extension registered."""
    info = server.object_info()
    missing = [name for name in LAVIE_NODES if name not in info]
    if missing:
        pytest.fail(f"the server lists no {', '.join(missing)} (the pack failed to import?)\n{server.log_tail()}")
    browser = Chromium(chromium, tmp_path_factory.mktemp("chromium") / "profile")
    try:
        browser.start()
        browser.navigate(server.url)
        browser.wait_for(
            "document.readyState === 'complete' && !!(window.app && app.graph && app.canvas && window.LiteGraph"
            " && LiteGraph.registered_node_types.LaVieSaveVideo"
            f" && (app.extensions || []).some((e) => e.name === {EXTENSION!r}))",
            timeout=PAGE_TIMEOUT, what="the ComfyUI page with the LaVie extension", diagnose=PAGE_STATE_JS)
        browser.evaluate(SETUP_JS)
        yield browser
    finally:
        browser.close()


def lavie_console(page, since: int) -> list[str]:
    return [line for line in page.console(since)
            if line.startswith("exception:") or "[LaVie]" in line or "lavie" in line.lower()]


# ----------------------------------------------------------------------------- tests
def test_extension_loads_in_page(page, server):
    loaded = page.evaluate(f"performance.getEntriesByType('resource').some((e) => e.name.endsWith({EXTENSION_URL!r}))")
    assert loaded, "the page never fetched " + EXTENSION_URL
    hooks = page.evaluate("""(() => {
      const saver = LiteGraph.registered_node_types.LaVieSaveVideo.prototype;
      const sampler = LiteGraph.registered_node_types.LaVieSampler.prototype;
      return {onExecuted: typeof saver.onExecuted, draw: typeof sampler.onDrawForeground};
    })()""")
    assert hooks == {"onExecuted": "function", "draw": "function"}
    # Every LaVie node type the server lists is registered in the page, with tooltips on all inputs.
    defs = page.evaluate("""(async () => {
      const {api} = await import("/scripts/api.js");
      const defs = await api.getNodeDefs();
      return Object.fromEntries(Object.entries(defs).filter(([k]) => k.startsWith("LaVie"))
        .map(([k, d]) => [k, {input: d.input, registered: k in LiteGraph.registered_node_types}]));
    })()""")
    assert sorted(defs) == sorted(k for k in server.object_info() if k.startswith("LaVie"))
    for name, spec in defs.items():
        assert spec["registered"], name
        for input_name, entry in all_inputs(spec).items():
            assert len(entry) > 1 and (entry[1] or {}).get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert not lavie_console(page, 0), lavie_console(page, 0)


@pytest.mark.parametrize("stem", STEMS)
def test_workflow_on_canvas(page, server, stem):
    started = time.monotonic()
    since = len(page.events)
    fmt = "webm" if stem in WEBM else None
    token = f"{stem}-{uuid.uuid4().hex[:8]}"
    original = json.loads((WORKFLOWS / f"{stem}.json").read_text())
    workflow = shrink_ui(original, server.object_info(), f"browser_{stem}_{uuid.uuid4().hex[:6]}", fmt)
    workflow.setdefault("extra", {})["lavie_test"] = token

    # ---- drop the file on the canvas
    assert page.evaluate(DROP_JS % (json.dumps(json.dumps(workflow)), json.dumps(f"{stem}.json"))) == 1
    page.wait_for(f"app.graph.extra?.lavie_test === {token!r}", timeout=120, what=f"{stem}.json to load")
    scale = page.evaluate("window.__lavieTest.fit()")
    state = page.evaluate("window.__lavieTest.state()")

    assert not state["missingDialog"] and state["dialog"] is None, state["dialog"]
    assert sorted((n["id"], n["type"]) for n in state["nodes"]) == \
        sorted((n["id"], n["type"]) for n in workflow["nodes"])
    by_id = {n["id"]: n for n in workflow["nodes"]}
    lavie_rects = {}
    for node in state["nodes"]:
        label = f"{stem}: node {node['id']} ({node['type']})"
        assert node["registered"] and not node["hasErrors"], label
        assert node["mode"] == 0 and node["color"] in (None, by_id[node["id"]].get("color")), label
        assert not (state["lastNodeErrors"] or {}).get(str(node["id"])), label
        if not node["type"].startswith("LaVie"):
            continue
        lavie_rects[label] = node["rect"]
        # The node is the one the server defines, showing what the dropped file holds.
        assert node["comfyClass"] == node["type"] and node["def"], label
        assert node["values"] == by_id[node["id"]]["widgets_values"], label
        assert node["size"][1] >= node["minSize"][1] - 1, (label, node["size"], node["minSize"])
        shown = {w["name"]: w for w in node["widgets"] if not w["hidden"]}
        specs = widget_inputs(node["def"])
        assert specs and set(specs) <= set(shown), (label, sorted(specs), sorted(shown))
        for input_name, entry in all_inputs(node["def"]).items():
            tooltip = (entry[1] if len(entry) > 1 else {}).get("tooltip")
            assert tooltip, f"{label}: input {input_name} has no tooltip"
            if shown.get(input_name, {}).get("tooltip") is not None:
                assert shown[input_name]["tooltip"] == tooltip, (label, input_name)
        extra = set(shown) - set(specs) - {"control_after_generate"}
        assert not extra, (label, extra)
    loaded_png = page.screenshot(SCREENSHOTS / f"{stem}-loaded.png")
    check_screenshot(loaded_png, lavie_rects)
    loaded_at = time.monotonic()

    # ---- queue it from the page and wait for the result on the canvas
    queued = page.evaluate("""(async () => {
      window.__lavieTest.events.length = 0;
      await app.queuePrompt(0, 1);
      return {errors: app.lastNodeErrors ?? null, dialog: window.__lavieTest.dialog()};
    })()""")
    assert not queued["errors"] and queued["dialog"] is None, queued
    prompt_id = page.wait_for(
        "window.__lavieTest.events.find((e) => e.type === 'execution_start')?.detail?.prompt_id",
        timeout=RUN_TIMEOUT, what=f"{stem} to start")
    wait_finished(server, prompt_id)
    ran_at = time.monotonic()
    page.wait_for("window.__lavieTest.events.some((e) => e.type === 'executing' && e.detail === null)",
                  timeout=120, what=f"{stem}: the page to see the prompt finish")
    page.wait_for(RESULT_READY_JS.replace("WANT_PLAYING", "true" if fmt == "webm" else "false"),
                  timeout=180, what=f"{stem}: the LaVie Save Video preview and player",
                  diagnose="window.__lavieTest.results()")
    page.evaluate("window.__lavieTest.fit()")
    events = page.evaluate("window.__lavieTest.events")
    results = page.evaluate("window.__lavieTest.results()")
    state = page.evaluate("window.__lavieTest.state()")
    result_png = page.screenshot(SCREENSHOTS / f"{stem}-result.png")
    finished_at = time.monotonic()

    assert not [e for e in events if e["type"] in ("execution_error", "execution_interrupted")], events
    assert state["dialog"] is None and state["lastExecutionError"] is None, state["dialog"]
    assert not any(n["hasErrors"] for n in state["nodes"])
    executed = {str(e["detail"]["node"]): e["detail"]["output"] for e in events if e["type"] == "executed"}
    outputs = server.outputs(prompt_id)
    save_ids = [str(n["id"]) for n in workflow["nodes"] if n["type"] == "LaVieSaveVideo"]
    assert sorted(str(r["id"]) for r in results) == sorted(save_ids)
    frames, size = EXPECTED[stem]
    rects = {}
    for result in results:
        node_id = str(result["id"])
        assert node_id in executed, (stem, node_id, sorted(executed))
        output = executed[node_id]
        assert output == outputs[node_id]  # what the page got is what the server recorded
        video = output["video"][0]
        assert (video["frames"], video["width"], video["height"]) == (frames, size, size), video
        path = server.output_dir / video["subfolder"] / video["filename"]
        assert path.is_file() and path.stat().st_size > 0, path
        assert path.suffix == "." + (fmt or "mp4")
        # Animated preview (the node's images, loaded from the temp folder).
        preview = output["images"][0]
        assert any(f"filename={preview['filename']}" in img["src"] and "type=temp" in img["src"]
                   for img in result["imgs"]), result["imgs"]
        # The extension's in-node player points at the saved file.
        player = result["player"]
        assert player and player["connected"] and player["widget"], (stem, node_id, player)
        src = player["src"]
        assert f"filename={video['filename']}" in src and "type=output" in src, src
        assert f"subfolder={video['subfolder']}" in src.replace("%2F", "/"), src
        assert video["filename"] in player["title"] and f"{frames} frames" in player["title"]
        if fmt == "webm":
            assert player["error"] is None and player["display"] != "none", player
            assert (player["videoWidth"], player["videoHeight"]) == (size, size), player
            assert player["readyState"] >= 2 and player["currentTime"] > 0 and not player["paused"], player
            assert player["note"] is None
            rects[f"node {node_id} video"] = player["rect"]
        elif player["error"] is None:  # this Chromium plays the mp4 codec
            assert (player["videoWidth"], player["videoHeight"]) == (size, size), player
            rects[f"node {node_id} video"] = player["rect"]
        else:  # it cannot: the player hides itself and says why, the animated preview stays
            assert player["display"] == "none" and player["note"] and "codec" in player["note"], player
        rects[f"node {node_id}"] = result["rect"]
        check_layout(stem, result)
    check_screenshot(result_png, rects)
    assert not lavie_console(page, since), lavie_console(page, since)
    print(f"\n{stem}: load {loaded_at - started:.1f}s, run {ran_at - loaded_at:.1f}s, "
          f"result shown {finished_at - ran_at:.1f}s, scale {scale:.2f}, "
          f"screenshots {loaded_png.relative_to(REPO_ROOT)} {result_png.relative_to(REPO_ROOT)}")
