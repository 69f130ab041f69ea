"""Every source of a multi-source MoE, resolved once and checked against the base up front.

A source serves the experts that name it; all mismatches with the base (architecture, any
tensor's shape, a missing FFN tensor, a dtype that cannot be cast, the tokenizer vocabulary) are
collected and reported together, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ckptforge.errors import SourceError
from ckptforge.families import Family
from ckptforge.io.source import DenseCheckpoint, open_checkpoint

from .spec import MoESpec

_SHOWN = 3  # mismatching tensors named per source; the rest are counted


@dataclass
class Sources:
    """The base and every other source, opened once (lazy tensors; nothing read yet)."""

    base: DenseCheckpoint
    by_ref: dict[str, DenseCheckpoint]

    def __getitem__(self, ref: str) -> DenseCheckpoint:
        return self.by_ref[ref]

    def close(self) -> None:
        for ckpt in self.by_ref.values():
            ckpt.close()


def open_sources(spec: MoESpec) -> Sources:
    """Resolve each distinct reference once (local path or Hub id); all unreadable ones reported together."""
    opened: dict[str, DenseCheckpoint] = {}
    failures: list[tuple[str, Exception]] = []
    for ref in spec.sources():
        try:
            opened[ref] = open_checkpoint(ref)
        except SourceError as exc:
            failures.append((ref, exc))
    if failures:
        first = failures[0][1]
        raise type(first)("; ".join(str(e) for _, e in failures)) from first
    return Sources(opened[spec.base_model], opened)


def check_sources(spec: MoESpec, sources: Sources, family: Family, moe_layers: list[int]) -> list[str]:
    """Every mismatch between a source and the base, one problem per source, naming tensors and shapes."""
    base = sources.base
    base_canon = family.canonical_names(list(base.tensors))
    base_prefix = family.base_prefix(set(base_canon)) or ""
    base_vocab = vocabulary_fingerprint(base.root)
    users = _experts_of(spec)
    problems = []
    for ref, ckpt in sources.by_ref.items():
        if ref == spec.base_model:
            continue
        label = f"source '{ref}' ({', '.join(users[ref])})"
        if ckpt.config.get("model_type") != base.config.get("model_type"):
            problems.append(f"{label} is a {ckpt.config.get('model_type')} model and the base is "
                            f"{base.config.get('model_type')}; every source must have the base's architecture")
            continue
        found = _tensor_problems(ckpt, family, base, base_canon, base_prefix, moe_layers)
        if found:
            problems.append(f"{label}: " + "; ".join(found))
        vocab = vocabulary_fingerprint(ckpt.root)
        if base_vocab is not None and vocab is not None and vocab != base_vocab:
            problems.append(f"{label} has a different tokenizer vocabulary from the base ({vocab[1]} vs {base_vocab[1]} "
                            "tokens, or the same count with other tokens); experts must share the base's tokenizer")
        elif ckpt.config.get("vocab_size") != base.config.get("vocab_size"):
            problems.append(f"{label} has vocab_size {ckpt.config.get('vocab_size')}, the base "
                            f"{base.config.get('vocab_size')}; experts must share the base's tokenizer")
    return problems


def _tensor_problems(ckpt: DenseCheckpoint, family: Family, base: DenseCheckpoint, base_canon: dict[str, str],
                     base_prefix: str, moe_layers: list[int]) -> list[str]:
    canon = family.canonical_names(list(ckpt.tensors))
    ffn = {n for layer in moe_layers for n in family.ffn_names(base_prefix, layer).values()}
    missing = sorted(n for n in ffn if n not in canon)
    shapes, dtypes = [], []
    for name, stored in base_canon.items():
        if name not in canon:
            continue
        mine, theirs = ckpt.tensors[canon[name]], base.tensors[stored]
        if mine.shape != theirs.shape:
            shapes.append(f"{name} {_shape(mine.shape)} vs the base's {_shape(theirs.shape)}")
        if name in ffn and not mine.dtype.is_floating_point:
            dtypes.append(f"{name} is {str(mine.dtype).removeprefix('torch.')}")
    out = []
    if missing:
        out.append(f"FFN tensor{'s' if len(missing) > 1 else ''} missing: {_listing(missing)}")
    if shapes:
        out.append(f"{len(shapes)} tensor shape(s) differ: {_listing(shapes)}")
    if dtypes:
        out.append(f"not a floating-point dtype, cannot be cast: {_listing(dtypes)}")
    return out


def _listing(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _experts_of(spec: MoESpec) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for group, items in (("expert", spec.experts), ("shared expert", spec.shared_experts)):
        for i, e in enumerate(items):
            users.setdefault(e.source_model, []).append(f"{group} {i}")
    return users


def vocabulary_fingerprint(root: Path) -> tuple[str, int] | None:
    """(sha256, token count) of the tokenizer vocabulary beside a checkpoint; None when it has no tokenizer.

    Reads ``tokenizer.json`` (model vocab + added tokens), else ``vocab.json`` / ``vocab.txt``, else
    hashes ``tokenizer.model`` (SentencePiece, count unknown: -1)."""
    tok = root / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], …]
            vocab = {str(p[0]): i for i, p in enumerate(vocab)}
        added = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
        tokens = {**vocab, **added}
        return _digest(json.dumps(sorted(tokens.items()), ensure_ascii=False).encode()), len(tokens)
    for name in ("vocab.json", "vocab.txt"):
        if (root / name).is_file():
            text = (root / name).read_bytes()
            count = len(json.loads(text)) if name.endswith(".json") else text.count(b"\n")
            return _digest(text), count
    if (root / "tokenizer.model").is_file():
        return _digest((root / "tokenizer.model").read_bytes()), -1
    return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
