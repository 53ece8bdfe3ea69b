"""Word-level tokenizers for from-scratch models, and memory tokens for any tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rim_lens.model.memory import MemorySpec

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits one by one: numbers never fall out of the vocabulary and arithmetic is per digit.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )


def build_word_tokenizer(texts: Iterable[str], spec: MemorySpec) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts`, with memory and answer-prefix tokens."""
    pre = _pre_tokenizer()
    words: set[str] = set("0123456789")
    for text in list(texts) + [spec.answer_prefix]:
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS] + sorted(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )
    add_memory_tokens(tok, spec)
    return tok


def add_memory_tokens(tokenizer: PreTrainedTokenizerBase, spec: MemorySpec) -> int:
    """Register the method's tokens (`spec.special_tokens`) as special tokens; returns how many were new."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": spec.special_tokens})
    if tokenizer.pad_token is None:
        # Pretrained causal LMs often lack a pad token; reuse EOS since padding is always masked.
        tokenizer.pad_token = tokenizer.eos_token
    return added


def memory_token_ids(tokenizer: PreTrainedTokenizerBase, spec: MemorySpec) -> tuple[int, int, int]:
    """Token ids of `spec.special_tokens`: (begin, memory, end), or (bot, thought, eot) for Coconut."""
    ids = tokenizer.convert_tokens_to_ids(spec.special_tokens)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise ValueError(f"tokenizer lacks memory tokens {spec.special_tokens}")
    return tuple(ids)
