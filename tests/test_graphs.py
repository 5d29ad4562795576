"""CUDA graph replay of UNet calls (lavie_core.graphs): the first call of a shape runs as it is, the second
captures, later ones replay; results equal plain calls. The capture tests need CUDA."""
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lavie_core import graphs
from lavie_core import pipeline as P
from lavie_core.graphs import GraphedCalls, graphs_available
from lavie_core.unet import per_sample
from test_unet import inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not graphs_available("cuda"), reason="needs CUDA graphs (an NVIDIA GPU and a capturable allocator)")


class Counted:
    """`fn` that counts how often it really runs (a replay does not run it)."""

    def __init__(self, fn):
        self.fn, self.runs = fn, 0

    def __call__(self, *args, **kwargs):
        self.runs += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("device,expected", [("cpu", False), ("meta", False)], ids=["cpu", "meta"])
def test_graphs_are_only_for_cuda(device, expected):
    assert graphs_available(device) is expected


@pytest.mark.parametrize(
    "backend,triton_version,expected",
    [
        ("native", "3.6.0", True),
        ("cudaMallocAsync", "3.6.0", True),
        ("cudaMallocAsync", "3.5.1", True),
        ("cudaMallocAsync", "3.7.0", False),
        ("cudaMallocAsync", "3.4.0", False),
        ("pluggable", "3.6.0", False),
    ],
    ids=["native", "async-triton-3.6", "async-triton-3.5", "async-newer-triton", "async-older-triton", "other"],
)
def test_graphs_need_an_allocator_whose_capture_triton_can_launch_in(monkeypatch, backend, triton_version, expected):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: backend)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(triton, "__version__", triton_version)
    assert graphs_available("cuda") is expected


def test_launches_take_raw_addresses_only_in_the_capturing_thread():
    # Under cudaMallocAsync, Triton's launcher rejects the addresses of a capture's tensors when it gets the
    # tensors; it takes plain integers as they are.
    class Launcher:
        def __call__(self, *args, **kwargs):
            return args

    Launcher.__call__ = graphs._raw_address_call(Launcher.__call__)
    t = torch.zeros(3)
    seen = {}
    with graphs._raw_addresses():
        inside = Launcher()(1, t, "meta")
        worker = threading.Thread(target=lambda: seen.update(other=Launcher()(t)))
        worker.start()
        worker.join()
    assert inside == (1, t.data_ptr(), "meta")
    assert seen["other"][0] is t
    assert Launcher()(t)[0] is t


def test_tensor_descriptors_take_their_base_as_a_raw_address():
    # Triton unpacks a descriptor after the launcher's __call__: into its base, which the C launcher then
    # checks, where it does not become TMA (GPUs before Hopper); or into a TMA map built from base.data_ptr().
    descriptors = pytest.importorskip("triton.tools.tensor_descriptor")

    class Launcher:
        def __call__(self, *args):
            return args

    Launcher.__call__ = graphs._raw_address_call(Launcher.__call__)
    t = torch.zeros(4, 8, dtype=torch.float16)
    desc = descriptors.TensorDescriptor.from_tensor(t, [4, 8])
    with graphs._raw_addresses():
        (passed,) = Launcher()(desc)
    assert isinstance(passed.base, int) and passed.base == passed.base.data_ptr() == t.data_ptr()
    assert (passed.shape, passed.strides, passed.block_shape) == (desc.shape, desc.strides, desc.block_shape)
    assert desc.base is t  # the caller's descriptor is left as it was


def test_calls_off_cuda_run_as_they_are():
    model = tiny_model("base")
    fn = Counted(model)
    graphed = GraphedCalls(fn)
    for seed in range(3):
        x, t, ctx, _ = inputs(model, seed=seed)
        assert torch.equal(graphed(x, t, ctx), model(x, t, ctx))
    assert fn.runs == 3 and not graphed.graphs and graphed.failure is None


@pytest.mark.parametrize(
    "value,dtype",
    [(500, torch.int64), (499.5, torch.float32), (torch.tensor([7]), torch.int64), (torch.tensor([1.5, 2.5]), torch.float32)],
    ids=["int", "float", "one-tensor", "per-sample-tensor"],
)
def test_per_sample_values(value, dtype):
    out = per_sample(value, 2, torch.device("cpu"))
    want = torch.as_tensor(value).reshape(-1).expand(2)
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))


def test_unet_takes_numbers_and_tensors_alike():
    model = tiny_model("vsr")
    x, t, ctx, _ = inputs(model)
    assert torch.equal(model(x, int(t), ctx, 20), model(x, t.expand(1).clone(), ctx, torch.tensor([20])))


# ----------------------------------------------------------------------------- CUDA


def _cuda_model(kind, dtype=torch.float32):
    return tiny_model(kind).to("cuda", dtype)


def _cuda_inputs(model, seed, **size):
    x, t, ctx, noise = inputs(model, seed=seed, **size)
    dtype = next(model.parameters()).dtype
    return x.to("cuda", dtype), t.cuda(), ctx.to("cuda", dtype), noise


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_replays_equal_plain_calls_and_keep_earlier_results(dtype):
    model = _cuda_model("base", dtype)
    fn = Counted(model)
    graphed = GraphedCalls(fn)
    with torch.no_grad():
        calls = [_cuda_inputs(model, seed)[:3] for seed in range(5)]
        got = [graphed(*args) for args in calls]
        want = [model(*args) for args in calls]
    # Call 1 runs plainly, call 2 captures (fn runs once more, inside the capture), calls 3-5 replay.
    assert fn.runs == 2 and len(graphed.graphs) == 1 and graphed.failure is None
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@cuda
def test_each_shape_gets_its_own_graph_in_one_pool():
    model = _cuda_model("interpolation")
    graphed = GraphedCalls(model)
    sizes = [dict(f=5, h=8, w=12), dict(f=3, h=8, w=8)]
    with torch.no_grad():
        for step in range(4):
            for i, size in enumerate(sizes):
                args = _cuda_inputs(model, 10 * step + i, **size)[:3]
                assert torch.equal(graphed(*args), model(*args))
    assert len(graphed.graphs) == 2


@cuda
def test_keyword_values_are_part_of_the_signature():
    model = _cuda_model("vsr")
    graphed = GraphedCalls(model)
    x, t, ctx, _ = _cuda_inputs(model, 0)
    with torch.no_grad():
        for level in (20, 20, 20, 30, 30, 30):
            assert torch.equal(graphed(x, t, ctx, noise_level=level), model(x, t, ctx, noise_level=level))
    assert len(graphed.graphs) == 2


@cuda
def test_weights_patched_in_place_are_replayed():
    model = _cuda_model("base")
    graphed = GraphedCalls(model)
    args = _cuda_inputs(model, 0)[:3]
    with torch.no_grad():
        for _ in range(3):
            graphed(*args)
        model.conv_in.weight.mul_(1.5)
        assert torch.equal(graphed(*args), model(*args))


@cuda
def test_a_failed_capture_falls_back_to_plain_calls(caplog):
    def syncs(x):
        return x * float(x.sum())  # a host read: not allowed while capturing

    graphed = GraphedCalls(syncs)
    x = torch.arange(4.0, device="cuda")
    with caplog.at_level(logging.WARNING, logger="lavie_core.graphs"):
        results = [graphed(x) for _ in range(3)]
    assert graphed.failure is not None and not graphed.graphs
    assert "CUDA graph capture failed" in caplog.text
    for r in results:
        assert torch.equal(r, syncs(x))


@cuda
@pytest.mark.parametrize("stage", ["text_to_video", "interpolate", "upscale"])
def test_stages_equal_with_and_without_graphs(stage, monkeypatch):
    made = []

    class Kept(GraphedCalls):
        def __init__(self, fn, **kwargs):
            super().__init__(fn, **kwargs)
            made.append(self)

    monkeypatch.setattr(P, "GraphedCalls", Kept)
    kind = {"text_to_video": "base", "interpolate": "interpolation", "upscale": "vsr"}[stage]
    model = _cuda_model(kind)
    text = torch.randn(1, 7, model.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    if stage == "text_to_video":
        run = lambda g: P.text_to_video(model, text, text, frames=4, height=64, width=96, steps=4, cuda_graph=g)
    elif stage == "interpolate":
        latents = torch.randn(1, 4, 3, 8, 12, generator=torch.Generator().manual_seed(2))
        run = lambda g: P.interpolate(model, latents, text, text, steps=4, cuda_graph=g)
    else:
        low_res = torch.rand(1, 3, 5, 8, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1
        run = lambda g: P.upscale(model, low_res, text, text, steps=4, chunk_frames=2, chunk_overlap=0, cuda_graph=g)
    with_graphs = run(True)
    assert len(made) == 1 and made[0].graphs and made[0].failure is None  # the stage really replayed
    assert torch.equal(with_graphs, run(False))
    assert len(made) == 1


def run_under_cuda_malloc_async(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh Python whose torch uses ComfyUI's default allocator (chosen at CUDA's start)."""
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_malloc_async_replays_graphs_equal_to_plain_calls():
    """ComfyUI's default allocator: half precision, so the Triton kernels run inside the capture. The
    allocator is chosen at CUDA's start, hence a fresh process."""
    script = (
        "import torch\n"
        "from lavie_core.graphs import GraphedCalls\n"
        "from test_unet import inputs, tiny_model\n"
        "model = tiny_model('base').cuda().half()\n"
        "graphed = GraphedCalls(model)\n"
        "same = True\n"
        "for frames in (3, 5, 3):  # two shapes: two graphs of one wrapper\n"
        "    x, t, ctx, _ = inputs(model, f=frames)\n"
        "    x, t, ctx = x.cuda().half(), t.cuda(), ctx.cuda().half()\n"
        "    with torch.no_grad():\n"
        "        same &= all(torch.equal(graphed(x, t, ctx), model(x, t, ctx)) for _ in range(3))\n"
        "compiled = GraphedCalls(torch.compile(model))\n"
        "print(torch.cuda.get_allocator_backend(), same, len(graphed.graphs), graphed.failure, compiled._capturable((x,)))\n"
        "graphed.release()\n"
        "torch.cuda.synchronize()\n"
    )
    done = run_under_cuda_malloc_async(script)
    # A compiled UNet is not captured there: its captures were not checked, and a failed one would abort.
    assert done.stdout.split()[-5:] == ["cudaMallocAsync", "True", "2", "None", "False"]
    # The outputs live outside the captures: releasing the graphs frees no captured allocation by hand,
    # which torch warns about at every release under this allocator.
    assert "technically allowed" not in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_released_graphs_give_their_memory_back_under_cuda_malloc_async():
    """Under cudaMallocAsync the driver keeps a destroyed graph's memory, unseen by torch's counters, until it
    is trimmed: after `release()` (or dropping the wrapper) the device's free memory is back."""
    script = (
        "import torch\n"
        "from lavie_core.graphs import GraphedCalls\n"
        "a = torch.ones(1024, 1024, device='cuda')\n"
        "def temporaries(a):\n"
        "    return (a.repeat(256, 1) * 2).sum(0)  # 1 GiB of float32 temporaries\n"
        "def free():\n"
        "    torch.cuda.synchronize(); torch.cuda.empty_cache()\n"
        "    return torch.cuda.mem_get_info()[0] / 2**20\n"
        "before = free()\n"
        "for drop in (lambda g: g.release(), lambda g: None):\n"
        "    graphed = GraphedCalls(temporaries)\n"
        "    for _ in range(3):\n"
        "        graphed(a)\n"
        "    held = free()\n"
        "    captured = len(graphed.graphs)\n"
        "    drop(graphed)\n"
        "    del graphed\n"
        "    print(captured, round(before - held), round(before - free()))\n"
    )
    done = run_under_cuda_malloc_async(script)
    for line in done.stdout.splitlines()[-2:]:
        captured, held_mib, left_mib = (int(v) for v in line.split())
        assert captured == 1 and held_mib >= 1000 and left_mib < 64, line
