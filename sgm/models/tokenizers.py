"""Tokenizers for SDXL's two text towers: one byte-pair encoding, two padding conventions.

Both towers read CLIP's BPE vocabulary (49408 ids; open_clip ships it, so no download is ever
needed): start-of-text 49406, the caption's ids, end-of-text 49407, padded to 77 positions.
They differ in what fills the positions after the end-of-text token:

- CLIP ViT-L/14 (base embedder 0) was tokenized by the Hugging Face tokenizer of
  openai/clip-vit-large-patch14, whose pad token IS end-of-text: [49406, ids..., 49407, 49407, ...].
- OpenCLIP ViT-bigG/14 pads with 0: [49406, ids..., 49407, 0, 0, ...].

Padded positions still run through the causal transformer and their hidden states are part of
the cross-attention context, so the pad id changes the conditioning: each tower must keep its own.
A caption too long for the context keeps start-of-text, its first (context - 2) ids, and
end-of-text at the last position; both reference tokenizers truncate this way. Text cleaning
(ftfy, HTML unescape, whitespace, lower case) is open_clip's; the Hugging Face tokenizer cleans
the same way for ordinary captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor

SOT_ID = 49406
EOT_ID = 49407
CLIP_L_PAD_ID = EOT_ID  # Hugging Face tokenizer of openai/clip-vit-large-patch14
OPENCLIP_PAD_ID = 0  # open_clip.tokenize


class CLIPBPETokenizer:
    """Captions -> [B, context_length] int64 ids with SOT/EOT, truncation and a chosen pad id.

    The BPE tables load on first use, so building a model (e.g. on the meta device) stays cheap.
    """

    def __init__(self, context_length: int = 77, pad_id: int = OPENCLIP_PAD_ID) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (room for SOT and EOT), got {context_length}")
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self._bpe: SimpleTokenizer | None = None

    @property
    def bpe(self) -> SimpleTokenizer:
        """open_clip's BPE (bundled vocabulary), built on first use."""
        if self._bpe is None:
            bpe = SimpleTokenizer(context_length=self.context_length)
            if (bpe.sot_token_id, bpe.eot_token_id) != (SOT_ID, EOT_ID):
                raise RuntimeError(
                    f"open_clip's tokenizer uses SOT/EOT ids {bpe.sot_token_id}/{bpe.eot_token_id}, not "
                    f"{SOT_ID}/{EOT_ID}; install an open_clip_torch release with CLIP's standard vocabulary"
                )
            self._bpe = bpe
        return self._bpe

    @property
    def vocab_size(self) -> int:
        """Number of ids the BPE can emit (49408 for CLIP's vocabulary)."""
        return len(self.bpe.encoder)

    def encode(self, text: str) -> list[int]:
        """One caption's BPE ids, without SOT/EOT and without truncation."""
        return self.bpe.encode(text)

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids [B, context_length] (int64, on the CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {bad[0]}; replace missing captions with ''")
        tokens = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text)[: self.context_length - 2], EOT_ID]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens
