"""daa.py: the DAA loss against the original's fixture, the TF-IDF semantics, the ASP metric."""
import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from daa import (DAALoss, asp_metric, batch_semantics, caption_tfidf, smooth_rank,
                 split_semantics)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref(fixtures):
    d = np.load(fixtures / "daa_ref" / "loss_n16_seed0.npz")
    return {k: d[k] for k in d.files}


def hinge(scores, margin=0.2):
    """Summed max-violation hinge, only to split the fixture's total and gradient."""
    diag = scores.diag().view(-1, 1)
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_s = (margin + scores - diag).clamp(min=0).masked_fill(eye, 0)
    cost_im = (margin + scores - diag.t()).clamp(min=0).masked_fill(eye, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


def loop_rank(m, T, rowwise):
    """The smooth ranks written out entry by entry (float64)."""
    m = np.asarray(m, dtype=np.float64)
    B = len(m)
    sig = lambda x: 1.0 / (1.0 + np.exp(-np.clip(x / T, -50, 50)))
    r = np.ones((B, B))
    for b in range(B):
        for c in range(B):
            for a in range(B):
                if rowwise and a != c:    # entry (b, c) among row b's candidates a
                    r[b, c] += sig(m[b, a] - m[b, c])
                if not rowwise and a != c:
                    r[b, c] += sig(m[a, b] - m[b, c])
    return r


CAPTIONS = [
    # image 0
    "A dog runs on the grass.", "A brown dog is running in a park.", "The dog plays with a ball.",
    "A puppy running across green grass.", "Dog chasing a ball in the park.",
    # image 1
    "A man rides a bicycle down the street.", "A cyclist on a city street.",
    "The man is riding his bike.", "A person biking past shops.", "Man on a bike in traffic.",
    # image 2
    "Two children play on the beach.", "Kids building a sand castle.",
    "Two kids at the beach near the water.", "Children playing in the sand.",
    "A boy and a girl on the beach.",
    # image 3
    "A woman cooks in the kitchen.", "A lady is making dinner.", "The woman stirs a pot.",
    "Someone cooking food on a stove.", "A woman preparing a meal in her kitchen.",
    # image 4
    "A cat sleeps on the sofa.", "The cat is napping on a couch.", "A sleeping cat on cushions.",
    "A grey cat lying on the sofa.", "Cat resting on a couch.",
    # image 5
    "A red car parked on the street.", "The car is parked near a building.",
    "A red vehicle by the road.", "A parked car in the city.", "A small red car.",
    # image 6
    "A man plays the guitar on stage.", "A musician performing with a guitar.",
    "The guitarist sings into a microphone.", "A man playing music for a crowd.",
    "Guitar player at a concert.",
    # image 7
    "Birds flying over the lake.", "A flock of birds above the water.",
    "Several birds fly across the sky.", "Birds soaring over a calm lake.",
    "The lake with birds in the air.",
    # image 8
    "A girl reads a book in the library.", "A young woman reading.",
    "The girl is reading a novel.", "A student studies with books.", "Someone reading in a library.",
    # image 9
    "A horse stands in the field.", "A brown horse grazing.", "The horse eats grass in a field.",
    "A horse on a farm.", "A pony in the green field.",
]


@pytest.fixture(scope="module")
def dense_tfidf():
    return TfidfVectorizer().fit_transform([c.strip() for c in CAPTIONS]).toarray()  # (50, V)


# ---------------------------------------------------------------------------------------------
# the loss against the original
# ---------------------------------------------------------------------------------------------

def test_loss_matches_original(ref):
    scores = torch.tensor(ref["scores"])
    sems = torch.tensor(ref["sems"])
    i2t, t2i = DAALoss(25)(scores, sems)
    assert abs(i2t.item() - ref["DAA_i2t_loss"]) < 1e-5
    assert abs(t2i.item() - ref["DAA_t2i_loss"]) < 1e-5
    total = hinge(scores) + i2t + t2i
    assert abs(hinge(scores).item() - ref["contrastive_loss"]) < 1e-5
    assert abs(total.item() - ref["loss"]) < 1e-5


def test_gradient_matches_original(ref):
    s = torch.tensor(ref["scores"], requires_grad=True)
    hinge(s).backward()
    daa_grad_ref = ref["grad_scores"] - s.grad.numpy()

    s = torch.tensor(ref["scores"], requires_grad=True)
    i2t, t2i = DAALoss(25)(s, torch.tensor(ref["sems"]))
    (i2t + t2i).backward()
    g = s.grad.numpy()
    assert np.isfinite(g).all()
    assert np.abs(g).max() > 1.0          # the DAA part really contributes
    np.testing.assert_allclose(g, daa_grad_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rowwise", [False, True])
def test_smooth_rank_formula(ref, rowwise):
    m = ref["scores"][:6, :6]
    got = smooth_rank(torch.tensor(m, dtype=torch.float64), 0.001, rowwise).numpy()
    np.testing.assert_allclose(got, loop_rank(m, 0.001, rowwise), rtol=1e-10, atol=1e-10)


def test_rowwise_differs_and_is_a_loss(ref):
    scores = torch.tensor(ref["scores"])
    sems = torch.tensor(ref["sems"])
    default = torch.stack(DAALoss(25)(scores, sems))
    rowwise = torch.stack(DAALoss(25, rowwise=True)(scores, sems))
    assert (default - rowwise).abs().min() > 1e-3
    assert ((rowwise > 0) & (rowwise < 25)).all()


@pytest.mark.parametrize("rowwise", [False, True])
def test_identical_matrices_give_zero_loss(ref, rowwise):
    sems = torch.tensor(ref["sems"])
    s = sems.clone().requires_grad_()
    i2t, t2i = DAALoss(25, rowwise=rowwise)(s, sems)
    assert i2t.item() == 0.0 and t2i.item() == 0.0
    (i2t + t2i).backward()
    assert torch.isfinite(s.grad).all()


def test_t2i_is_i2t_on_transposes(ref):
    scores = torch.tensor(ref["scores"])
    sems = torch.tensor(ref["sems"])
    loss = DAALoss(3.0, rowwise=True)
    i2t, t2i = loss(scores, sems)
    t2i_swapped, i2t_swapped = loss(scores.t(), sems.t())
    assert torch.allclose(i2t, i2t_swapped) and torch.allclose(t2i, t2i_swapped)


# ---------------------------------------------------------------------------------------------
# semantics
# ---------------------------------------------------------------------------------------------

def test_caption_tfidf_is_sklearn_default(dense_tfidf):
    raw = [(c + "\n").encode("utf-8") for c in CAPTIONS]   # lines as read from a file
    tf = caption_tfidf(raw)
    assert tf.format == "csr" and tf.shape == dense_tfidf.shape
    np.testing.assert_allclose(tf.toarray(), dense_tfidf, rtol=0, atol=1e-12)


def test_batch_semantics(dense_tfidf):
    tf = caption_tfidf(CAPTIONS)
    img_ids = np.array([3, 0, 7, 7, 9, 1])
    cap_ids = np.array([17, 2, 35, 39, 48, 5])      # each caption is one of its image's five
    sems = batch_semantics(tf, img_ids, cap_ids)
    assert sems.dtype == torch.float32 and sems.shape == (6, 6)
    want = np.array([[np.mean([dense_tfidf[5 * i + k] @ dense_tfidf[c] for k in range(5)])
                      for c in cap_ids] for i in img_ids])
    np.testing.assert_allclose(sems.numpy(), want, rtol=1e-6, atol=1e-7)
    assert (sems.numpy().diagonal() > 0.1).all()
    # the ground truth comes from the caption index: a loader with im_div=1 (img_id == index)
    # or no image ids at all gives the same matrix, and inconsistent ids are refused
    assert torch.equal(batch_semantics(tf, cap_ids, cap_ids, im_div=1), sems)
    assert torch.equal(batch_semantics(tf, None, cap_ids), sems)
    with pytest.raises(ValueError):
        batch_semantics(tf, cap_ids, cap_ids, im_div=5)


def test_split_semantics(dense_tfidf):
    tf = caption_tfidf(CAPTIONS)
    want = dense_tfidf.reshape(10, 5, -1).mean(1) @ dense_tfidf.T      # (10, 50)
    full = split_semantics(tf, 10, chunk=3)
    assert full.dtype == np.float32 and full.shape == (10, 50)
    np.testing.assert_allclose(full, want, rtol=1e-6, atol=1e-7)
    # a COCO-style fold: images 4..7 against their own 20 captions, TF-IDF over the whole split
    fold = split_semantics(tf, 4, image_offset=4, captions=slice(20, 40))
    np.testing.assert_allclose(fold, full[4:8, 20:40], rtol=0, atol=1e-7)
    # the batch version agrees with the split version
    b = batch_semantics(tf, np.arange(10), np.arange(0, 50, 5)).numpy()
    np.testing.assert_allclose(b, full[:, ::5], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ASP metric
# ---------------------------------------------------------------------------------------------

def test_asp_identical_rankings():
    rng = np.random.default_rng(0)
    sems = rng.random((20, 100)).astype(np.float32)
    assert asp_metric(sems, sems) == pytest.approx((100.0, 100.0), abs=1e-12)
    assert asp_metric(3.0 * sems + 1.0, sems) == pytest.approx((100.0, 100.0), abs=1e-12)


def test_asp_hand_computed():
    sims = np.array([[3.0, 2.0, 1.0],
                     [1.0, 2.0, 3.0]])
    sems = np.array([[3.0, 1.0, 2.0],
                     [1.0, 2.0, 3.0]])
    # i2t: row 0 ranks (1,2,3) vs (1,3,2) -> (1 + 2/3 + 2/3)/3 = 7/9; row 1 equal -> 1
    # t2i: column 0 equal -> 1; column 1 sims tie (2,2) -> ranks (1,2) by index, sems (1,2) ->
    #      ranks (2,1) -> 1/2; column 2 ranks (2,1) both -> 1
    i2t, t2i = asp_metric(sims, sems)
    assert i2t == pytest.approx(100 * (7 / 9 + 1) / 2)
    assert t2i == pytest.approx(100 * (1 + 0.5 + 1) / 3)


def test_asp_reversed_and_chunking():
    sims = np.array([[0.9, 0.5, 0.1]])
    sems = np.array([[0.1, 0.5, 0.9]])
    i2t, t2i = asp_metric(sims, sems)
    assert i2t == pytest.approx(100 * 5 / 9) and t2i == pytest.approx(100.0)

    rng = np.random.default_rng(1)
    sims = rng.random((30, 150))
    sems = rng.random((30, 150)).astype(np.float32)
    assert asp_metric(sims, sems, chunk=7) == pytest.approx(asp_metric(sims, sems), abs=1e-10)
