# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""Build the real CLIP BPE tokenizer offline, from the vocabulary file that `open_clip_torch` ships.

The full tokenizer gives OpenAI CLIP's ids (`"a photo of a cat"` -> 49406, 320, 1125, 539, 320, 2368, 49407), i.e. the
tokenizer of `openai/clip-vit-large-patch14`, without downloading anything.
"""

import gzip
import importlib.util
from pathlib import Path
from typing import Dict, List, Optional

from transformers import CLIPTokenizer


BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_CLIP_MERGES = 48894  # 49408 tokens = 512 byte tokens + 48894 merges + 2 special tokens


def open_clip_bpe_path() -> Path:
    """Path of the BPE merges file inside the installed `open_clip` package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Building the CLIP tokenizer offline needs `open_clip_torch`: pip install open_clip_torch")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"open_clip is installed but {path} is missing")
    return path


def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in CLIP's token order: the printable Latin-1 bytes map to
    themselves and come first; the remaining bytes follow in byte order, mapped to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    mapping = {byte: chr(byte) for byte in printable}
    mapping.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return mapping


def clip_vocab_and_merges(num_merges: int = NUM_CLIP_MERGES) -> (Dict[str, int], List[tuple]):
    """CLIP's vocabulary and merge list, truncated to the first `num_merges` merges (a smaller, still byte-complete
    tokenizer for tests)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    if not 0 <= num_merges <= NUM_CLIP_MERGES:
        raise ValueError(f"num_merges must be in [0, {NUM_CLIP_MERGES}], got {num_merges}")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]  # line 0 is a header
    byte_tokens = list(byte_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(
    num_merges: int = NUM_CLIP_MERGES, model_max_length: int = 77, pad_token: Optional[str] = None
) -> CLIPTokenizer:
    """
    The CLIP tokenizer (lower-cased byte-level BPE), built offline.

    Args:
        num_merges (`int`, defaults to 48894): Keep only the first merges; the default is the full OpenAI vocabulary
            (49408 tokens, bos 49406, eos 49407).
        model_max_length (`int`, defaults to 77): Padding/truncation length.
        pad_token (`str`, *optional*): Defaults to `<|endoftext|>` as in `openai/clip-vit-large-patch14`; open_clip
            models pad with `"!"`.
    """
    vocab, merges = clip_vocab_and_merges(num_merges)
    return CLIPTokenizer(
        vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad_token or "<|endoftext|>"
    )
