"""Loading a medtune model for generation: a base or merged model folder, or a LoRA adapter on its base, with the chat
format of its tokenizer (medtune.inference.chat_format); a GGUF file on llama.cpp. The one tokenizer loader and the
one dtype rule, which training uses too. Shared by the terminal chat, the server, evaluation and export.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from medtune.adapters import adapter_base, is_adapter, trained_quantization
from medtune.inference.chat_format import ChatFormat
from medtune.inference.gguf import is_gguf, local_model
from medtune.inference.quantization import fp32_on_cpu, quantization_config

DEMO_MODEL = ".cache/tiny-starling"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | None = None) -> torch.dtype:
    """None or "auto": bf16 where the GPU has it, else fp16, on a GPU (`device`, or any visible one); fp32 on CPU,
    which has no fast fp16 matmul. Else the dtype named."""
    if dtype in (None, "auto"):
        if torch.cuda.is_available() and (device or "cuda").startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_tokenizer(path: str | Path, revision: str | None = None, fallback: str | Path | None = None):
    """The tokenizer of `path` (an adapter folder carries the one it was trained with) or else of `fallback`; one
    without a padding token pads with its eos (padding is never trained on, and generation masks it)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(local_model(path), revision=revision)
    except (OSError, ValueError):
        if fallback is None:
            raise
        tok = AutoTokenizer.from_pretrained(local_model(fallback))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def generation_eos(path: str | Path, revision: str | None = None) -> int | list[int] | None:
    """The `eos_token_id` of a model's generation_config.json (an int or a list), None without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(local_model(path), revision=revision).eos_token_id
    except OSError:
        return None


def load_base(path: str | Path, dtype: torch.dtype, quantized: dict | None = None, device: str = "cpu"):
    """A base model. With `quantized` (the model settings of a run that trained on a 4-bit or 8-bit base,
    medtune.adapters.trained_quantization), the weights LoRA was trained against: the base quantised as in training
    (bitsandbytes, on `device`), then de-quantised to `dtype` by transformers' `dequantize` (meant for merging QLoRA
    adapters). Added to the original weights instead, the adapter corrects a quantisation error that is not there:
    on SmolLM2-135M two thirds of the greedy replies changed (docs/EVAL.md "Merge fidelity"); peft#2105, unsloth's
    16-bit merge."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    if quantized is None:
        return AutoModelForCausalLM.from_pretrained(local_model(path), dtype=dtype)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{path}: the adapter was trained on a quantised base, and re-creating the weights it was "
                           "trained against needs bitsandbytes: pip install bitsandbytes, or pass --adapter-base "
                           "original to run it on the base's own weights")
    settings = SimpleNamespace(**{**quantized, "bnb_4bit_quant_storage": None})  # storage dtype: same values
    config = quantization_config(settings, dtype, sharded=False)
    model = AutoModelForCausalLM.from_pretrained(local_model(path), dtype=dtype, quantization_config=config,
                                                 device_map={"": device})
    return fp32_on_cpu(model).dequantize(dtype=dtype)


def load_weights(path: str | Path, dtype: torch.dtype, base_model: str | None = None, as_trained: bool = True,
                 device: str = "cpu"):
    """The model of a model folder, or a LoRA adapter (un-merged) on its base, the one recorded in
    adapter_config.json unless `base_model` overrides it (e.g. when the base was moved). An adapter trained on a
    quantised base runs on the base's weights as training saw them (`load_base`) unless `as_trained` is False.

    Not peft's AutoPeftModelForCausalLM: it resizes the base's embeddings whenever the adapter folder's tokenizer is
    longer than them, and Starling's is (`<sep>` has id 32002, one past its 32002 rows), so the adapter would run
    on a model with a random extra row that neither training, vLLM nor the merged export has."""
    from peft import PeftModel

    if not is_adapter(path):
        return load_base(path, dtype)
    quantized = trained_quantization(path) if as_trained else None
    base = load_base(base_model or adapter_base(path), dtype, quantized, device)
    return PeftModel.from_pretrained(base, str(path))


def pick_engine(path: str | Path | None, engine: str = "auto") -> str:
    """"llama.cpp" or "transformers" for `path`; auto: llama.cpp for a .gguf file when llama-cpp-python is installed."""
    if engine == "auto":  # not for pypi: models, the bases of training, compared with what trained on them
        return "llama.cpp" if str(path).endswith(".gguf") and importlib.util.find_spec("llama_cpp") else "transformers"
    if engine == "llama.cpp":
        if not is_gguf(path):
            raise ValueError(f"--engine llama.cpp runs a .gguf file, and {path} is not one: write one with "
                             "medtune-export --gguf q8_0")
        if importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("--engine llama.cpp needs llama-cpp-python: make local (or pip install "
                             "llama-cpp-python), or pass --engine transformers")
    return engine


def load_llama_cpp(path: str | Path, context_size: int | None = None, max_sequences: int = 8):
    """(a GGUF model in llama.cpp, the chat format of the tokenizer and template the file holds)."""
    from medtune.inference.gguf import gguf_file, tokenizer
    from medtune.inference.llama_cpp import LlamaCppModel

    source = gguf_file(str(path))
    model = LlamaCppModel(source, context_size, max_sequences)
    tok = _tokenizer_beside(source, model) or tokenizer(source)
    tok.padding_side = "left"
    return model, ChatFormat(tok)


def _tokenizer_beside(source: Path, model) -> object | None:
    """The training tokenizer that medtune-export keeps beside its GGUF files, when it is the file's own (its chat
    template, vocabulary size and eos token): read in 35 MB, where transformers' rebuilding one from the GGUF peaks
    at 690 MB for SmolLM2's (a lone GGUF file still gets that)."""
    if not (source.parent / "tokenizer.json").is_file():
        return None
    try:
        tok = load_tokenizer(source.parent)
    except (OSError, ValueError):
        return None
    eos = model.eos_token_id
    same = (tok.chat_template == model.metadata("tokenizer.chat_template") and len(tok) >= model.n_vocab
            and tok.convert_ids_to_tokens(eos) == model.token_text(eos))
    return tok if same else None


def load_for_inference(path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
                       base_model: str | None = None, as_trained: bool = True, engine: str = "auto",
                       max_sequences: int = 8, context_size: int | None = None) -> tuple[torch.nn.Module, ChatFormat]:
    """(model in eval mode on `device`, its chat format) for a model folder or a LoRA adapter folder; a GGUF file
    runs on llama.cpp (`engine`, see pick_engine), with room for `max_sequences` replies at once."""
    if pick_engine(path, engine) == "llama.cpp":
        return load_llama_cpp(path, context_size, max_sequences)
    device = device or default_device()
    model = load_weights(path, resolve_dtype(dtype, device), base_model, as_trained, device)
    base = getattr(model, "peft_config", {}).get("default")
    tok = load_tokenizer(path, fallback=base_model or (base.base_model_name_or_path if base else None))
    tok.padding_side = "left"  # generation continues from the right edge
    model.to(device).eval()
    return model, ChatFormat(tok, eos_token_id=model.generation_config.eos_token_id)


def load_for_inference_or_demo(path: str | Path | None, device: str | None = None, dtype: str | None = None,
                               adapter_base: str = "as-trained", engine: str = "auto", max_sequences: int = 8,
                               context_size: int | None = None):
    """load_for_inference(path), or without a path the tiny random demo model (built on first use)."""
    if path is None:
        from medtune.tiny import build_tiny_model

        logging.getLogger(__name__).warning("no model given: using the tiny random demo model (it answers gibberish)")
        path = build_tiny_model(DEMO_MODEL)
    return load_for_inference(path, device=device, dtype=dtype, as_trained=adapter_base == "as-trained",
                              engine=engine, max_sequences=max_sequences, context_size=context_size)
