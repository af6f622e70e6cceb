"""A tiny, randomly initialised Starling-shaped model for demos, tests and CPU benchmarks.

Starling-LM-7B-alpha is a MistralForCausalLM whose tokenizer is Mistral-7B-v0.1's SentencePiece model plus two
added tokens (`<|end_of_turn|>` = 32000, `<|pad_0|>` = 32001). The mistral-common wheel ships that exact
SentencePiece file, so the real Starling vocabulary is built offline; only the weights are random and small.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from medtune.chat_format import CHAT_TEMPLATE, END_OF_TURN, PAD_TOKEN

STARLING_VOCAB_SIZE = 32002
# Starling-LM-7B-alpha's config.json (a Mistral-7B): used by the GPU benchmark with random weights.
STARLING_CONFIG = dict(
    vocab_size=STARLING_VOCAB_SIZE, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=10000.0,
    sliding_window=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32001,
    tie_word_embeddings=False,
)
# initializer_range 0.1 (Mistral's is 0.02): at width 64 the default init caps every logit near 1, so LoRA alone
# could barely move the loss; with 0.1 a few dozen CPU steps visibly learn the reply format and the end of turn.
TINY_CONFIG = dict(STARLING_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, sliding_window=None,
                   initializer_range=0.1)


def sentencepiece_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def build_starling_tokenizer(out_dir: str | os.PathLike | None = None):
    """Starling's tokenizer (32002 ids, chat template, eos = <|end_of_turn|>), optionally saved to out_dir."""
    from transformers import LlamaTokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sentencepiece_file(), Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False)
    tok.add_special_tokens({"additional_special_tokens": [END_OF_TURN, PAD_TOKEN]})
    tok.eos_token, tok.pad_token = END_OF_TURN, PAD_TOKEN
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"  # generation pads on the left; training is padding-free
    assert len(tok) == STARLING_VOCAB_SIZE, len(tok)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Write a random tiny MistralForCausalLM + Starling tokenizer to out_dir (idempotent) and return the path."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists() and not overrides:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_starling_tokenizer(out)
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{**TINY_CONFIG, **overrides}))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Create the tiny random Starling-shaped model used by the demo.")
    parser.add_argument("--out", default=".cache/tiny-starling", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"tiny Starling-shaped model: {build_tiny_model(args.out, args.seed)}")


if __name__ == "__main__":
    main()
