"""Packed samples must not attend to each other: per-sample logits with packing equal those without."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

ROWS = [
    {"instruction": "Name the disease.", "input": "Fever, neck stiffness and a purple rash.", "output": "Meningitis."},
    {"instruction": "Is the hypothesis entailed?", "input": "Premise: BP 190/110.\nHypothesis: hypertension.",
     "output": "entailment"},
    {"instruction": "What should I do about a mild sore throat?", "input": "", "output": "Rest, fluids, lozenges."},
]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _packed_batch(tok, max_length=512):
    from datasets import Dataset
    from trl import pack_dataset

    from medtune.inference.chat_format import ChatFormat
    from medtune.data.formats import INSTRUCTION, clean

    encoded = ChatFormat(tok).encode([clean(INSTRUCTION, row)[0]["messages"] for row in ROWS])
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.input_ids for e in encoded]})
    packed = pack_dataset(ds, max_length, strategy="bfd")
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == len(ROWS)  # all three share one row
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    return collate([packed[0]]), packed[0]["seq_lengths"]


@torch.no_grad()
def test_packed_logits_equal_unpacked(model_and_tok):
    model, tok = model_and_tok
    batch, lengths = _packed_batch(tok)
    assert "attention_mask" not in batch  # restarting position_ids alone carry the sample boundaries
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    start = 0
    for n in lengths:
        ids = batch["input_ids"][:, start:start + n]
        alone = model(input_ids=ids, use_cache=False).logits[0]
        torch.testing.assert_close(packed[start:start + n], alone, atol=1e-4, rtol=1e-4)
        start += n


@pytest.mark.slow
@torch.no_grad()
def test_flex_attention_keeps_packed_samples_apart(model_and_tok, tiny_model_dir):
    """flex_attention (a GPU benchmark option) builds a block mask from the restarting position_ids: same logits."""
    from transformers import AutoModelForCausalLM

    sdpa, tok = model_and_tok
    flex = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                attn_implementation="flex_attention")
    batch, lengths = _packed_batch(tok)
    packed = flex.eval()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    start = 0
    for n in lengths:
        alone = sdpa(input_ids=batch["input_ids"][:, start:start + n], use_cache=False).logits[0]
        torch.testing.assert_close(packed[start:start + n], alone, atol=1e-4, rtol=1e-4)
        start += n


@torch.no_grad()
def test_naive_concatenation_would_leak_between_samples(model_and_tok):
    """The equality above is meaningful: without restarting positions, later samples see earlier ones."""
    model, tok = model_and_tok
    batch, lengths = _packed_batch(tok)
    leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    second = slice(lengths[0], lengths[0] + lengths[1])
    alone = model(input_ids=batch["input_ids"][:, second], use_cache=False).logits[0]
    assert (leaky[second] - alone).abs().max() > 1e-3


def test_collator_masks_first_token_of_each_sample(model_and_tok):
    _, tok = model_and_tok
    batch, lengths = _packed_batch(tok)
    starts = torch.tensor([0, lengths[0], lengths[0] + lengths[1]])
    assert (batch["position_ids"][0, starts] == 0).all()
    assert (batch["labels"][0, starts] == -100).all()
