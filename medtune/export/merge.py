"""Merge a trained LoRA adapter into its base model and write a standalone model folder.

    medtune-export --model adjusted_model --out exported/starling-medtuned    # or: medtune-export adjusted_model ...
    medtune-export --model adjusted_model --out exported/starling-medtuned --gguf q8_0 q4_k_m   # also for llama.cpp

The base is loaded in a float dtype (merging needs real weights): for an adapter trained on a 4-bit (or 8-bit) base,
the base's weights as training saw them, quantised as then and de-quantised (medtune.inference.load.load_base), so the
merged model answers as the adapter did in training; `--adapter-base original` merges into the original weights
instead. The adapter is merged with peft's `merge_and_unload`, and the folder gets safetensors shards, the tokenizer
with the chat template it was trained with, a generation_config whose eos_token_id lists every stop id of that
format, and a model card built from the run's manifest (run_info.json) and evaluation report (eval.json) when they
are there. `--gguf` adds GGUF files and Ollama Modelfiles (medtune.export.gguf).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence


from medtune.adapters import adapter_base, is_adapter, trained_quantization
from medtune.inference.chat_format import ChatFormat
from medtune.command_line import add_adapter_base_argument
from medtune.inference.gguf import GGUFError, local_model
from medtune.export.gguf import GGUF_TYPES, check_architecture, check_types, write_gguf
from medtune.inference.generation import generation_config
from medtune.inference.load import load_tokenizer, load_weights, resolve_dtype
from medtune.export.model_card import find_training_record, model_card, quantization_name

DTYPES = ("bfloat16", "float16", "float32")


def export(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
           dtype: str = "bfloat16", max_shard_size: str = "5GB", as_trained: bool = True,
           gguf: Sequence[str] = ()) -> Path:
    """Merge `adapter_dir` into its base and write the standalone model to `out_dir`, with GGUF files of the `gguf`
    types (medtune.export.gguf)."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not is_adapter(adapter_dir):
        raise ValueError(f"{adapter_dir} has no adapter_config.json: not a LoRA adapter folder")
    base = base_model or adapter_base(adapter_dir)
    if gguf:  # refused before the merge, not after it
        from transformers import AutoConfig

        check_types(list(gguf))
        check_architecture(AutoConfig.from_pretrained(local_model(base)).to_dict(), base)
    quantized = trained_quantization(adapter_dir) if as_trained else None
    model = load_weights(adapter_dir, resolve_dtype(dtype), base_model, as_trained)  # float weights, on CPU
    fmt = ChatFormat(load_tokenizer(adapter_dir, fallback=base), eos_token_id=model.generation_config.eos_token_id)
    merged = model.merge_and_unload()
    merged.generation_config = generation_config(fmt)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    fmt.tokenizer.save_pretrained(out)
    quantization = quantization_name(quantized) if quantized else None
    model_card(base, find_training_record(adapter_dir), fmt, dtype, quantization).save(out / "README.md")
    if gguf:
        write_gguf(out, list(gguf))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medtune-export",
                                     description="Merge a LoRA adapter into its base model and export it.")
    parser.add_argument("--model", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("adapter", nargs="?", help="the adapter folder as a positional argument (same as --model)")
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.add_argument("--base", help="base model path or hub id (default: the one in adapter_config.json)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="dtype the merged weights are written in (default: %(default)s)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default: %(default)s)")
    parser.add_argument("--gguf", nargs="+", default=[], metavar="TYPE",
                        help=f"also write model-TYPE.gguf files for llama.cpp and Ollama ({', '.join(GGUF_TYPES)}; "
                             "q4_k_m needs llama-cpp-python). A merged model folder as --model: only these")
    add_adapter_base_argument(parser)
    args = parser.parse_args(argv)
    try:
        check_types(args.gguf)
    except GGUFError as err:
        parser.error(str(err))
    if args.model and args.adapter and args.model != args.adapter:
        parser.error(f"two adapters given ({args.adapter} and --model {args.model}): give one")
    args.model = args.model or args.adapter
    if not args.model:
        parser.error("the adapter folder is required: --model ADAPTER_DIR")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.gguf and not is_adapter(args.model):  # an already merged folder
            for path in write_gguf(args.model, args.gguf, args.out):
                print(f"GGUF written to {path}")
            return
        out = export(args.model, args.out, args.base, args.dtype, args.max_shard_size,
                     args.adapter_base == "as-trained", args.gguf)
    except GGUFError as err:  # an architecture, tokenizer or file GGUF cannot take
        raise SystemExit(f"medtune-export: {err}") from None
    print(f"merged model written to {out}")
    for kind in args.gguf:
        print(f"GGUF written to {out / f'model-{kind}.gguf'}")


if __name__ == "__main__":
    main()
