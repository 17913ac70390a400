"""Tokenizers for the tiny models, built offline from small in-memory vocabularies in each
family's own tokenizer class (CLIP and Qwen2 byte-level BPE, T5 unigram, Gemma BPE), so a
saved tiny model loads through the same tokenizer code as the real checkpoint."""

# ruff: noqa: PLC0415 - heavy modules load on first use (transformers)

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("a", "the", "of", "photo", "cat", "dog", "red", "blue", "green", "on", "in", "and")
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()\n"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tiny_clip_tokenizer(directory: Path) -> None:
    """A byte-level BPE vocabulary (single bytes and a few merges) in CLIP's file format."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = ["t h", "a n", "i n", "o n", "e r", "r e", "th e</w>", "a n</w>", "o f</w>"]
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer(workdir: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    source = workdir / "tokenizer-src"
    write_tiny_clip_tokenizer(source)
    return CLIPTokenizer.from_pretrained(str(source), model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """T5's unigram tokenizer over characters and a few words (no sentinel ids)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARACTERS if c != "\n"]
    pieces += [("\u2581" + word, -1.0) for word in WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def gemma_tokenizer(max_length: int = 4096):
    """Gemma's BPE tokenizer over characters, with its special tokens (Sana)."""
    from transformers import GemmaTokenizer

    vocab = {
        token: index
        for index, token in enumerate(
            (
                "<pad>",
                "<eos>",
                "<bos>",
                "<unk>",
                "<mask>",
                "<start_of_turn>",
                "<end_of_turn>",
                "\u2581",
            )
        )
    }
    for c in CHARACTERS:
        vocab.setdefault(c, len(vocab))
    merges = [("\u2581", "a"), ("\u2581", "t"), ("o", "f")]
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# Qwen-Image drops the first 34 tokens of its prompt template (the system prompt, in the real
# Qwen2 tokenizer); the tiny tokenizer knows the template's words, so it drops exactly those too.
QWEN_TEMPLATE_WORDS = (
    "system",
    "\n",
    "Describe",
    " the",
    " image",
    " by",
    " detailing",
    " the",
    " color",
    ",",
    " shape",
    ",",
    " size",
    ",",
    " texture",
    ",",
    " quantity",
    ",",
    " text",
    ",",
    " spatial",
    " relationships",
    " of",
    " the",
    " objects",
    " and",
    " background",
    ":",
    "\n",
    "user",
    "\n",
    "assistant",
)


def qwen2_tokenizer(max_length: int = 1024):
    """Qwen2's byte-level BPE with its chat special tokens, and the words of Qwen-Image's
    prompt template as whole tokens (34 tokens up to the user's text, as in the real one)."""
    from transformers import Qwen2Tokenizer

    alphabet = bytes_to_unicode()
    vocab = {c: index for index, c in enumerate(alphabet.values())}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(
        QWEN_TEMPLATE_WORDS
    ):  # each word: its byte characters merged left to right
        encoded = "".join(alphabet[b] for b in word.encode())
        for end in range(2, len(encoded) + 1):
            merge = (encoded[: end - 1], encoded[end - 1])
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(encoded[:end], len(vocab))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer
