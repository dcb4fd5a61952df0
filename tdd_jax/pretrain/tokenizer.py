"""A CLIP-format byte-level BPE tokenizer learned from a dataset's captions.

Why our own vocabulary: the tiny SDXL's text encoders stay frozen at their random init, so what they give the
UNet is a fixed random function of the token sequence. Merging until every caption word is one token gives each
word its own random embedding for the UNet's cross-attention to learn, and keeps the embedding tables at a few
thousand rows instead of CLIP's 49,408. The files are what ``transformers.CLIPTokenizer`` reads, in CLIP's layout:
the 256 byte symbols, the same with the end-of-word marker ``</w>``, one token per merge in merge order, then
``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids (so EOS pooling by argmax of the ids works).

Words are split exactly as ``CLIPTokenizer`` splits them (its own normaliser and pre-tokeniser are used), and
the merges are learned by plain greedy BPE with a deterministic tie-break, so the same captions always give
the same files.
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77


def caption_words(captions: Iterable[str]) -> collections.Counter:
    """Byte-level words of the captions as CLIPTokenizer produces them, with their counts."""
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # empty vocabulary: only its text pipeline is used
    words: collections.Counter = collections.Counter()
    for caption in captions:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)):
            words[word] += 1
    return words


def byte_symbols() -> list[str]:
    """The 256 characters byte-level BPE uses for the bytes 0..255 (printable Latin-1 bytes stand for
    themselves, the others are mapped to code points 256 and up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def learn_merges(words: collections.Counter, max_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent symbol pair (ties: the largest pair as strings).

    Pair counts are updated incrementally, only for the words that contain the merged pair, so learning
    thousands of merges over a few thousand words takes about a second.
    """
    symbols = [list(w[:-1]) + [w[-1] + END_OF_WORD] for w in words]
    counts = list(words.values())
    pair_counts: collections.Counter = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)

    def account(i: int, sign: int) -> None:
        for pair in zip(symbols[i], symbols[i][1:]):
            pair_counts[pair] += sign * counts[i]
            if sign > 0:
                where[pair].add(i)
            elif pair_counts[pair] == 0:
                del pair_counts[pair]

    for i in range(len(symbols)):
        account(i, +1)
    merges = []
    while len(merges) < max_merges:
        if not pair_counts:
            break
        best = max(pair_counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for i in sorted(where.pop(best)):
            account(i, -1)
            merged, j, word = [], 0, symbols[i]
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    merged.append(word[j] + word[j + 1])
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            symbols[i] = merged
            account(i, +1)
    return merges


def write_clip_tokenizer(folder: str | Path, captions: Iterable[str], vocab_size: int = 8192) -> int:
    """Learn merges from ``captions`` and write vocab.json, merges.txt and tokenizer_config.json to ``folder``.

    vocab_size caps the vocabulary (512 byte tokens + merges + 2 specials); learning stops earlier once every
    word is a single token. Returns the vocabulary size written (the text encoders' ``vocab_size``).
    """
    base = byte_symbols()
    if vocab_size < 2 * len(base) + 2:
        raise ValueError(f"vocab_size={vocab_size} must be at least {2 * len(base) + 2} (byte tokens + specials)")
    merges = learn_merges(caption_words(captions), vocab_size - 2 * len(base) - 2)
    tokens = base + [s + END_OF_WORD for s in base] + list(dict.fromkeys(a + b for a, b in merges))
    tokens += [BOS, EOS]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH, "do_lower_case": True,
              "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True, help="TFDS data dir of the emoji dataset (built if missing)")
    parser.add_argument("--out", required=True, help="output folder for the tokenizer files")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=8192)
    args = parser.parse_args(argv)
    from tdd_jax.data.emoji import load_emoji

    captions = [str(c) for split in ("train", "test")
                for c in load_emoji(args.data_dir, split, args.image_size)["captions"]]
    size = write_clip_tokenizer(args.out, captions, args.vocab_size)
    print(f"tokenizer: {size} tokens from {len(captions)} captions -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
