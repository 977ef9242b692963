"""Calibration windows cut from documents: consecutive from the joined text, or aligned to document starts."""

import pytest
import torch

from nbl.data import token_sequences


class _Tokenizer:
    """Whitespace tokenizer over integer words: 'w17 w3' -> [17, 3]; BOS = 1, EOS = 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def _docs(lengths):
    start = 10
    docs = []
    for n in lengths:
        docs.append(" ".join(f"w{start + j}" for j in range(n)))
        start += 100
    return docs


def test_stream_windows_are_consecutive_and_use_every_token_once():
    ids = token_sequences(_Tokenizer(), _docs([5, 7, 9, 11]), 3, 6, seed=0)
    flat = ids.flatten().tolist()
    assert ids.shape == (3, 6) and len([t for t in flat if t > 2]) == len({t for t in flat if t > 2})


def test_document_windows_start_at_a_bos_at_a_document_start():
    docs = _docs([5, 30, 3, 4, 12, 8, 9, 20, 6, 7])
    ids = token_sequences(_Tokenizer(), docs, 4, 8, seed=3, windows="documents")
    starts = {int(d.split()[0][1:]) for d in docs}
    assert ids.shape == (4, 8)
    for row in ids.tolist():
        assert row[0] == 1 and row[1] in starts  # BOS, then a document's first token
        assert all(t > 2 for t in row[1:] if t != 1)
    words = [t for t in ids.flatten().tolist() if t > 2]
    assert len(words) == len(set(words))  # no token twice
    assert torch.equal(ids, token_sequences(_Tokenizer(), docs, 4, 8, seed=3, windows="documents"))


def test_too_little_text_for_document_windows_is_refused():
    with pytest.raises(ValueError, match="fills 1 document-aligned windows of 8, fewer than 3"):
        token_sequences(_Tokenizer(), _docs([9, 2]), 3, 8, windows="documents")


@pytest.mark.parametrize("windows", ["stream", "documents"])
def test_asking_for_more_windows_keeps_the_first_ones(windows):
    docs = _docs([5, 30, 3, 4, 12, 8, 9, 20, 6, 7, 11, 13])
    few = token_sequences(_Tokenizer(), docs, 3, 8, seed=1, windows=windows)
    more = token_sequences(_Tokenizer(), docs, 5, 8, seed=1, windows=windows)
    assert torch.equal(more[:3], few)  # held-out windows never change the calibration windows


def test_mixed_text_holds_every_genre_and_none_of_the_perplexity_texts():
    from nbl.data import coqa_passages, lambada_passages, mixed_passages, sciq_passages, wikipedia_passages

    mixed = mixed_passages()
    assert len(mixed) == len(set(mixed)) and all(t.strip() for t in mixed)
    held_out = set(wikipedia_passages()) | set(sciq_passages())
    assert not held_out & set(mixed)
    # books and CoQA's non-Wikipedia passages are in, and so are the short genres (maths, clinical, abstracts)
    assert set(lambada_passages()) <= set(mixed) and set(coqa_passages()) <= set(mixed)
    assert any("####" in t for t in mixed)  # a GSM8K worked solution
    assert len(mixed) > len(set(lambada_passages()) | set(coqa_passages())) + 2000


def test_heldout_windows_of_another_text_leave_the_calibration_windows_alone(monkeypatch):
    from omegaconf import OmegaConf

    from nbl.recipe import windows

    texts = {"books": _docs([50] * 20), "news": [d.replace("w", "w9") for d in _docs([50] * 20)]}
    monkeypatch.setattr(windows, "load_texts", lambda source, path=None: texts[source])
    cal = OmegaConf.create({"source": "books", "path": None, "num_sequences": 4, "seq_len": 8, "batch_size": 2,
                            "seed": 0, "windows": "stream"})  # fmt: skip
    same_cal, same_held = windows.calibration_batches(_Tokenizer(), cal, 2)
    other_cal, other_held = windows.calibration_batches(_Tokenizer(), cal, 2, "news")
    assert all(torch.equal(a, b) for a, b in zip(same_cal, other_cal, strict=True))
    expected = token_sequences(_Tokenizer(), texts["news"], 2, 8, seed=0)
    assert torch.equal(torch.cat(other_held), expected)
    assert torch.equal(torch.cat(same_held), token_sequences(_Tokenizer(), texts["books"], 6, 8, seed=0)[4:])
    # naming the calibration text itself is the default: the windows after the calibration windows
    assert torch.equal(torch.cat(windows.calibration_batches(_Tokenizer(), cal, 2, "books")[1]), torch.cat(same_held))
