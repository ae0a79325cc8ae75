"""Embeddings: batched pooling equals a one-text-at-a-time computation, for both poolings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.schema import ModelConfig
from models.embeddings import embed_texts
from models.loading import load_model

TEXTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France? The capital of France is Paris, a city on the Seine.",
    "Hi",
    "Describe the process of making bread: mix flour, water, yeast and salt, knead, rise, and bake it well.",
    "Write a short poem about the sea.",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))


def _one_by_one(model, tokenizer, text: str, pooling: str) -> np.ndarray:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    vec = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return vec.numpy()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batched_pooling_matches_unpadded_single_texts(tiny, pooling, one_torch_thread):
    model, tokenizer = tiny
    got = embed_texts(model, tokenizer, TEXTS, pooling=pooling, batch_size=3, normalize=False)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), model.config.hidden_size)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(got[i], _one_by_one(model, tokenizer, text, pooling), rtol=1e-4, atol=1e-5)


def test_normalised_and_independent_of_padding_side_and_batch_size(tiny, one_torch_thread):
    model, tokenizer = tiny
    a = embed_texts(model, tokenizer, TEXTS, pooling="last", batch_size=2)
    tokenizer.padding_side = "left"
    try:
        b = embed_texts(model, tokenizer, TEXTS, pooling="last", batch_size=5)
    finally:
        tokenizer.padding_side = "right"
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # "last" and "mean" are different poolings, not the same vector twice
    m = embed_texts(model, tokenizer, TEXTS, pooling="mean")
    assert not np.allclose(a, m, atol=1e-3)


def test_unknown_pooling_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="pooling"):
        embed_texts(model, tokenizer, TEXTS, pooling="max")
