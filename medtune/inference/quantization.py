"""bitsandbytes quantisation as medtune uses it: the config that training quantises the base with and that the
as-trained base of an adapter is re-created with (medtune.inference.load), and bitsandbytes' plain CPU path."""

from __future__ import annotations

import copy

import torch


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
