// LaVie front-end helpers: an in-node player for LaVie Save Video, and live size hints on LaVie Sampler.
// Every hook is guarded: ComfyUI's front-end API changes between releases, and a missing function
// must cost only the feature that needs it, never the page.

const EXTENSION = "LaVie.Frontend";
const HINT_LINE = 15;
const HINT_LINES = 3;
const HINT_PAD = 8;
const BASE_FPS = 8;

function warn(what, err) {
    try {
        console.warn(`[LaVie] ${what}:`, err);
    } catch (_) {
        /* console may be unavailable in odd embeddings */
    }
}

function widgetValue(node, name) {
    const w = (node.widgets || []).find((x) => x && x.name === name);
    return w ? Number(w.value) : NaN;
}

// Text shown under LaVie Sampler's widgets: what each stage of the cascade will produce.
export function samplerHints(frames, width, height) {
    if (!(frames > 0 && width > 0 && height > 0)) return [];
    const lines = [];
    const bad = [width % 8 ? "width" : null, height % 8 ? "height" : null].filter(Boolean);
    const seconds = frames > 1 ? (frames - 1) / BASE_FPS : 1 / BASE_FPS;
    lines.push({
        text: `base: ${frames} frames, ${width}x${height}, ${seconds.toFixed(2)} s at ${BASE_FPS} fps`,
        error: false,
    });
    if (frames >= 2) {
        const n = 4 * frames - 3;
        lines.push({
            text: `interpolated: ${n} frames (4n-3), same length at ${4 * BASE_FPS} fps`,
            error: false,
        });
    } else {
        lines.push({ text: "interpolation needs at least 2 frames", error: true });
    }
    if (bad.length) {
        lines.push({ text: `${bad.join(" and ")} must be a multiple of 8`, error: true });
    } else {
        lines.push({ text: `after VSR x4: ${4 * width}x${4 * height}`, error: false });
    }
    return lines;
}

// Older front ends only copy LGraphNode's methods onto a node class when it is registered, after
// this hook runs; newer ones subclass LGraphNode. Either way the base method is found at call time.
function baseMethod(nodeType, name) {
    const own = nodeType.prototype[name];
    if (typeof own === "function") return own;
    const graphNode = globalThis.LGraphNode ?? globalThis.LiteGraph?.LGraphNode;
    return graphNode?.prototype?.[name];
}

function addSamplerHints(nodeType) {
    const computeSize = baseMethod(nodeType, "computeSize");
    if (typeof computeSize === "function") {
        nodeType.prototype.computeSize = function () {
            const size = computeSize.apply(this, arguments);
            try {
                if (size && size.length >= 2) size[1] += HINT_LINES * HINT_LINE + HINT_PAD;
            } catch (err) {
                warn("hint size", err);
            }
            return size;
        };
    }
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
        const result = onDrawForeground?.apply(this, arguments);
        try {
            if (this.flags?.collapsed || !ctx || typeof ctx.fillText !== "function") return result;
            const lines = samplerHints(widgetValue(this, "frames"), widgetValue(this, "width"), widgetValue(this, "height"));
            if (!lines.length) return result;
            ctx.save();
            ctx.font = "12px sans-serif";
            ctx.textAlign = "left";
            let y = this.size[1] - HINT_LINES * HINT_LINE - HINT_PAD / 2 + 11;
            for (const line of lines) {
                ctx.fillStyle = line.error ? "#f66" : "#9ab";
                ctx.fillText(line.text, 10, y, Math.max(20, this.size[0] - 20));
                y += HINT_LINE;
            }
            ctx.restore();
        } catch (err) {
            warn("hint drawing", err);
        }
        return result;
    };
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        try {
            const size = this.computeSize?.();
            if (size && this.size && this.size[1] < size[1]) this.setSize?.([this.size[0], size[1]]);
        } catch (err) {
            warn("hint layout", err);
        }
        return result;
    };
}

function viewUrl(api, file) {
    const params = new URLSearchParams({
        filename: file.filename,
        subfolder: file.subfolder || "",
        type: file.type || "output",
    });
    const path = `/view?${params.toString()}`;
    return typeof api?.apiURL === "function" ? api.apiURL(path) : path;
}

function ensurePlayer(node) {
    if (node.lavieVideo) return node.lavieVideo;
    if (typeof node.addDOMWidget !== "function") return null;
    const box = document.createElement("div");
    box.style.cssText = "width:100%;display:flex;flex-direction:column;align-items:center";
    const video = document.createElement("video");
    video.controls = true;
    video.loop = true;
    video.muted = true;
    video.autoplay = true;
    video.playsInline = true;
    video.style.cssText = "width:100%;max-height:100%;object-fit:contain;display:none";
    const note = document.createElement("div");
    note.style.cssText = "font-size:11px;opacity:0.7;padding:2px 4px;display:none";
    box.append(video, note);
    const widget = node.addDOMWidget("lavie_video", "lavie_video", box, {
        serialize: false,
        hideOnZoom: false,
        getValue() {
            return undefined;
        },
        setValue() {},
    });
    if (widget) {
        widget.serializeValue = () => undefined;
        widget.computeSize = function (width) {
            const w = Number.isFinite(width) ? width : node.size?.[0] ?? 200;
            let h;
            if (video.style.display === "none") {
                h = note.style.display === "none" ? -4 : 48;
            } else {
                const ratio = video.videoWidth ? video.videoHeight / video.videoWidth : 0.625;
                h = Math.max(60, (w - 20) * ratio + 28);
            }
            this.computedHeight = h;
            return [w, h];
        };
    }
    video.addEventListener("loadedmetadata", () => {
        video.style.display = "";
        note.style.display = "none";
        try {
            const size = node.computeSize?.();
            if (size) node.setSize?.([node.size[0], Math.max(node.size[1], size[1])]);
            node.setDirtyCanvas?.(true, true);
        } catch (err) {
            warn("player layout", err);
        }
    });
    video.addEventListener("error", () => {
        // An mp4 in MPEG-4 part 2 (OpenCV without H.264) is a valid file most browsers cannot play.
        video.style.display = "none";
        note.textContent = "This browser cannot play the saved file's codec; the animated preview shows the video, and the file is in the output folder.";
        note.style.display = "";
        try {
            const size = node.computeSize?.();
            node.setSize?.([node.size[0], Math.max(node.size[1], size ? size[1] : 0)]);
        } catch (err) {
            warn("player layout", err);
        }
        node.setDirtyCanvas?.(true, true);
    });
    node.lavieVideo = { video, note, widget };
    return node.lavieVideo;
}

function addVideoPlayer(nodeType, api) {
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
        const result = onExecuted?.apply(this, arguments);
        try {
            const file = message?.video?.[0];
            if (!file?.filename) return result;
            const player = ensurePlayer(this);
            if (!player) return result;
            player.video.src = viewUrl(api, file);
            player.video.title = `${file.filename}: ${file.frames} frames, ${file.width}x${file.height}, ${file.fps} fps (${file.codec})`;
        } catch (err) {
            warn("video preview", err);
        }
        return result;
    };
}

async function register() {
    let app;
    let api;
    try {
        ({ app } = await import("../../scripts/app.js"));
    } catch (err) {
        warn("ComfyUI app module not found; LaVie front-end helpers disabled", err);
        return;
    }
    try {
        ({ api } = await import("../../scripts/api.js"));
    } catch (err) {
        warn("ComfyUI api module not found; video URLs are relative", err);
    }
    if (typeof app?.registerExtension !== "function") return;
    app.registerExtension({
        name: EXTENSION,
        async beforeRegisterNodeDef(nodeType, nodeData) {
            try {
                if (nodeData?.name === "LaVieSampler") addSamplerHints(nodeType);
                if (nodeData?.name === "LaVieSaveVideo") addVideoPlayer(nodeType, api);
            } catch (err) {
                warn(`setting up ${nodeData?.name}`, err);
            }
        },
    });
}

if (typeof window !== "undefined") {
    // Awaited at the top level so the host, which awaits this module, sees the extension before it
    // registers node types.
    try {
        await register();
    } catch (err) {
        warn("registration", err);
    }
}
