"""Speed and memory of the three LaVie UNets on a CUDA GPU at the paper's sizes.

    python bench/speed.py [--dtype fp16|bf16] [--stages base,interpolation,vsr] [--iters 6] [--compile]
                          [--cfg-input shared|doubled] [--cuda-graph on|off] [--cudnn-benchmark on|off]
                          [--loop-steps 12]
    python bench/speed.py --cascade [--steps 50] [--cfg-mode batched|split] [--vsr-chunk 4] [--budget-gib 12] [--compile]
                          [--cascade-stages base,interpolation,vsr] [--cuda-graph on|off]

Per stage: one UNet call that answers both halves of classifier-free guidance, median of `--iters`
timed calls (CUDA events) after warm-up, each started with the GPU idle, and the median GPU time per call
with the calls queued back to back as a sampling loop queues them (`queued`: the host's launch work
overlaps the call before), and the median step period of the stage's own sampling loop
(`--loop-steps`, as the stages run); FLOPs counted with torch's FlopCounterMode; peak memory from
torch.cuda.max_memory_allocated over the timed calls (the warm-up's, with compilation and cuDNN's
algorithm search, is reported apart); numerics against the float32 path on the same inputs, and how much
of that error comes from rounding the weights alone (float32 compute on the rounded weights). Weights
are random at a variance-preserving scale (timing does not depend on their values).

`--cfg-input shared` (default; what the samplers do) passes the video once with both texts, so the
layers before the first text attention run once; `doubled` passes the video twice, as the official
code does. `--cuda-graph on` (default, as the stages run) replays the calls from a CUDA graph
(`lavie_core.graphs`); `off` launches every kernel from the host.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lavie_core import LaVieUNet, UNetConfig, compile_unet  # noqa: E402
from lavie_core.graphs import GraphedCalls  # noqa: E402

# Inputs of one call, as in the reference measurements: CFG batch 2.
STAGES = {
    "base": dict(frames=16, h=40, w=64, ctx=(77, 768)),
    "interpolation": dict(frames=61, h=40, w=64, ctx=(77, 768)),
    "vsr": dict(frames=8, h=320, w=512, ctx=(77, 1024)),
}
OFFICIAL_MS = {"base": 133.4, "interpolation": 589.8, "vsr": 1723.0}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def random_model(kind: str, device: torch.device, seed: int = 0, config: UNetConfig | None = None) -> LaVieUNet:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LaVieUNet(config or UNetConfig.preset(kind))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                scale = 0.5 if ("embedding" in name and p.ndim == 2 and "linear" not in name) else fan_in**-0.5
                p.normal_(0, scale)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.02)
        for name, b in model.named_buffers():
            if name.endswith("freqs"):
                dim = 2 * b.shape[0]
                b.copy_(1.0 / 10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return model.use_channels_last().eval().requires_grad_(False)


def make_inputs(kind: str, device: torch.device, seed: int = 0, cfg_input: str = "doubled"):
    """Inputs of one guided call: two texts, and the video twice (`doubled`) or once (`shared`)."""
    s = STAGES[kind]
    cfg = UNetConfig.preset(kind)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, s["frames"], s["h"], s["w"], generator=g).to(device)
    ctx = torch.randn(2, *s["ctx"], generator=g).to(device)
    n = 2 if cfg_input == "doubled" else 1
    x = x.repeat(n, 1, 1, 1, 1)
    t = torch.full((n,), 500, device=device)
    noise = torch.full((n,), 50, device=device) if kind == "vsr" else None
    return x, t, ctx, noise


def add_cudnn_benchmark_option(parser: argparse.ArgumentParser) -> None:
    """`--cudnn-benchmark on|off`; the script sets `torch.backends.cudnn.benchmark` from it."""
    parser.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"],
                        help="let cuDNN time its convolution algorithms (off: its heuristics pick, as ComfyUI runs)")


def time_calls(fn, iters: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_queued(fn, iters: int) -> list[float]:
    """GPU time of each call with the calls queued back to back, as a sampling loop queues them: the host
    launches a call while the GPU still runs the one before, so the launch work (with CUDA graphs, the
    replay's submission) overlaps. `time_calls` waits for each call first, so its times include it."""
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    # The first call's start still waited for its launch; the others begin when the previous one ends.
    return [start.elapsed_time(end) for start, end in events[1:]]


def time_loop(kind: str, unet, steps: int, cuda_graph: bool) -> list[float]:
    """Step periods of the stage's own sampling loop (`lavie_core.pipeline`, its default sampler): CUDA
    events recorded as each UNet call is queued (`on_call`), so a period is the GPU time from one call's
    end to the next's, with the sampler's own work and any wait for the host in it. The first two calls
    (the plain call, the capture) are left out. VSR samples one 8-frame chunk of 320x512."""
    from lavie_core.pipeline import interpolate, text_to_video, upscale

    text = torch.randn(1, 77, STAGES[kind]["ctx"][1])
    events: list[torch.cuda.Event] = []

    def on_call(done: int, total: int) -> None:
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record()

    common = dict(steps=steps, on_call=on_call, cuda_graph=cuda_graph)
    with torch.no_grad():
        if kind == "base":
            text_to_video(unet, text, text, **common)
        elif kind == "interpolation":
            interpolate(unet, torch.randn(1, 4, 16, 40, 64), text, text, **common)
        else:
            low_res = torch.rand(1, 3, 8, 320, 512) * 2 - 1
            upscale(unet, low_res, text, text, chunk_frames=8, latent_device="cuda", **common)
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events[2:], events[3:])]


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_stage(
    kind: str, dtype: torch.dtype, iters: int, compile_model: bool, numerics: bool, cfg_input: str = "shared",
    official: Path | None = None, cuda_graph: bool = True, loop_steps: int = 0,
) -> dict:
    """One stage's call: speed, memory and numerics; with `official` (a Vchitect/LaVie checkout) the
    official UNet is timed after it in the same process, on the same weights and inputs. With `cuda_graph`
    the calls after the first are replayed from a CUDA graph, as the stages run them."""
    device = torch.device("cuda")
    model = random_model(kind, device)
    x, t, ctx, noise = make_inputs(kind, device, cfg_input=cfg_input)
    result: dict = {"stage": kind, "dtype": str(dtype).removeprefix("torch."), "cfg_input": cfg_input,
                    "cuda_graph": cuda_graph}
    ref = None
    if numerics and dtype != torch.float32:
        with torch.no_grad():
            ref = model(x, t, ctx, noise).float()
    model = model.to(dtype)
    if ref is not None:
        # The part of the error that any `dtype` run has: float32 compute on the weights rounded to dtype
        # (the round trip back to dtype is exact).
        with torch.no_grad():
            result["rel_l2_weights_rounded"] = rel_l2(model.float()(x, t, ctx, noise), ref)
        model = model.to(dtype)
    call_model = compile_unet(model) if compile_model else model
    runner = GraphedCalls(call_model) if cuda_graph else call_model
    args = (x, t, ctx) if noise is None else (x, t, ctx, noise)

    def call():
        with torch.no_grad():
            return runner(*args)

    if ref is not None:
        out = call().float()
        result["rel_l2_vs_fp32"] = rel_l2(out, ref)
        del out, ref
    elif cuda_graph:
        call()  # the plain first call: compilation and cuDNN's algorithm search, outside the measured window
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    # Without graphs the first calls also hold compilation's and cuDNN's algorithm search's scratch memory,
    # once per shape. With graphs they are the capture, which allocates the graph's memory for good.
    result["warmup_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times = time_calls(call, iters, warmup=0)
    result["ms_per_call"] = statistics.median(times)
    result["ms_all"] = [round(v, 2) for v in times]
    queued = time_queued(call, iters + 1)
    result["ms_per_call_queued"] = statistics.median(queued)
    result["ms_all_queued"] = [round(v, 2) for v in queued]
    # A replay allocates nothing new: the graph's activations were allocated at capture.
    timed_peak = torch.cuda.max_memory_allocated() / 2**30
    result["peak_gib"] = max(timed_peak, result["warmup_peak_gib"]) if cuda_graph else timed_peak
    result["weights_gib"] = base_mem / 2**30
    with torch.no_grad():
        flops = count_flops(lambda: model(x, t, ctx, noise))  # eager: the counter does not see compiled graphs
        out = call().float() if official is not None else None
    result["tflop_per_call"] = flops / 1e12
    result["achieved_tflops"] = flops / 1e12 / (result["ms_per_call"] / 1e3)
    weights = {k: v.cpu() for k, v in model.state_dict().items()} if official is not None else None
    del runner
    torch.cuda.empty_cache()
    if loop_steps:
        periods = time_loop(kind, call_model, loop_steps, cuda_graph)
        result["ms_per_step_in_loop"] = statistics.median(periods)
        result["ms_all_in_loop"] = [round(v, 2) for v in periods]
    del model, call_model
    torch.cuda.empty_cache()
    result["official_ms"], result["official_source"] = OFFICIAL_MS[kind], "ANCHORS.md"
    if official is not None:
        result.update(bench_official(kind, dtype, iters, official, weights, out))
    result["speedup_vs_official"] = result["official_ms"] / result["ms_per_call"]
    return result


def bench_official(
    kind: str, dtype: torch.dtype, iters: int, repo: Path, weights: dict[str, torch.Tensor], ours: torch.Tensor
) -> dict:
    """The official UNet on the same weights (this project's state dict) and inputs, the video doubled for
    guidance as the official pipelines pass it; `rel_l2_vs_official` compares its output with `ours`."""
    from official import load_official, official_forward

    device = torch.device("cuda")
    model = load_official(kind, repo, weights).to(device, dtype)
    x, t, ctx, noise = make_inputs(kind, device, cfg_input="doubled")

    def call():
        with torch.no_grad():
            return official_forward(kind, model, x, t, ctx, noise)

    out = call().float()
    # Both answer the same two (video, text) pairs in the same order, whether the video came once or twice.
    report = {"rel_l2_vs_official": rel_l2(ours, out)}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = time_calls(call, iters)
    report.update(
        official_ms=statistics.median(times),
        official_source="measured",
        official_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    del model
    torch.cuda.empty_cache()
    return report


def bench_cascade(
    dtype: torch.dtype,
    steps: int,
    compile_model: bool,
    cfg_mode: str,
    budget_gib: float,
    vsr_chunk: int = 8,
    stages: tuple[str, ...] = ("base", "interpolation", "vsr"),
    cuda_graph: bool = True,
) -> dict:
    """The whole cascade at the paper's sizes: 16 frames 320x512 -> 61 frames -> 61 frames 1280x2048.

    `cascade_s` sums the three stages' sampling time; with `compile_model` each stage first runs one
    step to compile (`<stage>_compile_s`, included in `wall_s`).

    Each stage's model is on the GPU only while it runs (the others wait in CPU memory), as the nodes
    do. Stages left out of `stages` are skipped and the next one gets random latents of the right
    shape (the timing does not depend on their content). VSR runs on `vsr_chunk`-frame chunks of the
    61 frames without overlap (8 in the official code; fewer frames per chunk lower the peak at the
    same FLOPs).
    """
    from lavie_core.pipeline import interpolate, text_to_video, upscale

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * 2**30 / total))
    report: dict = {"steps": steps, "dtype": str(dtype).removeprefix("torch."), "cfg_mode": cfg_mode,
                    "budget_gib": budget_gib, "compile": compile_model, "vsr_chunk": vsr_chunk,
                    "cuda_graph": cuda_graph}
    models = {k: random_model(k, torch.device("cpu")).to(dtype) for k in stages}
    text = {k: torch.randn(1, 77, 1024 if k == "vsr" else 768) for k in models}

    def run(kind, fn):
        model = models[kind].to(device)
        # Static shapes, as the nodes compile: the remainder chunk gets a second graph, rather than automatic
        # dynamic shapes recompiling one shape-generic graph for every chunk.
        net = compile_unet(model) if compile_model else model
        if compile_model:
            # One step of the same stage compiles every shape it meets (VSR: the remainder chunk too), so the
            # timed run below is warm; the compile time is reported on its own.
            t0 = time.perf_counter()
            with torch.no_grad():
                fn(net, 1)
            torch.cuda.synchronize()
            report[f"{kind}_compile_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(net, steps)
        torch.cuda.synchronize()
        report[f"{kind}_s"] = time.perf_counter() - t0
        report[f"{kind}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        models[kind] = model.to("cpu")
        torch.cuda.empty_cache()
        print(f"{kind}: {report[f'{kind}_s']:.1f} s, peak {report[f'{kind}_peak_gib']:.2f} GiB", flush=True)
        return out

    t_start = time.perf_counter()
    base = torch.randn(1, 4, 16, 40, 64)
    if "base" in stages:
        base = run("base", lambda net, n: text_to_video(net, text["base"], text["base"], steps=n, cfg_mode=cfg_mode,
                                                          cuda_graph=cuda_graph))
    frames = torch.randn(1, 4, 4 * base.shape[2] - 3, 40, 64)
    if "interpolation" in stages:
        frames = run(
            "interpolation",
            lambda net, n: interpolate(net, base, text["interpolation"], text["interpolation"], steps=n, cfg_mode=cfg_mode,
                                       cuda_graph=cuda_graph),
        )
    # VSR is conditioned on the decoded low-res video; its content does not change the timing.
    low_res = torch.rand(1, 3, frames.shape[2], 320, 512) * 2 - 1
    if "vsr" in stages:
        run(
            "vsr",
            lambda net, n: upscale(net, low_res, text["vsr"], text["vsr"], steps=n, chunk_frames=vsr_chunk,
                                   chunk_overlap=0, cfg_mode=cfg_mode, latent_device="cuda", cuda_graph=cuda_graph),
        )
    report["wall_s"] = time.perf_counter() - t_start
    report["cascade_s"] = sum(report[f"{k}_s"] for k in models)
    report["stages"] = list(stages)
    report["peak_gib"] = max(report[f"{k}_peak_gib"] for k in models)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--stages", default="base,interpolation,vsr")
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--no-numerics", action="store_true", help="skip the float32 comparison")
    parser.add_argument("--cfg-input", default="shared", choices=["shared", "doubled"],
                        help="video once with both texts (as the samplers call it) or twice (as the official code)")
    parser.add_argument("--cuda-graph", default="on", choices=["on", "off"],
                        help="replay the UNet calls from CUDA graphs, as the stages do (default on)")
    add_cudnn_benchmark_option(parser)
    parser.add_argument("--loop-steps", type=int, default=12,
                        help="also time this many steps of each stage's own sampling loop (0: skip)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--official", type=Path, metavar="PATH",
                        help="a Vchitect/LaVie checkout: time its UNets in the same run, on the same weights and "
                             "inputs, and compare outputs (needs its libraries, see bench/official.py)")
    parser.add_argument("--cascade", action="store_true", help="time the whole cascade instead of single calls")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps per stage (--cascade)")
    parser.add_argument("--cfg-mode", default="batched", choices=["batched", "split"], help="(--cascade)")
    parser.add_argument("--budget-gib", type=float, default=12.0, help="GPU memory cap (--cascade)")
    parser.add_argument("--vsr-chunk", type=int, default=8, help="VSR frames per chunk (--cascade)")
    parser.add_argument("--cascade-stages", default="base,interpolation,vsr",
                        help="stages of the cascade to run (--cascade); skipped ones hand on random latents")
    args = parser.parse_args(argv)
    # Under a memory cap, fragmentation of fixed-size segments decides whether a chunk fits (VSR chunk 4 at
    # 12 GiB: 9.2 GiB allocated, 2 GiB reserved but unusable); growable segments avoid that.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not torch.cuda.is_available():
        print("bench/speed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} dtype {args.dtype} "
          f"cudnn.benchmark {args.cudnn_benchmark}")
    if args.cascade:
        report = bench_cascade(
            DTYPES[args.dtype], args.steps, args.compile, args.cfg_mode, args.budget_gib, args.vsr_chunk,
            tuple(args.cascade_stages.split(",")), args.cuda_graph == "on",
        )
        print(json.dumps(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0
    stages = args.stages.split(",")
    if args.official is not None:
        from official import missing_sources

        missing = missing_sources(args.official, stages)
        if missing:
            print(f"--official {args.official}: not a Vchitect/LaVie checkout, missing {', '.join(missing)}", file=sys.stderr)
            return 2
    results = []
    for kind in stages:
        t0 = time.time()
        r = bench_stage(
            kind, DTYPES[args.dtype], args.iters, args.compile, not args.no_numerics, args.cfg_input, args.official,
            args.cuda_graph == "on", args.loop_steps,
        )
        r["bench_s"] = time.time() - t0
        results.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n({args.cfg_input} CFG input, CUDA graphs {args.cuda_graph}; official ms measured in this run, or from "
          "ANCHORS.md where marked *)")
    print("| stage | ms/call | queued ms/call | ms/step in loop | official ms | speed-up | TFLOP/call | TFLOP/s | peak GiB (official) | rel L2 vs fp32 | "
          "of which weight rounding | rel L2 vs official |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        anchor = "" if r["official_source"] == "measured" else "*"
        print(
            f"| {r['stage']} | {r['ms_per_call']:.1f} | {r['ms_per_call_queued']:.1f} | {r.get('ms_per_step_in_loop', nan):.1f} | {r['official_ms']:.1f}{anchor} | {r['speedup_vs_official']:.2f}x | "
            f"{r.get('tflop_per_call', nan):.1f} | {r.get('achieved_tflops', nan):.0f} | "
            f"{r['peak_gib']:.1f} ({r.get('official_peak_gib', nan):.1f}) | {r.get('rel_l2_vs_fp32', nan):.1e} | "
            f"{r.get('rel_l2_weights_rounded', nan):.1e} | {r.get('rel_l2_vs_official', nan):.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
