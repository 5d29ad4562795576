"""The node reference and the README stay true to the code."""
import re
from pathlib import Path

from node_docs import DOC, render

ROOT = Path(__file__).resolve().parent.parent


def test_node_reference_matches_the_server(comfy_server):
    assert DOC.read_text() == render(comfy_server.object_info()), "run .venv/bin/python tools/node_docs.py"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"bash (tools/\w+\.sh)", readme):
        assert (ROOT / script).is_file(), script
    assert "bash tools/test.sh" in readme
    assert "bash tools/test.sh" in (ROOT / ".ci" / "run").read_text()
