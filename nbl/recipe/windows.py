"""The run's token windows: calibration, held-out and fine-tuning windows of the configured texts, disjoint."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from nbl.data import load_texts, token_sequences

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase, cal_cfg: DictConfig, heldout: int = 0, heldout_source: str | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration batches, held-out batches): the configured windows, then ``heldout`` further windows of
    the same text, tokenized once; or, with a ``heldout_source`` other than the calibration text, ``heldout``
    windows of that text. The calibration windows do not depend on ``heldout``."""
    texts = load_texts(cal_cfg.source, cal_cfg.path)
    n = cal_cfg.num_sequences
    other = heldout_source is not None and heldout_source != cal_cfg.source
    with _named("calibration.num_sequences" + ("" if other or not heldout else " + selection.holdout_sequences")):
        ids = token_sequences(
            tokenizer, texts, n + (0 if other else heldout), cal_cfg.seq_len, cal_cfg.seed, cal_cfg.windows
        )
    held = ids[n:]
    if other and heldout:
        with _named(f"selection.holdout_sequences (of selection.heldout_source={heldout_source})"):
            held = token_sequences(
                tokenizer, load_texts(heldout_source), heldout, cal_cfg.seq_len, cal_cfg.seed, cal_cfg.windows
            )
    return list(ids[:n].split(cal_cfg.batch_size)), list(held.split(cal_cfg.batch_size))


@contextmanager
def _named(keys: str) -> Iterator[None]:
    """Too little text for the windows asked for: say which settings asked for them."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{keys} x calibration.seq_len: {err}") from None


def finetune_batches(tokenizer: PreTrainedTokenizerBase, cfg: DictConfig) -> list[torch.Tensor]:
    """The fine-tuning windows (finetune.steps batches of finetune.batch_size): drawn with the calibration
    windows, after them and the held-out ones, so they share no token with either."""
    cal, ft = cfg.calibration, cfg.finetune
    skip = cal.num_sequences + cfg.selection.holdout_sequences
    texts = load_texts(cal.source, cal.path)
    with _named("calibration.num_sequences + selection.holdout_sequences + finetune.steps x finetune.batch_size"):
        ids = token_sequences(tokenizer, texts, skip + ft.steps * ft.batch_size, cal.seq_len, cal.seed, cal.windows)
    return list(ids[skip:].split(ft.batch_size))


class Windows:
    """A run's calibration and held-out batches, tokenized together on first use (``heldout`` further windows)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, heldout: int) -> None:
        self._both = functools.cache(
            lambda: calibration_batches(tokenizer, cfg.calibration, heldout, cfg.selection.heldout_source)
        )

    def calibration(self) -> list[torch.Tensor]:
        return self._both()[0]

    def heldout(self) -> list[torch.Tensor]:
        return self._both()[1]
