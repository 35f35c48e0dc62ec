"""Rebuild the GPT-2 byte-level BPE tokenizer offline from the rank file openai-whisper ships (gpt2.tiktoken).

    pip download --no-deps --no-binary :all: openai-whisper -d /tmp/whisper
    python benchmarks/cross_tokenizer/build_gpt2_tokenizer.py /tmp/whisper/openai_whisper-*.tar.gz -o tokenizers/gpt2

The rank file lists every token as base64 bytes with its rank; ranks 0-255 are the single bytes and each later
token was made by one merge of two earlier tokens. The merge of a token is found by running byte-level BPE on its
bytes with only the lower ranks allowed: the two parts left are the merge. Tokens are written in GPT-2's spelling
(each byte as a printable character), giving vocab.json and merges.txt (merges in rank order) plus
<|endoftext|> = 50256, then saved as a fast tokenizer with the GPT-2 pre-tokenizer. The script checks the result on
sample text against a direct rank-based BPE of the same bytes.
"""

from __future__ import annotations

import argparse
import base64
import json
import tarfile
from pathlib import Path

from distil.cross_tokenizer.vocabulary import byte_level_alphabet

# GPT-2's pre-tokenization pattern (contractions, letters, digits, other symbols, whitespace).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def read_ranks(source: Path) -> dict[bytes, int]:
    if source.suffix == ".tiktoken":
        text = source.read_text()
    else:
        with tarfile.open(source) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            text = archive.extractfile(member).read().decode()
    ranks = {}
    for line in text.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-level BPE of `token` using only merges whose result ranks below `below` (lowest rank first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < below and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def build(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    to_char = {byte: ch for ch, byte in byte_level_alphabet().items()}

    def spell(data: bytes) -> str:
        return "".join(to_char[b] for b in data)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank
        if len(token) > 1:
            parts = bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise SystemExit(f"token {token!r} (rank {rank}) is not one merge of two earlier tokens: {parts}")
            merges.append((spell(parts[0]), spell(parts[1])))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the openai-whisper sdist (.tar.gz) or a gpt2.tiktoken file")
    parser.add_argument("--output-dir", "-o", type=Path, required=True)
    args = parser.parse_args()

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks = read_ranks(args.source)
    vocab, merges = build(ranks)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (args.output_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)
    tokenizer.save_pretrained(args.output_dir)

    import regex  # the \p{L} classes of GPT2_PATTERN

    sample = "It is a truth universally acknowledged, that a single man in possession of a good fortune... 日本語 café 12345"
    reference = [ranks[p] for piece in regex.findall(GPT2_PATTERN, sample)
                 for p in bpe_parts(piece.encode(), ranks, len(ranks))]
    got = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if got != reference:
        raise SystemExit(f"the rebuilt tokenizer disagrees with rank-based BPE on the sample: {got} vs {reference}")
    print(f"GPT-2 tokenizer written to {args.output_dir}: {len(vocab)} tokens, {len(merges)} merges; sample of "
          f"{len(got)} tokens matches rank-based BPE.")


if __name__ == "__main__":
    main()
