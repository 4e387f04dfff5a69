"""The README and docs/ stay true to the code (issue 22): every relative link and #anchor of
README.md and docs/*.md resolves, and every `python X.py ...` / `torchrun ... X.py ...` command in
their fenced code blocks parses with X's own argparse parser (a renamed or removed flag fails
here). The commands are parsed, never run: placeholders such as CKPT or BERT_DIR are just
strings, and no file is checked.
"""
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 200
FIRST_SCREEN = 40  # lines

FENCE = re.compile(r"^(\s*)(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.*?)\1")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_page(text):
    """(prose lines, code blocks): the lines outside fenced code blocks (None inside them, so
    that line numbers stay), and each fenced block as (first line number, its lines)."""
    prose, blocks, block, fence = [], [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if block is None and m:
            fence, block = m.group(2), (number + 1, [])
            prose.append(None)
        elif block is not None and line.strip().startswith(fence) and \
                line.strip().strip(fence[0]) == "":
            blocks.append(block)
            block = None
            prose.append(None)
        elif block is not None:
            block[1].append(line)
            prose.append(None)
        else:
            prose.append(line)
    assert block is None, "an unclosed code block (opened at line %d)" % (block[0] - 1)
    return prose, blocks


def slug(heading):
    """GitHub's anchor of a heading: its text as rendered (no markup), lower case, every
    character but letters, digits, `_`, `-` and spaces dropped, spaces made hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[*~]|(?<!\w)_|_(?!\w)", "", text)  # emphasis
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """The #anchors a page's headings make (a repeated one gets -1, -2, ... as on GitHub)."""
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    seen, out = {}, set()
    for line in prose:
        m = HEADING.match(line) if line is not None else None
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else "%s-%d" % (base, n))
    return out


def links(path):
    """(line number, target) of every link and image of a page, outside code."""
    prose, _ = split_page(path.read_text(encoding="utf-8"))
    for number, line in enumerate(prose, 1):
        if line is None:
            continue
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, m.group(1)


def link_problem(page, target):
    """Why a relative link of `page` does not resolve (None when it does, or is external)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
        return None
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return "%s does not exist" % path_part
    if anchor:
        if dest.suffix != ".md":
            return "#%s: anchors are checked in .md pages only" % anchor
        if anchor not in anchors(dest):
            return "no heading of %s has the anchor #%s" % (dest.name, anchor)
    return None


def commands(text):
    """(line number, script, argv) of every `python X.py ...` and `torchrun ... X.py ...` in
    the fenced code blocks of a page. Comments, `\\` continuations, `&&`/`;`/`|` chains and
    leading VAR=value assignments are understood; other commands (pip, python -m) are not
    ours and are skipped."""
    _, blocks = split_page(text)
    for first, lines in blocks:
        number, pending, start = first - 1, "", None
        for line in lines:
            number += 1
            if start is None:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            full, pending = pending + line, ""
            if not re.search(r"(^|\s)(python3?|torchrun)\s", full):  # a layout, an output line
                start = None
                continue
            lexer = shlex.shlex(full, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True  # commenters stay: "# ..." is a comment
            try:
                tokens = list(lexer)
            except ValueError as e:  # an unclosed quote
                raise AssertionError("line %d: %s: %s" % (start, e, full)) from None
            segment, redirected = [], False
            for token in tokens + [";"]:
                if redirected:  # the file of a redirection
                    redirected = False
                elif token in REDIRECTIONS:
                    if segment and segment[-1].isdigit():  # 2> err.txt
                        segment.pop()
                    redirected = True
                elif token in SEPARATORS:
                    found = command_of(segment)
                    if found:
                        yield (start,) + found
                    segment = []
                else:
                    segment.append(token)
            start = None


def command_of(tokens):
    """(script, argv) of one simple command, or None when it is not one of ours."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in ("python", "python3"):
        if len(tokens) > 1 and tokens[1].endswith(".py"):
            return tokens[1], tokens[2:]
        return None  # python -m pytest, python -c ...
    if tokens[0] == "torchrun":
        for i, token in enumerate(tokens):
            if token.endswith(".py"):
                return token, tokens[i + 1:]
        raise AssertionError("a torchrun command without a script: %s" % " ".join(tokens))
    return None


def parser_of(script):
    """The argparse parser `python <script>` parses its command line with, taking flags only
    by their full names (a page should not teach an abbreviation, which a new flag can make
    ambiguous)."""
    if script == "train.py":
        parser = importlib.import_module("opts").build_parser()
    elif script == "vocab.py":
        parser = importlib.import_module("vocab").build_parser()
    else:
        parser = importlib.import_module(Path(script).stem).build_parser()
    parser.allow_abbrev = False
    return parser


def parse_problem(script, argv):
    """Why `python <script> <argv>` would be refused by its parser (None when it parses)."""
    if "/" in script or not (REPO / script).is_file():
        return "%s is not a script of this repository" % script
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if script == "demo.py":  # demo.py passes the flags it does not know to train.py
                _, rest = parser_of("demo.py").parse_known_args(argv)
                parser_of("train.py").parse_args(rest)
            else:
                parser_of(script).parse_args(argv)
    except SystemExit as e:  # --help (0), or a plain argparse parser's refusal (2)
        if e.code not in (0, None):
            return out.getvalue().strip().splitlines()[-1:] or "exit code %s" % e.code
    except Exception as e:  # noqa: BLE001 (the project's parsers raise their one-line error)
        return "%s: %s" % (type(e).__name__, e)
    return None


def page_id(path):
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    bad = ["line %d: (%s): %s" % (n, target, why) for n, target in links(page)
           for why in [link_problem(page, target)] if why]
    assert not bad, "%s:\n%s" % (page_id(page), "\n".join(bad))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_parse(page):
    bad = ["line %d: python %s %s: %s" % (n, script, " ".join(argv), why)
           for n, script, argv in commands(page.read_text(encoding="utf-8"))
           for why in [parse_problem(script, argv)] if why]
    assert not bad, "%s:\n%s" % (page_id(page), "\n".join(bad))


def test_every_script_documented_parses():
    """The pages hold commands of every script a user runs (else the test above is vacuous)."""
    scripts = {script for page in PAGES
               for _, script, _ in commands(page.read_text(encoding="utf-8"))}
    assert {"train.py", "evaluation.py", "retrieve.py", "demo.py", "bench.py", "np2h.py",
            "vocab.py", "checks.py", "synthetic.py", "serve.py"} <= scripts, sorted(scripts)


def test_readme_first_screen():
    """A newcomer's README: at most 200 lines; its first screen holds the two commands, the
    download links and an evaluation command."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    screen = "\n".join(lines[:FIRST_SCREEN])
    assert "pip install -r requirements.txt && python demo.py" in screen
    assert "python -m pytest -q tests" in screen
    assert "python evaluation.py --model_path" in screen
    assert "data.zip" in screen and "vocab.zip" in screen
    assert re.search(r"\]\(https://drive\.google\.com/", screen), "no checkpoint link"


def test_catches_a_stale_flag_and_a_broken_anchor(tmp_path):
    """The checks above can fail: a flag that no parser has (or an abbreviation), an anchor no
    heading makes, a file that is not there."""
    page = tmp_path / "page.md"
    page.write_text("# Evaluate a checkpoint\n\n[ok](#evaluate-a-checkpoint) [bad](#evaluate)"
                    " [gone](missing.md)\n\n```bash\n"
                    "CUDA_VISIBLE_DEVICES=0 python evaluation.py --model_path CKPT \\\n"
                    "    --split test --no_such_flag 1   # a comment\n"
                    "pip install x && torchrun --nproc_per_node=2 train.py --num_epochz 3\n"
                    "python demo.py --module_name SAF --sim_dim 8 --bogus\n"
                    "python retrieve.py --model_path CKPT --image 12 --top 5\n"
                    "python evaluation.py --model_path CKPT --split test --fold5 2> err.txt\n```\n",
                    encoding="utf-8")
    found = list(commands(page.read_text(encoding="utf-8")))
    assert [(n, s) for n, s, _ in found] == [(6, "evaluation.py"), (8, "train.py"),
                                             (9, "demo.py"), (10, "retrieve.py"),
                                             (11, "evaluation.py")]
    problems = [parse_problem(s, argv) for _, s, argv in found]
    assert "--no_such_flag" in str(problems[0])
    assert "--num_epochz" in str(problems[1])
    assert "--bogus" in str(problems[2])
    assert "--top" in str(problems[3])  # an abbreviation of --topk: not taught
    assert problems[4] is None
    assert found[0][2] == ["--model_path", "CKPT", "--split", "test", "--no_such_flag", "1"]
    assert [link_problem(page, t) for _, t in links(page)] == [
        None, "no heading of page.md has the anchor #evaluate", "missing.md does not exist"]


def test_slug_is_githubs():
    assert slug("Multi-GPU and multi-node") == "multi-gpu-and-multi-node"
    assert slug("How a score is computed") == "how-a-score-is-computed"
    assert slug("`--save_sims`: long runs, resumed") == "--save_sims-long-runs-resumed"
    assert slug("SGRAF + DAA (AAAI 2021, NeurIPS 2022)") == "sgraf--daa-aaai-2021-neurips-2022"
