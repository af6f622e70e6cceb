"""Loading the base model in 4-bit for QLoRA, the way each launcher needs it, and its tokenizer and chat format."""

from __future__ import annotations

import copy
import os

import torch

from medtune.chat_format import ChatFormat
from medtune.gguf import local_model


def compute_dtype(name: str | None) -> torch.dtype:
    """`auto`: bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU (which has no fast fp16 matmul)."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def shards_weights(training_args) -> bool:
    """ZeRO-3 or FSDP (an accelerate FSDP config, or `fsdp` in the recipe): each rank holds a shard of every weight."""
    fsdp = bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return fsdp or zero3_enabled()


def load_tokenizer(recipe_or_path):
    """The model's tokenizer; one without a padding token pads with its eos (padding is never trained on)."""
    from transformers import AutoTokenizer

    path = getattr(getattr(recipe_or_path, "model", None), "model_name_or_path", recipe_or_path)
    revision = getattr(getattr(recipe_or_path, "model", None), "model_revision", None)
    tok = AutoTokenizer.from_pretrained(local_model(path), revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def generation_eos(path: str, revision: str | None = None) -> int | list[int] | None:
    """The `eos_token_id` of a model's generation_config.json (an int or a list), None without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(local_model(path), revision=revision).eos_token_id
    except OSError:
        return None


def load_chat_format(recipe) -> ChatFormat:
    """The training chat format: the model's tokenizer, the recipe's chat_template if set, the model's stop ids. The
    template becomes the tokenizer's, so the adapter folder carries what it was trained with."""
    m = recipe.model
    fmt = ChatFormat(load_tokenizer(recipe), recipe.data.chat_template,
                     generation_eos(m.model_name_or_path, m.model_revision))
    fmt.tokenizer.chat_template = fmt.template
    return fmt


def quantization_config(model_args, dtype: torch.dtype, sharded: bool):
    """TRL's `get_quantization_config` on a copy of the model settings whose dtype is the resolved compute dtype
    (`auto` is no torch dtype) and, when sharded, whose 4-bit storage dtype is that dtype too."""
    from trl import get_quantization_config

    resolved = copy.copy(model_args)
    resolved.dtype = str(dtype).removeprefix("torch.")
    # Sharded (ZeRO-3, FSDP), the 4-bit weights are flattened together with the layer's other weights into one
    # tensor of one dtype, so they are stored in a float dtype equal to the compute dtype (else uint8, the default).
    if sharded and not model_args.bnb_4bit_quant_storage:
        resolved.bnb_4bit_quant_storage = resolved.dtype
    return get_quantization_config(resolved)


def fp32_on_cpu(model):
    """Keep bitsandbytes' 4-bit layers on their plain CPU path: de-quantise, then matmul in the compute dtype.

    On a CPU with AVX512-BF16 (Intel Xeon and AMD EPYC here), bitsandbytes 0.50's `Linear4bit.forward` in eval mode
    otherwise repacks `weight.data` in place into another layout (`packing_format_for_cpu`) and runs a fused kernel
    that computes in bf16: evaluation would then see other numerics than the training steps, the as-trained base and
    the merged export (logits apart by up to 0.9 on SmolLM2), and a de-quantisation or merge after it would read
    the repacked bytes. The switch is the layer's `support_avx512bf16_for_cpu` (set from `has_avx512bf16()` in its
    constructor); tests/test_cpu_4bit.py pins what it does. On a GPU it is never read."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_model(recipe):
    """The base model, 4-bit when the recipe says so, prepared for k-bit training (LoRA is attached by TRL)."""
    from accelerate import PartialState
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    m, t = recipe.model, recipe.training
    dtype, sharded = compute_dtype(m.dtype), shards_weights(t)
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
