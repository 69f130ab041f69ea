"""Issue 12, defect "BERT-MoE differs from dense on padded positions": where routing is exact
(copy-all, renormalised top-k, no capacity) the MoE equals the dense model at every position of a
padded batch, padded ones included — checked as a user would, through the transformers classes."""

from __future__ import annotations

import torch
import transformers

import ckptforge
from calib_helpers import add_tokenizer
from conftest import build_tiny


def test_copy_all_bert_moe_equals_dense_on_the_whole_padded_batch(tmp_path):
    dense_dir = add_tokenizer(build_tiny("bert-base-model", tmp_path / "dense"))
    out = tmp_path / "moe"
    ckptforge.upcycle(dense_dir, out, ckptforge.UpcycleOptions(num_experts=8, top_k=2, layers="all"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    batch = tokenizer(["the cat sat on the mat today", "a dog"], padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # the batch really is padded
    dense = transformers.BertModel.from_pretrained(dense_dir).eval()
    moe = transformers.AutoModel.from_pretrained(out).eval()
    assert type(moe).__name__ != "BertModel"
    with torch.no_grad():
        expected = dense(**batch).last_hidden_state
        got = moe(**batch).last_hidden_state
    assert torch.allclose(expected, got, rtol=1e-5, atol=1e-5), float((expected - got).abs().max())
