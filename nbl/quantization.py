"""Weight quantization on top of a (linearized) model, through torchao rather than hand-written kernels.

The paper shows NBL composes with AWQ. Here the decoder's linear layers (the kept attention and MLP projections
and the NBL maps alike) are quantized in place; the LM head and the embedding stay in the model's dtype (tied
to the embedding in many small models, and the most error-sensitive matrix).

- ``int8_weight``: int8 weights with one scale per output channel, activations in the model's dtype
  (torchao's ``Int8WeightOnlyConfig``); runs on the CPU and on GPUs.
- ``int8_dynamic``: int8 weights and per-token dynamically quantized int8 activations
  (``Int8DynamicActivationInt8WeightConfig``), int8 matrix products where the backend has them.

On a GPU, 4-bit weights (torchao ``Int4WeightOnlyConfig``, or AWQ / GPTQ through llm-compressor, served by
vLLM) are what saves memory bandwidth in decoding; they need CUDA kernels and are not offered here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Scheme = Literal["none", "int8_weight", "int8_dynamic"]
SCHEMES: tuple[str, ...] = ("none", "int8_weight", "int8_dynamic")


def _config(scheme: str):
    import torchao.quantization as q

    return {"int8_weight": q.Int8WeightOnlyConfig, "int8_dynamic": q.Int8DynamicActivationInt8WeightConfig}[scheme]()


def quantize_model(model: PreTrainedModel, scheme: Scheme) -> list[str]:
    """Quantize every ``nn.Linear`` inside the decoder layers of ``model`` in place; returns their names."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")
    if scheme == "none":
        return []
    head = model.get_output_embeddings()
    chosen = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    names = set(chosen)
    from torchao.quantization import quantize_

    quantize_(model, _config(scheme), filter_fn=lambda module, fqn: fqn in names)
    return chosen
