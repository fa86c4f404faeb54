"""Time one UNet training step (forward + backward + AdamW) and report images/s, FLOPs, memory, MFU.

    python -m sgm.benchmarks.unet_train_step --config small --resolution 256 --batch-size 2 \
        --precision fp32 --steps 5 --warmup 2 --compare-diffusers

FLOPs are model FLOPs of forward + backward, counted once with FlopCounterMode on the meta device
(no compute, and the same count on every device: on CPU the fused attention kernel has no FLOP
formula and would count as zero). Recomputation from gradient checkpointing is not counted.
Attention backward counts as 2x forward, like every matmul; SDXL base gives 1.231 / 4.714 / 20.231
TFLOP per image at 256 / 512 / 1024 px. Step times are reported as median and best of the timed
steps (a shared CPU is noisy); images/s uses the median.
`--compare-diffusers` times diffusers' UNet2DConditionModel of the same architecture in the same run
(diffusers is a test/benchmark-only reference and is imported only then).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from sgm.models.unet import UNetModel

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model_channels": 32,
        "channel_mult": (1, 2, 4),
        "num_res_blocks": 1,
        "transformer_depth": (0, 1, 1),
        "transformer_depth_middle": 1,
        "num_head_channels": 16,
        "context_dim": 96,
        "adm_in_channels": 1600,
    },
    "small": {
        "model_channels": 96,
        "channel_mult": (1, 2, 4),
        "num_res_blocks": 2,
        "transformer_depth": (0, 2, 4),
        "transformer_depth_middle": 4,
        "num_head_channels": 64,
        "context_dim": 2048,
        "adm_in_channels": 2816,
    },
    "sdxl_base": {
        "model_channels": 320,
        "channel_mult": (1, 2, 4),
        "num_res_blocks": 2,
        "transformer_depth": (0, 2, 10),
        "transformer_depth_middle": 10,
        "num_head_channels": 64,
        "context_dim": 2048,
        "adm_in_channels": 2816,
    },
    "sdxl_refiner": {
        "model_channels": 384,
        "channel_mult": (1, 2, 4, 4),
        "num_res_blocks": 2,
        "transformer_depth": (0, 4, 4, 0),
        "transformer_depth_middle": 4,
        "num_head_channels": 64,
        "context_dim": 1280,
        "adm_in_channels": 2560,
    },
}
CONTEXT_TOKENS = 77
NUM_TIME_IDS = 6  # diffusers splits y into pooled text + 256-d Fourier features of each micro-condition
TIME_ID_DIM = 256

# Dense peak FLOP/s per precision, by device-name substring (first match wins).
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
]


def make_inputs(cfg: dict[str, Any], batch_size: int, resolution: int, device: torch.device | str) -> dict[str, Tensor]:
    """Random latents (resolution / 8), timesteps, 77-token context, y, plus diffusers' split of y."""
    if resolution % 8:
        raise ValueError(f"--resolution {resolution} is not a multiple of 8; latents are resolution / 8")
    side = resolution // 8
    pooled_dim = cfg["adm_in_channels"] - NUM_TIME_IDS * TIME_ID_DIM
    return {
        "x": torch.randn(batch_size, cfg.get("in_channels", 4), side, side, device=device),
        "timesteps": torch.randint(0, 1000, (batch_size,), device=device),
        "context": torch.randn(batch_size, CONTEXT_TOKENS, cfg["context_dim"], device=device),
        "y": torch.randn(batch_size, cfg["adm_in_channels"], device=device),
        "text_embeds": torch.randn(batch_size, max(pooled_dim, 0), device=device),
        "time_ids": torch.randint(0, 1024, (batch_size, NUM_TIME_IDS), device=device).float(),
    }


def ours_forward(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    return model(inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"])


def diffusers_forward(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return model(
        inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"], added_cond_kwargs=added
    ).sample


def diffusers_unet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config of the same architecture (SDXL-style naming)."""
    mults, depths = tuple(cfg["channel_mult"]), tuple(cfg["transformer_depth"])
    middle, head_channels, width = cfg["transformer_depth_middle"], cfg["num_head_channels"], cfg["model_channels"]
    if middle < 1 or (depths[-1] > 0 and depths[-1] != middle):
        raise ValueError(
            "diffusers' mid block has the last level's transformer depth (and always attention); "
            f"transformer_depth_middle={middle} with transformer_depth={depths} has no diffusers twin"
        )
    attn = [d > 0 for d in depths]
    return {
        "sample_size": 128,
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": tuple(m * width for m in mults),
        "layers_per_block": cfg["num_res_blocks"],
        "transformer_layers_per_block": (depths[:-1] + (middle,)) if depths[-1] == 0 else depths,
        "attention_head_dim": tuple(m * width // head_channels for m in mults),  # number of heads, as diffusers SDXL
        "cross_attention_dim": cfg["context_dim"],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_ID_DIM,
        "projection_class_embeddings_input_dim": cfg["adm_in_channels"],
        "norm_num_groups": cfg.get("norm_num_groups", 32),
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "upcast_attention": False,
    }


def build_diffusers_unet(cfg: dict[str, Any]) -> nn.Module:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit("--compare-diffusers needs diffusers: pip install diffusers (test-only dependency)") from error
    return UNet2DConditionModel(**diffusers_unet_config(cfg))


def count_train_step_flops(
    build: Callable[[], nn.Module],
    forward: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    cfg: dict[str, Any],
    batch_size: int,
    resolution: int,
) -> int:
    """Forward + backward FLOPs of one training step, counted on the meta device."""
    with torch.device("meta"):
        model = build()
        inputs = make_inputs(cfg, batch_size, resolution, "meta")
    model.train()
    with FlopCounterMode(display=False) as counter:
        forward(model, inputs).float().pow(2).mean().backward()
    return counter.get_total_flops()


class PeakMemory:
    """Peak memory of a phase: CUDA max_memory_allocated, or on CPU the rise of sampled RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_bytes = device, 0
        self._stop = threading.Event()

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        _release_freed_memory()
        baseline, peak = _rss_bytes(), [0]

        def sample() -> None:
            while not self._stop.wait(0.005):
                peak[0] = max(peak[0], _rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak_bytes = max(peak[0], _rss_bytes()) - baseline


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so an RSS rise measures this phase, not the last one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the process peak from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_train_steps(
    model: nn.Module,
    forward: Callable[[nn.Module, dict[str, Tensor]], Tensor],
    inputs: dict[str, Tensor],
    precision: str,
    steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[list[float], int]:
    """Seconds of each timed step (after warmup) and peak memory, for forward + MSE backward + AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randn_like(inputs["x"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()

    def step() -> None:
        with autocast:
            out = forward(model, inputs)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory, times = PeakMemory(device), []
    with memory.measure():
        for _ in range(warmup):
            step()
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    return times, memory.peak_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Dense peak FLOP/s for the device and precision, or None when unknown (CPU, unlisted GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_FLOPS if key in name), None)


def set_precision(device: torch.device, precision: str) -> None:
    """fp32 means true fp32 matmuls/convs; tf32 allows TF32 tensor cores; bf16 is autocast."""
    if device.type == "cuda":
        allow = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cfg = UNET_CONFIGS[args.config]
    set_precision(device, args.precision)
    torch.manual_seed(0)
    inputs = make_inputs(cfg, args.batch_size, args.resolution, device)
    # Builders take the checkpointing flag: FLOPs are counted without it (model FLOPs, recompute excluded).
    candidates: list[tuple[str, Callable[[bool], nn.Module], Callable]] = [
        ("ours", lambda ckpt: UNetModel(**cfg, gradient_checkpointing=ckpt), ours_forward)
    ]
    if args.compare_diffusers:
        candidates.append(("diffusers", lambda ckpt: _diffusers_model(cfg, ckpt), diffusers_forward))
    peak = peak_flops(device, args.precision, args.peak_tflops)
    results: dict[str, Any] = {
        "config": args.config,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": _device_name(device),
        "models": {},
    }
    for name, build, forward in candidates:
        flops = count_train_step_flops(lambda build=build: build(False), forward, cfg, 1, args.resolution)
        model = build(args.gradient_checkpointing).to(device)
        times, peak_bytes = time_train_steps(model, forward, inputs, args.precision, args.steps, args.warmup, device)
        images_per_s = args.batch_size / statistics.median(times)
        achieved = flops * images_per_s
        results["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "step_s_median": statistics.median(times),
            "step_s_best": min(times),
            "step_s_all": times,
            "images_per_s": images_per_s,
            "flops_per_image": flops,
            "achieved_flops_per_s": achieved,
            "peak_memory_bytes": peak_bytes,
            "mfu": achieved / peak if peak else None,
        }
        del model
        gc.collect()
    if "diffusers" in results["models"]:
        models = results["models"]
        results["ratio_ours_over_diffusers"] = models["ours"]["images_per_s"] / models["diffusers"]["images_per_s"]
        results["ratio_ours_over_diffusers_best"] = models["diffusers"]["step_s_best"] / models["ours"]["step_s_best"]
    results["peak_flops_per_s"] = peak
    return results


def _diffusers_model(cfg: dict[str, Any], gradient_checkpointing: bool) -> nn.Module:
    model = build_diffusers_unet(cfg)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def format_table(results: dict[str, Any]) -> str:
    """A small fixed-width table, one row per model."""
    mem_label = "peak RSS rise GiB" if results["device"].startswith("cpu") else "peak mem GiB"
    header = (
        f"{'model':<10} {'params M':>9} {'step s med':>10} {'step s best':>11} {'img/s':>8} {'TFLOP/img':>10} "
        f"{'TFLOP/s':>8} {mem_label:>17} {'MFU':>7}"
    )
    lines = [
        f"UNet train step: config={results['config']} res={results['resolution']} "
        f"batch={results['batch_size']} precision={results['precision']} device={results['device']}",
        header,
    ]
    for name, m in results["models"].items():
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        lines.append(
            f"{name:<10} {m['params'] / 1e6:>9.1f} {m['step_s_median']:>10.3f} {m['step_s_best']:>11.3f} "
            f"{m['images_per_s']:>8.3f} "
            f"{m['flops_per_image'] / 1e12:>10.4f} {m['achieved_flops_per_s'] / 1e12:>8.3f} "
            f"{m['peak_memory_bytes'] / 2**30:>17.2f} {mfu:>7}"
        )
    if results["peak_flops_per_s"] is None:
        lines.append("MFU: unknown peak for this device (pass --peak-tflops)")
    if "ratio_ours_over_diffusers" in results:
        lines.append(
            f"throughput ratio ours/diffusers: {results['ratio_ours_over_diffusers']:.3f} (median step), "
            f"{results['ratio_ours_over_diffusers_best']:.3f} (best step)"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="tiny")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=["fp32", "tf32", "bf16"],
        default="fp32",
        help="bf16 = autocast with fp32 weights; tf32 = fp32 with TF32 tensor cores (CUDA)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compare-diffusers", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU if not in the table")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1 and --warmup >= 0")
    multiple = 8 * 2 ** (len(UNET_CONFIGS[args.config]["channel_mult"]) - 1)
    if args.resolution < multiple or args.resolution % multiple:
        parser.error(f"--resolution must be a positive multiple of {multiple} for config {args.config}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = benchmark(args)
    print(format_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
