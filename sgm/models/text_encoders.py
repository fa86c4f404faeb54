"""SDXL's two frozen text towers, built from open_clip's transformer modules.

- CLIPTextEmbedder: CLIP ViT-L/14 (base `conditioner.embedders.0`), quick-GELU, no projection;
  stored officially in Hugging Face CLIPTextModel naming (`transformer.text_model.*`).
- OpenCLIPTextEmbedder: OpenCLIP ViT-bigG/14 (base `embedders.1`, refiner `embedders.0`), GELU,
  with text projection; stored officially in open_clip naming (`model.*`), which is ours too.

Both return the penultimate hidden states (the input of the last residual block, no final
LayerNorm) as the cross-attention context; bigG also returns the pooled, projected EOT feature
as part of the vector conditioning. The open_clip causal-mask buffer is dropped: the mask is built
per call, so a model built on the meta device and loaded later needs no buffer re-initialisation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from open_clip.transformer import QuickGELU, TextTransformer
from torch import Tensor, nn

from sgm.models.tokenizers import CLIP_L_PAD_ID, OPENCLIP_PAD_ID, CLIPBPETokenizer

CROSSATTN = "crossattn"
VECTOR = "vector"


def _text_transformer(
    width: int,
    layers: int,
    heads: int,
    context_length: int,
    vocab_size: int,
    mlp_ratio: float,
    output_dim: int | None,
    act_layer: type[nn.Module],
) -> TextTransformer:
    """An open_clip text transformer (causal, argmax pooling) without the causal-mask buffer."""
    if layers < 1 or width % heads:
        raise ValueError(
            f"text tower needs layers >= 1 and width divisible by heads; got width {width}, "
            f"heads {heads}, layers {layers}"
        )
    tower = TextTransformer(
        context_length=context_length,
        vocab_size=vocab_size,
        width=width,
        heads=heads,
        layers=layers,
        mlp_ratio=mlp_ratio,
        output_dim=output_dim,
        proj_type="linear" if output_dim else "none",
        pool_type="argmax",
        act_layer=act_layer,
    )
    tower.attn_mask = None  # built per call in _TextTower.run_blocks
    return tower


class _TextTower(nn.Module):
    """Tokenization, embedding and the causal blocks shared by both towers (self.model holds weights)."""

    model: TextTransformer
    tokenizer: CLIPBPETokenizer

    @property
    def frozen(self) -> bool:
        """True when no parameter requires grad (SDXL keeps its text towers frozen)."""
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> _TextTower:
        """Eval mode, no grads: the reference setting for SDXL training."""
        self.eval()
        self.requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def unused_parameter_names(self) -> list[str]:
        """Parameters the forward never uses (kept for the official layout): they get no gradient, so a trained
        tower leaves them out of the optimizer (DDP refuses parameters without gradients)."""
        return []

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Captions -> [B, context_length] int64 ids on the tower's device."""
        tokens = self.tokenizer(texts)
        if int(tokens.max()) >= self.model.vocab_size:
            raise ValueError(
                f"token id {int(tokens.max())} does not fit vocab_size {self.model.vocab_size}; "
                f"CLIP's BPE needs vocab_size >= {self.tokenizer.vocab_size}"
            )
        return tokens.to(self.device)

    def _tokens(self, texts: Sequence[str] | Tensor) -> Tensor:
        if isinstance(texts, Tensor):
            return texts.to(self.device, torch.long)
        return self.tokenize(texts)

    def run_blocks(self, tokens: Tensor, through_last: bool) -> tuple[Tensor, Tensor | None]:
        """(input of the last block, output of the last block or None) for token ids [B, L]."""
        model = self.model
        length = tokens.shape[1]
        if length > model.positional_embedding.shape[0]:
            raise ValueError(f"{length} tokens exceed the context length {model.positional_embedding.shape[0]}")
        x = model.token_embedding(tokens) + model.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        blocks = model.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x, attn_mask=mask)
        last = blocks[-1](x, attn_mask=mask) if through_last else None
        return x, last


class CLIPTextEmbedder(_TextTower):
    """CLIP ViT-L/14 text tower: penultimate hidden states [B, 77, width], no final LayerNorm.

    Tokens are padded with EOT (49407), as the reference's Hugging Face tokenizer does. The last
    block and final LayerNorm exist only so the official layout round-trips; they are not run.
    """

    def __init__(
        self,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        context_length: int = 77,
        vocab_size: int = 49408,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.model = _text_transformer(width, layers, heads, context_length, vocab_size, mlp_ratio, None, QuickGELU)
        self.tokenizer = CLIPBPETokenizer(context_length, pad_id=CLIP_L_PAD_ID)
        self.output_dims = {CROSSATTN: width}

    def forward(self, texts: Sequence[str] | Tensor) -> Tensor:
        """Captions (or token ids [B, 77]) -> cross-attention context [B, 77, width]."""
        penultimate, _ = self.run_blocks(self._tokens(texts), through_last=False)
        return penultimate

    def unused_parameter_names(self) -> list[str]:
        """The last block and the final LayerNorm: SDXL takes CLIP-L's penultimate hidden states."""
        last = len(self.model.transformer.resblocks) - 1
        prefixes = (f"model.transformer.resblocks.{last}.", "model.ln_final.")
        return [name for name, _ in self.named_parameters() if name.startswith(prefixes)]

    def to_official(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Own keys -> official keys under `conditioner.embedders.N.` (HF naming, q/k/v split)."""
        return clip_l_to_official(state_dict, self.model.positional_embedding.shape[0])

    def from_official(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Official (HF-named) keys -> own keys; position_ids are optional and must be 0..L-1."""
        return clip_l_from_official(state_dict)


class OpenCLIPTextEmbedder(_TextTower):
    """OpenCLIP ViT-bigG/14 text tower: (penultimate states [B, 77, width], pooled [B, output_dim]).

    pooled = ln_final(last block output)[argmax token id, i.e. EOT] @ text_projection [width, out].
    `model.logit_scale` is kept (frozen, unused) because the official files carry it.
    """

    def __init__(
        self,
        width: int = 1280,
        layers: int = 32,
        heads: int = 20,
        context_length: int = 77,
        vocab_size: int = 49408,
        mlp_ratio: float = 4.0,
        output_dim: int = 1280,
    ) -> None:
        super().__init__()
        if not output_dim:
            raise ValueError("OpenCLIPTextEmbedder needs output_dim > 0 for its pooled, projected output")
        self.model = _text_transformer(width, layers, heads, context_length, vocab_size, mlp_ratio, output_dim, nn.GELU)
        self.model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=False)
        self.tokenizer = CLIPBPETokenizer(context_length, pad_id=OPENCLIP_PAD_ID)
        self.output_dims = {CROSSATTN: width, VECTOR: output_dim}

    def forward(self, texts: Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
        """Captions (or token ids [B, 77]) -> (context [B, 77, width], pooled [B, output_dim])."""
        tokens = self._tokens(texts)
        penultimate, last = self.run_blocks(tokens, through_last=True)
        final = self.model.ln_final(last)
        eot = final[torch.arange(final.shape[0], device=final.device), tokens.argmax(dim=-1)]
        return penultimate, eot @ self.model.text_projection

    def unused_parameter_names(self) -> list[str]:
        """`logit_scale`: only CLIP's contrastive loss uses it."""
        return ["model.logit_scale"]

    def to_official(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Our keys are already the official ones (relative to `conditioner.embedders.N.`)."""
        return dict(state_dict)

    def from_official(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(state_dict)


# --- CLIP-L: open_clip layout <-> Hugging Face CLIPTextModel layout -------------------------------

_HF = "transformer.text_model."
_GLOBAL_KEYS = {  # own -> official (relative to _HF)
    "model.token_embedding.weight": "embeddings.token_embedding.weight",
    "model.positional_embedding": "embeddings.position_embedding.weight",
    "model.ln_final.weight": "final_layer_norm.weight",
    "model.ln_final.bias": "final_layer_norm.bias",
}
_BLOCK_KEYS = {  # own -> official, inside one residual block / encoder layer
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OWN_BLOCK = re.compile(r"model\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OWN_IN_PROJ = re.compile(r"model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_LAYER = re.compile(re.escape(_HF) + r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj$")
_POSITION_IDS = _HF + "embeddings.position_ids"


def clip_l_to_official(state_dict: Mapping[str, Tensor], context_length: int) -> dict[str, Tensor]:
    """open_clip-named CLIP-L weights -> HF CLIPTextModel names, adding position_ids [1, L] int64."""
    out: dict[str, Tensor] = {}
    device = None
    for key, value in state_dict.items():
        if key in _GLOBAL_KEYS:
            out[_HF + _GLOBAL_KEYS[key]] = value
            device = value.device
        elif match := _OWN_IN_PROJ.match(key):
            layer, kind = match.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{_HF}encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.clone()
        elif (match := _OWN_BLOCK.match(key)) and match.group(2) in _BLOCK_KEYS:
            layer, name, kind = match.groups()
            out[f"{_HF}encoder.layers.{layer}.{_BLOCK_KEYS[name]}.{kind}"] = value
        else:
            raise ValueError(f"CLIPTextEmbedder: no official name for key '{key}'; pass the module's own state_dict()")
    out[_POSITION_IDS] = torch.arange(context_length, dtype=torch.long, device=device).unsqueeze(0)
    return out


def clip_l_from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF CLIPTextModel names -> open_clip names, packing q/k/v into in_proj; checks position_ids."""
    global_keys = {official: own for own, official in _GLOBAL_KEYS.items()}
    block_keys = {official: own for own, official in _BLOCK_KEYS.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        relative = key[len(_HF) :] if key.startswith(_HF) else None
        if key == _POSITION_IDS:
            _check_position_ids(value)
        elif relative in global_keys:
            out[global_keys[relative]] = value
        elif match := _HF_LAYER.match(key):
            layer, name, kind = match.groups()
            if qkv_match := _HF_QKV.match(name):
                qkv.setdefault((layer, kind), {})[qkv_match.group(1)] = value
            elif name in block_keys:
                out[f"model.transformer.resblocks.{layer}.{block_keys[name]}.{kind}"] = value
            else:
                raise ValueError(f"CLIPTextEmbedder: unexpected official key '{key}'")
        else:
            raise ValueError(
                f"CLIPTextEmbedder: unexpected official key '{key}'; expected keys under '{_HF}' "
                "(relative to conditioner.embedders.0.)"
            )
    for (layer, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            missing = sorted(set("qkv") - set(parts))
            raise ValueError(f"CLIPTextEmbedder: layer {layer} lacks self_attn {missing} projection {kind}(s)")
        out[f"model.transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out


def _check_position_ids(position_ids: Tensor) -> None:
    """Our tower always uses positions 0..L-1; a file whose position_ids differ would be read wrongly."""
    expected = torch.arange(position_ids.shape[-1], dtype=torch.float64).unsqueeze(0)
    if position_ids.device.type == "meta":
        return
    if position_ids.shape != expected.shape or not torch.equal(position_ids.to("cpu", torch.float64), expected):
        raise ValueError(
            f"CLIP-L position_ids in the checkpoint are not 0..{position_ids.shape[-1] - 1} (shape "
            f"{list(position_ids.shape)}); the file's text encoder is corrupted (a known merge bug). Drop the key "
            "`conditioner.embedders.0.transformer.text_model.embeddings.position_ids` to use the standard positions."
        )
