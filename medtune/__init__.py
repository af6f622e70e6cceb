"""medtune: QLoRA fine-tuning of Starling-LM-7B-alpha into a medical assistant, and serving it."""

import logging

__version__ = "0.1.0"


class _FusedKernelNotNeeded(logging.Filter):
    """bitsandbytes warns at import, on every CPU with AVX512-BF16, that it could not load its fused bf16 CPU kernel
    (from the `kernels` package, which downloads it from the Hugging Face hub at run time). medtune never runs that
    kernel: it keeps 4-bit layers on the fp32 path (medtune.inference.quantization.fp32_on_cpu), so the warning would
    only be noise on every command. Set here, before anything imports bitsandbytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_FusedKernelNotNeeded())
