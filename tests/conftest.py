"""Shared test setup.

- The repository root is the node pack and has an __init__.py (ComfyUI imports it). pytest would
  collect the root as a package and import that __init__.py outside ComfyUI; the plugin below makes
  pytest treat the root as a plain directory instead.
- `comfy_server`: one real headless ComfyUI shared by the whole test run, started only when a
  test asks for it. Tests that use it are marked `host` automatically (-m "not host" skips them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


class _RootIsNotAPackage:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin (not a conftest hook) so that it also applies to the root directory.
    config.pluginmanager.register(_RootIsNotAPackage(), "lavie-root-is-not-a-package")


def pytest_collection_modifyitems(items):
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.host)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running ComfyServer (tests/comfy_host.py); drop model files under `.models_dir/<folder>`."""
    from comfy_host import HOST_DIR, ComfyServer

    if not (HOST_DIR / "main.py").is_file():
        reason = f"ComfyUI test host not installed at {HOST_DIR}; run `bash tools/setup.sh`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    server = ComfyServer(work_dir=tmp_path_factory.mktemp("comfy-host")).start()
    yield server
    server.stop()
