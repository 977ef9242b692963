"""The class of a model with replaced layers, ``Nbl<Family>ForCausalLM``: in memory, and built from a checkpoint.

A model becomes an instance of its family's NBL class when its layers are replaced (:func:`adopt`): the family's
own class and weights, with what transformers needs to generate right in every decoding mode:

- ``forward`` hands the 2-D attention mask to the convolution maps (padding enters them as zeros, whatever
  ``position_ids`` say);
- generation puts the replaced layers' cache slots in place as soon as it makes a cache
  (:mod:`nbl.core.decode_state`), so beam search, cropping and resets reach a convolution map's state;
- ``save_pretrained`` writes an NBL checkpoint (:func:`nbl.save_linearized`).

A checkpoint's config.json says ``model_type: nbl_<family>`` (:func:`nbl_model_type`), so transformers without
nbl refuses it (an unknown model type) rather than loading the replaced layers' attention with random weights.
:func:`register_auto_classes` registers every family's NBL config and class with transformers' auto classes:
``AutoModelForCausalLM.from_pretrained(checkpoint)`` then builds the model, whose ``__init__`` makes the
replacement the config declares before transformers loads the weights (shard by shard, onto any ``device_map``).
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import transformers

from nbl.core.adapters import ADAPTERS, adapter_for_config
from nbl.core.decode_state import PADDING

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

PREFIX = "nbl_"  # model_type of a checkpoint: nbl_<family's model_type>

_MODELS: dict[type, type] = {}  # family class -> its NBL class
_CONFIGS: dict[type, type] = {}  # family config class -> the NBL checkpoint's config class


def nbl_model_type(model_type: str) -> str:
    """The model_type an NBL checkpoint of this family declares."""
    return model_type if model_type.startswith(PREFIX) else PREFIX + model_type


def family_model_type(model_type: str) -> str:
    """The family's own model_type, from a checkpoint's (``nbl_llama`` -> ``llama``) or the family's."""
    return model_type.removeprefix(PREFIX)


def family_class(model_type: str) -> type:
    """The family's transformers CausalLM class, from its model_type or a checkpoint's."""
    return getattr(transformers, adapter_for_config(SimpleNamespace(model_type=family_model_type(model_type))).causal_lm)


class NblCausalLM:
    """What every ``Nbl<Family>ForCausalLM`` adds to the family's class (the family's class follows in the MRO)."""

    _nbl_family: type
    _nbl_conv = False  # whether any attention is a convolution map (set by adopt): only then forward tracks padding

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        """Build from a checkpoint's config: the family's model, then the replacement its ``nbl`` entry declares
        (fresh maps, filled by the weight load that follows in ``from_pretrained``)."""
        from nbl.core.checkpoint import apply_declared

        if isinstance(config, tuple(_CONFIGS.values())):
            recast(config, type(config).__mro__[1])  # the family's own config class (model_type llama, ...)
        super().__init__(config, *args, **kwargs)
        meta = getattr(config, "nbl", None)
        if isinstance(meta, dict):
            apply_declared(self, meta)

    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict, *args: Any,
                                      **kwargs: Any) -> None:  # fmt: skip
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]
        cache = model_kwargs.get("past_key_values")
        if cache is None:
            return
        from nbl.core.surgery import install_cache_slots

        install_cache_slots(self, cache)  # before generation asks the cache's slots to record their past
        if getattr(generation_config, "is_assistant", False):
            # transformers asked it of its own layers when it made the cache (once: re-asking on every candidate round
            # kept Gemma 2's sliding layers growing past the window their masks are sized for); ours, made after
            from nbl.core.decode_state import ConvSlot

            for slot in cache.layers:
                if isinstance(slot, ConvSlot):
                    slot.activate_past_recording()

    def save_pretrained(self, save_directory: str | Path, *, max_shard_size: int | str | None = None,
                        **kwargs: Any) -> None:  # fmt: skip
        """An NBL checkpoint (:func:`nbl.save_linearized`): transformers' own would declare the family's
        model_type, whose classes load the replaced layers wrong."""
        from nbl.core.checkpoint import save_linearized

        unsupported = sorted(k for k in kwargs if k not in ("safe_serialization", "is_main_process"))
        if unsupported or not kwargs.get("safe_serialization", True):
            raise TypeError(f"an NBL model saves with nbl.save_linearized (safetensors); {unsupported} not supported")
        if kwargs.get("is_main_process", True):
            save_linearized(self, save_directory, max_shard_size=max_shard_size)  # type: ignore[arg-type]


def _padding_forward(family: type) -> Any:
    """The family's ``forward``, with the attention mask handed to the convolution maps (same signature)."""
    position = list(inspect.signature(family.forward).parameters).index("attention_mask") - 1  # after self

    @functools.wraps(family.forward)
    def forward(self: NblCausalLM, *args: Any, **kwargs: Any) -> Any:
        if not self._nbl_conv:
            return family.forward(self, *args, **kwargs)
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[position] if len(args) > position
                                                                            else None)  # fmt: skip
        token = PADDING.set(mask)
        try:
            return family.forward(self, *args, **kwargs)
        finally:
            PADDING.reset(token)

    return forward


def recast(config: PretrainedConfig, cls: type) -> None:
    """Make ``config`` an instance of ``cls`` (a family's config class or its NBL one), in place: the fields stay,
    the ``model_type`` becomes the class's."""
    config.__class__ = cls
    vars(config).pop("model_type", None)  # a config read from a file may hold its own copy of the class's value


def nbl_config_class(family_config: type) -> type:
    """The config class of the family's NBL checkpoints: the family's, declaring ``model_type`` nbl_<family>."""
    if family_config in _CONFIGS.values():
        return family_config
    if family_config not in _CONFIGS:
        name = f"Nbl{family_config.__name__}"
        _CONFIGS[family_config] = type(name, (family_config,), {
            "model_type": nbl_model_type(family_config.model_type), "__module__": __name__, "__qualname__": name,
        })  # fmt: skip
    return _CONFIGS[family_config]


def nbl_class(family: type) -> type:
    """The family class's NBL class (made once; the class itself when given one)."""
    if issubclass(family, NblCausalLM):
        return family
    if family not in _MODELS:
        name = f"Nbl{family.__name__}"
        _MODELS[family] = type(name, (NblCausalLM, family), {
            "forward": _padding_forward(family), "config_class": nbl_config_class(family.config_class),
            "_nbl_family": family, "__module__": __name__, "__qualname__": name,
        })  # fmt: skip
    return _MODELS[family]


def adopt(model: PreTrainedModel) -> None:
    """Make ``model`` an instance of its family's NBL class, in place, if any of its sub-blocks is replaced (else of
    the family's class again: a model whose layers were all restored)."""
    from nbl.core.surgery import conv_shapes, replaced_layers, replaced_mlps

    family = getattr(type(model), "_nbl_family", type(model))
    replaced = bool(replaced_layers(model) or replaced_mlps(model))
    model.__class__ = nbl_class(family) if replaced else family
    model._nbl_conv = bool(conv_shapes(model))


def register_auto_classes(models: bool = True) -> None:
    """Register every supported family's NBL config with transformers' AutoConfig and, unless ``models`` is false
    (an engine that only reads the config: vLLM), its class with AutoModelForCausalLM, so that ``from_pretrained``
    builds NBL checkpoints right. Safe to call again."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for adapter in ADAPTERS:
        for model_type in adapter.model_types:
            config_class = nbl_config_class(CONFIG_MAPPING[model_type])
            transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            if models:
                model_class = nbl_class(family_class(model_type))
                transformers.AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def __getattr__(name: str) -> type:
    """``Nbl<Family>ForCausalLM`` and ``Nbl<Family>Config`` by name (pickle finds the classes made at run time)."""
    family = getattr(transformers, name.removeprefix("Nbl"), None) if name.startswith("Nbl") else None
    if isinstance(family, type) and issubclass(family, transformers.PreTrainedModel):
        return nbl_class(family)
    if isinstance(family, type) and issubclass(family, transformers.PretrainedConfig):
        return nbl_config_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
