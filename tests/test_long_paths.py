"""An error line naming a long path stays within 300 characters and keeps its problem and its
fix: the path is shortened in the middle (`/very/long/…/run/model_best.pth.tar`), never the
explanation (issue 22)."""
import os
import re
import shutil
import string

import pytest

import errors
import train
from test_bad_input import Work, base  # noqa: F401

LIMIT = 300
# fields that name a file or a directory in the messages
PATH_FIELDS = {"path", "latest", "parent", "above", "last", "features", "images", "owner",
               "inside", "default", "head"}


def long_path(n=250, name="model_best.pth.tar"):
    """An absolute path of exactly n characters, ending in `name`."""
    head = ("/very/long" + "/directory" * (n // 10))[:n - len(name) - 1]
    if head.endswith("/"):
        head = head[:-1] + "x"
    return head + "/" + name


def fields_of(key, path):
    """Values for every field of a problem's templates: `path` for those that name files, short
    values of the right type for the rest."""
    p = errors.PROBLEMS[key]
    values = {}
    for _, name, spec, _ in string.Formatter().parse(p.problem + p.fix):
        if not name or name == "where":
            continue
        if spec and spec[-1] in "dfgeix%":
            values[name] = 7
        else:
            values[name] = path if name in PATH_FIELDS else "x"
    return values


def literal_parts(template):
    """The text of a template between its fields: what must be in every rendered line."""
    return [t.strip() for t in re.split(r"\{[^}]*\}", template) if t.strip()]


def test_shorten_path_keeps_head_and_file_name():
    path = long_path(250)
    short = errors.shorten_path(path, 40)
    assert len(short) <= 40 and "…" in short
    assert short.startswith("/very/") and short.endswith("/model_best.pth.tar")
    assert errors.shorten_path("/a/b.txt", 40) == "/a/b.txt"


@pytest.mark.parametrize("key", sorted(errors.PROBLEMS))
def test_a_long_path_keeps_the_problem_and_the_fix(key):
    """Every problem (warnings and reports are logged through the same `message`), its
    `where` and each field that names a file a 250-character path."""
    path = long_path(250)
    assert len(path) == 250
    line = "error: " + errors.message(key, path, **fields_of(key, path))
    assert len(line) <= LIMIT, (len(line), line)
    p = errors.PROBLEMS[key]
    for part in literal_parts(p.problem) + literal_parts(p.fix):
        assert part in line, (part, line)


@pytest.mark.parametrize("key,fields,kept", [
    ("ckpt_mismatch", dict(diff="--module_name SAF in the checkpoint, --module_name SGR from the "
                           "flags; 18 keys missing, 7 keys unexpected",
                           flags="--module_name SAF"),
     "--module_name SAF in the checkpoint, --module_name SGR from the flags"),
    ("run_exists", dict(found="model_best.pth.tar and checkpoint_3.pth.tar",
                        latest="checkpoint_3.pth.tar"),
     "model_best.pth.tar and checkpoint_3.pth.tar"),
    ("vocab_missing", dict(name="f30k_precomp_vocab.json", data_name="f30k_precomp"),
     "f30k_precomp_vocab.json"),
])
def test_the_descriptive_fields_stay_whole(key, fields, kept):
    """A long path is shortened before the explanation is: the fields that say what differs
    stay whole."""
    line = "error: %s" % errors.error(key, "--resume " + long_path(250), **fields)
    assert len(line) <= LIMIT and kept in line and "…" in line, line


def test_resume_from_a_checkpoint_at_a_long_path(base, tmp_path, capsys):  # noqa: F811
    """The issue's case: `train.py --resume` of another matcher's checkpoint at a 240-character
    path printed a 393-character line that kept the path and cut the explanation."""
    shutil.copytree(base, tmp_path / "w")
    work = Work(tmp_path / "w")
    deep = str(tmp_path / "w" / "ckpt")
    while len(deep) < 240 - len("/SAF.pth.tar"):
        deep = os.path.join(deep, "d" * min(60, 240 - len("/SAF.pth.tar") - len(deep) - 1))
    os.makedirs(deep)
    resume = os.path.join(deep, "SAF.pth.tar")
    shutil.copyfile(work.saf, resume)
    assert len(resume) >= 240
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(work.train_args("--resume", resume))
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and len(lines[0]) <= LIMIT, lines
    assert "--module_name SAF in the checkpoint, --module_name SGR from the flags" in lines[0]
    assert lines[0].endswith("pass --module_name SAF (the flags it was trained with)")
    assert "/SAF.pth.tar" in lines[0] and "…" in lines[0]
