"""bench/comfy_cascade.py: the paper-size graph it queues, its per-node and per-bar timing from websocket
messages, and the text encoders it writes (at a tiny size)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from comfy_cascade import (  # noqa: E402
    UNET_FILES,
    _write_text_encoder,
    ballast_bytes,
    node_peaks,
    node_times,
    paper_graph,
    progress_spans,
)

from lavie_core.text import load_text_encoder  # noqa: E402


def by_class(graph: dict, kind: str) -> list[dict]:
    return [n["inputs"] for n in graph.values() if n["class_type"] == kind]


@pytest.mark.parametrize("overlap,chunk", [(0, 8), (2, 4)], ids=["paper-chunks", "overlapping-4-frame-chunks"])
def test_paper_graph_sets_sizes_weights_and_steps(overlap, chunk):
    graph = paper_graph(steps=7, seed=3, vsr_overlap=overlap, vsr_chunk=chunk)
    assert sorted(n["ckpt_name"] for n in by_class(graph, "LaVieLoader")) == sorted(UNET_FILES.values())
    assert sorted(n["components"] for n in by_class(graph, "LaVieComponentsLoader")) == ["random-sd", "random-x4"]
    (base,) = by_class(graph, "LaVieSampler")
    assert (base["frames"], base["width"], base["height"]) == (16, 512, 320)
    (vsr,) = by_class(graph, "LaVieUpscale")
    assert (vsr["chunk_frames"], vsr["chunk_overlap"]) == (chunk, overlap)
    samplers = [n for n in graph.values() if "steps" in n["inputs"]]
    assert len(samplers) == 3 and all(n["inputs"]["steps"] == 7 and n["inputs"]["seed"] == 3 for n in samplers)


def test_node_times_and_progress_spans_from_messages():
    graph = {"1": {"class_type": "A"}, "2": {"class_type": "B"}}
    messages = [
        {"type": "executing", "data": {"node": "1"}, "received": 10.0},
        {"type": "progress", "data": {"node": "1", "value": 1, "max": 2}, "received": 11.0},
        {"type": "progress", "data": {"node": "1", "value": 2, "max": 2}, "received": 12.0},
        {"type": "progress", "data": {"node": "1", "value": 1, "max": 5}, "received": 13.0},
        {"type": "executing", "data": {"node": "2"}, "received": 14.5},
        {"type": "executing", "data": {"node": None}, "received": 15.0},
    ]
    assert node_times(messages, graph) == [("1", "A", 4.5), ("2", "B", 0.5)]
    spans = progress_spans(messages, t0=10.0)
    assert [(s["node"], s["max"], s["first_s"], s["last_s"], s["value"]) for s in spans] == [
        ("1", 2, 1.0, 2.0, 2), ("1", 5, 3.0, 3.0, 1)]


def test_written_text_encoder_loads(tmp_path):
    _write_text_encoder(tmp_path / "text_encoder", hidden=32, layers=1, heads=2, act="gelu", seed=0)
    encoder = load_text_encoder(tmp_path / "text_encoder")
    assert encoder.model.config.hidden_size == 32 and encoder.model.config.vocab_size == 49408


def test_node_peaks_take_the_samples_inside_each_node():
    messages = [
        {"type": "executing", "data": {"node": "1"}, "received": 10.0},
        {"type": "executing", "data": {"node": "2"}, "received": 12.0},
        {"type": "executing", "data": {"node": "3"}, "received": 12.1},
        {"type": "executing", "data": {"node": None}, "received": 15.0},
    ]
    samples = [(9.0, 9000), (10.5, 1536), (11.9, 2048), (12.5, 4096), (14.0, 3072)]
    assert node_peaks(messages, samples, before_mib=1024) == {"1": 1.0, "3": 3.0}  # node 2 had no sample


@pytest.mark.parametrize("free,card_gib,expected", [(100 * 2**30, 12, 88 * 2**30), (12 * 2**30, 12, 0)],
                         ids=["h200-as-12-gib", "exactly-free"])
def test_ballast_leaves_the_card_size_free(free, card_gib, expected):
    assert ballast_bytes(free, card_gib) == expected


@pytest.mark.parametrize("card_gib,match", [(200, "only 100.00 GiB free"), (0, "must be positive")],
                         ids=["larger-than-free", "zero"])
def test_ballast_rejects_impossible_cards(card_gib, match):
    with pytest.raises(ValueError, match=match):
        ballast_bytes(100 * 2**30, card_gib)
