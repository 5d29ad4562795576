"""UNet calls replayed from CUDA graphs.

A sampler calls its UNet with the same shapes at every step. Launching a call's 1,000 to 2,500 kernels one
by one costs the host more time than the GPU spends on the small ones (the low-resolution levels, norms,
elementwise work), so the GPU waits between them. On an H200 (fp16, one guided call) an eager base call
took 69.8 ms, of which 48.8 ms were kernels, and 49.8 ms replayed from a graph; compiled, 43.9 -> 41.9 ms.

`GraphedCalls(fn)` wraps a function of tensors. The first call with a new signature (shapes, strides and
dtypes of the tensors, values of the keyword arguments) runs `fn` as it is, which also warms it up (cuDNN's
algorithm choice, Triton's and torch.compile's compilation); the next call with that signature captures a
graph, and later calls replay it. Inputs are copied into the graph's own buffers and the output comes back
as a copy, so results never overwrite each other. All graphs of one wrapper share one memory pool: it holds
the activations of its largest call, as plain calls would (VSR windows of two sizes get two graphs, not
twice the memory). Drop the wrapper, or `release()` it, to free it.

Graphs read the weights where they were at capture: patch them in place (LoRA) and the graphs follow; move
or replace them and build a new wrapper. Only CUDA inputs on NVIDIA GPUs are captured (`graphs_available`);
other calls, and every call after a failed capture (logged once, with the reason), run `fn` as it is.

ComfyUI starts torch with the cudaMallocAsync allocator (`PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`,
unless run with `--disable-cuda-malloc`). Memory it hands out during a capture is mapped only when the
graph runs, so Triton's launcher, which asks the driver about every tensor's address, rejects it (torch
2.11, Triton 3.6). While this module captures, the capturing thread's Triton launches get the tensors'
addresses as plain integers, which the launcher takes as they are, and tensor descriptors their base so
(`_raw_addresses`). Base call on an H200 under that allocator: 55.6 ms without graphs, 37.3 ms replayed;
outputs bit-identical to plain calls at all three stages. Under that allocator any failed capture (a host
read, an exception, an allocation refused) aborts the process as its tensors are freed, and nothing here
can catch it; so there only the eager UNet, whose captures were checked, is captured, not a
torch.compile'd one. The nodes' `cuda_graph` switch turns graphs off. Under that allocator, memory that graphs
allocated also stays with the driver after they are destroyed, and torch's counters, which ComfyUI plans
its loading with, no longer show it (on an H200, a graph of 4 GiB of temporaries: 4 GiB less free after
the graph and `torch.cuda.empty_cache()` were gone); so releasing graphs trims it (`_trim_graph_memory`).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import logging
import threading
from typing import Any, Callable, Hashable, Iterator

import torch

__all__ = ["GraphedCalls", "graphs_available", "signature"]

log = logging.getLogger(__name__)


def graphs_available(device: torch.device | str) -> bool:
    """Whether calls on `device` can be captured: a CUDA device on an NVIDIA build of torch, with torch's
    native caching allocator, or with cudaMallocAsync where Triton's launcher can take raw addresses
    (`_raw_addresses`; see the module docstring)."""
    if torch.device(device).type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    backend = torch.cuda.get_allocator_backend()
    return backend == "native" or (backend == "cudaMallocAsync" and _async_capture_safe())


# Triton versions whose launcher was checked to take raw addresses (3.5 read, 3.6 run on an H200): a launch
# that rejects an address during a capture under cudaMallocAsync aborts the process, so others are not
# assumed to.
_RAW_ADDRESS_TRITON = ((3, 5), (3, 6))


def _async_capture_safe() -> bool:
    """Whether a capture under cudaMallocAsync can launch Triton kernels: no Triton (no such launches), or a
    Triton whose launcher `_raw_addresses` serves."""
    try:
        import triton
    except ImportError:
        return True
    try:
        version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    low, high = _RAW_ADDRESS_TRITON
    return low <= version <= high and _triton_launcher() is not None


def _triton_launcher() -> type | None:
    """Triton's CUDA launcher class, or None (no Triton, or one laid out otherwise)."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except ImportError:
        return None
    return CudaLauncher


@functools.lru_cache(maxsize=1)
def _cuda_driver() -> Any:
    """The CUDA driver library (loaded already by torch), or None."""
    for name in (ctypes.util.find_library("cuda"), "libcuda.so.1", "nvcuda.dll"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def _trim_graph_memory(device: torch.device) -> bool:
    """Under cudaMallocAsync, hand the memory of destroyed graphs on `device` back to the driver
    (`cuDeviceGraphMemTrim`); returns whether it did. The native allocator frees graph pools itself."""
    if device.type != "cuda" or torch.cuda.get_allocator_backend() != "cudaMallocAsync":
        return False
    driver = _cuda_driver()
    if driver is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    handle = ctypes.c_int()
    torch.cuda.synchronize(index)
    return driver.cuDeviceGet(ctypes.byref(handle), index) == 0 and driver.cuDeviceGraphMemTrim(handle) == 0


_CAPTURING = threading.local()


class _Address(int):
    """A tensor's address as Triton's launcher takes it as it is (an int), which also answers `data_ptr()`."""

    def data_ptr(self) -> int:
        return int(self)


def _as_address(arg: Any) -> Any:
    """A tensor argument as its address; a tensor descriptor with its base so (Triton unpacks descriptors
    after `__call__`: into their base tensor where they do not become TMA, as on GPUs before Hopper)."""
    if isinstance(arg, torch.Tensor):
        return arg.data_ptr()
    if type(arg).__name__ == "TensorDescriptor" and isinstance(getattr(arg, "base", None), torch.Tensor):
        arg = copy.copy(arg)
        arg.base = _Address(arg.base.data_ptr())
    return arg


def _raw_address_call(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` (a launcher's `__call__`) taking the tensors among its arguments as their addresses while the
    calling thread captures (`_raw_addresses`); otherwise as it was."""

    def launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_CAPTURING, "active", False):
            args = tuple(_as_address(a) for a in args)
        return call(self, *args, **kwargs)

    launch.lavie_raw_addresses = True  # type: ignore[attr-defined]
    return launch


@contextlib.contextmanager
def _raw_addresses() -> Iterator[None]:
    """Within it, this thread's Triton launches pass tensors as raw addresses (see the module docstring).
    Installed on first use; other threads, and this one outside it, launch as before."""
    launcher = _triton_launcher()
    if launcher is not None and not getattr(launcher.__call__, "lavie_raw_addresses", False):
        launcher.__call__ = _raw_address_call(launcher.__call__)
    _CAPTURING.active = True
    try:
        yield
    finally:
        _CAPTURING.active = False


_NOTED_ALLOCATOR = False


def _note_allocator() -> None:
    global _NOTED_ALLOCATOR
    if not _NOTED_ALLOCATOR and torch.cuda.is_available() and not graphs_available("cuda"):
        _NOTED_ALLOCATOR = True
        log.info("LaVie: CUDA graphs are off with the %s allocator and this Triton; ComfyUI started with "
                 "--disable-cuda-malloc (torch's own allocator) uses them", torch.cuda.get_allocator_backend())


def signature(args: tuple[torch.Tensor, ...], static: dict[str, Hashable]) -> Hashable:
    """What a call's kernels depend on: the shapes, strides, dtypes and devices of its tensors, the values of the
    rest."""
    tensors = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args)
    return tensors, tuple(sorted(static.items()))


def _layout(out: Any) -> tuple | None:
    """Shape, strides, dtype and device of a tensor output; None for anything else."""
    return (tuple(out.shape), out.stride(), out.dtype, out.device) if isinstance(out, torch.Tensor) else None


class _Graph:
    """One captured call: its input buffers, the graph and the output it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output

    def __call__(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buffer, a in zip(self.inputs, args):
            buffer.copy_(a)
        self.graph.replay()
        return self.output.clone()


class GraphedCalls:
    """`fn(*tensors, **static)` replayed from CUDA graphs, one per signature (see the module docstring).

    `max_graphs` bounds the signatures captured; calls with further ones run as they are.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, max_graphs: int = 8) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: dict[Hashable, _Graph] = {}
        self.failure: str | None = None
        # Signatures called plainly so far, with their output's layout (`_capture` allocates the output there).
        self._seen: dict[Hashable, tuple | None] = {}
        self._pool: Any = None
        self._device: torch.device | None = None

    def __call__(self, *args: torch.Tensor, **static: Hashable) -> torch.Tensor:
        if not self._capturable(args):
            return self.fn(*args, **static)
        key = signature(args, static)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self._seen or len(self.graphs) >= self.max_graphs:
                out = self.fn(*args, **static)
                self._seen[key] = _layout(out)
                return out
            graph = self._capture(key, args, static)
            if graph is None:
                return self.fn(*args, **static)
        return graph(args)

    def _capturable(self, args: tuple[torch.Tensor, ...]) -> bool:
        if self.failure is not None or not args or not all(isinstance(a, torch.Tensor) for a in args):
            return False
        device = args[0].device
        if not graphs_available(device) or any(a.device != device for a in args):
            if device.type == "cuda":
                _note_allocator()
            return False
        # Graphs replay kernels, not autograd's bookkeeping: calls that build a backward graph run as they are.
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            return False
        # Under cudaMallocAsync a failed capture aborts the process, so only what was checked to capture
        # there is: the eager UNet, not a torch.compile'd one.
        if getattr(self.fn, "_orig_mod", None) is not None and torch.cuda.get_allocator_backend() != "native":
            return False
        return self._device is None or device == self._device

    def _capture(self, key: Hashable, args: tuple[torch.Tensor, ...], static: dict[str, Hashable]) -> _Graph | None:
        device = args[0].device
        inputs = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=device).copy_(a) for a in args]
        # The output lives outside the capture, which copies its result there: under cudaMallocAsync, freeing
        # a tensor allocated during a capture warns about graph memory at every release.
        layout = self._seen.get(key)
        result = None if layout is None else torch.empty_strided(*layout[:2], dtype=layout[2], device=device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(device):
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                # thread_local: work that other threads of the host process queue meanwhile cannot spoil it.
                with _raw_addresses(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    output = self.fn(*inputs, **static)
                    if result is not None and _layout(output) == layout:
                        output = result.copy_(output)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"the call returned {type(output).__name__}, not a tensor")
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to plain calls
            self.failure = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("LaVie: CUDA graph capture failed, running the UNet without graphs (%s)", self.failure)
            self.release()
            return None
        self._device = device
        self.graphs[key] = _Graph(graph, inputs, output)
        return self.graphs[key]

    def release(self) -> None:
        """Drop every graph and its memory pool; later calls capture again."""
        device, captured = self._device, bool(self.graphs)
        self.graphs.clear()
        self._seen.clear()
        self._pool = None
        self._device = None
        if captured and device is not None:
            _trim_graph_memory(device)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the CUDA context may be gone
            pass
