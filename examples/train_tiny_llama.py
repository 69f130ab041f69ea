"""Train the tiny causal LM shipped in ``examples/tiny-llama-pydoc``.

1. Reads real English prose that ships with Python itself: ``pydoc_data.topics``, the text of
   the "topics" of Python's documentation (the language reference pages ``help()`` shows;
   PSF licence). Topics are sorted by name and split into paragraphs; every 10th paragraph
   (``--holdout-every``) is held out.
2. Trains a byte-level BPE (``tokenizers``, vocab ``--vocab-size``) on the training topics and
   saves it as a ``transformers.PreTrainedTokenizerFast`` (``tokenizer.json`` +
   ``tokenizer_config.json``), with ``<|endoftext|>`` as BOS/EOS between documents.
3. Trains a ``transformers.LlamaForCausalLM`` that is capacity-limited on purpose (hidden 128,
   4 layers, 4 heads, SwiGLU FFN of only 256 units): the setting where an upcycled MoE's extra
   experts have room to help. AdamW, linear warm-up + cosine decay, clipping at 1.0, random
   blocks of ``--seq-len`` + 1 tokens.
4. Saves model + tokenizer into ``--out`` and reports the held-out loss (nats per token and per
   byte) after reloading the folder with ``from_pretrained``.

Deterministic for a given ``--seed`` and ``--threads`` (torch deterministic algorithms).

Example::

    python examples/train_tiny_llama.py
    python examples/train_tiny_llama.py --steps 50 --out /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "tiny-llama-pydoc"
EOS = "<|endoftext|>"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for model + tokenizer")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=256, help="FFN width (small: capacity-limited)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-frac", type=float, default=0.05)
    parser.add_argument("--holdout-every", type=int, default=10, help="every Nth paragraph is held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def load_topics(holdout_every: int) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) from ``pydoc_data.topics``: topics sorted by name, split into
    paragraphs (blank lines); every ``holdout_every``-th paragraph, counted across topics, is held out."""
    from pydoc_data.topics import topics

    train, held, count = [], [], 0
    for name in sorted(topics):
        kept, out = [], []
        for para in topics[name].split("\n\n"):
            count += 1
            (out if count % holdout_every == 0 else kept).append(para)
        train += ["\n\n".join(kept)] if kept else []
        held += ["\n\n".join(out)] if out else []
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, wrapped for ``transformers`` (BOS/EOS = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS)


def encode(tok: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each document preceded by <|endoftext|>."""
    ids = [i for text in texts for i in tok(text, add_special_tokens=True)["input_ids"]]
    return torch.tensor(ids, dtype=torch.long)


def build_model(args: argparse.Namespace, vocab_size: int, eos_id: int) -> LlamaForCausalLM:
    """The capacity-limited LLaMA (weights from the current torch seed)."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.d_ff,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=eos_id, eos_token_id=eos_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def blocks(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping (n, seq_len + 1) blocks of the stream."""
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1)


def train(model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> float:
    """AdamW + warm-up/cosine on random windows of the training stream; return wall seconds."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimiser, int(args.warmup_frac * args.steps), args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[o: o + args.seq_len + 1] for o in offsets.tolist()])
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        running += loss.item()
        if step % 100 == 0:
            print(f"step {step:5d}/{args.steps}  train loss {running / 100:.4f}  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
            running = 0.0
    return time.perf_counter() - start


@torch.no_grad()
def held_out_loss(model: LlamaForCausalLM, data: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token loss (nats/token) over the (n, seq_len + 1) blocks ``data``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        chunk = data[i: i + batch_size]
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="sum")
        total += losses.item()
        count += chunk[:, 1:].numel()
    return total / count


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train_texts, held_texts = load_topics(args.holdout_every)
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_stream, held_stream = encode(tok, train_texts), encode(tok, held_texts)
    held_bytes = sum(len(t.encode("utf-8")) for t in held_texts)
    print(f"data: {len(train_texts)} train topics ({len(train_stream):,} tokens) / {len(held_texts)} held out "
          f"({len(held_stream):,} tokens, {held_bytes:,} bytes); vocab {len(tok)}")
    torch.manual_seed(args.seed)
    model = build_model(args, len(tok), tok.eos_token_id)
    print(f"model: LlamaForCausalLM, {sum(p.numel() for p in model.parameters()):,} parameters")
    held = blocks(held_stream, args.seq_len)
    print(f"held-out loss at init: {held_out_loss(model, held):.4f} nats/token")
    seconds = train(model, train_stream, args)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    reloaded = LlamaForCausalLM.from_pretrained(args.out)
    loss = held_out_loss(reloaded, held)
    tokens = held[:, 1:].numel()
    per_byte = loss * tokens / (held_bytes * tokens / len(held_stream))
    print(f"train time: {seconds:.1f}s; held-out loss (reloaded): {loss:.4f} nats/token, "
          f"{per_byte:.4f} nats/byte, perplexity {math.exp(loss):.1f}")
    weights = args.out / "model.safetensors"
    print(f"saved {weights} ({weights.stat().st_size:,} bytes, sha256 {sha256(weights)})")


if __name__ == "__main__":
    main()
