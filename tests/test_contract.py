"""The matcher contract (matchers.py, contract.Matcher): a new matcher is one class plus one
registry line, with no change to train.py or evaluation.py; the files that must not know any
matcher do not; and the project's files import each other without cycles."""
import ast
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluation
import matchers
import train
from conftest import REPO
from helpers import tiny_dataset, train_args
from loss import ContrastiveLoss
from contract import Matcher, l2norm


class Toy(Matcher):
    """Mean-pooled region and word embeddings, scored by a dot product: the smallest matcher."""
    defaults = {"learning_rate": 0.01}

    @classmethod
    def add_options(cls, parser):
        cls.add_option(parser.add_argument_group("TOY"), "--toy_temperature", default=1.0,
                       type=float, help="scores are divided by it")

    @classmethod
    def recognise(cls, ckpt):
        return "TOY" if getattr(ckpt["opt"], "module_name", None) == "TOY" else None

    @classmethod
    def infer_flags(cls, state, opt=None):
        return {"embed_size": tuple(state[0]["weight"].shape)[0]}

    def __init__(self, opt, device=None):
        super().__init__(opt, device)
        self.img_enc = nn.Linear(opt.img_dim, opt.embed_size)
        self.txt_enc = nn.Embedding(opt.vocab_size, opt.embed_size, padding_idx=0)
        self.criterion = ContrastiveLoss(margin=opt.margin)
        self.setup()

    def modules(self):
        return [self.img_enc, self.txt_enc]

    def forward_emb(self, images, captions, lengths, **extra):
        img = l2norm(self.img_enc(images.to(self.device)).mean(1))            # (B, d)
        words = self.txt_enc(captions.to(self.device)).sum(1)                  # (C, d)
        cap = l2norm(words / torch.as_tensor(lengths, device=self.device)[:, None])
        return img, cap, lengths

    def train_loss(self, images, captions, lengths, ids=None, **extra):
        img, cap, _ = self.forward_emb(images, captions, lengths)
        loss = self.criterion(img @ cap.t() / self.opt.toy_temperature)
        self.logger.update("Loss", loss.item(), len(ids))
        return loss, loss

    def score(self, img_embs, cap_embs, cap_lens, shard_size=None, **extra):
        return (img_embs.astype(np.float64) @ cap_embs.astype(np.float64).T /
                self.opt.toy_temperature)


def test_a_new_matcher_trains_and_evaluates_through_the_contract(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(matchers.MATCHERS, "TOY", Toy)
    data_path, vocab_path = tiny_dataset(str(tmp_path))
    run = str(tmp_path / "run")
    train.main(train_args(data_path, vocab_path, run, "--module_name", "TOY",
                          "--toy_temperature", "0.5", "--num_epochs", "2", "--seed", "0"))
    ckpt = torch.load(str(tmp_path / "run" / "checkpoint" / "model_best.pth.tar"),
                      weights_only=False)
    assert ckpt["opt"].module_name == "TOY" and ckpt["opt"].toy_temperature == 0.5
    assert ckpt["opt"].learning_rate == 0.01  # the matcher's own default
    assert [sorted(sd) for sd in ckpt["model"]] == [["bias", "weight"], ["weight"]]
    capsys.readouterr()
    sims = str(tmp_path / "sims.npy")
    evaluation.main(["--model_path", str(tmp_path / "run" / "checkpoint" / "model_best.pth.tar"),
                     "--data_path", data_path, "--vocab_path", vocab_path, "--split", "test",
                     "--device", "cpu", "--save_sims", sims])
    out = capsys.readouterr().out
    rsum = float(re.search(r"rsum: ([\d.]+)", out).group(1))
    s = np.load(sims)
    assert s.shape == (10, 50)
    r = evaluation.report(s, log=lambda *a: None)
    assert rsum == pytest.approx(round(r["rsum"], 1))
    assert r["rsum"] > 60  # it learned (chance: about 23)


def test_a_flag_of_another_matcher_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(matchers.MATCHERS, "TOY", Toy)
    data_path, vocab_path = tiny_dataset(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        train.main(train_args(data_path, vocab_path, str(tmp_path / "run"), "--module_name",
                              "SGR", "--toy_temperature", "2"))
    assert e.value.code == 2
    assert "--toy_temperature 2.0: does not apply to SGR: it is an option of TOY" in \
        capsys.readouterr().err


MATCHER_FREE = ("train.py", "evaluation.py", "checks.py", "opts.py", "data.py", "errors.py",
                "runs.py", "bench.py", "outputs.py", "matrix.py", "twostage.py", "ranking.py",
                "serve.py", "cache.py")


def test_generic_files_name_no_matcher():
    names = sorted(matchers.MATCHERS, key=len, reverse=True)
    pattern = re.compile(r"\b(%s)\b|module_name\s*(==|!=|in\b)" % "|".join(names))
    for name in MATCHER_FREE:
        hits = [line for line in (REPO / name).read_text().splitlines() if pattern.search(line)]
        assert not hits, (name, hits)


def project_imports(repo=REPO):
    """{module: {project modules it imports anywhere}}: at module level, inside functions and
    under `if __name__ == "__main__":` (a script's imports make a cycle as well: running
    vocab.py imports vocab as __main__ and then, through the other module, as vocab)."""
    modules = {p.stem: p for p in repo.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[name] = deps & set(modules) - {name}
    return graph


def test_imports_are_seen_everywhere(tmp_path):
    """The graph holds an import at module level, in a function and in a main guard."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n")
    (tmp_path / "c.py").write_text('if __name__ == "__main__":\n    import a\n')
    assert project_imports(tmp_path) == {"a": {"b"}, "b": {"c"}, "c": {"a"}}


def test_no_import_cycles():
    graph = project_imports()
    assert graph["errors"] == set(), graph["errors"]  # the bottom of the project
    assert graph["outputs"] == {"errors"}, graph["outputs"]  # what a command writes: next to it
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":  # every cycle, not only the first
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(cycles)
