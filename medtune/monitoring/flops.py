"""The FLOP model behind MFU, device peak FLOP/s, and the token counts of a batch that the FLOPs depend on."""

from __future__ import annotations

import dataclasses

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peak of one device, by a substring of torch.cuda.get_device_name().
# First match wins, so the more specific names come first.
PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 only
    ("T4", 65e12),  # fp16 only
)


def peak_flops(device_name: str | None, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the `peak_tflops` override, else the PEAK_FLOPS entry for the name, else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    for key, flops in PEAK_FLOPS:
        if device_name and key.lower() in device_name.lower():
            return flops
    return None


@dataclasses.dataclass
class FlopModel:
    """The one FLOP model behind every MFU medtune reports (training log, bench/gpu_train.py).

    Training FLOPs of LoRA on a frozen (e.g. 4-bit) base, counted as matmul FLOPs (2 per multiply-add), per real
    (non-padding) token of a sample of length s:
        base weights (frozen):   forward 2*N_base + backward w.r.t. activations 2*N_base = 4*N_base
                                 (no weight gradients, so not the usual 6*N);
        LoRA weights (trained):  forward 2*N_lora + backward activations 2*N_lora + weight gradients 2*N_lora
                                 = 6*N_lora;
        attention (QK^T, AV):    forward 4*n_layers*hidden*s, backward 8*n_layers*hidden*s = 12*n_layers*hidden*s
                                 (PaLM convention: the causal mask is not halved out; s is the sample's own length,
                                 as packed samples do not attend across each other).
    N_base counts every frozen parameter but the input embedding (a lookup, not a matmul): the matmul weights,
    lm_head included, at their unquantized size (4-bit weights are dequantized for the matmul), and the norms' few
    weights (0.004% of Starling's); N_lora counts the adapter weights. Summed over the tokens of a batch, the
    attention term becomes 12*n_layers*hidden*sum(s_i^2).
    Not counted: the forward that gradient checkpointing runs again (MFU counts the model's FLOPs, not the
    hardware's, as PaLM defines it, so turning checkpointing off shows up as a higher MFU), padding, and
    elementwise work (norms, activations, softmax, loss).
    MFU = these FLOPs / (elapsed seconds * devices * peak FLOP/s of one device).
    """

    n_base: int
    n_lora: int
    n_layers: int
    hidden: int

    def batch(self, tokens: float, sum_sq_lengths: float) -> float:
        """FLOPs to train on `tokens` real tokens whose samples' squared lengths sum to `sum_sq_lengths`."""
        return (4 * self.n_base + 6 * self.n_lora) * tokens + 12 * self.n_layers * self.hidden * sum_sq_lengths

    @classmethod
    def from_model(cls, model) -> FlopModel:
        trainable = total = 0
        for param in model.parameters():
            n = param.numel() or getattr(param, "ds_numel", 0)  # ZeRO-3 leaves empty shards with ds_numel
            if param.__class__.__name__ == "Params4bit":  # two 4-bit values per stored byte
                n *= 2 * param.element_size()
            total += n
            trainable += n if param.requires_grad else 0
        config = model.config
        embed = model.get_input_embeddings().weight
        tied = getattr(config, "tie_word_embeddings", False)  # then the weight is also the lm_head matmul
        embed_n = 0 if tied else embed.numel() or getattr(embed, "ds_numel", 0)
        return cls(total - trainable - embed_n, trainable, config.num_hidden_layers, config.hidden_size)


def batch_counts(input_ids: torch.Tensor, attention_mask=None, position_ids=None, pad_token_id=None) -> torch.Tensor:
    """[real tokens, samples, sum of squared sample lengths] of one model input, without a host sync.

    Real tokens are the positions covered by a sample: not padding. Padding is attention_mask 0; without a mask,
    a pad id at position 0 (packed and padding-free batches pad with position 0). The pad id alone cannot say it:
    many tokenizers pad with their eos / end-of-turn token, which ends every real sample too.
    Samples start where position_ids restart at 0 (packed rows, padding-free batches), else one per row.
    sum_i s_i^2 is computed as sum over real tokens of (2*position + 1), since 1 + 3 + ... + (2s-1) = s^2.
    """
    real = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        real &= attention_mask.bool()
    elif pad_token_id is not None:
        padding = input_ids == pad_token_id
        real &= ~(padding & (position_ids == 0)) if position_ids is not None else ~padding
    if position_ids is None:
        position_ids = real.long().cumsum(-1) - 1
    starts = (position_ids == 0) & real
    squares = ((2 * position_ids + 1) * real).sum()
    return torch.stack([real.sum(), starts.sum(), squares]).double()
