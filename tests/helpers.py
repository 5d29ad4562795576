"""Helpers shared by several test modules.

``single_thread``: import it into a test module (``from helpers import single_thread``) to run that
module's tiny models on one thread.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and OpenMP spin-waits make them crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
