"""module.compile=true: the UNet is compiled in place, so checkpoints keep their keys and losses match eager.

Compiling the whole tiny UNet with inductor (the default backend) on this 2-core CPU took 454 s for the
forward and 371 s for the backward (14 min wall, 4.5 min CPU, under load from other jobs), far too long
for the suite. So: the whole UNet is captured by dynamo + AOT autograd with the `aot_eager` backend
(the same graphs inductor would receive, without generating C++), and inductor itself compiles a smaller
piece, a ResBlock, whose outputs and gradients must match eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from training_utils import compose_train

from sgm.checkpoint.official_layout import to_official
from sgm.models.layers import ResBlock
from sgm.training.run import build_module


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs are cached per code object: start and end each test without them."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_module(tmp_path, compile: bool):
    torch.manual_seed(0)
    return build_module(compose_train([f"run_dir={tmp_path}", f"module.compile={str(compile).lower()}"]))


def tiny_batch(module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    sizes = torch.tensor([[64, 64], [64, 64]])
    batch = {
        "txt": ["a red heart", "a blue circle"],
        "original_size_as_tuple": sizes,
        "crop_coords_top_left": torch.zeros(2, 2, dtype=torch.long),
        "target_size_as_tuple": sizes,
    }
    with torch.no_grad():
        cond = module.model.condition(batch)
    return latents, cond


def loss_and_grads(module, latents, cond) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same noise levels and noise for both runs
    loss = module.loss_fn(module.model.unet, latents, cond).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.unet.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_compiled_module_keeps_checkpoint_and_official_keys(tmp_path):
    eager, compiled = tiny_module(tmp_path, False), tiny_module(tmp_path, True)
    assert compiled.model.unet._compiled_call_impl is not None  # compiled in place (lazily, on first call)
    keys = list(compiled.state_dict())
    assert keys == list(eager.state_dict()) and not any("_orig_mod" in k for k in keys)
    assert list(to_official(compiled.model)) == list(to_official(eager.model))
    compiled.load_state_dict(eager.state_dict())  # an eager run's checkpoint loads into a compiled run


@pytest.mark.slow
def test_whole_unet_captured_by_dynamo_gives_the_eager_loss_and_grads(tmp_path):
    eager = tiny_module(tmp_path, False)
    compiled = copy.deepcopy(eager)
    compiled.model.unet.compile(backend="aot_eager")  # what module.compile does, minus inductor's C++ codegen
    latents, cond = tiny_batch(eager)
    eager_loss, eager_grads = loss_and_grads(eager, latents, cond)
    compiled_loss, compiled_grads = loss_and_grads(compiled, latents, cond)
    assert counters["stats"]["unique_graphs"] >= 1  # really compiled, not a silent eager fallback
    print("dynamo graphs:", dict(counters["stats"]), "graph breaks:", dict(counters["graph_break"]))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_compiled_resblock_matches_eager():
    torch.manual_seed(0)
    eager = ResBlock(32, 64, 64, groups=8)
    torch.nn.init.normal_(eager.out_layers[-1].weight, std=0.02)  # zero-initialised: give it a gradient path
    compiled = copy.deepcopy(eager)
    compiled.compile()  # inductor, as module.compile=true
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    outputs = []
    for block in (eager, compiled):
        out = block(x, emb)
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)
