"""Tests for vocab.py: offline tokenizer == nltk.word_tokenize, json round trip, build_vocab, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nltk
import nltk.data
import nltk.tokenize
import pytest
from nltk.tokenize.destructive import NLTKWordTokenizer

import vocab

REPO = Path(__file__).resolve().parent.parent

CAPTIONS = [
    "A man rides a bike. He wears a helmet.",
    "A man rides a bike.He wears a helmet.",
    "Two dogs play in the snow",
    "Two dogs play in the snow.",
    "Mr. Smith walks his dog in St. Louis.",
    "Dr. Jones and Mrs. Smith sit on a bench. They are talking.",
    "People gather at the U.S. Capitol at 9 a.m. on Monday.",
    "Tools, e.g. hammers and saws, lie on the table.",
    "The girl said \"cheese\" for the camera.",
    "A sign reads 'no parking' near the curb.",
    "The dog doesn't want to go, but he can't stay.",
    "They're walking; we'll follow. I'd rather stay.",
    "A well-dressed man in a black-and-white suit.",
    "A man holds a sign that says 3.5 miles.",
    "The price is $12.50 at the store.",
    "A child waits... then jumps into the pool.",
    "What a great catch! The crowd cheers.",
    "Is this a cat? No, it is a small dog.",
    "A woman (wearing a red hat) walks past a store.",
    "The dog's ball is red, and the cat's toy is blue.",
    "A man  with   two spaces walks by.",
    "A barista makes a latte at the café.",
    "A man in a jersey, no. 23, dribbles the ball.",
    "The time is 5 p.m. The sun sets over the lake.",
    "Kids play soccer in the park; one kicks the ball!",
    "A sign says: \"Welcome to N.Y.\" near the road.",
    "A dog jumps over the fence... The owner watches.",
    "Several people wait for the bus at 8:30 in the morning.",
    "A person in a T-shirt and jeans holds a 2x4 board.",
    "Two men, one in blue and one in red, shake hands.",
    "A man wearing a hat , is walking down the street .",
    "A woman rides a horse.  The horse is brown.",
    "An older man with a beard -- and a younger man -- sit together.",
    "The boys' team celebrates their win!!",
    "Jr. and Sr. members pose for a photo. Everyone smiles.",
    "A man sits by the fire at night. It is cold outside. Snow falls.",
    "",
    "   ",
    "A black dog runs\nthrough the grass.",
    "Crème brûlée is served at a café in Zürich.",
]

# Hand-checked token lists: these hold even if vocab.tokenize and the nltk path shared a bug.
EXPECTED = {
    "A man rides a bike. He wears a helmet.":
        ["a", "man", "rides", "a", "bike", ".", "he", "wears", "a", "helmet", "."],
    "Two dogs play in the snow": ["two", "dogs", "play", "in", "the", "snow"],
    "Mr. Smith walks his dog in St. Louis.":
        ["mr.", "smith", "walks", "his", "dog", "in", "st.", "louis", "."],
    "The dog doesn't want to go, but he can't stay.":
        ["the", "dog", "does", "n't", "want", "to", "go", ",", "but", "he", "ca", "n't",
         "stay", "."],
    "The girl said \"cheese\" for the camera.":
        ["the", "girl", "said", "``", "cheese", "''", "for", "the", "camera", "."],
    "A woman (wearing a red hat) walks past a store.":
        ["a", "woman", "(", "wearing", "a", "red", "hat", ")", "walks", "past", "a",
         "store", "."],
    "The dog's ball is red, and the cat's toy is blue.":
        ["the", "dog", "'s", "ball", "is", "red", ",", "and", "the", "cat", "'s", "toy",
         "is", "blue", "."],
    "What a great catch! The crowd cheers.":
        ["what", "a", "great", "catch", "!", "the", "crowd", "cheers", "."],
    "A man holds a sign that says 3.5 miles.":
        ["a", "man", "holds", "a", "sign", "that", "says", "3.5", "miles", "."],
    "A well-dressed man in a black-and-white suit.":
        ["a", "well-dressed", "man", "in", "a", "black-and-white", "suit", "."],
    "A barista makes a latte at the café.":
        ["a", "barista", "makes", "a", "latte", "at", "the", "café", "."],
    "": [],
}


def write_punkt_tab(root: Path) -> None:
    """Write English punkt_tab in the layout and format nltk's load_punkt_params reads.

    nltk.tabdata: sets are "\\n".join(items) (one item a line), tuple sets and int dicts
    are one tab-separated row a line; the reader strips one trailing "\\n" per line only.
    """
    from punkt.data import english

    d = root / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True)

    def write(name, lines):
        with open(d / name, "w", encoding="utf-8", newline="") as f:
            f.write("\n".join(lines))

    write("abbrev_types.txt", sorted(english.ABBREV_TYPES))
    write("sent_starters.txt", sorted(english.SENT_STARTERS))
    write("collocations.tab", ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)])
    write("ortho_context.tab", [f"{w}\t{n}" for w, n in english.ORTHO_CONTEXT.items()])


@pytest.fixture
def real_word_tokenize(tmp_path, monkeypatch):
    """nltk.word_tokenize, reading punkt_tab from a tmp nltk_data dir (and nothing else)."""
    write_punkt_tab(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    cached = nltk.tokenize._get_punkt_tokenizer  # lru_cache'd: forget other data dirs
    cached.cache_clear()
    try:
        yield nltk.word_tokenize
    finally:
        cached.cache_clear()


def test_tokenize_matches_nltk_word_tokenize(real_word_tokenize):
    assert len(CAPTIONS) >= 30
    # The fixture really loads the files we wrote.
    assert nltk.tokenize.sent_tokenize("a man rides a bike. he wears a helmet.") == [
        "a man rides a bike.", "he wears a helmet."]
    for caption in CAPTIONS:
        assert vocab.tokenize(caption) == real_word_tokenize(caption.lower()), caption


def test_tokenize_params_equal_nltk_loader(real_word_tokenize):
    from nltk.tokenize.punkt import PunktTokenizer

    ours = vocab.punkt_english_params()
    theirs = PunktTokenizer("english")._params
    assert ours.abbrev_types == theirs.abbrev_types
    assert ours.collocations == theirs.collocations
    assert ours.sent_starters == theirs.sent_starters
    assert dict(ours.ortho_context) == dict(theirs.ortho_context)
    assert type(ours.ortho_context) is type(theirs.ortho_context)


@pytest.mark.parametrize("caption", sorted(EXPECTED))
def test_tokenize_expected(caption):
    assert vocab.tokenize(caption) == EXPECTED[caption]


def test_sentence_split_matters():
    caption = "A man rides a bike. He wears a helmet."
    without_split = NLTKWordTokenizer().tokenize(caption.lower())
    assert "bike." in without_split  # the treebank tokenizer only splits the final period
    assert vocab.tokenize(caption) != without_split
    assert "bike" in vocab.tokenize(caption)
    # Abbreviations do not end a sentence, so their period stays attached.
    assert vocab.tokenize("Mr. Smith runs.")[:2] == ["mr.", "smith"]


VOCAB_FILES = {"f30k_precomp_vocab.json": 8481, "coco_precomp_vocab.json": 11353}


@pytest.mark.parametrize("name", sorted(VOCAB_FILES))
def test_vocab_round_trip(original_vocab, tmp_path, name):
    src = original_vocab / name
    v = vocab.deserialize_vocab(src)
    assert len(v) == VOCAB_FILES[name] == v.idx
    assert [v(w) for w in vocab.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert [v.idx2word[i] for i in range(4)] == list(vocab.SPECIAL_TOKENS)
    assert v("qwertyuiopasdf") == 3
    assert v("dog") > 3
    dest = tmp_path / name
    vocab.serialize_vocab(v, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_new_vocab_json_format(tmp_path):
    v = vocab.Vocabulary()
    for w in vocab.SPECIAL_TOKENS + ("dog",):
        v.add_word(w)
    v.add_word("dog")
    assert len(v) == 5 and v.idx == 5
    dest = tmp_path / "v.json"
    vocab.serialize_vocab(v, dest)
    d = json.loads(dest.read_text())
    assert list(d) == ["word2idx", "idx2word", "idx"]
    assert d["idx2word"] == {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "dog"}
    back = vocab.deserialize_vocab(dest)
    assert back.idx2word == v.idx2word and back.word2idx == v.word2idx
    vocab.serialize_vocab(back, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == dest.read_bytes()


def test_encode_caption():
    v = vocab.Vocabulary()
    for w in vocab.SPECIAL_TOKENS + ("a", "dog", "."):
        v.add_word(w)
    assert vocab.encode_caption(v, "A dog.") == [1, 4, 5, 6, 2]
    ids, n_oov = vocab.encode_caption_with_oov(v, "A brown dog runs.")
    assert ids == [1, 4, 3, 5, 3, 6, 2] and n_oov == 2
    assert vocab.encode_caption_with_oov(v, "") == ([1, 2], 0)


def _tiny_dataset(root: Path) -> None:
    d = root / "tiny_precomp"
    d.mkdir()
    # counts over train+dev, first-seen order: dog 4, runs 4, . 4, a 7, cat 3, café 4, the 1
    (d / "train_caps.txt").write_text(
        "Dog runs.\n  a dog runs\nA cat. \na café\n", encoding="utf-8")
    (d / "dev_caps.txt").write_text(
        "a dog runs.\nA CAT\ncat café\nA dog runs. café CAFÉ\nthe a\n", encoding="utf-8")
    (d / "test_caps.txt").write_text("zebra zebra zebra zebra zebra\n", encoding="utf-8")


def test_build_vocab(tmp_path):
    _tiny_dataset(tmp_path)
    v = vocab.build_vocab(str(tmp_path), "tiny_precomp", threshold=4)
    assert list(v.word2idx) == ["<pad>", "<start>", "<end>", "<unk>",
                                "dog", "runs", ".", "a", "café"]
    assert v.idx == len(v) == 9
    assert v("cat") == v("zebra") == v("the") == 3
    v3 = vocab.build_vocab(tmp_path, "tiny_precomp", threshold=3)
    assert list(v3.word2idx)[4:] == ["dog", "runs", ".", "a", "cat", "café"]
    only_train = vocab.build_vocab(tmp_path, "tiny_precomp", caption_file=["train_caps.txt"],
                                   threshold=2)
    assert list(only_train.word2idx)[4:] == ["dog", "runs", ".", "a"]


def test_cli(tmp_path):
    _tiny_dataset(tmp_path)
    out = tmp_path / "vocab_out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "vocab.py"), "--data_path", str(tmp_path),
         "--data_name", "tiny_precomp", "--vocab_path", str(out), "--threshold", "4"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    dest = out / "tiny_precomp_vocab.json"
    assert str(dest) in proc.stdout
    d = json.loads(dest.read_text())
    assert list(d) == ["word2idx", "idx2word", "idx"] and d["idx"] == 9
    assert list(d["word2idx"])[4:] == ["dog", "runs", ".", "a", "café"]
