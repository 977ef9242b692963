"""What replaced layers keep on transformers' cache objects while a model generates.

A replaced attention stores no keys or values, but generation treats the cache as one entry per slot and acts on
all of them: beam search reorders every slot, assisted decoding and prompt lookup crop them, a static cache is reset
for reuse, ``num_return_sequences`` repeats them. So every replaced layer owns a slot of its own, after the kept
attentions' compact slots (:func:`nbl.core.surgery.slot_plan`), holding a :class:`ReplacedSlot`: nothing (a linear
map, a drop), or for a convolution map a :class:`ConvSlot`, the last T - 1 inputs of each sequence, which follows
every one of those operations. A layer puts its slot in place on its first step with a cache (:func:`slot_of`);
generation puts them in place as soon as it makes the cache (``NblCausalLM._prepare_cache_for_generation``), so a
request to record past states for a later crop reaches them.

:data:`PADDING` carries the 2-D attention mask of the running forward to the convolution maps: padding is a zero
input, as the calibration statistics count it, whatever ``position_ids`` say.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# the running forward's (batch, past + new tokens) attention mask; set by NblCausalLM.forward
PADDING: ContextVar[torch.Tensor | None] = ContextVar("nbl_padding", default=None)


class ReplacedSlot(CacheLayerMixin):
    """The cache slot of a replaced attention whose map sees one token (linear, drop): it holds nothing."""

    is_sliding = False
    is_compileable = True
    is_croppable = True
    supports_early_init = False  # never allocated: early initialisation skips it

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a replaced attention has no keys and values to cache")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple:
        raise RuntimeError(
            "an attention wrote keys and values into the cache slot of a replaced layer: the cache was laid out "
            "for another model"
        )

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length + self.get_seq_length(), 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self) -> None:  # a state of T - 1 vectors stays where it is computed
        pass

    def prefetch(self) -> None:
        pass


class ConvSlot(ReplacedSlot):
    """The cache slot of a convolution map of width T: each sequence's last T - 1 inputs (zeros before it starts).

    ``record_past`` (transformers' ``activate_past_recording``, asked for by assisted decoding) keeps every input
    since the last :meth:`crop`, so a crop can take tokens back; otherwise the slot keeps a copy of the last T - 1
    inputs only, never a view that would keep a whole prefill's activations alive.
    """

    is_compileable = False  # the state is replaced, not written in place

    def __init__(self, width: int) -> None:
        super().__init__()
        self.keep = width - 1
        self.window: torch.Tensor | None = None  # (batch, >= T - 1, d): the inputs the next step needs, or more
        self.length = 0  # tokens seen (what a crop to an absolute length counts from)
        self.record_past = False

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """Append this step's inputs ``x`` (batch, steps, d); returns the last T - 1 inputs before them followed by
        ``x``, what the map convolves."""
        if self.window is None:
            past = x.new_zeros(x.shape[0], self.keep, x.shape[-1])
        elif self.window.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"the cache holds a convolution state for {self.window.shape[0]} sequences, this step has "
                f"{x.shape[0]}: continue the sequences the cache was filled with"
            )
        else:
            past = self.window.to(x.device, x.dtype)
        full = torch.cat([past, x], dim=1)
        self.window = full if self.record_past else full[:, -self.keep :].clone()
        self.length += x.shape[1]
        return full[:, -(self.keep + x.shape[1]) :]

    def get_seq_length(self) -> int:
        return self.length

    def state_bytes(self) -> int:
        return 0 if self.window is None else self.window.numel() * self.window.element_size()

    def activate_past_recording(self) -> None:
        self.record_past = True

    def reset(self) -> None:
        self.window, self.length = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the last ``-tokens_to_remove`` tokens (a positive value: keep that many tokens in all, the
        legacy form), and shrink the state back to T - 1 inputs."""
        n = max(self.length - tokens_to_remove, 0) if tokens_to_remove > 0 else -tokens_to_remove
        if self.window is None:
            self.length = max(self.length - n, 0)
            return
        if self.window.shape[1] < self.keep + n:
            raise RuntimeError(
                f"a convolution map cannot take back {n} tokens: it kept only its last inputs. Call "
                "cache.activate_past_recording() before the forward whose tokens may be taken back"
            )
        self.window = self.window[:, : self.window.shape[1] - n][:, -self.keep :].clone()
        self.length -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.window is not None:
            self.window = self.window.index_select(0, beam_idx.to(self.window.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.window is not None:
            self.window = self.window.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.window is not None:
            self.window = self.window[indices]


def slot_of(cache: Cache, index: int, make: Callable[[], ReplacedSlot]) -> ReplacedSlot:
    """The slot ``index`` of ``cache``, made by ``make`` if it does not hold a replaced layer's slot yet.

    Slots a cache made for the model's configuration (one per layer) are taken over while unused; a slot that holds
    keys and values belongs to an attention, so the cache was filled by a model laid out differently: refused.
    """
    layers = cache.layers
    while len(layers) <= index:  # a cache that grows its slots as layers write them
        layers.append(cache.layer_class_to_replicate() if cache.layer_class_to_replicate else ReplacedSlot())
    slot = layers[index]
    if isinstance(slot, ReplacedSlot):
        return slot
    if int(slot.get_seq_length()) > 0:
        raise RuntimeError(
            f"cache slot {index} holds keys and values, but this model keeps no attention there: the cache was "
            "filled by another model (an NBL model's kept attentions use the first slots, its replaced layers the rest)"
        )
    layers[index] = made = make()
    made.is_sliding = slot.is_sliding  # the type of the slot taken over: each type's masks read its first live slot
    return made


def padding_of(x: torch.Tensor) -> torch.Tensor | None:
    """This forward's mask for the ``x.shape[1]`` newest tokens, (batch, steps, 1) in ``x``'s dtype; None when the
    forward has no 2-D attention mask."""
    mask = PADDING.get()
    if mask is None or mask.dim() != 2:
        return None
    if mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} for {x.shape[0]} sequences of {x.shape[1]} new tokens: "
            "it must cover the cached and the new tokens of every sequence"
        )
    return mask[:, -x.shape[1] :, None].to(x.device, x.dtype)


def state_bytes(cache: Cache) -> int:
    """Bytes the replaced layers' slots of ``cache`` hold (the convolution maps' inputs)."""
    return sum(slot.state_bytes() for slot in cache.layers if isinstance(slot, ConvSlot))
