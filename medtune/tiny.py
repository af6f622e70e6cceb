"""A tiny, randomly initialised Starling-shaped model for demos, tests and CPU benchmarks.

Starling-LM-7B-alpha is a MistralForCausalLM whose tokenizer is Mistral-7B-v0.1's SentencePiece model plus added
tokens. The mistral-common wheel ships that exact SentencePiece file, so the real Starling tokenizer is rebuilt
offline with the settings of its hub files (docs/DATA.md "Starling's tokenizer" cites them); only the weights are
random and small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

# berkeley-nest/Starling-LM-7B-alpha: added_tokens.json ({"<|end_of_turn|>": 32000, "<|pad_0|>": 32001}),
# special_tokens_map.json (eos and pad <|end_of_turn|>, sep <sep>, which takes id 32002, one past the embedding
# matrix) and tokenizer_config.json (LlamaTokenizer, legacy true, this chat template). `legacy: true` is what gives
# the role prefixes their "▁" after <s> and after <|end_of_turn|>, as OpenChat trained them.
STARLING_ADDED_TOKENS = ("<|end_of_turn|>", "<|pad_0|>")
STARLING_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + "
    "message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)
STARLING_VOCAB_SIZE = 32002
# Starling-LM-7B-alpha's config.json (a Mistral-7B): used by the GPU benchmark with random weights.
STARLING_CONFIG = dict(
    vocab_size=STARLING_VOCAB_SIZE, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=10000.0,
    sliding_window=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
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
    """Starling's tokenizer as transformers loads the hub's files, optionally saved to out_dir."""
    from transformers import AutoTokenizer, LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(sentencepiece_file(), Path(tmp) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True)
        tok.add_special_tokens({"additional_special_tokens": list(STARLING_ADDED_TOKENS)})
        tok.add_special_tokens({"sep_token": "<sep>"})  # after the others: id 32002, as on the hub
        tok.eos_token = tok.pad_token = "<|end_of_turn|>"
        tok.chat_template = STARLING_CHAT_TEMPLATE
        saved = Path(out_dir) if out_dir is not None else Path(tmp) / "saved"
        tok.save_pretrained(saved)
        # transformers does not write `legacy`, and without it rebuilds the tokenizer with legacy=False on load.
        config_file = saved / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "legacy": True}, indent=2))
        tok = AutoTokenizer.from_pretrained(saved)
    assert tok.convert_tokens_to_ids(list(STARLING_ADDED_TOKENS)) == [32000, 32001], "added token ids"
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
