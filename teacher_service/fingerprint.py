"""Tokenizer fingerprints: equal fingerprints mean the same id <-> token mapping.

Both the teacher (in `Info`) and the trainer (at connect) compute this from a local
tokenizer directory, so a student whose tokenizer differs from the teacher's is caught
before any training step. Only the mapping matters: normalisers and chat templates do
not change which id a log-prob belongs to.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 hex digest of a Hugging Face tokenizer's vocabulary and special tokens.

    Accepts a `transformers` tokenizer (anything with `get_vocab()`); the digest covers
    the (token, id) pairs sorted by id and the special-token map.
    """
    vocab = tokenizer.get_vocab()
    pairs = sorted(((int(i), str(tok)) for tok, i in vocab.items()))
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    payload = json.dumps({"vocab": pairs, "special": special}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
