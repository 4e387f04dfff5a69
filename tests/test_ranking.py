"""i2t / t2i: vectorised ranks equal the original per-row loops, ties included."""
import numpy as np
import pytest

from evaluation import i2t, report, t2i


def i2t_loop(sims):
    """The original's i2t, written as it loops (the oracle)."""
    npts = sims.shape[0]
    ranks, top1 = np.zeros(npts), np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5):
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index], top1[index] = rank, inds[0]
    return ranks, top1


def t2i_loop(sims):
    npts = sims.shape[0]
    ranks, top1 = np.zeros(5 * npts), np.zeros(5 * npts)
    sims = sims.T
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
            top1[5 * index + i] = inds[0]
    return ranks, top1


def metrics(ranks):
    return (100.0 * (ranks < 1).sum() / len(ranks), 100.0 * (ranks < 5).sum() / len(ranks),
            100.0 * (ranks < 10).sum() / len(ranks), np.floor(np.median(ranks)) + 1,
            ranks.mean() + 1)


def test_known_answers():
    # 2 images, 10 captions. Image 0's best caption is #3 (its own): rank 0.
    # Image 1's own captions 5..9 are all below caption 0: its best own caption has rank 1.
    sims = np.zeros((2, 10))
    sims[0] = [0.1, 0.2, 0.3, 0.9, 0.0, 0.5, 0.4, 0.3, 0.2, 0.1]
    sims[1] = [0.95, 0.1, 0.1, 0.1, 0.1, 0.9, 0.2, 0.2, 0.2, 0.2]
    r, (ranks, top1) = i2t(None, None, None, sims, return_ranks=True)
    assert list(ranks) == [0, 1] and list(top1) == [3, 0]
    assert r == (50.0, 100.0, 100.0, 1.0, 1.5)
    ri, (ranks_i, _) = t2i(None, None, None, sims, return_ranks=True)
    # captions 0..4 belong to image 0: caption 0 prefers image 1 (rank 1), caption 4 too.
    # Captions 6, 7 prefer image 0. Caption 8 ties (0.2, 0.2): the reversed ascending argsort
    # puts image 1 first, so its rank is 0, as in the original.
    assert list(ranks_i) == [1, 0, 0, 0, 1, 0, 1, 1, 0, 0]
    assert ri == (60.0, 100.0, 100.0, 1.0, 1.4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [2, 3, 7, None])
def test_matches_original_loops_with_ties(seed, levels):
    rng = np.random.default_rng(seed)
    n = 37
    sims = rng.random((n, 5 * n))
    if levels is not None:  # heavy exact ties
        sims = np.floor(sims * levels) / levels
    r, (ranks, top1) = i2t(None, None, None, sims, return_ranks=True)
    ri, (ranks_i, top1_i) = t2i(None, None, None, sims, return_ranks=True)
    ranks_ref, top1_ref = i2t_loop(sims)
    ranks_i_ref, top1_i_ref = t2i_loop(sims)
    assert np.array_equal(ranks, ranks_ref) and np.array_equal(top1, top1_ref)
    assert np.array_equal(ranks_i, ranks_i_ref) and np.array_equal(top1_i, top1_i_ref)
    assert r == metrics(ranks_ref) and ri == metrics(ranks_i_ref)


def test_medr_is_floor_of_median_plus_one():
    sims = np.eye(4).repeat(5, axis=1)  # every caption ranks first, except we shuffle two
    sims[0, :5] = -1  # image 0's own captions rank last
    r, (ranks, _) = i2t(None, None, None, sims, return_ranks=True)
    assert ranks[0] == 15 and np.median(ranks) == 0.0 and r[3] == 1.0
    ranks2 = np.array([0.0, 1.0, 2.0, 3.0])  # median 1.5 -> floor 1 -> medr 2
    assert np.floor(np.median(ranks2)) + 1 == 2.0


def test_fold5_and_5k_layout(capsys):
    """COCO 5K: 5000 images x 25000 captions. Each fold's own block is a perfect diagonal;
    the off-fold blocks outscore it, so only the right slicing gives R@1 = 100 in every fold,
    while the full 5K evaluation sees them."""
    n_img, n_cap = 5000, 25000
    rng = np.random.default_rng(0)
    sims = rng.random((n_img, n_cap), dtype=np.float32).astype(np.float64) * 0.5
    img = np.arange(n_img)
    for k in range(5):
        sims[img, 5 * img + k] = 1.0                     # own captions on top within a fold
    for f in range(5):                                   # other folds beat them
        rows = slice(f * 1000, (f + 1) * 1000)
        sims[rows, :f * 5000] += 2.0
        sims[rows, (f + 1) * 5000:] += 2.0
    res5 = report(sims, fold5=True)
    assert res5["i2t"][:3] == (100.0, 100.0, 100.0) and res5["t2i"][:3] == (100.0, 100.0, 100.0)
    assert res5["rsum"] == 600.0
    out = capsys.readouterr().out
    assert "rsum: 600.0" in out and out.count("rsum: 600.0 ar: 100.0 ari: 100.0") == 5
    full = report(sims, fold5=False)
    assert full["i2t"][0] == 0.0  # 4000 off-fold captions rank above each image's own
    with pytest.raises(ValueError, match="5000 images"):
        report(sims[:1000, :5000], fold5=True)


def test_fold5_asp_is_the_mean_of_the_folds(capsys):
    """COCO 5-fold ASP: TF-IDF over all 25000 captions, fold f = images [1000f, 1000f+1000) x
    captions [5000f, 5000f+5000), the mean printed after the R@K lines."""
    import daa
    rng = np.random.default_rng(1)
    words = ["dog", "cat", "man", "ball", "red", "tree", "car", "beach", "snow", "kite"]
    captions = [" ".join(rng.choice(words, 4)) for _ in range(25000)]
    sims = rng.random((5000, 25000))
    res = report(sims, fold5=True, captions=captions)
    tfidf = daa.caption_tfidf(captions)
    folds = [daa.asp_metric(sims[f * 1000:(f + 1) * 1000, f * 5000:(f + 1) * 5000],
                            daa.split_semantics(tfidf, 1000, image_offset=1000 * f,
                                                captions=slice(5000 * f, 5000 * (f + 1))))
             for f in range(5)]
    assert np.allclose(res["asp"], np.mean(folds, axis=0), rtol=0, atol=1e-9)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "ASP: i2t %.1f t2i %.1f" % res["asp"]
    assert out.count("ASP: i2t %.1f t2i %.1f" % folds[0]) >= 1
