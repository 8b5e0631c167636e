"""Text encoding: trimming the padding after the longest sentence gives the features of the full 77-token
encoding (CLIP's text transformer is causal), and encode_texts returns them in the order given."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from clip import clip as clip_api

from mtil.models.clip_loading import load_clip
from mtil.models.text import encode_texts, tokenize, trim_padding

SENTENCES = ["a photo of a cat.", "x", "a long caption about a dog that runs in a park on a sunny day with a ball",
             "a photo of a dog.", "an origami red square."]


def full_features(model, texts):
    tokens = clip_api.tokenize(texts, context_length=model.context_length, truncate=True)
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


def test_trimming_cuts_after_the_last_end_token_only():
    tokens = clip_api.tokenize(SENTENCES, context_length=77)
    trimmed = trim_padding(tokens)
    longest = int(tokens.argmax(dim=-1).max())
    assert trimmed.shape == (len(SENTENCES), longest + 1) and longest + 1 < 77
    assert torch.equal(trimmed, tokens[:, :longest + 1]) and not tokens[:, longest + 1:].any()
    assert torch.equal(trim_padding(tokens[:0]), tokens[:0])


def test_trimmed_features_equal_the_full_encoding_in_the_given_order():
    model = load_clip("micro-vit", seed=0).model.eval()
    want = full_features(model, SENTENCES * 3)
    got = encode_texts(model, SENTENCES * 3, batch_size=4)  # sorted by length inside, several batches
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert tokenize(model, SENTENCES[:2]).shape[1] < model.context_length
    with torch.no_grad():  # the training path (tokenize + encode_text) too
        torch.testing.assert_close(F.normalize(model.encode_text(tokenize(model, SENTENCES)).float(), dim=-1),
                                   want[:len(SENTENCES)], rtol=0, atol=1e-5)
