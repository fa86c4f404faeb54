"""CLIP score (sgm.eval.clip_score): a tiny open_clip CLIP trained here on the shapes data scores matched
image-caption pairs far above mismatched ones (and did not before training); the full-size ViT-L-14 and
ViT-bigG-14 built on the meta device give their embedding sizes; a missing or mismatched weights file is one
message. No weights are downloaded: the tiny CLIP's file is written by the test."""

from __future__ import annotations

import random

import pytest
import torch

from sgm.eval.clip_score import CLIPModelError, CLIPScorer, build_clip, clip_config, tiny_clip_config
from sgm.eval.conditioning_metrics import SHAPES
from sgm.eval.inception import MissingWeightsError
from sgm.eval.shapes_dataset import COLOURS, caption_for, render_shape, sample_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def shapes(count: int, seed: int, size: int = 48) -> tuple[torch.Tensor, list[str]]:
    """`count` shapes-data images (uint8 [N, 3, size, size]) and captions; consecutive captions always differ."""
    rng = random.Random(seed)
    images, captions = [], []
    for i in range(count):
        shape, colour = SHAPES[i % len(SHAPES)], COLOURS[(i // len(SHAPES)) % len(COLOURS)]
        pixels = render_shape(sample_spec(rng, shape, colour, size, size), size, size)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        captions.append(caption_for(shape, colour))
    return torch.stack(images), captions


def train_contrastive(scorer: CLIPScorer, images: torch.Tensor, captions: list[str], steps: int) -> None:
    """CLIP's symmetric contrastive loss (pairs with the same caption count as positives), through the
    scorer's own preprocessing and tokenizer. The token table stays at its random init: fixed distinct word
    vectors are enough here, and its 1.6M weights would dominate the step time."""
    model = scorer.model.train().requires_grad_(True)
    model.token_embedding.requires_grad_(False)
    pixels, tokens = scorer.pixels(images), scorer.tokenizer(captions)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randperm(len(images), generator=generator)[:36]
        image = model.encode_image(pixels[batch], normalize=True)
        text = model.encode_text(tokens[batch], normalize=True)
        logits = model.logit_scale.exp() * image @ text.T
        same = (tokens[batch][:, None] == tokens[batch][None]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)


def matched_and_shuffled(scorer: CLIPScorer, images: torch.Tensor, captions: list[str]):
    shuffled = captions[1:] + captions[:1]  # every image paired with another class's caption
    return scorer.score(images, captions), scorer.score(images, shuffled)


def test_clip_score_of_matched_pairs_beats_shuffled_pairs_after_training(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(build_clip(tiny_clip_config()).state_dict(), weights)
    scorer = CLIPScorer(tiny_clip_config(), weights)
    held_out, held_out_captions = shapes(48, seed=1)  # other draws than the training images
    matched, shuffled = matched_and_shuffled(scorer, held_out, held_out_captions)
    assert matched.shape == (48,) and matched.dtype == torch.float32
    assert ((matched >= 0) & (matched <= 100)).all()
    assert abs(float(matched.mean() - shuffled.mean())) < 10  # untrained: the caption makes little difference

    train_contrastive(scorer, *shapes(360, seed=0), steps=300)
    matched, shuffled = matched_and_shuffled(scorer, held_out, held_out_captions)
    assert float(matched.mean()) > float(shuffled.mean()) + 30
    assert float((matched > shuffled).float().mean()) >= 0.75  # mismatched pairs may share the colour word

    trained = tmp_path / "trained_clip.pt"  # the file form the CLI and callback read gives the same scores
    torch.save(scorer.model.state_dict(), trained)
    reloaded = CLIPScorer(tiny_clip_config(), trained)
    torch.testing.assert_close(reloaded.score(held_out, held_out_captions), matched)


@pytest.mark.parametrize(("name", "dim"), [("ViT-L-14", 768), ("ViT-bigG-14", 1280)])
def test_full_size_clip_on_meta_gives_its_embedding_size(name, dim):
    config = clip_config(name)
    model = build_clip(config, device="meta")
    size = config["vision_cfg"]["image_size"]
    image = model.encode_image(torch.empty(2, 3, size, size, device="meta"), normalize=True)
    text = model.encode_text(torch.zeros(2, 77, dtype=torch.long, device="meta"), normalize=True)
    assert image.shape == text.shape == (2, dim)
    assert all(p.is_meta for p in model.parameters())


def test_missing_weights_file_is_one_message_naming_it_and_where_to_get_it(tmp_path):
    missing = tmp_path / "open_clip_pytorch_model.bin"
    with pytest.raises(MissingWeightsError) as caught:
        CLIPScorer("ViT-L-14", missing, what="CLIP weights (--clip-weights)")
    message = str(caught.value)
    assert str(missing) in message and "--clip-weights" in message and "huggingface.co/laion" in message
    assert "\n" not in message


def test_weights_of_another_model_or_an_unknown_name_are_one_message(tmp_path):
    weights = tmp_path / "tiny_clip.pt"
    torch.save(build_clip(tiny_clip_config()).state_dict(), weights)
    with pytest.raises(CLIPModelError, match="do not fit the open_clip model"):
        CLIPScorer(tiny_clip_config(width=48), weights)
    with pytest.raises(CLIPModelError, match="unknown open_clip model 'ViT-Q-99'"):
        CLIPScorer("ViT-Q-99", weights)
