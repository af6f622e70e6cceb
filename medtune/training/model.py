"""Loading the base model in 4-bit for QLoRA, the way each launcher needs it, and the training chat format."""

from __future__ import annotations

import os

import torch

from medtune.inference.chat_format import ChatFormat
from medtune.inference.gguf import local_model
from medtune.inference.load import generation_eos, load_tokenizer, resolve_dtype
from medtune.inference.quantization import fp32_on_cpu, quantization_config


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def shards_weights(training_args) -> bool:
    """ZeRO-3 or FSDP (an accelerate FSDP config, or `fsdp` in the recipe): each rank holds a shard of every weight."""
    fsdp = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return fsdp or zero3_enabled()


def load_chat_format(recipe) -> ChatFormat:
    """The training chat format: the model's tokenizer, the recipe's chat_template if set, the model's stop ids. The
    template becomes the tokenizer's, so the adapter folder carries what it was trained with."""
    m = recipe.model
    fmt = ChatFormat(load_tokenizer(m.model_name_or_path, m.model_revision), recipe.data.chat_template,
                     generation_eos(m.model_name_or_path, m.model_revision))
    fmt.tokenizer.chat_template = fmt.template
    return fmt


def load_model(recipe):
    """The base model, 4-bit when the recipe says so, prepared for k-bit training (LoRA is attached by TRL)."""
    from accelerate import PartialState
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    m, t = recipe.model, recipe.training
    dtype, sharded = resolve_dtype(m.dtype), shards_weights(t)
    quant = quantization_config(m, dtype, sharded)
    kwargs = dict(dtype=dtype, quantization_config=quant, attn_implementation=m.attn_implementation or "sdpa",
                  revision=m.model_revision)
    # A device map pins each rank's copy to its GPU; ZeRO-3 and FSDP place (and shard) the weights themselves.
    if quant is not None and torch.cuda.is_available() and not sharded:
        kwargs["device_map"] = {"": PartialState().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(local_model(m.model_name_or_path), **kwargs)
    if quant is not None:
        fp32_on_cpu(model)
    model.config.use_cache = False  # the KV cache is useless in training and breaks packed-sequence masks
    # prepare_model_for_kbit_training casts norms and embeddings to fp32. Not when sharded: FSDP flattens each layer's
    # parameters (4-bit weights in the compute dtype, norms) into one tensor of one dtype, and ZeRO-3 keeps its own
    # fp32 master weights. The Trainer turns on gradient checkpointing either way.
    if quant is not None and not sharded:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.gradient_checkpointing,
            gradient_checkpointing_kwargs=t.gradient_checkpointing_kwargs or {"use_reentrant": False},
        )
    return model
