"""ESTIMATED peak GPU memory of full-UNet fine-tune setups (SDXL base, 1024 px): from parameter counts, not measured.

    python -m sgm.benchmarks.memory_estimate [--model sdxl_base] [--resolution 1024] [--batch-size 1] [--json OUT]

Every figure comes from the real model built on the meta device (no memory, no compute):
- weights, gradients: parameter counts x bytes (fp32 master weights under bf16-mixed);
- optimizer state: `sgm.training.optim.state_bytes_per_tensor` over the UNet's real shapes (tests check
  it against the real optimizers' state), e.g. Adafactor's row/column factors per tensor;
- frozen parts: the VAE and text encoders, 0 when latents and text embeddings are cached;
- activations: a forward pass on meta that records every tensor autograd saves (each storage once),
  per top-level UNet block, with attention modelled as the GPU's fused kernel (it keeps q, k, v, the
  output and fp32 row log-sum-exps, never the attention matrix) and bf16-mixed modelled as autocast
  (matmul/conv inputs cast to bf16, LayerNorm in fp32). With gradient checkpointing the backward holds
  what checkpointing keeps (block inputs, tensors saved outside blocks) plus one block's recomputation
  (the largest) plus two block-sized gradients in flight. Take this line as +-30% (a judgement, not a
  derived bound): kernel choices, workspaces, the loss's tensors and allocator rounding are not modelled;
- phases: the forward peak also holds autocast's bf16 copies of the weights (cached until the forward
  ends), and the accumulated gradients when accumulate_grad_batches > 1; the backward peak holds all
  gradients with the activations (conservative: some activations are freed before the last gradients);
- overhead (assumed, not derived): 0.5 GiB CUDA context and workspaces + 5% allocator fragmentation;
- ZeRO-2 optimizer offload (DeepSpeed, bf16): bf16 weights on the GPU, gradients streamed to the host
  through the reduce/allgather buckets, fp32 master weights, gradients and Adam moments in host memory.
  Whether a setup offloads, and its bucket sizes, come from its shipped strategy config through the
  parallelism seam (`sgm.parallel.plan_for`).
  GPU and host figures follow DeepSpeed's own `estimate_zero2_model_states_mem_needs` (2 bytes per
  parameter on the GPU; 16 x 1.5 bytes per parameter of host memory) plus the buckets.
Not yet measured on a GPU. `python -m sgm.benchmarks.unet_train_step --config sdxl_base --precision bf16
--resolution 1024 --batch-size 1 --gradient-checkpointing --device cuda` measures a UNet step's peak (with AdamW);
a real preset run's peak is `torch.cuda.max_memory_allocated()` after a few steps.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from sgm.models.build import build_model, config_root
from sgm.parallel import ParallelPlan, plan_for
from sgm.training.optim import state_bytes_per_tensor

GIB = 2**30
CONTEXT_BYTES, FRAGMENTATION = 0.5 * GIB, 0.05
BUCKET_BYTES = 2  # the reduce and allgather buckets hold bf16 values
# precision -> (bytes per weight, bytes per gradient on the GPU, compute dtype, autocast)
PRECISIONS = {
    "32-true": (4, 4, torch.float32, False),
    "bf16-mixed": (4, 4, torch.bfloat16, True),
    "bf16-true": (2, 2, torch.bfloat16, False),
    "deepspeed-bf16": (2, 0, torch.bfloat16, False),
}


@functools.cache
def strategy_plan(name: str) -> ParallelPlan:
    """The parallel plan of a shipped strategy config, configs/strategy/<name>.yaml."""
    return plan_for(OmegaConf.to_container(OmegaConf.load(config_root() / "strategy" / f"{name}.yaml")).get("strategy"))


@dataclass(frozen=True)
class Setup:
    """One way to run a full UNet fine-tune; `strategy` names its configs/strategy file, `config` the shipped
    preset that sets it up."""

    name: str
    precision: str
    optimizer: str
    gradient_checkpointing: bool = True
    cached: bool = True  # latents and text embeddings cached: VAE and text encoders not on the GPU
    strategy: str = "auto"
    config: str = ""

    @property
    def zero2_offload(self) -> bool:
        """Whether the optimizer state and master weights live in host memory (ZeRO optimizer offload)."""
        return strategy_plan(self.strategy).offloads_optimizer


SETUPS = (
    Setup("fp32_adamw_plain", "32-true", "adamw", gradient_checkpointing=False, cached=False),
    Setup("bf16_adamw", "bf16-mixed", "adamw"),
    Setup("bf16_adamw8bit", "bf16-mixed", "adamw8bit"),
    Setup("finetune_24gb", "bf16-mixed", "adafactor", config="experiment=finetune_24gb"),
    Setup("finetune_24gb_uncached", "bf16-mixed", "adafactor", cached=False),
    Setup(
        "finetune_24gb_zero2_offload",
        "deepspeed-bf16",
        "deepspeed_cpu_adam",
        strategy="deepspeed_zero2_offload",
        config="experiment=finetune_24gb_zero2_offload",
    ),
    Setup("bf16_true_adafactor", "bf16-true", "adafactor"),
)


@dataclass
class Estimate:
    """Bytes per part and the two phase peaks; `total` adds the assumed overhead to the larger peak."""

    setup: str
    weights: int
    grads: int
    optimizer_state: int
    frozen_parts: int
    activations: int
    autocast_cache: int
    buckets: int
    forward_peak: int
    backward_peak: int
    overhead: int
    total: int
    host_memory: int
    config: str


class _FusedAttention(torch.autograd.Function):
    """What a GPU's fused attention keeps for backward: q, k, v, the output and fp32 log-sum-exps."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:  # pragma: no cover - counting only
        raise NotImplementedError("only used to count saved tensors on the meta device")


class _GPULikeForward(TorchFunctionMode):
    """Fused attention, and (under bf16-mixed) autocast's casts; records which cast tensors are weight copies."""

    def __init__(self, autocast: bool) -> None:
        super().__init__()
        self.autocast, self.weight_copies, self.alive = autocast, set(), []

    def __torch_function__(self, func: Any, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _FusedAttention.apply(*args[:3])
        if self.autocast and func in (F.linear, F.conv2d, F.layer_norm):
            dtype = torch.float32 if func is F.layer_norm else torch.bfloat16
            args = [self._cast(a, dtype) for a in args]
        return func(*args, **kwargs)

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        cast = value.to(dtype)
        if isinstance(value, nn.Parameter):
            self.alive.append(cast)  # a freed storage's id could be reused by a later tensor
            self.weight_copies.add(cast.untyped_storage()._cdata)
        return cast


def activation_bytes(unet: nn.Module, resolution: int, batch_size: int, precision: str) -> dict[str, int]:
    """Activation bytes that each phase holds (see the module docstring); converts the meta UNet's dtype in place.

    Keys: `forward` / `backward` without checkpointing, `forward_ckpt` / `backward_ckpt` with it. Autocast's
    weight copies are left out of the forward figures (the autocast cache holds them: see `estimate`).
    """
    _, _, dtype, autocast = PRECISIONS[precision]
    unet = unet.to(torch.float32 if autocast else dtype).train()
    unet.set_gradient_checkpointing(False)
    side = resolution // 8
    x = torch.empty(batch_size, unet.in_channels, side, side, device="meta", dtype=dtype)
    context = torch.empty(batch_size, 77, unet.context_dim, device="meta", dtype=dtype)
    y = torch.empty(batch_size, unet.adm_in_channels, device="meta", dtype=dtype)
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    blocks = {f"input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)}
    blocks |= {"middle_block": unet.middle_block} | {f"output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)}
    mode, current, alive = _GPULikeForward(autocast), ["outside"], []
    saved: dict[tuple[str, bool], dict[int, int]] = {(n, c): {} for n in [*blocks, "outside"] for c in (False, True)}
    kept_inputs: dict[int, int] = {}  # what checkpointing keeps of each block: its inputs

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            current[0] = name
            alive.extend(args)  # keep storages alive so their ids stay unique during the pass
            kept_inputs.update((a.untyped_storage()._cdata, a.untyped_storage().nbytes()) for a in args)

        return hook

    def leave(module: nn.Module, args: tuple, output: Tensor) -> None:
        current[0] = "outside"

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:  # weights in the model's own dtype are the weights line
            saved[current[0], key in mode.weight_copies][key] = t.untyped_storage().nbytes()
        return t

    handles = [
        h
        for name, b in blocks.items()
        for h in (b.register_forward_pre_hook(enter(name)), b.register_forward_hook(leave))
    ]
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.zeros(batch_size, dtype=torch.long, device="meta"), context, y)
    finally:
        for handle in handles:
            handle.remove()
    block_acts = [sum(saved[name, False].values()) for name in blocks]
    block_peaks = [a + sum(saved[name, True].values()) for a, name in zip(block_acts, blocks)]
    outside, outside_copies = sum(saved["outside", False].values()), sum(saved["outside", True].values())
    kept = sum({**saved["outside", False], **kept_inputs}.values())
    return {
        "forward": outside + sum(block_acts),
        "backward": outside + outside_copies + sum(block_peaks),
        "forward_ckpt": kept,
        "backward_ckpt": kept + outside_copies + max(block_peaks) + 2 * max(kept_inputs.values()),
    }


def estimate(
    setup: Setup,
    model: str = "sdxl_base",
    resolution: int = 1024,
    batch_size: int = 1,
    accumulate_grad_batches: int = 1,
    counts: dict[str, Any] | None = None,
) -> Estimate:
    """The memory estimate of one setup; `counts` (from `model_counts`) saves rebuilding the model."""
    counts = counts or model_counts(model, resolution, batch_size)
    weight_bytes, grad_bytes, dtype, autocast = PRECISIONS[setup.precision]
    unet_params = counts["unet_params"]
    state_dtype = torch.float32 if weight_bytes == 4 else dtype
    state = (
        0
        if setup.zero2_offload
        else sum(state_bytes_per_tensor(setup.optimizer, shape, state_dtype) for shape in counts["unet_shapes"])
    )
    weights, grads = unet_params * weight_bytes, unet_params * grad_bytes
    frozen = 0 if setup.cached else counts["frozen_params"] * weight_bytes
    suffix = "_ckpt" if setup.gradient_checkpointing else ""
    acts = counts["activations"][setup.precision]
    activations, kept = acts["backward" + suffix], acts["forward" + suffix]
    cache = unet_params * 2 if autocast else 0
    buckets = strategy_plan(setup.strategy).bucket_elements * BUCKET_BYTES if setup.zero2_offload else 0
    base = weights + state + frozen + buckets
    forward_peak = base + cache + kept + (grads if accumulate_grad_batches > 1 else 0)
    backward_peak = base + grads + activations
    peak = max(forward_peak, backward_peak)
    overhead = int(CONTEXT_BYTES + FRAGMENTATION * peak)
    host = int(unet_params * 16 * 1.5) if setup.zero2_offload else 0
    return Estimate(
        setup.name,
        weights,
        grads,
        state,
        frozen,
        activations,
        cache,
        buckets,
        forward_peak,
        backward_peak,
        overhead,
        peak + overhead,
        host,
        setup.config,
    )


def model_counts(
    model: str = "sdxl_base", resolution: int = 1024, batch_size: int = 1, setups: Sequence[Setup] = SETUPS
) -> dict[str, Any]:
    """Parameter counts and shapes (the model built on meta) and the activations each setup needs."""
    sdxl = build_model(model, device="meta")
    unet_params = sum(p.numel() for p in sdxl.unet.parameters())
    counts: dict[str, Any] = {
        "unet_params": unet_params,
        "frozen_params": sum(p.numel() for p in sdxl.parameters()) - unet_params,
        "unet_shapes": [tuple(p.shape) for p in sdxl.unet.parameters()],
        "activations": {},
    }
    by_compute: dict[tuple, dict[str, int]] = {}  # bf16-true and DeepSpeed bf16 compute alike
    for precision in dict.fromkeys(setup.precision for setup in setups):
        compute = PRECISIONS[precision][2:]
        if compute not in by_compute:
            by_compute[compute] = activation_bytes(sdxl.unet, resolution, batch_size, precision)
        counts["activations"][precision] = by_compute[compute]
    return counts


def format_table(estimates: Sequence[Estimate], gpu_gib: float) -> str:
    """A text table in GiB: the parts, the two phase peaks, and TOTAL = the larger peak + overhead."""
    columns = (
        "weights",
        "grads",
        "optimizer_state",
        "frozen_parts",
        "activations",
        "autocast_cache",
        "buckets",
        "forward_peak",
        "backward_peak",
        "overhead",
        "total",
    )
    heads = ("weights", "grads", "optim", "frozen", "acts", "cast", "bucket", "fwd", "bwd", "overh", "TOTAL")
    lines = [f"{'setup (ESTIMATES, GiB)':28s}" + "".join(f"{h:>7s}" for h in heads) + f"  <={gpu_gib:g}  host RAM"]
    for e in estimates:
        row = "".join(f"{getattr(e, c) / GIB:7.2f}" for c in columns)
        host = f"{e.host_memory / GIB:6.1f}" if e.host_memory else "     -"
        lines.append(f"{e.setup:28s}{row}  {'yes' if e.total <= gpu_gib * GIB else 'NO ':4s}  {host}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sdxl_base", help="model config name or path (default sdxl_base)")
    parser.add_argument("--resolution", type=int, default=1024, help="square image side in pixels (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulate-grad-batches", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory to compare with (default 24)")
    parser.add_argument("--json", type=Path, default=None, help="also write the estimates (bytes) to this file")
    args = parser.parse_args(argv)
    if args.resolution % 64 or args.batch_size < 1:
        parser.error(f"--resolution must be a multiple of 64 (got {args.resolution}) and --batch-size >= 1")
    counts = model_counts(args.model, args.resolution, args.batch_size)
    estimates = [
        estimate(s, args.model, args.resolution, args.batch_size, args.accumulate_grad_batches, counts) for s in SETUPS
    ]
    print(
        f"{args.model}: {counts['unet_params']:,} UNet parameters (+{counts['frozen_params']:,} frozen), "
        f"{args.resolution} px, batch {args.batch_size}, accumulate {args.accumulate_grad_batches}"
    )
    print(format_table(estimates, args.gpu_gib))
    print(
        "ESTIMATES from parameter counts and a meta-device forward (activations +-30%), not measurements; "
        "see the module docstring. acts: at the backward peak; cast: autocast's bf16 weight copies (forward)."
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        payload = {
            "settings": settings,
            "unet_params": counts["unet_params"],
            "estimates": [asdict(e) for e in estimates],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
