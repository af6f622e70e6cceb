"""A GGUF model run by llama.cpp (llama-cpp-python's bindings of its C API), behind the same decoding interface as a
transformers model: `decode_batch` gives an object with DecodeBatch's `rows`, `sample()` and `advance()`, so the
server's batcher, the terminal chat and evaluation run it unchanged, under medtune.inference.generation's rules (stop
ids, stop strings, at least one token, per-request sampling from the logits).

Not llama-cpp-python's `Llama` class: it holds one sequence, and samples inside llama.cpp. Here one llama.cpp
context holds up to `max_sequences` sequences in one KV cache (`kv_unified`: all of them share `context_size`
cells), and each step decodes the next token of every running row in one `llama_decode` call: llama.cpp's own
batching, as its server does. Prompts and replies use the chat format's token ids (medtune.inference.chat_format, from
the tokenizer the GGUF holds), which the tests check against llama.cpp's own tokenizer.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from medtune.inference.decoding import sample
from medtune.inference.generation import Sampling


class LlamaCppModel:
    def __init__(self, path: str | Path, context_size: int | None = None, max_sequences: int = 8,
                 threads: int | None = None):
        import llama_cpp

        from medtune.inference.gguf import read_gguf

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its loading log is pages long
        llama_cpp.llama_backend_init()
        self._lib, self.path = llama_cpp, Path(path)
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self._model:
            read_gguf(path)  # what is wrong with the file, named (not read up front: it takes 230 MB for SmolLM2)
            raise ValueError(f"{path}: llama.cpp could not load this model (its log above says why)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        trained = llama_cpp.llama_model_n_ctx_train(self._model)
        self.context_size = min(context_size or trained, trained)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = self.context_size, max_sequences, True
        params.n_batch = params.n_ubatch = 512
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        params.n_threads = params.n_threads_batch = threads or cores
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ValueError(f"{path}: llama.cpp could not make a context of {self.context_size} tokens")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._n_batch = params.n_batch
        self.max_sequences = max_sequences
        self._free = list(range(max_sequences))
        self._reserved: dict[int, int] = {}  # sequence -> the KV cells its prompt and longest reply take
        # What medtune reads of a transformers model: its context size, and its mode (always inference here).
        self.config = SimpleNamespace(max_position_embeddings=self.context_size)
        self.training = False
        weakref.finalize(self, _free_all, llama_cpp, self._batch, self._ctx, self._model)

    def eval(self) -> LlamaCppModel:
        return self

    def train(self, mode: bool = True) -> LlamaCppModel:
        if mode:
            raise ValueError(f"{self.path}: a llama.cpp model cannot be trained")
        return self

    def metadata(self, key: str) -> str | None:
        """A metadata value of the file, as text (None when the key is missing)."""
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode()
            size = n + 1

    def token_text(self, token: int) -> str:
        return self._lib.llama_vocab_get_text(self._vocab, token).decode()

    @property
    def eos_token_id(self) -> int:
        return self._lib.llama_vocab_eos(self._vocab)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Run (token, position, sequence, wants logits) items; the logits wanted, in order (rows x vocabulary)."""
        lib, batch, out = self._lib, self._batch, []
        for start in range(0, len(items), self._n_batch):
            chunk = items[start:start + self._n_batch]
            for i, (token, pos, seq, wants) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wants
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(chunk)
            status = lib.llama_decode(self._ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed ({status})")
            out += [np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,)).copy()
                    for i, item in enumerate(chunk) if item[3]]
        return torch.from_numpy(np.stack(out)) if out else torch.empty(0, self.n_vocab)

    @property
    def cells_free(self) -> int:
        """KV cells no running reply has reserved: the server starts a request only when its prompt and max_tokens
        fit, so that the cache, shared by all sequences, never fills half way through a reply."""
        return self.context_size - sum(self._reserved.values())

    def fits(self, needs: list[int]) -> int:
        """How many of the replies needing `needs` KV cells, in order, the free sequences and cells hold now."""
        n, cells = 0, self.cells_free
        for need in needs[:len(self._free)]:
            if need > cells:
                break
            cells, n = cells - need, n + 1
        return n

    def acquire(self, needs: list[int]) -> list[int]:
        """Sequences for replies that take `needs` KV cells each (prompt and max tokens), reserved until released."""
        if self.fits(needs) < len(needs):
            raise RuntimeError(f"{len(needs)} replies of {sum(needs)} tokens in all do not fit: {len(self._free)} of "
                               f"{self.max_sequences} sequences and {self.cells_free} of {self.context_size} KV cells "
                               "are free")
        seqs = [self._free.pop() for _ in needs]
        self._reserved.update(zip(seqs, needs))
        return seqs

    def release(self, seqs: list[int]) -> None:
        """Give `seqs` back, their KV cells cleared; empties the list (so releasing twice is harmless)."""
        for seq in seqs:
            self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
            self._reserved.pop(seq, None)
        self._free += seqs
        seqs.clear()

    def decode_batch(self, fmt, prompts: list[list[int]], samplings: list[Sampling],
                     max_tokens: list[int]) -> LlamaCppBatch:
        return LlamaCppBatch(self, fmt, prompts, samplings, max_tokens)

    def token_losses(self, ids: list[int], start: int) -> torch.Tensor:
        """Negative log-likelihood of ids[start + 1:], each given the ids before it (teacher-forced)."""
        (seq,) = self.acquire([len(ids)])
        try:
            logits = self.decode([(t, p, seq, p >= start and p < len(ids) - 1) for p, t in enumerate(ids)])
        finally:
            self.release([seq])
        return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[start + 1:]), reduction="none")


def _free_all(lib, batch, ctx, model) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


class LlamaCppBatch:
    """DecodeBatch's interface over sequences of a LlamaCppModel's context."""

    def __init__(self, engine: LlamaCppModel, fmt, prompts: list[list[int]], samplings: list[Sampling],
                 max_tokens: list[int]):
        self.engine, self.samplings = engine, list(samplings)
        self.stop_ids = list(fmt.stop_ids)
        self.rows = list(range(len(prompts)))
        self.fresh = [True] * len(prompts)
        self.seqs = engine.acquire([len(p) + m for p, m in zip(prompts, max_tokens)])
        # Rows give their sequences back as they leave (advance) and the rest on close(); the finalizer is the
        # backstop for a batch dropped without either.
        weakref.finalize(self, engine.release, self.seqs)
        self.lengths = [len(p) for p in prompts]
        try:
            self._logits = engine.decode([(t, pos, seq, pos == len(p) - 1)
                                          for p, seq in zip(prompts, self.seqs) for pos, t in enumerate(p)])
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Give the sequences of the rows still here back to the engine (the batch is being dropped)."""
        self.engine.release(self.seqs)

    @property
    def size(self) -> int:
        return len(self.samplings)

    def sample(self) -> list[int]:
        return sample(self._logits, [self.samplings[r] for r in self.rows], self.stop_ids, self.fresh)

    def join(self, other: LlamaCppBatch) -> None:
        """Take `other`'s rows: their sequences already live in the same KV cache, so they just step with these."""
        self.rows += [self.size + r for r in other.rows]
        self.seqs += other.seqs
        other.seqs.clear()  # now released by this batch
        self.lengths += other.lengths
        self.fresh += other.fresh
        self.samplings += other.samplings
        self._logits = torch.cat([self._logits, other._logits])

    def advance(self, tokens: list[int], keep: list[bool]) -> None:
        gone = [i for i, k in enumerate(keep) if not k]
        if gone:
            self.engine.release([self.seqs[i] for i in gone])
            kept = [i for i, k in enumerate(keep) if k]
            self.rows, tokens = [self.rows[i] for i in kept], [tokens[i] for i in kept]
            self.seqs[:] = [self.seqs[i] for i in kept]
            self.lengths = [self.lengths[i] for i in kept]
            if not kept:
                return
        self.fresh = [False] * len(self.rows)
        self._logits = self.engine.decode([(t, n, seq, True) for t, n, seq in zip(tokens, self.lengths, self.seqs)])
        self.lengths = [n + 1 for n in self.lengths]
