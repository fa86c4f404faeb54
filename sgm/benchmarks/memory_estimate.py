"""ESTIMATED peak GPU memory of SDXL fine-tune setups (full UNet, LoRA, text encoders; 1024 px): not measured.

    python -m sgm.benchmarks.memory_estimate [--model sdxl_base] [--resolution 1024] [--batch-size 1] [--json OUT]
    python -m sgm.benchmarks.memory_estimate --lora-presets          # lora_24gb / lora_12gb and variants
    python -m sgm.benchmarks.memory_estimate --lora-rank 16 --lora-targets attn_mlp --text-encoder-lora-rank 8 \
        [--precision bf16-mixed|bf16-true] [--base-bf16] [--batch-size N]

LoRA setups: adapters built by `apply_lora` on the meta model (exact counts), fp32 under bf16-mixed with
fp32 gradients and AdamW moments; the frozen base in the precision's weight dtype (fp32 under bf16-mixed, as
the framework keeps it today; `--base-bf16`: held in bf16); trained text encoders' activations from a meta
forward of the towers (77 tokens); without caches an ASSUMED VAE-encode transient (4 full-resolution maps).

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
import contextlib
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from sgm.models.build import build_model, config_root
from sgm.models.lora import LoRAConfig, apply_lora
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
class Part:
    """One trained part (`unet`, `text_encoder_<i>`): its own weights (mode full) or LoRA adapters (mode lora)."""

    name: str
    mode: str = "full"
    lora: LoRAConfig | None = None


UNET_FULL = (Part("unet"),)


@dataclass(frozen=True)
class Setup:
    """One way to run a fine-tune; `strategy` names its configs/strategy file, `config` the shipped preset that
    sets it up. `trainable`: what trains (default the UNet in full; parts not named are frozen). `base_bf16`:
    frozen base weights held in bf16 while the trained parameters stay fp32 (under bf16-mixed the framework
    today keeps every weight fp32). `batch_size`: the preset's batch (None: the caller's)."""

    name: str
    precision: str
    optimizer: str
    gradient_checkpointing: bool = True
    cached: bool = True  # latents and text embeddings cached: VAE and text encoders not on the GPU
    strategy: str = "auto"
    config: str = ""
    trainable: tuple[Part, ...] = UNET_FULL
    base_bf16: bool = False
    batch_size: int | None = None

    def part(self, name: str) -> Part | None:
        return next((p for p in self.trainable if p.name == name), None)

    @property
    def lora(self) -> dict[str, LoRAConfig]:
        """Part -> adapter config of the parts trained through LoRA."""
        return {p.name: p.lora or LoRAConfig() for p in self.trainable if p.mode == "lora"}

    @property
    def text_encoders(self) -> tuple[int, ...]:
        """Indices of the text encoders that train (in full or through adapters)."""
        return tuple(int(p.name.rsplit("_", 1)[1]) for p in self.trainable if p.name.startswith("text_encoder_"))

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


def lora_parts(
    rank: int = 16,
    targets: str = "attn_mlp",
    text_encoder_rank: int | None = None,
    text_encoder_targets: str = "attn",
    text_encoders: Sequence[int] = (0, 1),
) -> tuple[Part, ...]:
    """UNet LoRA (alpha = rank), plus LoRA on the given text encoders when `text_encoder_rank` is set."""
    parts = [Part("unet", "lora", LoRAConfig(rank=rank, alpha=rank, targets=targets))]
    if text_encoder_rank:
        config = LoRAConfig(rank=text_encoder_rank, alpha=text_encoder_rank, targets=text_encoder_targets)
        parts += [Part(f"text_encoder_{i}", "lora", config) for i in text_encoders]
    return tuple(parts)


LORA_24GB_BATCH = 2
# The LoRA presets (images, not cached latents: VAE and text encoders on the GPU) and their variants: with and
# without text-encoder LoRA and gradient checkpointing. `base_bf16`: the frozen base in bf16 with fp32 adapters
# (under bf16-mixed the framework today keeps the frozen base fp32: the rows without `_bf16base`).
_24 = {"precision": "bf16-mixed", "optimizer": "adamw", "cached": False, "batch_size": LORA_24GB_BATCH}
_12 = {"precision": "bf16-true", "optimizer": "adamw", "cached": False, "batch_size": 1}
LORA_SETUPS = (
    Setup("lora_24gb", **_24, trainable=lora_parts(32, "attn_mlp", 8), config="experiment=lora_24gb"),
    Setup("lora_24gb_no_ckpt", **_24, trainable=lora_parts(32, "attn_mlp", 8), gradient_checkpointing=False),
    Setup("lora_24gb_no_te", **_24, trainable=lora_parts(32, "attn_mlp")),
    Setup("lora_24gb_no_te_no_ckpt", **_24, trainable=lora_parts(32, "attn_mlp"), gradient_checkpointing=False),
    Setup("lora_24gb_bf16base", **_24, trainable=lora_parts(32, "attn_mlp", 8), base_bf16=True),
    Setup("lora_12gb", **_12, trainable=lora_parts(16, "attn_mlp"), config="experiment=lora_12gb"),
    Setup("lora_12gb_no_ckpt", **_12, trainable=lora_parts(16, "attn_mlp"), gradient_checkpointing=False),
    Setup("lora_12gb_te", **_12, trainable=lora_parts(16, "attn_mlp", 8)),
    Setup("lora_12gb_te_no_ckpt", **_12, trainable=lora_parts(16, "attn_mlp", 8), gradient_checkpointing=False),
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


def _storage(t: Tensor) -> tuple[int, int]:
    return t.untyped_storage()._cdata, t.untyped_storage().nbytes()


@contextlib.contextmanager
def _autocast_reported(autocast: bool) -> Any:
    """LoRA adapters ask `torch.is_autocast_enabled` (False on meta) to pick their branch's dtype: answer as the
    GPU would, so the adapter branch runs as under real autocast."""
    with mock.patch.object(torch, "is_autocast_enabled", lambda *args: autocast):
        yield


def activation_bytes(
    unet: nn.Module,
    resolution: int,
    batch_size: int,
    precision: str,
    weight_dtype: torch.dtype | None = None,
    adapters: nn.Module | None = None,
    context_grad: bool = False,
) -> dict[str, int]:
    """Activation bytes that each phase holds (see the module docstring); converts the meta UNet's dtype in place.

    Keys: `forward` / `backward` without checkpointing, `forward_ckpt` / `backward_ckpt` with it. Autocast's
    weight copies are left out of the forward figures (the autocast cache holds them: see `estimate`);
    `forward_copies` / `forward_ckpt_copies` are those copies, which the forward holds as saved tensors when the
    weights are frozen (autocast caches only the casts of weights that require grad).
    `weight_dtype`: the UNet weights' dtype (default: fp32 under autocast, else the compute dtype); `adapters`:
    LoRA adapters hooked into the UNet (their weights are not activations); `context_grad`: the text encoders
    train, so the text context and pooled vector carry gradients.
    """
    _, _, dtype, autocast = PRECISIONS[precision]
    unet = unet.to(weight_dtype or (torch.float32 if autocast else dtype)).train()
    unet.set_gradient_checkpointing(False)
    side = resolution // 8
    x = torch.empty(batch_size, unet.in_channels, side, side, device="meta", dtype=dtype)
    context = torch.empty(batch_size, 77, unet.context_dim, device="meta", dtype=dtype, requires_grad=context_grad)
    y = torch.empty(batch_size, unet.adm_in_channels, device="meta", dtype=dtype, requires_grad=context_grad)
    weights = [*unet.parameters(), *(adapters.parameters() if adapters is not None else ())]
    params = {p.untyped_storage()._cdata for p in weights}
    blocks = {f"input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)}
    blocks |= {"middle_block": unet.middle_block} | {f"output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)}
    mode, current, alive = _GPULikeForward(autocast), ["outside"], []
    saved: dict[tuple[str, bool], dict[int, int]] = {(n, c): {} for n in [*blocks, "outside"] for c in (False, True)}
    kept_inputs: dict[int, int] = {}  # what checkpointing keeps of each block: its inputs

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            current[0] = name
            alive.extend(args)  # keep storages alive so their ids stay unique during the pass
            kept_inputs.update(_storage(a) for a in args)

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
        with mode, _autocast_reported(autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.zeros(batch_size, dtype=torch.long, device="meta"), context, y)
    finally:
        for handle in handles:
            handle.remove()
    block_acts = [sum(saved[name, False].values()) for name in blocks]
    block_copies = [sum(saved[name, True].values()) for name in blocks]
    block_peaks = [a + c for a, c in zip(block_acts, block_copies)]
    outside, outside_copies = sum(saved["outside", False].values()), sum(saved["outside", True].values())
    kept = sum({**saved["outside", False], **kept_inputs}.values())
    return {
        "forward": outside + sum(block_acts),
        "backward": outside + outside_copies + sum(block_peaks),
        "forward_ckpt": kept,
        "backward_ckpt": kept + outside_copies + max(block_peaks) + 2 * max(kept_inputs.values()),
        "forward_copies": outside_copies + sum(block_copies),
        "forward_ckpt_copies": outside_copies,
    }


def text_activation_bytes(
    embedder: nn.Module, batch_size: int, precision: str, adapters: nn.Module | None = None
) -> tuple[int, int]:
    """(activations, autocast weight copies) a trained text encoder's forward saves for backward, 77 tokens per
    caption (text towers run without checkpointing). Its weights keep their dtype; LoRA adapters' weights are not
    activations (copies of frozen weights are: autocast does not cache them)."""
    _, _, dtype, autocast = PRECISIONS[precision]
    weights = [*embedder.parameters(), *(adapters.parameters() if adapters is not None else ())]
    params = {p.untyped_storage()._cdata for p in weights}
    mode, saved = _GPULikeForward(autocast), {False: {}, True: {}}

    def pack(t: Tensor) -> Tensor:
        key, nbytes = _storage(t)
        if key not in params:
            saved[key in mode.weight_copies][key] = nbytes
            mode.alive.append(t)
        return t

    tokens = torch.zeros(batch_size, 77, dtype=torch.long, device="meta")
    with mode, _autocast_reported(autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        embedder.train()(tokens)
    return sum(saved[False].values()), sum(saved[True].values())


def vae_encode_bytes(vae: nn.Module, resolution: int, batch_size: int, weight_bytes: int) -> int:
    """ASSUMED transient peak of a no-grad VAE encode (images, not cached latents): four full-resolution
    feature maps of the encoder's first width per image (a ResNet block's input, norm, activation and conv
    outputs), in the VAE's dtype. Not traced; it only matters when it exceeds the training peaks."""
    first = next(m for m in vae.modules() if isinstance(m, nn.Conv2d))
    return 4 * batch_size * first.out_channels * resolution * resolution * weight_bytes


def _part_module(sdxl: nn.Module, name: str) -> nn.Module:
    return sdxl.unet if name == "unet" else sdxl.conditioner.embedders[int(name.rsplit("_", 1)[1])]


def _trained_weights(module: nn.Module) -> list[nn.Parameter]:
    """A fully trained part's parameters (those its forward never uses stay frozen, as in training)."""
    unused = set(getattr(module, "unused_parameter_names", list)())
    return [p for n, p in module.named_parameters() if n not in unused and p.dim() > 0 and p.is_floating_point()]


def activation_key(setup: Setup, batch_size: int) -> tuple:
    """What a setup's counts depend on: compute dtype, weight dtypes, what trains, caches, batch."""
    compute = PRECISIONS[setup.precision][2:]
    return (*compute, setup.base_bf16, setup.trainable, setup.cached, setup.batch_size or batch_size)


def setup_pass(sdxl: nn.Module, setup: Setup, resolution: int, batch_size: int) -> dict[str, Any]:
    """One setup on the meta model: its trained parameters (LoRA adapters built by `apply_lora`, exactly as
    training builds them), its frozen weights, and the activations of the UNet and the trained text encoders."""
    _, _, dtype, autocast = PRECISIONS[setup.precision]
    trained_dtype = torch.float32 if autocast else dtype
    base_dtype = torch.bfloat16 if setup.base_bf16 else trained_dtype
    full = [p.name for p in setup.trainable if p.mode == "full"]
    text = [_part_module(sdxl, f"text_encoder_{i}") for i in setup.text_encoders]
    sdxl.requires_grad_(False)
    for name in full:
        for param in _trained_weights(_part_module(sdxl, name)):
            param.requires_grad_(True)
    for module in (sdxl.unet, *text):
        module.to(trained_dtype if module in [_part_module(sdxl, n) for n in full] else base_dtype)
    network = apply_lora(sdxl, setup.lora).to(trained_dtype) if setup.lora else None
    try:
        trained = [p for p in sdxl.parameters() if p.requires_grad]
        adapters = list(network.parameters()) if network is not None else []
        acts = activation_bytes(
            sdxl.unet,
            resolution,
            batch_size,
            setup.precision,
            next(sdxl.unet.parameters()).dtype,
            network,
            bool(text),
        )
        text_acts = [text_activation_bytes(m, batch_size, setup.precision, network) for m in text]
    finally:
        if network is not None:
            network.remove()
        sdxl.requires_grad_(True)
    on_gpu = [sdxl.unet, *text] + ([] if setup.cached else [sdxl.vae, sdxl.conditioner])
    weights_on_gpu = {id(p): p for m in on_gpu for p in m.parameters()}
    trained_ids = {id(p) for p in trained}
    return {
        **acts,
        "text": sum(a for a, _ in text_acts),
        "text_copies": sum(c for _, c in text_acts),
        "trained_params": sum(p.numel() for p in trained + adapters),
        "trained_shapes": [tuple(p.shape) for p in trained + adapters],
        "adapter_params": sum(p.numel() for p in adapters),
        "frozen_params": sum(p.numel() for i, p in weights_on_gpu.items() if i not in trained_ids),
        "vae_encode": 0 if setup.cached else vae_encode_bytes(sdxl.vae, resolution, batch_size, 1),
    }


def estimate(
    setup: Setup,
    model: str = "sdxl_base",
    resolution: int = 1024,
    batch_size: int = 1,
    accumulate_grad_batches: int = 1,
    counts: dict[str, Any] | None = None,
) -> Estimate:
    """The memory estimate of one setup; `counts` (from `model_counts`) saves rebuilding the model. A setup's
    own `batch_size` wins over the argument."""
    batch_size = setup.batch_size or batch_size
    counts = counts or model_counts(model, resolution, batch_size, (setup,))
    weight_bytes, grad_bytes, dtype, autocast = PRECISIONS[setup.precision]
    info = counts["passes"][activation_key(setup, batch_size)]
    trained = info["trained_params"]
    state_dtype = torch.float32 if weight_bytes == 4 else dtype
    state = (
        0
        if setup.zero2_offload
        else sum(state_bytes_per_tensor(setup.optimizer, shape, state_dtype) for shape in info["trained_shapes"])
    )
    weights, grads = trained * weight_bytes, trained * grad_bytes
    frozen = info["frozen_params"] * (2 if setup.base_bf16 else weight_bytes)
    suffix = "_ckpt" if setup.gradient_checkpointing else ""
    text = info["text"] + info["text_copies"]  # saved in the forward, freed at the very end of the backward
    activations = info["backward" + suffix] + text
    # autocast caches the bf16 casts of weights that require grad; a frozen fp32 weight's cast is a saved tensor
    unet_full = setup.part("unet") is not None and setup.part("unet").mode == "full"
    kept = info["forward" + suffix] + text + (0 if unet_full else info[f"forward{suffix}_copies"])
    cache = trained * 2 if autocast else 0
    buckets = strategy_plan(setup.strategy).bucket_elements * BUCKET_BYTES if setup.zero2_offload else 0
    base = weights + state + frozen + buckets
    forward_peak = base + cache + kept + (grads if accumulate_grad_batches > 1 else 0)
    forward_peak = max(forward_peak, base + info["vae_encode"] * (2 if setup.base_bf16 else weight_bytes))
    backward_peak = base + grads + activations
    peak = max(forward_peak, backward_peak)
    overhead = int(CONTEXT_BYTES + FRAGMENTATION * peak)
    host = int(trained * 16 * 1.5) if setup.zero2_offload else 0
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
    """Parameter counts and shapes (the model built on meta) and, per distinct setup (`activation_key`), its
    trained / frozen parameters and activations."""
    sdxl = build_model(model, device="meta")
    unet_params = sum(p.numel() for p in sdxl.unet.parameters())
    counts: dict[str, Any] = {
        "unet_params": unet_params,
        "frozen_params": sum(p.numel() for p in sdxl.parameters()) - unet_params,
        "unet_shapes": [tuple(p.shape) for p in sdxl.unet.parameters()],
        "passes": {},
    }
    for setup in setups:
        if setup.cached and setup.text_encoders:
            raise ValueError(f"{setup.name}: cached text embeddings cannot train a text encoder (cached=False)")
        key = activation_key(setup, batch_size)
        if key not in counts["passes"]:
            counts["passes"][key] = setup_pass(sdxl, setup, resolution, setup.batch_size or batch_size)
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
    parser.add_argument(
        "--lora-presets", action="store_true", help="the LoRA presets (lora_24gb, lora_12gb) and variants"
    )
    parser.add_argument("--lora-rank", type=int, default=None, help="estimate UNet LoRA of this rank (alpha = rank)")
    parser.add_argument("--lora-targets", default="attn_mlp", help="UNet LoRA targets: attn | attn_mlp | locon")
    parser.add_argument("--text-encoder-lora-rank", type=int, default=None, help="also LoRA on both text encoders")
    parser.add_argument("--text-encoder-lora-targets", default="attn", help="text encoder targets: attn | attn_mlp")
    parser.add_argument("--precision", default="bf16-mixed", choices=sorted(PRECISIONS), help="for --lora-rank")
    parser.add_argument("--base-bf16", action="store_true", help="--lora-rank: frozen base weights in bf16")
    args = parser.parse_args(argv)
    if args.resolution % 64 or args.batch_size < 1:
        parser.error(f"--resolution must be a multiple of 64 (got {args.resolution}) and --batch-size >= 1")
    setups: Sequence[Setup] = SETUPS
    if args.lora_presets:
        setups = LORA_SETUPS
    elif args.lora_rank:
        parts = lora_parts(
            args.lora_rank, args.lora_targets, args.text_encoder_lora_rank, args.text_encoder_lora_targets
        )
        common = {"precision": args.precision, "optimizer": "adamw", "cached": False, "trainable": parts}
        setups = [
            Setup(
                f"lora_r{args.lora_rank}{'' if ckpt else '_no_ckpt'}",
                **common,
                gradient_checkpointing=ckpt,
                base_bf16=args.base_bf16,
            )
            for ckpt in (True, False)
        ]
    counts = model_counts(args.model, args.resolution, args.batch_size, setups)
    estimates = [
        estimate(s, args.model, args.resolution, args.batch_size, args.accumulate_grad_batches, counts) for s in setups
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
            "adapter_params": {
                s.name: counts["passes"][activation_key(s, args.batch_size)]["adapter_params"] for s in setups
            },
            "estimates": [asdict(e) for e in estimates],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
