"""Small random causal LMs with matching tokenizers, saved as Hugging Face directories.

No model hub is reachable from CI or from a fresh laptop, so tests, benchmarks and the
demo build their models here: a Llama-architecture model (which both transformers and
vLLM load) with random weights, and a word-level tokenizer whose tokens are "t0",
"t1", ... so that every id in [0, vocab_size) is a real token.

    python -m teacher_service.random_model OUT_DIR --vocab 1024 --hidden 64 --layers 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over tokens <pad> <bos> <eos> <unk> t4 t5 ... t{V-1}."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def build_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    intermediate: int | None = None,
    kv_heads: int | None = None,
) -> LlamaConfig:
    """A small Llama config; tie_word_embeddings off so the LM head is its own matrix.
    kv_heads < heads gives grouped-query attention (default: heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def save_random_model(
    out_dir: str | Path,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
    init_std: float = 0.5,
    intermediate: int | None = None,
    kv_heads: int | None = None,
) -> Path:
    """Writes a random model + tokenizer to out_dir and returns the path.

    `init_std` is larger than a trained model's so that the random model's next-token
    distributions are far from uniform (top-K then means something in tests).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config(vocab_size, hidden, layers, heads, max_positions, intermediate, kv_heads)
    config.initializer_range = init_std
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(vocab_size).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a small random causal LM directory.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = save_random_model(
        args.out_dir,
        args.vocab,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        max_positions=args.max_positions,
        seed=args.seed,
    )
    print(path)


if __name__ == "__main__":
    main()
