import pytest
import torch

from nbl.models import random_model, tiny_config

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def make_tiny(model_type: str = "llama", num_layers: int = 4, hidden_size: int = 64, seed: int = 0):
    return random_model(tiny_config(model_type, hidden_size=hidden_size, num_layers=num_layers), seed=seed)


def token_batches(n_batches: int = 4, batch: int = 4, seq: int = 32, vocab: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (batch, seq), generator=g) for _ in range(n_batches)]


def greedy_cached_and_uncached(model, prompt: torch.Tensor, new_tokens: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s greedy continuation of ``prompt`` with the KV cache and without it."""
    kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    return model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs)


@pytest.fixture(scope="session")
def converted_models():
    """The folder holding the converted embedded model (converted once per machine, not once per test cache)."""
    from nbl.models import smollm2_folder

    return smollm2_folder().parent


@pytest.fixture
def nbl_cache(tmp_path, monkeypatch, converted_models):
    """A fresh, empty result cache ($NBL_CACHE) that shares the converted embedded model."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(converted_models)
    monkeypatch.setenv("NBL_CACHE", str(cache))
    return cache
