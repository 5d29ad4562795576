"""Write docs/NODES.md from what a running ComfyUI reports for this pack's nodes (`/object_info`).

    .venv/bin/python tools/node_docs.py [--check]

`--check` exits non-zero when the committed file differs from what the server reports now.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

DOC = ROOT / "docs" / "NODES.md"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(object_info: dict) -> str:
    lines = [
        "# Nodes",
        "",
        "Generated from the server's `/object_info` by `tools/node_docs.py`. Node ids and input names are",
        "stable: saved workflows refer to them.",
        "",
    ]
    for node_id in sorted(k for k in object_info if k.startswith("LaVie")):
        spec = object_info[node_id]
        lines += [f"## {spec.get('display_name') or node_id} (`{node_id}`)", ""]
        if spec.get("description"):
            lines += [_cell(spec["description"]), ""]
        lines += ["| input | type | default | what it does |", "|---|---|---|---|"]
        for section in ("required", "optional"):
            for name, entry in (spec.get("input", {}).get(section) or {}).items():
                kind = entry[0]
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                kind_text = "choice" if isinstance(kind, list) else kind
                default = options.get("default", "")
                lines.append(f"| `{name}` | {kind_text} | {_cell(default)} | {_cell(options.get('tooltip', ''))} |")
        outputs = ", ".join(f"`{n}` ({t})" for n, t in zip(spec.get("output_name", []), spec.get("output", [])))
        lines += ["", f"Outputs: {outputs or 'none (saves files and shows them in the UI)'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    from comfy_host import ComfyServer

    with ComfyServer() as server:
        text = render(server.object_info())
    if args.check:
        if DOC.read_text() != text:
            print(f"{DOC} is out of date: run tools/node_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
