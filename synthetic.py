"""A small synthetic image-text dataset in the SCAN precomputed format, made from a seed.

So that SGRAF can be trained and evaluated in minutes on a laptop CPU without downloading
Flickr30K/COCO features, and so that tests have data that looks like the real thing.

The generative story. There are 44 visual concepts, each with a fixed random direction in
feature space (sparse, non-negative, drawn from the seed): 10 subjects (man, dog, ...),
16 objects (bike, ball, ...), 8 colours and 10 scenes (beach, tree, ...). An image has a
subject (one, or two instances), usually an object, often coloured, and usually a scene:
2 to 4 concepts, a combination that is unique within its split while the combinations last.
Each concept is carried by 1-3 of the 36 regions (strength * direction + a little noise; a
colour shares the regions of its object); the other regions are background: ReLU noise,
sometimes holding an unnamed "clutter" object that no caption mentions. Regions come in a
random order. Each image gets five captions written independently from varied English
templates: each names the subject and at least one other concept of the image (synonyms
and plurals included), with filler words, 6-20 tokens, random capitalisation and
punctuation. So a caption word points at a few regions, as cross-attention expects.

Layout written (what data.py reads): `<data_path>/<data_name>/{split}_ims.npy` float32
(N, n_regions, img_dim) and `{split}_caps.txt` (5 captions per image, lines 5i..5i+4 describe
image i) for train, dev, test and optionally testall (test is the first n_test images of
testall: both come from one generator stream), `synthetic.json` (the arguments), and
`<vocab_path>/<data_name>_vocab.json` built by vocab.build_vocab. Real BUTD features have
img_dim 2048; the default here is 256 for speed (train with `--img_dim 256`).

The bytes depend only on the arguments (numpy's PCG64 streams). Each split has its own
streams, so changing one split's size leaves the others unchanged, and captions do not
depend on img_dim.

CLI: `python synthetic.py --data_path data --data_name synth_precomp --vocab_path vocab`.
"""
import argparse
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

import errors
import outputs

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test", "testall")
# testall shares test's streams, so test is a prefix of testall.
_SPLIT_STREAM = {"train": 0, "dev": 1, "test": 2, "testall": 2}

DEFAULTS = dict(n_train=2000, n_dev=100, n_test=200, n_testall=0, img_dim=256, n_regions=36)

# ---------------------------------------------------------------------------
# Concepts and words
# ---------------------------------------------------------------------------

# Subjects: (singular forms, plural forms). The first form is the concept's name.
SUBJECTS = [
    (("man", "guy"), ("men", "guys")),
    (("woman", "lady"), ("women", "ladies")),
    (("boy",), ("boys",)),
    (("girl",), ("girls",)),
    (("child", "kid"), ("children", "kids")),
    (("dog", "puppy"), ("dogs", "puppies")),
    (("cat", "kitten"), ("cats", "kittens")),
    (("player", "athlete"), ("players", "athletes")),
    (("horse", "pony"), ("horses", "ponies")),
    (("worker",), ("workers",)),
]

# Objects: (forms, verbs). A verb is (3rd person singular, plural, -ing), with its
# preposition if any.
OBJECTS = [
    (("bike", "bicycle"), [("rides", "ride", "riding"), ("pushes", "push", "pushing")]),
    (("ball",), [("plays with", "play with", "playing with"), ("kicks", "kick", "kicking"),
                 ("chases", "chase", "chasing")]),
    (("car",), [("walks past", "walk past", "walking past"), ("washes", "wash", "washing")]),
    (("frisbee",), [("throws", "throw", "throwing"), ("catches", "catch", "catching")]),
    (("skateboard",), [("rides", "ride", "riding"), ("carries", "carry", "carrying")]),
    (("surfboard",), [("carries", "carry", "carrying"), ("holds", "hold", "holding")]),
    (("umbrella",), [("holds", "hold", "holding"), ("carries", "carry", "carrying")]),
    (("kite",), [("flies", "fly", "flying")]),
    (("bench",), [("sits on", "sit on", "sitting on"), ("rests on", "rest on", "resting on")]),
    (("bag", "backpack"), [("carries", "carry", "carrying"), ("holds", "hold", "holding")]),
    (("hat",), [("wears", "wear", "wearing")]),
    (("guitar",), [("plays", "play", "playing"), ("holds", "hold", "holding")]),
    (("boat",), [("sits in", "sit in", "sitting in"), ("looks at", "look at", "looking at")]),
    (("truck",), [("walks past", "walk past", "walking past"),
                  ("looks at", "look at", "looking at")]),
    (("balloon",), [("holds", "hold", "holding")]),
    (("book",), [("reads", "read", "reading"), ("holds", "hold", "holding")]),
]
# Any subject may relate to any object this way too.
GENERIC_VERBS = [("stands next to", "stand next to", "standing next to"),
                 ("looks at", "look at", "looking at"),
                 ("is near", "are near", "near")]

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "pink"]

# Scenes: (words that name the concept, prepositional phrases).
SCENES = [
    (("grass", "grassy", "lawn"), ["on the grass", "in the grass", "on a grassy lawn"]),
    (("beach", "sand"), ["on the beach", "at the beach", "on the sand"]),
    (("street",), ["on the street", "on a city street", "down the street"]),
    (("park",), ["in the park", "at a park"]),
    (("snow", "snowy"), ["in the snow", "on a snowy hill"]),
    (("water", "lake"), ["in the water", "near the water", "by the lake"]),
    (("field",), ["in a field", "across a field", "in an open field"]),
    (("tree",), ["near a tree", "under a tree", "next to a large tree"]),
    (("building",), ["in front of a building", "outside a building"]),
    (("fence",), ["by a fence", "near a wooden fence"]),
]

INTRANSITIVE = [("stands", "stand", "standing"), ("sits", "sit", "sitting"),
                ("walks", "walk", "walking"), ("runs", "run", "running"),
                ("waits", "wait", "waiting"), ("poses", "pose", "posing"),
                ("plays", "play", "playing")]
SUBJECT_ADJ = ["young", "little", "happy"]
ADVERBS = ["happily", "quietly", "slowly"]
FILLERS = ["on a sunny day", "during the day", "in the afternoon", "outside",
           "for the camera", "while others watch", "at sunset"]
PLURAL_FILLERS = ["together"]

N_SUBJ, N_OBJ, N_COL, N_SCENE = len(SUBJECTS), len(OBJECTS), len(COLOURS), len(SCENES)
# Concept ids: subjects, then objects, colours, scenes.
SUBJ0, OBJ0, COL0, SCENE0 = 0, N_SUBJ, N_SUBJ + N_OBJ, N_SUBJ + N_OBJ + N_COL
N_CONCEPTS = SCENE0 + N_SCENE
N_CLUTTER = 24  # unnamed objects of the background

# Feature magnitudes. A direction has RMS 1 per dimension over img_dim (sparse, so larger
# on its support); background regions are relu(N(0, 1)), RMS 0.71.
_SUPPORT = 0.125          # fraction of dimensions a concept direction uses
_STRENGTH = (0.8, 1.2)    # of a subject/object/scene in a region that carries it
_COLOUR_STRENGTH = (0.5, 0.8)
_CLUTTER_STRENGTH = (0.5, 1.0)
_CLUTTER_P = 0.4          # chance a background region holds a clutter object
_REGION_NOISE = 0.5       # scale of the relu noise left in a concept region


def _directions(rng, n, img_dim):
    """(n, img_dim) sparse non-negative directions with RMS 1 per dimension."""
    k = max(1, int(round(_SUPPORT * img_dim)))
    dirs = np.zeros((n, img_dim), np.float32)
    for i in range(n):
        support = rng.choice(img_dim, size=k, replace=False)
        dirs[i, support] = np.abs(rng.standard_normal(k, dtype=np.float32))
    dirs *= np.float32(np.sqrt(img_dim)) / np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs


def concept_directions(seed=0, img_dim=DEFAULTS["img_dim"]):
    """(N_CONCEPTS, img_dim) float32: the feature direction of each concept."""
    return _directions(np.random.default_rng([seed, 0, 0]), N_CONCEPTS, img_dim)


def _clutter_directions(seed, img_dim):
    return _directions(np.random.default_rng([seed, 0, 1]), N_CLUTTER, img_dim)


# ---------------------------------------------------------------------------
# Image contents and captions
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Content:
    """What an image shows. object/colour/scene are indices into their lists, or None."""
    subject: int
    count: int  # 1 or 2 instances of the subject
    object: int = None
    colour: int = None
    scene: int = None

    def concepts(self):
        """Concept ids shown, in the order subject, object, colour, scene."""
        ids = [SUBJ0 + self.subject]
        if self.object is not None:
            ids.append(OBJ0 + self.object)
        if self.colour is not None:
            ids.append(COL0 + self.colour)
        if self.scene is not None:
            ids.append(SCENE0 + self.scene)
        return ids


def _sample_content(rng):
    subject = int(rng.integers(N_SUBJ))
    count = 2 if rng.random() < 0.25 else 1
    obj = colour = scene = None
    if rng.random() < 0.8:
        obj = int(rng.integers(N_OBJ))
        if rng.random() < 0.65:
            colour = int(rng.integers(N_COL))
    if obj is None or rng.random() < 0.75:
        scene = int(rng.integers(N_SCENE))
    return Content(subject, count, obj, colour, scene)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def _caption(rng, c):
    """One English-like caption of content c, naming the subject and >= 1 other concept."""
    plural = c.count == 2
    mention_obj = c.object is not None and rng.random() < 0.85
    mention_scene = c.scene is not None and rng.random() < 0.7
    if not (mention_obj or mention_scene):  # a caption names at least two concepts
        if c.object is not None and (c.scene is None or rng.random() < 0.5):
            mention_obj = True
        else:
            mention_scene = True
    vi = 1 if plural else 0  # verb form: 3rd singular or plural
    aux = "are" if plural else "is"

    sing, plur = SUBJECTS[c.subject]
    noun = _pick(rng, plur if plural else sing)
    adj = _pick(rng, SUBJECT_ADJ) + " " if rng.random() < 0.2 else ""
    if plural:
        subj = ("two " if rng.random() < 0.8 else "a couple of ") + adj + noun
    else:
        subj = _article(adj or noun) + " " + adj + noun

    obj = verb = ""
    if mention_obj:
        forms, verbs = OBJECTS[c.object]
        obj = _pick(rng, forms)
        if c.colour is not None and rng.random() < 0.75:
            obj = COLOURS[c.colour] + " " + obj
        obj = _article(obj) + " " + obj
        verb = _pick(rng, verbs if rng.random() < 0.8 else GENERIC_VERBS)
    else:
        verb = _pick(rng, INTRANSITIVE)
    place = _pick(rng, SCENES[c.scene][1]) if mention_scene else ""
    adv = _pick(rng, ADVERBS) + " " if rng.random() < 0.15 else ""
    ing = verb[2] if verb[2] != "near" else "standing near"

    t = int(rng.integers(6))
    if t == 0:
        parts = [subj, adv + verb[vi], obj, place]
    elif t == 1:
        parts = [subj, aux, adv + ing, obj, place]
    elif t == 2 and place:
        parts = [place + ",", subj, verb[vi], obj]
    elif t == 3:
        parts = ["there", aux, subj, ing, obj, place]
    elif t == 4 and obj:
        parts = [subj, "with", obj, place]
    elif t == 4 and place:
        parts = ["there", aux, subj, place]
    else:
        parts = [_pick(rng, ["a photo of", "an image of", "a picture of"]), subj, ing, obj,
                 place]
    words = " ".join(p for p in parts if p).split()

    if rng.random() < 0.3 or len(words) < 6:
        fillers = FILLERS + (PLURAL_FILLERS if plural else [])
        while True:
            words += _pick(rng, fillers).split()
            if len(words) >= 6:
                break
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    end = rng.random()
    if end < 0.35:
        text += " ."
    elif end < 0.65:
        text += "."
    return text


def _sample_contents(rng, n):
    """n contents, unique within the split (ignoring count) while 200 draws find one, and
    their 5 captions each. Image by image, so the first m of n are the m of a shorter run."""
    seen, contents, captions = set(), [], []
    for _ in range(n):
        for _ in range(200):
            c = _sample_content(rng)
            key = (c.subject, c.object, c.colour, c.scene)
            if key not in seen:
                break
        seen.add(key)
        contents.append(c)
        captions += [_caption(rng, c) for _ in range(5)]
    return contents, captions


def _image(rng, c, dirs, clutter, n_regions):
    """(n_regions, img_dim) float32 features of content c."""
    img_dim = dirs.shape[1]
    feats = np.maximum(rng.standard_normal((n_regions, img_dim), dtype=np.float32), 0)
    # (concept ids, n regions): the colour rides on the object's regions.
    groups = [([SUBJ0 + c.subject], int(rng.integers(1, 3)) + c.count - 1)]
    if c.object is not None:
        ids = [OBJ0 + c.object] + ([COL0 + c.colour] if c.colour is not None else [])
        groups.append((ids, int(rng.integers(1, 3))))
    if c.scene is not None:
        groups.append(([SCENE0 + c.scene], int(rng.integers(1, 4))))
    order = rng.permutation(n_regions)
    used = 0
    for ids, k in groups:
        for r in order[used:used + k]:
            x = feats[r] * np.float32(_REGION_NOISE)
            for cid in ids:
                lo, hi = _COLOUR_STRENGTH if COL0 <= cid < SCENE0 else _STRENGTH
                x += np.float32(rng.uniform(lo, hi)) * dirs[cid]
            feats[r] = x
        used += k
    for r in order[used:]:
        if rng.random() < _CLUTTER_P:
            feats[r] += np.float32(rng.uniform(*_CLUTTER_STRENGTH)) * _pick(rng, clutter)
    return feats


@dataclass
class Split:
    ims: np.ndarray   # (N, n_regions, img_dim) float32
    captions: list    # 5 N strings
    contents: list    # N Content


def generate_split(split, n_images, seed=0, img_dim=DEFAULTS["img_dim"],
                   n_regions=DEFAULTS["n_regions"]):
    """One split in memory; make_synthetic writes exactly this."""
    stream = _SPLIT_STREAM[split]
    text_rng = np.random.default_rng([seed, 1, stream])
    feat_rng = np.random.default_rng([seed, 2, stream])
    contents, captions = _sample_contents(text_rng, n_images)
    dirs, clutter = concept_directions(seed, img_dim), _clutter_directions(seed, img_dim)
    ims = np.empty((n_images, n_regions, img_dim), np.float32)
    for i, c in enumerate(contents):
        ims[i] = _image(feat_rng, c, dirs, clutter, n_regions)
    return Split(ims, captions, contents)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def _atomic_write(dest, write):
    """Call write(binary file) on a partial file next to dest, then rename it to dest
    (outputs.atomic_output: a killed run's partial file is removed by the next write there),
    recorded as synthetic.py's."""
    with outputs.atomic_output(dest, "synthetic.py") as tmp, open(tmp, "wb") as f:
        write(f)


def _paths(data_path, data_name, split):
    loc = os.path.join(data_path, data_name)
    return (os.path.join(loc, "%s_ims.npy" % split), os.path.join(loc, "%s_caps.txt" % split))


def vocab_file(vocab_path, data_name):
    return os.path.join(vocab_path, "%s_vocab.json" % data_name)


# a subject (up to 3 regions), an object (up to 2) and a scene (up to 3) in one image
MIN_REGIONS = 8


def check_synthetic(data_path, data_name="synth_precomp", vocab_path=None, seed=0,
                    n_train=DEFAULTS["n_train"], n_dev=DEFAULTS["n_dev"],
                    n_test=DEFAULTS["n_test"], n_testall=DEFAULTS["n_testall"],
                    img_dim=DEFAULTS["img_dim"], n_regions=DEFAULTS["n_regions"],
                    overwrite=False, vocab_threshold=4):
    """What make_synthetic checks before it writes anything (raises a errors.SGRAFError): the
    arguments, and where it writes. Files that exist are kept only when they are synthetic
    data made with the same arguments; another dataset (no synthetic.json), synthetic data
    made with other arguments, or a vocabulary that this data did not make, are refused
    unless `overwrite` (mixing them would give a dataset that fits no checkpoint). Returns the
    arguments as synthetic.json records them."""
    opt = argparse.Namespace(seed=seed, n_train=n_train, n_dev=n_dev, n_test=n_test,
                             n_testall=n_testall, img_dim=img_dim, n_regions=n_regions,
                             vocab_threshold=vocab_threshold)
    errors.check_positive(opt, ["n_train", "n_dev", "n_test", "img_dim", "vocab_threshold"])
    errors.check_nonnegative(opt, ["n_testall", "seed"])
    errors.check_min(opt, "n_regions", MIN_REGIONS,
                     "an image shows up to %d regions of named concepts" % MIN_REGIONS)
    errors.check_data_name(data_name, data_path)
    errors.check_dir(data_path, "--data_path %s" % data_path, exists=False,
                     expected="the directory to hold <data_name>/ (created if missing)")
    if vocab_path is not None:
        errors.check_dir(vocab_path, "--vocab_path %s" % vocab_path, exists=False,
                         expected="the directory to hold <data_name>_vocab.json (created if "
                                  "missing)")
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    if n_testall:
        sizes["testall"] = n_testall
    args = dict(seed=seed, sizes=sizes, img_dim=img_dim, n_regions=n_regions,
                vocab_threshold=vocab_threshold)
    data_dir = os.path.join(data_path, data_name)
    meta_path = os.path.join(data_dir, "synthetic.json")
    for split in sizes:
        for path in _paths(data_path, data_name, split):
            errors.check_not_dir(path, path, expected="a file: move the directory away")
    if not overwrite and os.path.isdir(data_dir):
        if os.path.isfile(meta_path):
            try:
                with open(meta_path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
            if old != args:
                diff = ("an unreadable synthetic.json" if not isinstance(old, dict) else
                        ", ".join("%s %s" % (k, old.get(k)) for k in args
                                  if old.get(k) != args[k]) or "other arguments")
                raise errors.error("synthetic_mismatch", data_dir, diff=diff)
        else:
            found = sorted(n for n in os.listdir(data_dir)
                           if n.endswith(("_ims.npy", "_caps.txt", ".h5")))
            if found:
                raise errors.error("dataset_foreign", data_dir, found=", ".join(found[:3]) + (
                    " ..." if len(found) > 3 else ""))
    if vocab_path is not None:
        dest = vocab_file(vocab_path, data_name)
        if not (os.path.isfile(dest) and _unmarked_own_vocab(dest, data_path, data_name,
                                                             meta_path, args)):
            record = outputs.check_output_file(dest, made_by="synthetic.py",
                                               overwrite=overwrite,
                                               alternative="another --vocab_path")
            if record and not overwrite and record.get("data") != _data_id(data_dir, args):
                raise errors.error("file_exists", dest, alternative="another --vocab_path",
                                   detail=" (made by synthetic.py for other data)")
    return args


def _unmarked_own_vocab(dest, data_path, data_name, meta_path, args):
    """A vocabulary that carries no record (written before records existed) beside synthetic
    data made with these arguments, whose bytes are those that this data gives: it is this
    data's own (make_synthetic records it)."""
    if outputs.made_record(dest) or not os.path.isfile(meta_path):
        return False
    try:
        with open(meta_path, encoding="utf-8") as f:
            if json.load(f) != args:
                return False
    except (OSError, ValueError):
        return False
    from vocab import build_vocab, serialize_vocab  # vocab imports nltk: only here
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        serialize_vocab(build_vocab(data_path, data_name, threshold=args["vocab_threshold"]),
                        os.path.join(tmp, "v.json"))
        with open(os.path.join(tmp, "v.json"), "rb") as a, open(dest, "rb") as b:
            return a.read() == b.read()


def _data_id(data_dir, args):
    """What a synthetic vocabulary was made from: the data's directory and arguments."""
    return {"data_dir": os.path.abspath(data_dir), "args": args}


def make_synthetic(data_path, data_name="synth_precomp", vocab_path=None, seed=0,
                   n_train=DEFAULTS["n_train"], n_dev=DEFAULTS["n_dev"],
                   n_test=DEFAULTS["n_test"], n_testall=DEFAULTS["n_testall"],
                   img_dim=DEFAULTS["img_dim"], n_regions=DEFAULTS["n_regions"],
                   overwrite=False, vocab_threshold=4):
    """Write the dataset (and, when vocab_path is given, its vocab json); files that exist
    are kept unless overwrite (after check_synthetic: only the same synthetic data's). testall
    is written only when n_testall > 0.

    Returns {"data_dir", "vocab_file" (None without vocab_path), "written": [paths],
    "skipped": [paths], "sizes": {split: n_images}, "img_dim", "n_regions", "seconds"}.
    """
    t0 = time.perf_counter()
    args = check_synthetic(data_path, data_name, vocab_path, seed, n_train, n_dev, n_test,
                           n_testall, img_dim, n_regions, overwrite, vocab_threshold)
    sizes = args["sizes"]
    data_dir = os.path.join(data_path, data_name)
    os.makedirs(data_dir, exist_ok=True)
    meta_path = os.path.join(data_dir, "synthetic.json")

    written, skipped = [], []

    def keep(path):
        if os.path.exists(path) and not overwrite:
            skipped.append(path)
            return True
        return False

    for split, n in sizes.items():
        ims_path, caps_path = _paths(data_path, data_name, split)
        keep_ims, keep_caps = keep(ims_path), keep(caps_path)
        if keep_ims and keep_caps:
            continue
        data = generate_split(split, n, seed, img_dim, n_regions)
        if not keep_ims:
            _atomic_write(ims_path, lambda f: np.save(f, data.ims, allow_pickle=False))
            written.append(ims_path)
        if not keep_caps:
            text = "".join(c + "\n" for c in data.captions).encode("utf-8")
            _atomic_write(caps_path, lambda f: f.write(text))
            written.append(caps_path)
        logger.info("%s: %d images, %d captions", split, n, len(data.captions))

    meta = (json.dumps(args, indent=1) + "\n").encode("utf-8")
    if not keep(meta_path):
        _atomic_write(meta_path, lambda f: f.write(meta))
        written.append(meta_path)

    vocab_dest = None
    if vocab_path is not None:
        vocab_dest = vocab_file(vocab_path, data_name)
        if os.path.isfile(vocab_dest) and not overwrite and not outputs.made_record(vocab_dest):
            # this data's own vocabulary from before records existed (check_synthetic)
            outputs.mark_made(vocab_dest, "synthetic.py", data=_data_id(data_dir, args))
        if not keep(vocab_dest):
            from vocab import build_vocab, serialize_vocab  # vocab imports nltk: only here
            os.makedirs(vocab_path, exist_ok=True)
            vocab = build_vocab(data_path, data_name, threshold=vocab_threshold)
            serialize_vocab(vocab, vocab_dest, made_by="synthetic.py",
                            data=_data_id(data_dir, args))
            written.append(vocab_dest)
    seconds = time.perf_counter() - t0
    for path in skipped:
        logger.info("kept existing %s", path)
    logger.info("synthetic data in %s (%.1f s)", data_dir, seconds)
    return dict(data_dir=data_dir, vocab_file=vocab_dest, written=written, skipped=skipped,
                sizes=sizes, img_dim=img_dim, n_regions=n_regions, seconds=seconds)


def build_parser():
    p = errors.ArgumentParser(prog="synthetic.py",
                              description="Write a small synthetic SCAN-format dataset.")
    p.add_argument("--data_path", default="data")
    p.add_argument("--data_name", default="synth_precomp")
    p.add_argument("--vocab_path", default="vocab")
    p.add_argument("--seed", type=int, default=0)
    for name in ("n_train", "n_dev", "n_test", "n_testall"):
        p.add_argument("--" + name, type=int, default=DEFAULTS[name],
                       help="images in the split" + (" (0: no testall)" if name == "n_testall"
                                                     else ""))
    p.add_argument("--img_dim", type=int, default=DEFAULTS["img_dim"],
                   help="region feature size (real BUTD features: 2048)")
    p.add_argument("--n_regions", type=int, default=DEFAULTS["n_regions"])
    p.add_argument("--vocab_threshold", type=int, default=4)
    p.add_argument("--overwrite", action="store_true",
                   help="remake files that exist (data and vocabulary), whoever made them")
    return p


@errors.exit_on_error
def main(argv=None):
    opt = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_synthetic(opt.data_path, opt.data_name, opt.vocab_path, seed=opt.seed,
                         n_train=opt.n_train, n_dev=opt.n_dev, n_test=opt.n_test,
                         n_testall=opt.n_testall, img_dim=opt.img_dim,
                         n_regions=opt.n_regions, overwrite=opt.overwrite,
                         vocab_threshold=opt.vocab_threshold)
    print("Wrote %d files (%d kept) in %.1f s: %s" % (len(out["written"]), len(out["skipped"]),
                                                      out["seconds"], out["data_dir"]))


if __name__ == "__main__":
    main()
