"""GGUF files of an exported (merged) model folder, for llama.cpp, llama-cpp-python and Ollama.

    medtune-export --model outputs/demo --out outputs/demo/export --gguf q8_0 q4_k_m

Written with the `gguf` package (its writer, tensor-name map and vocab classes), as llama.cpp's own
convert_hf_to_gguf.py does for the llama family (LlamaForCausalLM, MistralForCausalLM: Llama, Mistral, Starling,
SmolLM2), whose conventions are kept:
- q_proj and k_proj rows are permuted from the Hugging Face rotary layout to llama.cpp's (`LlamaModel.permute`);
- 1-D tensors (norms) stay F32; a tensor whose rows do not split into Q8_0 blocks falls back to F16;
- tied embeddings write no output tensor; tokens past the embedding rows (Starling's `<sep>`, id 32002) are dropped;
- a SentencePiece vocabulary (tokenizer.ggml.model "llama") carries scores, a byte-level BPE one ("gpt2") its merges
  and its pre-tokenizer name (llama.cpp's src/llama-vocab.cpp), found from tokenizer.json.
f16, bf16 and q8_0 come from the gguf package; q4_k_m from llama.cpp's own quantizer (`llama_model_quantize` of
llama-cpp-python), as gguf's numpy quantizers stop at Q8_0 and the legacy 4-bit types.

The chat template trained with goes in `tokenizer.chat_template`, and the eos and eot ids are the template's
end-of-turn token, so that llama.cpp (and Ollama) stop where training taught the model to stop: llama.cpp ends a
reply at eos, eot and a few known texts, and Starling's `<|end_of_turn|>` is not one of them. Each file is read back
with GGUFReader and checked; a mismatch is an error naming the key.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from medtune.inference.gguf import GGUFError, read_gguf

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# tokenizer.json pre-tokenizers of byte-level BPE models, by llama.cpp's name for them (src/llama-vocab.cpp):
# "smollm" splits digits one by one before GPT-2's byte-level regex; "llama-bpe" is Llama 3's regex split.
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
}


def check_types(types: list[str]) -> list[str]:
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad:
        raise GGUFError(f"unsupported GGUF type {', '.join(bad)}: choose from {', '.join(GGUF_TYPES)}")
    if "q4_k_m" in types:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise GGUFError("q4_k_m is quantized by llama.cpp: install llama-cpp-python (make local), or "
                                  "choose f16, bf16 or q8_0") from None
    return list(dict.fromkeys(types))


def check_architecture(config: dict, where: str | Path) -> None:
    """Refuse (before any work) a model config outside the llama family."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{where}: architecture {arch} is not supported for GGUF export (supported: "
                              f"{', '.join(ARCHITECTURES)}); serve the safetensors folder with transformers or vLLM")
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise GGUFError(f"{where}: rope scaling is not supported for GGUF export")


def write_gguf(model_dir: str | Path, types: list[str], out_dir: str | Path | None = None) -> list[Path]:
    """`model-<type>.gguf` files of the model folder, in `out_dir` (default: the folder itself), each checked, each
    with an Ollama Modelfile beside it where its chat template allows one (medtune.export.modelfile)."""
    from transformers import AutoTokenizer

    from medtune.inference.chat_format import ChatFormat
    from medtune.export.modelfile import ModelfileError, write_modelfile

    model_dir = Path(model_dir)
    out_dir = Path(out_dir or model_dir)
    types = check_types(types)
    if not (model_dir / "config.json").is_file():
        raise GGUFError(f"{model_dir}: no config.json, not a model folder")
    config = json.loads((model_dir / "config.json").read_text())
    check_architecture(config, model_dir / "config.json")
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id") \
        if (model_dir / "generation_config.json").is_file() else None
    fmt = ChatFormat(tok, eos_token_id=eos)
    vocab = _vocab(model_dir, tok, fmt, config["vocab_size"])
    written = []
    for kind in types:
        path = out_dir / f"model-{kind}.gguf"
        logger.info("writing %s", path)
        if kind == "q4_k_m":
            source = out_dir / f".model-{kind}-source.gguf"
            _write(path=source, model_dir=model_dir, config=config, vocab=vocab, kind=_lossless_type(config))
            try:
                _llama_cpp_quantize(source, path)
            finally:
                source.unlink(missing_ok=True)
        else:
            _write(path=path, model_dir=model_dir, config=config, vocab=vocab, kind=kind)
        check_gguf(path, vocab, kind)
        written.append(path)
        try:
            write_modelfile(path, fmt, config["max_position_embeddings"], vocab["add_bos"])
        except ModelfileError as err:
            logger.warning("%s: no Ollama Modelfile: %s", path, err)
    return written


def _lossless_type(config: dict) -> str:
    """The type that holds the folder's weights exactly: the source of llama.cpp's quantizer."""
    return {"bfloat16": "bf16", "float16": "f16"}.get(config.get("dtype") or config.get("torch_dtype"), "f32")


def _vocab(model_dir: Path, tok, fmt, n_vocab: int) -> dict:
    """Tokens, scores, types, merges and special ids as llama.cpp reads them."""
    import gguf

    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    if tokenizer_json["model"]["type"] == "BPE" and tokenizer_json["model"].get("byte_fallback"):
        # A SentencePiece model. Its pieces are ordered by score (a BPE piece's score is minus its rank), which is
        # the order llama.cpp merges by; gguf's LlamaHfVocab leaves every score at -1000.
        source = gguf.LlamaHfVocab(model_dir)
        model, pre, merges = "llama", None, []
        tokens, types = [], []
        for text, _, kind in source.all_tokens():
            tokens.append(text)
            types.append(kind)
        scores = [0.0 if types[i] != gguf.TokenType.NORMAL else -float(i) for i in range(len(tokens))]
        # llama.cpp puts a space before the text after every special token, or before none (add_space_prefix): a
        # legacy tokenizer (Starling's, Llama 2's) writes "▁GPT4" after "<|end_of_turn|>", Mistral v3's "GPT4".
        after_special = tok.convert_ids_to_tokens(tok(f"{tok.bos_token}a", add_special_tokens=False).input_ids)
        space_prefix = tok.bos_token is None or after_special[1:2] == ["\u2581a"]
    else:
        try:
            source = gguf.BpeVocab(model_dir)
        except (FileNotFoundError, ValueError) as err:
            raise GGUFError(f"{model_dir / 'tokenizer.json'}: neither SentencePiece nor byte-level BPE ({err}); "
                                  "not supported for GGUF export") from None
        pre = next((name for name, value in PRE_TOKENIZERS.items() if value == tokenizer_json["pre_tokenizer"]), None)
        if pre is None:
            raise GGUFError(f"{model_dir / 'tokenizer.json'}: pre_tokenizer {tokenizer_json['pre_tokenizer']} "
                                  f"has no llama.cpp equivalent known here ({', '.join(PRE_TOKENIZERS)})")
        model, tokens, scores, types, space_prefix = "gpt2", [], [], [], None
        for text, score, kind in source.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        merges = gguf.SpecialVocab(model_dir, load_merges=True).merges
    for i in range(len(tokens)):  # the special tokens of the base vocabulary (ChatML's <|im_end|>) are control tokens
        if i in special:
            types[i] = gguf.TokenType.CONTROL
    if len(tokens) > n_vocab:
        logger.warning("dropping %d tokens past the model's %d embedding rows: %s", len(tokens) - n_vocab, n_vocab,
                       [t.decode() if isinstance(t, bytes) else t for t in tokens[n_vocab:]])
    pad = [f"[PAD{i}]".encode() for i in range(len(tokens), n_vocab)]
    tokens, scores = (tokens + pad)[:n_vocab], (scores + [-1000.0] * len(pad))[:n_vocab]
    types = (types + [gguf.TokenType.UNUSED] * len(pad))[:n_vocab]
    for name, i in (("bos", tok.bos_token_id), ("end of turn", fmt.end_of_turn_id)):
        if i is not None and i >= n_vocab:
            raise GGUFError(f"{model_dir}: the {name} token (id {i}) is past the {n_vocab} embedding rows")
    ids = {"bos": tok.bos_token_id, "eos": fmt.end_of_turn_id, "eot": fmt.end_of_turn_id,
           "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    return {"model": model, "pre": pre, "space_prefix": space_prefix, "tokens": tokens, "scores": scores,
            "types": types, "merges": merges,
            "ids": {k: v for k, v in ids.items() if v is not None and v < n_vocab},
            "add_bos": tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id],
            "template": fmt.template, "name": model_dir.name}


def _tensors(model_dir: Path):
    """(name, float32 array) of every weight of the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{model_dir}: no .safetensors weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) to llama.cpp's (pairs): convert_hf_to_gguf's LlamaModel.permute."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write(path: Path, model_dir: Path, config: dict, vocab: dict, kind: str) -> None:
    import gguf
    from gguf.quants import QuantError, quantize

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    n_layer, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, arch, use_temp_file=True)
    w.add_name(vocab["name"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                               or 10000.0))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_vocab_size(config["vocab_size"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        w.add_tokenizer_pre(vocab["pre"])
    if vocab["space_prefix"] is not None:
        w.add_add_space_prefix(vocab["space_prefix"])
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    for name, i in vocab["ids"].items():
        getattr(w, f"add_{name}_token_id")(i)
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(False)
    w.add_chat_template(vocab["template"])

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    for hf_name, data in _tensors(model_dir):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{model_dir}: tensor {hf_name} has no GGUF name in the llama family")
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        target = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qtype
        try:
            stored = quantize(data, target)
        except QuantError:  # rows that do not split into the type's blocks
            target, stored = gguf.GGMLQuantizationType.F16, quantize(data, gguf.GGMLQuantizationType.F16)
        w.add_tensor(name, stored, raw_dtype=target)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _llama_cpp_quantize(source: Path, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise GGUFError(f"{source}: llama.cpp's quantizer failed (its log above says why)")
    os.replace(tmp, out)


def check_gguf(path: Path, vocab: dict, kind: str) -> None:
    """Read `path` back and check what llama.cpp needs to tokenize, template and stop as training did."""
    import gguf

    reader = read_gguf(path)
    expected = {"general.architecture": "llama", "tokenizer.ggml.model": vocab["model"],
                "tokenizer.chat_template": vocab["template"], "tokenizer.ggml.add_bos_token": vocab["add_bos"],
                **{getattr(gguf.Keys.Tokenizer, f"{k.upper()}_ID"): v for k, v in vocab["ids"].items()}}
    if vocab["pre"]:
        expected["tokenizer.ggml.pre"] = vocab["pre"]
    if vocab["space_prefix"] is not None:
        expected["tokenizer.ggml.add_space_prefix"] = vocab["space_prefix"]
    if kind != "q4_k_m":
        expected["general.file_type"] = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    for key, value in expected.items():
        field = reader.get_field(key)
        found = None if field is None else field.contents()
        if found != value:
            raise GGUFError(f"{path}: key {key} is {str(found)[:80]!r}, expected {str(value)[:80]!r}")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != len(vocab["tokens"]):
        raise GGUFError(f"{path}: key tokenizer.ggml.tokens holds {0 if tokens is None else len(tokens.data)} "
                              f"tokens, expected {len(vocab['tokens'])}")
