"""A hand-built byte-level BPE CLIP tokenizer for the tiny demo text encoder.

No vocabulary can be downloaded here, so the tokenizer is built from the 256
byte-level characters (as ``bytes_to_unicode`` maps them), their end-of-word forms,
a few merges of common English pairs and the two CLIP special tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Merges applied in this order; every product becomes a vocabulary entry.
MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("a", "t</w>"),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP mapping of every byte to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def demo_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of the demo tokenizer; the two specials come last."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in MERGES] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, list(MERGES)


def build_tokenizer() -> CLIPTokenizer:
    """The demo ``CLIPTokenizer`` (77 tokens, padding with the end-of-text token)."""
    from transformers import CLIPTokenizer

    vocab, merges = demo_vocab()
    # The backend takes merges as pairs although the annotation says strings.
    pairs: Any = merges
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=MODEL_MAX_LENGTH)


def special_ids() -> tuple[int, int]:
    """``(bos_id, eos_id)``; the text encoder's config must use the same ids."""
    vocab, _ = demo_vocab()
    return vocab[BOS], vocab[EOS]
