"""HREM (hrem.py) against the original code's outputs (tests/fixtures/hrem_ref/hrem_small_seed1,
a tiny seeded BERT): strict checkpoint loading, the WordPiece tokenisation of the recorded
captions, evaluation embeddings, similarities and R@K, the training augmentations of the
recorded batch, and one training step with the instance-level graph losses active (every loss
term, the connection and relevance matrices, the negative draws, the pre-clip gradients, and
the state after AdamW of the encoders and of the criterion)."""
import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import contract
import hrem
from helpers import assert_ranks_as_recorded, fixture_dir, named_params

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = "hrem_small_seed1"


def torch_load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def bert_dir(fixtures, tmp_path_factory):
    """A Hugging Face directory of the fixture's tiny BERT: config.json and vocab.txt, no
    weights (they come from the checkpoint)."""
    d = tmp_path_factory.mktemp("tiny_bert")
    src = fixture_dir(fixtures, "hrem_ref", FIXTURE)
    cfg = json.loads((src / "bert_config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "vocab.txt").write_bytes((src / "vocab.txt").read_bytes())
    return str(d)


def build(fixtures, bert_dir):
    """The fixture's checkpoint (the original's format and opt) as evaluation.py loads it:
    the opt completed, BERT built from --bert_path's config, the weights from the checkpoint."""
    d = fixture_dir(fixtures, "hrem_ref", FIXTURE)
    ckpt = torch_load(d / "model_best.pth")
    assert hrem.HREM.recognise(ckpt) == "HREM"
    opt = hrem.HREM.complete_opt(argparse.Namespace(**vars(ckpt["opt"])))
    assert opt.bert_path == "bert-base-uncased"  # the authors' path is never read
    opt.bert_path, opt.device = bert_dir, "cpu"
    model = hrem.HREM.for_checkpoint(opt)
    model.load_state_dict(ckpt["model"])
    model.criterion.load_state_dict(torch_load(d / "criterion_init.pth"))
    return model, ckpt


# the original's `model.params` order: txt_enc, img_enc, criterion
PARTS = ("txt_enc", "img_enc", "criterion")


# ----------------------------------------------------------------------------- 1. loading

def test_strict_load(fixtures, bert_dir):
    model, ckpt = build(fixtures, bert_dir)
    for ours, ref in zip(model.state_dict(), ckpt["model"], strict=True):
        assert list(ours) == list(ref)
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k
    crit = torch_load(fixture_dir(fixtures, "hrem_ref", FIXTURE) / "criterion_init.pth")
    assert list(model.criterion.state_dict()) == list(crit)
    # the Linear after BERT is sized from the BERT config (32 here), not 768
    assert model.txt_enc.linear.in_features == model.txt_enc.bert.config.hidden_size == 32

    # the position_ids buffer of older transformers' checkpoints is the one tolerated key
    img_sd, txt_sd = (dict(sd) for sd in ckpt["model"])
    txt_sd[hrem.POSITION_IDS] = torch.arange(40)[None]
    model.load_state_dict([img_sd, txt_sd])
    for bad in ({**txt_sd, "bert.embeddings.extra": torch.zeros(1)},          # unexpected
                {k: v for k, v in txt_sd.items() if k != "linear.bias"},      # missing
                {"module." + k: v for k, v in txt_sd.items()}):               # prefix
        with pytest.raises(RuntimeError):
            model.load_state_dict([img_sd, bad])


# ----------------------------------------------------------------------------- 2. tokens

def test_tokenisation(fixtures, bert_dir):
    tok = hrem.CaptionTokenizer(hrem.load_tokenizer(bert_dir))
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, len(tok)) == (0, 2, 3, 4, 75)
    d = fixture_dir(fixtures, "hrem_ref", FIXTURE)
    inp, exp = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    for k, caption in enumerate(inp["caption_text"]):
        ids = tok.encode(str(caption))
        assert ids == inp["captions"][k, :inp["lengths"][k]].tolist(), caption
        assert ids == exp["captions"][k, :exp["lengths"][k]].tolist(), caption
    # a word WordPiece cannot split is one [UNK]; a literal [MASK] is split as plain text
    assert tok.encode("zebra walker") == [2, 1, 43, 72, 3]
    assert tok.encode("[MASK]") == [2, 1, 1, 1, 3]


def test_augment_rules():
    """process_caption_bert's rule on each branch: a draw p < 0.2 alters the word (p/0.2 < 0.5
    [MASK] per sub-token, < 0.6 a random vocabulary token per sub-token, else deleted)."""
    class Draws:
        def __init__(self, probs):
            self.probs, self.choices = list(probs), []

        def random(self):
            return self.probs.pop(0)

        def choice(self, seq):
            self.choices.append(len(seq))
            return seq[7 + len(self.choices)]

    class FakeTok:
        pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 2, 3, 4

        def get_vocab(self):
            return {"t%d" % i: i for i in range(20)}

    tok = hrem.CaptionTokenizer(FakeTok())
    words = [[10], [11, 12], [13, 14], [15], [16]]
    rng = Draws([0.5, 0.05, 0.11, 0.15, 0.2])
    assert tok.augment(words, rng) == [2, 10, 4, 4, 8, 9, 16, 3]
    assert rng.choices == [20, 20]  # one draw per sub-token, over the whole vocabulary


TRAIN_ORDER = [0, 5, 10, 15, 20, 25, 30, 35, 40, 1]  # the recorded batch's captions


def train_items(fixtures, bert_dir):
    """The training loader's batch of the recorded captions, before augmentation: hrem's
    dataset items (image, ids, index, image index, words), collated."""
    inp = np.load(fixture_dir(fixtures, "hrem_ref", FIXTURE) / "inputs.npz")
    tok = hrem.CaptionTokenizer(hrem.load_tokenizer(bert_dir))
    items = []
    for i in TRAIN_ORDER:
        words = tok.words(str(inp["caption_text"][i]))
        ids = [tok.cls_id] + [t for w in words for t in w] + [tok.sep_id]
        items.append((torch.from_numpy(inp["images"][i // 5]), ids, i, i // 5, words))
    return hrem.collate_fn(items)


def test_train_batch(fixtures, bert_dir):
    """The recorded training batch: random.seed(1) / np.random.seed(1), then the original
    dataset's items for captions 0, 5, ..., 40, 1 (caption augmentation, region dropout),
    collated (sorted by caption length, padded): HREM.augment draws the same from the same
    generators."""
    model, _ = build(fixtures, bert_dir)
    ts = np.load(fixture_dir(fixtures, "hrem_ref", FIXTURE) / "train_step.npz")
    batch = train_items(fixtures, bert_dir)
    random.seed(1)
    np.random.seed(1)
    out = model.augment(batch.images, batch.img_lengths, batch.words, batch.ids, batch.img_ids)
    for name, ours in zip(["train_images", "train_img_lengths", "train_captions",
                           "train_lengths", "train_ids", "train_img_ids"], out):
        np.testing.assert_array_equal(np.asarray(ours), ts[name], err_msg=name)
    # and the draws are the functions' own, with any generator of the same kind
    tok = hrem.CaptionTokenizer(hrem.load_tokenizer(bert_dir))
    py, nprng = random.Random(1), np.random.RandomState(1)
    caps = [tok.augment(w, py) for w in batch.words]
    ims = [hrem.drop_regions(im, nprng) for im in batch.images]
    again = hrem.pad_batch(ims, caps, batch.ids, batch.img_ids)
    for a, b in zip(out, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- 3. evaluation

def test_evaluation(fixtures, bert_dir):
    model, _ = build(fixtures, bert_dir)
    d = fixture_dir(fixtures, "hrem_ref", FIXTURE)
    inp, exp = np.load(d / "inputs.npz"), np.load(d / "expected.npz")
    model.val_start()
    with torch.no_grad():
        img, cap, _ = model.forward_emb(torch.from_numpy(inp["images"]),
                                        torch.from_numpy(inp["captions"]), inp["lengths"],
                                        img_lengths=torch.from_numpy(inp["img_lengths"]))
    np.testing.assert_allclose(img.numpy(), exp["img_embs"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cap.numpy(), exp["cap_embs"], atol=1e-5, rtol=0)
    for block in (4096, 7):  # one block, and several
        sims = hrem.dot_scores(img.numpy(), cap.numpy(), block=block)
        assert sims.shape == (10, 50) and sims.dtype == np.float64
        np.testing.assert_allclose(sims, exp["sims"], atol=1e-5, rtol=0)
        assert_ranks_as_recorded(sims, exp)


# ----------------------------------------------------------------------------- 4. train step

def key_bias_rows(name, numel, d=32):
    """Entries whose gradient is zero in exact arithmetic: a key bias adds the same logit to
    every key of a query (softmax is invariant to it), and a bias right before a BatchNorm is
    removed by the batch mean. AdamW moves them by up to +-lr on float noise, so the step is
    not compared there."""
    if name.endswith("self_attn.in_proj_bias"):
        rows = torch.zeros(numel, dtype=torch.bool)
        rows[d:2 * d] = True
        return rows
    if name.endswith("attention.self.key.bias") or name == "img_enc.fc.mlp.layers.0.bias":
        return torch.ones(numel, dtype=torch.bool)
    return torch.zeros(numel, dtype=torch.bool)


def test_train_step(fixtures, bert_dir, monkeypatch):
    model, _ = build(fixtures, bert_dir)
    d = fixture_dir(fixtures, "hrem_ref", FIXTURE)
    ts = np.load(d / "train_step.npz")
    names = list(ts["param_names"])
    params = dict(named_params(model, PARTS))
    assert list(params) == names
    assert [g["lr"] for g in model.optimizer.param_groups] == [5e-4, 5e-5, 5e-4, 5e-4]
    lr_of = {id(p): g["lr"] for g in model.optimizer.param_groups for p in g["params"]}

    # the recorded mode: training, with dropout off (BatchNorm on batch statistics)
    model.train_start()
    for m in (model.img_enc, model.txt_enc, model.criterion):
        for x in m.modules():
            if isinstance(x, (torch.nn.Dropout, torch.nn.MultiheadAttention)):
                x.eval()
    model.criterion.iter_count = int(ts["iter_count_before"])  # the graph losses are on
    assert model.criterion.iter_count >= model.criterion.warmup

    seen = {"draws": []}
    clip, multinomial = contract.clip_grad_norm_, torch.multinomial

    def spy_clip(ps, max_norm):
        seen["grads"] = {id(p): None if p.grad is None else p.grad.detach().clone()
                         for p in ps}
        seen["norm"] = float(clip(ps, max_norm))
        return seen["norm"]

    def spy_multinomial(weight, n):
        out = multinomial(weight, n)
        seen["draws"].append((weight.clone(), out.clone()))
        return out

    def spy_inputs(module, args):
        seen["img_emb"], seen["cap_emb"] = args[0][0].detach(), args[1][0].detach()

    monkeypatch.setattr(contract, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(torch, "multinomial", spy_multinomial)
    model.criterion.register_forward_pre_hook(spy_inputs)
    before = {n: p.detach().clone() for n, p in params.items()}
    # the training loader's batch, augmented in the step: the recording's seeds (the
    # augmentations: random and numpy; the negative draws: torch right before the step)
    batch = train_items(fixtures, bert_dir)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    loss = model.train_emb(*batch, **batch.extra)

    # the loss and its terms
    parts = model.criterion.parts
    assert abs(float(loss) - float(ts["loss"])) <= 1e-5 * abs(float(ts["loss"]))
    assert abs(float(parts["base"]) - float(ts["loss_base"])) <= 1e-5 * float(ts["loss_base"])
    np.testing.assert_allclose([float(g) for g in parts["gnn"]], ts["loss_gnn"], rtol=1e-5)
    # the KL of two nearly equal distributions: float32 noise of ~1e-8 on a value of 3e-4
    assert abs(float(parts["reg"]) - float(ts["reg_loss"])) <= 1e-6
    assert model.criterion.iter_count == int(ts["iter_count_before"]) + 1

    # what the criterion saw and built
    np.testing.assert_allclose(seen["img_emb"].numpy(), ts["img_emb_train"], atol=1e-5)
    np.testing.assert_allclose(seen["cap_emb"].numpy(), ts["cap_emb_train"], atol=1e-5)
    for k in ("i2i", "t2t", "i2t", "t2i"):
        np.testing.assert_array_equal(parts["connect"][k].numpy(), ts["connect_" + k])
        np.testing.assert_allclose(parts["relation"][k].numpy(), ts["relation_" + k],
                                   atol=1e-5, rtol=0)
    assert len(seen["draws"]) == int(ts["multinomial_n"]) == 8
    for k, (weight, draw) in enumerate(seen["draws"]):
        # the weights are exp((2 - 512) log dist ...): a 1e-7 distance error is 5e-5 relative
        np.testing.assert_allclose(weight.numpy(), ts["multinomial_weight/%d" % k],
                                   rtol=1e-3, atol=1e-7)
        np.testing.assert_array_equal(draw.numpy(), ts["multinomial_draw/%d" % k])

    # the pre-clip gradients (the SGRAF train-step tolerances)
    grads = {n: seen["grads"][id(p)] for n, p in params.items()}
    assert sorted(n for n, g in grads.items() if g is None) == sorted(ts["grad_none"])
    ref = {n: ts["grad/" + n].astype(np.float64) for n in names if n not in ts["grad_none"]}
    total = np.sqrt(sum((g ** 2).sum() for g in ref.values()))
    for i, n in enumerate(names):
        if n in ts["grad_none"]:
            continue
        g = grads[n].double().numpy()
        err = np.linalg.norm(g - ref[n])
        assert err <= 1e-4 * np.linalg.norm(ref[n]) + 1e-6 * total, (n, err)
        assert abs(np.sqrt((g ** 2).sum()) - ts["grad_l2"][i]) <= 1e-4 * ts["grad_l2"][i] + \
            1e-6 * total, n
    assert abs(seen["norm"] - float(ts["grad_norm"])) <= 1e-5 * float(ts["grad_norm"])

    # the state after the clipped AdamW step: BatchNorm statistics, then the weights
    after = torch_load(d / "after_step.pth")["model"]
    after_crit = torch_load(d / "criterion_after_step.pth")
    after_params = {}
    for prefix, m, sd in (("img_enc.", model.img_enc, after[0]),
                          ("txt_enc.", model.txt_enc, after[1]),
                          ("criterion.", model.criterion, after_crit)):
        ours = m.state_dict()
        assert list(ours) == list(sd)
        for k, v in sd.items():
            if "num_batches_tracked" in k:
                assert int(ours[k]) == int(v), k
            elif "running_" in k:
                torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-7, msg=k)
        after_params.update({prefix + k: v for k, v in sd.items()})
    for i, n in enumerate(names):
        p = params[n]
        moved, ref_moved = p.detach() - before[n], after_params[n] - before[n]
        if n in ts["grad_none"]:  # AdamW skips a parameter without gradient
            assert torch.equal(moved, torch.zeros_like(moved)), n
            continue
        keep = ~key_bias_rows(n, p.shape[0]).view(-1, *[1] * (p.dim() - 1)).expand_as(p)
        # AdamW's first step is ~lr x sign(gradient): entries with a tiny gradient may flip
        flipped = ((moved - ref_moved).abs() > 0.1 * lr_of[id(p)])[keep].double()
        assert flipped.numel() == 0 or flipped.mean().item() <= 1e-3, (n, flipped.mean())
        np.testing.assert_allclose(after_params[n].sum().item(), ts["after_sum"][i],
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 5. pieces

def test_lr_schedule(fixtures, bert_dir):
    model, _ = build(fixtures, bert_dir)
    factors = [model.lr_factor(e) for e in range(30)]
    assert factors[:15] == [1.0] * 15
    assert all(abs(f - 0.1) < 1e-12 for f in factors[15:25])
    assert all(abs(f - 0.01) < 1e-12 for f in factors[25:])
    assert [g["weight_decay"] for g in model.optimizer.param_groups] == [1e-4] * 4


def test_maxk_pool_lengths():
    """Top-2 mean over the valid positions; the original's loop keeps k = min(k, length) for
    the samples after a sample shorter than k."""
    x = torch.tensor([[[1.], [5.], [3.]], [[2.], [9.], [9.]], [[4.], [1.], [0.]]])
    lengths = torch.tensor([3, 1, 2])
    valid = hrem.valid_mask(lengths, 3, x.device)
    out = hrem.maxk_pool(x, lengths, valid)
    assert out.flatten().tolist() == [4.0, 2.0, 4.0]
    lengths = torch.tensor([3, 2, 2])
    out = hrem.maxk_pool(x, lengths, hrem.valid_mask(lengths, 3, x.device))
    assert out.flatten().tolist() == [4.0, 5.5, 2.5]
    assert hrem.avg_pool(x, lengths, hrem.valid_mask(lengths, 3, x.device)).flatten().tolist() \
        == [3.0, 5.5, 2.5]


def test_adjacency_short_captions():
    """A batch whose captions are all shorter than topk: the original indexes past the
    padded length and fails; here the missing positions are zero features."""
    torch.manual_seed(0)
    adj = hrem.AdjacencyModel(threshold=0.5, topk=10)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    connect, relation, reg = adj(img, cap, torch.randn(4, 36, 8), torch.randn(4, 6, 8),
                                 torch.tensor([6, 5, 4, 3]))
    assert relation["t2i"].shape == (4, 4) and torch.isfinite(reg)
    assert all(bool(c.diagonal().all()) for k, c in connect.items() if k in ("i2i", "t2t"))


def test_vse_loss():
    """--base_loss/--gnn_loss vse: the VSE++ hinge of v t^T; --mask_repeat masks every pair of
    the same image (not only the diagonal) as a positive."""
    torch.manual_seed(0)
    im = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    scores = im @ s.t()
    pos = ids[:, None] == ids[None, :]
    for max_violation in (False, True):
        for repeat in (False, True):
            mask = pos if repeat else torch.eye(6, dtype=torch.bool)
            cost_s = (0.2 + scores - scores.diag()[:, None]).clamp(min=0).masked_fill(mask, 0)
            cost_im = (0.2 + scores - scores.diag()[None, :]).clamp(min=0).masked_fill(mask, 0)
            if max_violation:
                cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
            ref = cost_s.sum() + cost_im.sum()
            loss = hrem.VSELoss(0.2, max_violation, repeat)(im, s, ids)
            assert torch.allclose(loss, ref), (max_violation, repeat)
    crit = hrem.GraphLoss(embed_size=4, nhead=2, base_loss="vse", gnn_loss="vse")
    crit.set_max_violation(True)
    assert crit.base_loss.max_violation and crit.gnn_loss.max_violation


def test_demo_bert_covers_synthetic():
    """bert_demo/ (the demo's BERT: config and vocabulary, no weights) tokenises every word of
    the synthetic captions (no [UNK])."""
    import synthetic
    path = str(Path(__file__).resolve().parent.parent / "bert_demo")
    tok = hrem.CaptionTokenizer(hrem.load_tokenizer(path))
    split = synthetic.generate_split("train", 400, seed=3, img_dim=8)
    unk = tok.tokenizer.unk_token_id
    assert all(unk not in tok.encode(c) for c in split.captions)
    assert hrem.load_bert_config(path).vocab_size == len(tok)
