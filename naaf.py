"""NAAF: the Negative-Aware Attention Framework for image-text matching.

Zhang, Mao, Wang, Zhang, "Negative-Aware Attention Framework for Image-Text Matching", CVPR 2022,
following the original code (CrossmodalGroup/NAAF, commit cafcd6f, `model.py`) formula by
formula. The authors' checkpoints ([img_enc, txt_enc] state dicts; the learned threshold in
`checkpoint['opt']`) load strictly. NAAF is SCAN's two encoders with a text-to-image score that
has a negative branch, and a threshold that is learned by statistics inside the training forward
("Discriminative Mismatch Mining"), not by gradient. It adds no parameters to the encoders.

Read top to bottom:
  options     add_naaf_options, complete_naaf_opt, is_naaf_state, the vocab helpers
  encoders    model.EncoderImage; model.EncoderText (basic: random table) or with the GloVe table,
              both without dropout and with the GRU saved under the original's name `rnn`
  score       word_region_cosines (A), relevance_scores (positive branch b),
              thresholded_scores (negative branch and positive branch a), naaf_sims (every pair
              at a fixed threshold), naaf_sims_percaption (the original loop, kept as the oracle)
  threshold   ThresholdLearner and train_sims: one caption at a time, the threshold moving
              between captions
  wrapper     NAAF: the encoders, the hinge loss, Adam and the train step (contract.Matcher)

The threshold state lives in `opt`, as in the original, so that every checkpoint carries it:
`opt.thres` (used in training), `opt.thres_safe` (used at evaluation), `opt.mean_pos`,
`opt.stnd_pos`, `opt.mean_neg`, `opt.stnd_neg` (THRESHOLD_STATE).

Letters in shape comments: B images, C captions, R regions (36), L words, d embed_size.
"""
import argparse
import json
import logging
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import errors
import vocab
from contract import Matcher, bench_opt, fp32, l1norm, l2norm
from loss import ContrastiveLoss
from model import EncoderImage, EncoderText
from similarity import word_mask
from vocab import Vocabulary, deserialize_vocab

log = logging.getLogger(__name__)

THRESHOLD_STATE = ("thres", "thres_safe", "mean_pos", "stnd_pos", "mean_neg", "stnd_neg")
MIN_POS_WORDS = 200      # matched words a batch must collect before the threshold is estimated
INTRA_TEMPERATURE = 5.0  # word-word attention of the test-time negative mask (hard-coded there)
EMA_NEW = 0.7            # new = 0.7 * estimate + 0.3 * value before the update


# ----------------------------------------------------------------------------- options

def add_naaf_options(parser, add=None):
    """NAAF's flags, with the original names and defaults (train.py of the original). Flags
    that SGRAF's opts.py already has (margin, word_dim, embed_size, ...) are not repeated.
    Deviation: `--precomp_enc_text_type` defaults to `basic`, because the GloVe 840B tables of
    the default `GloVe` encoder cannot be obtained offline (give them with `--glove_path`).
    `add(group, *flags, **kw)`: how a flag is added (NAAF.add_option records it as NAAF's)."""
    g = parser.add_argument_group("NAAF (naaf.py)")
    add = add or (lambda grp, *flags, **kw: grp.add_argument(*flags, **kw))
    add(g, "--lambda_softmax", default=20.0, type=float,
        help="attention softmax temperature (NAAF: 20)")
    add(g, "--alpha", default=2.0, type=float,
        help="penalty weight of the mismatched distribution in the threshold solve")
    add(g, "--thres", default=0.0, type=float,
        help="initial training threshold (then learned; saved in the checkpoint opt)")
    add(g, "--thres_safe", default=0.0, type=float,
        help="initial test threshold (then learned; saved in the checkpoint opt)")
    for name, what in (("mean_pos", "mean of the matched"), ("stnd_pos", "std of the matched"),
                       ("mean_neg", "mean of the mismatched"),
                       ("stnd_neg", "std of the mismatched")):
        add(g, "--" + name, default=0.0, type=float,
            help="%s word-region similarity distribution (learned)" % what)
    add(g, "--precomp_enc_text_type", default="basic", choices=["basic", "GloVe"],
        help="basic: Bi-GRU on a random word table (SCAN vocab); GloVe: Bi-GRU on a GloVe table "
             "(NAAF GloVe vocab, --glove_path)")
    add(g, "--glove_path", default=None,
        help="GloVe matrix (vocab_size, word_dim) saved with torch.save, e.g. the original's "
             "glove_840B_f30k_precomp.json.pkl")
    add(g, "--freeze_glove", action="store_true",
        help="freeze the GloVe table (the original means to, but fine-tunes it)")
    add(g, "--using_intra_info", action="store_true",
        help="accepted for the original's commands; evaluation always uses the intra-caption "
             "smoothing of the negative mask, as the original")
    return parser


# defaults of the original train.py for the fields an older or foreign opt may lack
_BASE_DEFAULTS = dict(no_imgnorm=False, no_txtnorm=False, num_layers=1, margin=0.2,
                      grad_clip=2.0, learning_rate=0.0005, precomp_enc_type="basic")


def complete_naaf_opt(opt):
    """Give `opt` (e.g. an original checkpoint's) every field NAAF reads; present ones stay."""
    defaults = dict(_BASE_DEFAULTS)
    defaults.update(vars(add_naaf_options(argparse.ArgumentParser()).parse_args([])))
    for k, v in defaults.items():
        if not hasattr(opt, k):
            setattr(opt, k, v)
    return opt


def restore_threshold_state(opt, ckpt_opt):
    """Copy the threshold state of a checkpoint's opt into `opt` (when resuming training with
    new command-line options)."""
    for k in THRESHOLD_STATE:
        if hasattr(ckpt_opt, k):
            setattr(opt, k, getattr(ckpt_opt, k))
    return opt


def is_naaf_state(state, opt=None):
    """NAAF's state list: [img_enc, txt_enc] with the image encoder's `fc` and the text GRU
    under NAAF's name `rnn` (SGRAF's is `cap_rnn`), and, when the checkpoint's `opt` is given,
    the threshold state in it (SCAN's checkpoints have the same keys, but no `thres_safe`). Any
    other two state dicts (a truncated SGRAF checkpoint, another model) are not NAAF's."""
    return (len(state) == 2 and "fc.weight" in state[0] and
            any(k.startswith("rnn.") for k in state[1]) and
            (opt is None or hasattr(opt, "thres_safe")))


def load_glove_vocab(path):
    """The NAAF GloVe vocab json (`{'word2idx', 'char_level', 'max_len'}`; <pad>=0 <unk>=1
    <start>=2 <end>=3) as a vocab.Vocabulary (unknown words map to <unk>)."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    vocab = Vocabulary()
    vocab.word2idx = d["word2idx"]
    vocab.idx2word = {i: w for w, i in vocab.word2idx.items()}
    vocab.idx = len(vocab.word2idx)
    return vocab


def load_naaf_vocab(path):
    """Either vocab format: SCAN's (`idx2word` present) or NAAF's GloVe one."""
    with open(path, encoding="utf-8") as f:
        keys = json.load(f).keys()
    return deserialize_vocab(path) if "idx2word" in keys else load_glove_vocab(path)


def naaf_vocab_file(opt, vocab_path):
    """The vocab a NAAF model needs: the SCAN vocab `<data_name>_vocab.json` for the basic
    encoder; the GloVe vocab `<data_name>.json` (looked for in vocab_path/naaf, then vocab_path)
    for the GloVe one. The original's evalrank always took the GloVe one (its bug)."""
    if opt.precomp_enc_text_type == "GloVe":
        name = "%s.json" % opt.data_name
        nested = os.path.join(vocab_path, "naaf", name)
        return nested if os.path.isfile(nested) else os.path.join(vocab_path, name)
    return os.path.join(vocab_path, "%s_vocab.json" % opt.data_name)


# ----------------------------------------------------------------------------- encoders

class GloveEmbedding(nn.Module):
    """The original GloveEmb with add_rand_embed=False: one table, saved as `glove.weight`."""

    def __init__(self, vocab_size, word_dim, glove_path=None, freeze=False):
        super().__init__()
        self.glove = nn.Embedding(vocab_size, word_dim)
        if glove_path:
            table = torch.load(glove_path, map_location="cpu", weights_only=True)
            if tuple(table.shape) != (vocab_size, word_dim):
                raise ValueError("GloVe table %s has shape %s, expected (%d, %d)"
                                 % (glove_path, tuple(table.shape), vocab_size, word_dim))
            self.glove.weight.data.copy_(table)
        # The original sets requires_grad on the Module, which leaves the weight trainable.
        self.glove.weight.requires_grad_(not freeze)

    def forward(self, x):
        return self.glove(x)


def build_text_encoder(opt):
    """model.EncoderText, bidirectional, without dropout (NAAF has none). GloVe: its table
    replaces the random one, and the output is always normalised (hard-coded there)."""
    glove = opt.precomp_enc_text_type == "GloVe"
    enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size, opt.num_layers,
                      use_bi_gru=True, no_txtnorm=False if glove else opt.no_txtnorm)
    enc.dropout = nn.Identity()
    if glove:
        if not opt.glove_path:
            log.info("GloVe encoder without --glove_path: the table starts random (a "
                     "checkpoint's table replaces it)")
        enc.embed = GloveEmbedding(opt.vocab_size, opt.word_dim, opt.glove_path,
                                   freeze=opt.freeze_glove)
    elif opt.precomp_enc_text_type != "basic":
        raise ValueError("precomp_enc_text_type must be basic or GloVe, got %r"
                         % (opt.precomp_enc_text_type,))
    return enc


# Our EncoderText names its GRU `cap_rnn` (SGRAF); NAAF's checkpoints call it `rnn`.
_OURS, _THEIRS = "cap_rnn.", "rnn."


def _rename(state_dict, old, new):
    return type(state_dict)((new + k[len(old):] if k.startswith(old) else k, v)
                            for k, v in state_dict.items())


# ----------------------------------------------------------------------------- score

def word_region_cosines(img_emb, cap_emb):
    """A[b, k, c, l] = <r_bk, w_cl>, the raw cosines (both sides unit norm), in one matrix
    product: (B, R, d) x (C, L, d) -> (B, R, C, L). Regions come before words so that no copy
    is needed, here or in the Gram product of thresholded_scores."""
    B, R, d = img_emb.shape
    C, L, _ = cap_emb.shape
    return (img_emb.reshape(B * R, d) @ cap_emb.reshape(C * L, d).t()).view(B, R, C, L)


def relevance_attention(A, mask, lambda_softmax):
    """SCAN's text-to-image attention weights of the positive branch (b): P = LeakyReLU_0.1(A),
    l2-normalised over the caption's words for each region; beta = softmax_k(lambda P), over
    the regions. (B, R, C, L) -> (B, R, C, L)."""
    P = F.leaky_relu(A, 0.1)
    if mask is not None and not bool(mask.all()):  # padding must not enter the norm over words
        P = P * mask.to(P.dtype)
    P = l2norm(P, dim=3)
    return torch.softmax(P * lambda_softmax, dim=1)                # over the regions


def relevance_scores(A, mask, lambda_softmax):
    """Positive branch (b): SCAN's text-to-image attention weights applied to the raw cosines,
    pos_r = sum_k beta[k, l] A[k, l]. (B, R, C, L) -> (B, C, L)."""
    return (A * relevance_attention(A, mask, lambda_softmax)).sum(1)


def intra_smoothing(cap_emb, mask):
    """S = softmax_row(5 W W^T) over each caption's real words: (C, L, d) -> (C, L, L)."""
    logits = torch.bmm(cap_emb, cap_emb.transpose(1, 2))           # (C, L, L)
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(logits * INTRA_TEMPERATURE, dim=-1)


def thresholded_scores(A, gram, thres, lambda_softmax, smooth=None):
    """The two threshold-dependent word scores. A: (B, R, C, L) raw cosines; gram: (B, R, R)
    region Gram matrices; thres: the threshold t; smooth: (C, L, L) intra-caption attention
    (evaluation) or None (training). Returns (neg, pos_f), each (B, C, L):
      negative branch:  m_l = max_k (A - t)[k, l]; neg_l = m_l where the mask (m, or the
                        smoothed S m at evaluation) is < 0, else 0;
      positive branch (a): a = exp(lambda (A - t)) over the regions above t, L1-normalised;
                        u_l = sum_k a_kl r_k; pos_f_l = <w_l, u_l> / max(||u_l||, 1e-8).
    <w, u> = sum_k a_k A_k and ||u||^2 = a^T G a, so the (B, C, L, d) contexts are never built."""
    B, R, C, L = A.shape
    At = A - thres
    m = At.max(dim=1)[0]                                           # (B, C, L)
    if smooth is None:
        sign_of = m
    else:  # m~ = S m, caption by caption
        sign_of = torch.bmm(smooth, m.permute(1, 2, 0)).permute(2, 0, 1)  # (B, C, L)
    neg = m * (sign_of < 0).to(m.dtype)

    # exp without max-subtraction, as the original. It fills -1e9 before the exp; zeroing
    # after it gives the same values and is 3x faster (exp is slow on huge negatives).
    a = torch.exp(At * lambda_softmax) * (At > 0).to(At.dtype)
    a = a / (a.sum(dim=1, keepdim=True) + 1e-8)                    # l1norm (a >= 0)
    num = (a * A).sum(1)                                           # <w_l, u_l>
    Ga = torch.bmm(gram, a.reshape(B, R, C * L)).view(B, R, C, L)
    sq = (Ga * a).sum(1)                                           # ||u_l||^2
    # sqrt(max(q, eps^2)) = max(||u||, eps) with a finite gradient where no region passes
    pos_f = num / sq.clamp(min=1e-16).sqrt()
    return neg, pos_f


def naaf_sims(img_emb, cap_emb, cap_lens, thres, lambda_softmax, intra=True, gram=None):
    """Every (image, caption) pair at a fixed threshold: (B, R, d) x (C, L, d) -> (B, C),
    float64. intra=True is the evaluation score (xattn_score_test), intra=False the training
    formula. Computed in the inputs' dtype (the original evaluates float64 embeddings); the
    negative and positive word scores are summed in float64, as there. `gram`: the images'
    (B, R, R) Gram matrices, when the caller reuses them across caption blocks."""
    C, L, _ = cap_emb.shape
    mask = word_mask(cap_lens, L, cap_emb.device)                  # (C, L)
    A = word_region_cosines(img_emb, cap_emb)                      # (B, R, C, L)
    if gram is None:
        gram = torch.bmm(img_emb, img_emb.transpose(1, 2))         # (B, R, R)
    smooth = intra_smoothing(cap_emb, mask) if intra else None
    neg, pos_f = thresholded_scores(A, gram, thres, lambda_softmax, smooth)
    pos_r = relevance_scores(A, mask, lambda_softmax)
    s = neg.double() + (pos_f + pos_r).double()                    # (B, C, L)
    s = s.masked_fill(~mask[None], 0)
    return s.sum(-1) / mask.sum(-1).double()[None]                 # (B, C)


def naaf_sims_percaption(img_emb, cap_emb, cap_lens, thres, lambda_softmax, intra=True):
    """The original xattn_score_test (intra=True) / the training formula (intra=False), one
    caption at a time against every image, with the contexts built explicitly. Kept as the
    reference the vectorised path is tested against. Returns (B, C) float64."""
    B, R, _ = img_emb.shape
    sims = []
    for i in range(cap_emb.size(0)):
        n_word = int(cap_lens[i])
        cap_i = cap_emb[i, :n_word].unsqueeze(0)                   # (1, L, d)
        cap_i_expand = cap_i.repeat(B, 1, 1)                       # (B, L, d)
        attn = torch.bmm(cap_i_expand, img_emb.transpose(1, 2))    # (B, L, R)
        attn_thres = attn - torch.ones_like(attn) * thres
        row_max = attn_thres.max(dim=2)[0]                         # (B, L)
        if intra:
            intra_attn = torch.softmax(torch.bmm(cap_i, cap_i.transpose(1, 2)) *
                                       INTRA_TEMPERATURE, dim=2)   # (1, L, L)
            row_max_intra = torch.bmm(intra_attn.repeat(B, 1, 1), row_max.unsqueeze(-1))
            neg = row_max * row_max_intra.squeeze(-1).lt(0).double()
        else:
            neg = row_max * row_max.lt(0).to(row_max.dtype)
        pos_w = torch.exp(attn_thres.masked_fill(attn_thres <= 0, -1e9) * lambda_softmax)
        pos_w = l1norm(pos_w, dim=2)
        context = torch.bmm(pos_w, img_emb)                        # (B, L, d)
        pos_f = ((cap_i_expand * context).sum(2) /
                 torch.norm(context, 2, 2).clamp(min=1e-8))        # no squeeze: L=1 is fine
        rel = l2norm(F.leaky_relu(attn.transpose(1, 2), 0.1), dim=2)  # (B, R, L)
        rel = torch.softmax(rel.transpose(1, 2) * lambda_softmax, dim=2)  # (B, L, R)
        pos_r = attn.mul(rel).sum(-1)
        sims.append((neg + (pos_f + pos_r)).double().mean(dim=1, keepdim=True))
    return torch.cat(sims, 1)


# ----------------------------------------------------------------------------- threshold

class ThresholdLearner:
    """Discriminative Mismatch Mining: the statistics-based update of the threshold state in
    `opt`, caption by caption in batch order. Reproduces the original's every assignment:

    - caption i counts when its top-ranked image is image i. Its words' max raw cosine against
      image i joins the matched sample; against the LOWEST-scoring image (not the hardest
      negative) the mismatched one; the batch's matched-word count grows by L;
    - once the count exceeds 200: means and unbiased stds of the batch's samples (float32), the
      threshold where alpha * N(mu_n, s_n) meets N(mu_p, s_p) (a quadratic; only when its
      discriminant > 0), thres_safe = mu_p - 3 s_p; values < 0 or > 1 become 0 (not clipped to
      1); then new = 0.7 new + 0.3 old;
    - after every caption: while fewer than 200 matched words have been seen in this batch,
      thres = thres_safe = 0 (exactly 200 leaves them). The means and stds persist.
    """

    def __init__(self, opt):
        self.opt = opt
        self.start_batch()

    def start_batch(self):
        self.max_pos, self.max_neg, self.n_pos_word = [], [], 0

    def observe(self, i, sim_i, row_max):
        """Caption i of the batch was scored: sim_i (B,) its scores against the batch's images,
        row_max (B, L) the max over regions of its raw cosines against each image."""
        opt = self.opt
        if int(sim_i.argmax()) == i:
            self.max_pos.append(row_max[i])
            self.max_neg.append(row_max[int(sim_i.argmin())])
            self.n_pos_word += row_max.size(1)
            if self.n_pos_word > MIN_POS_WORDS:
                self._estimate()
        if self.n_pos_word < MIN_POS_WORDS:
            opt.thres = 0
            opt.thres_safe = 0

    def _estimate(self):
        opt = self.opt
        pos, neg = torch.cat(self.max_pos), torch.cat(self.max_neg)
        mu_p, mu_n = pos.mean(), neg.mean()
        s_p, s_n = pos.std(), neg.std()                            # unbiased, as torch's std
        qa = s_p.pow(2) - s_n.pow(2)
        qb = 2 * ((mu_p * s_n.pow(2)) - (mu_n * s_p.pow(2)))
        qc = ((mu_n * s_p).pow(2) - (mu_p * s_n).pow(2) +
              2 * (s_p * s_n).pow(2) * torch.log(s_n / (opt.alpha * s_p) + 1e-8))
        thres_old, thres_safe_old = opt.thres, opt.thres_safe
        # assignment order as the original (the fixtures log every one)
        opt.stnd_pos = s_p.item()
        opt.stnd_neg = s_n.item()
        opt.mean_pos = mu_p.item()
        opt.mean_neg = mu_n.item()
        disc = qb.pow(2) - 4 * qa * qc
        if disc > 0:
            opt.thres = ((-qb + torch.sqrt(disc)) / (2 * qa + 1e-10)).item()
            opt.thres_safe = (mu_p - 3 * opt.stnd_pos).item()
        for k in ("thres", "thres_safe"):
            if getattr(opt, k) < 0:
                setattr(opt, k, 0)
            if getattr(opt, k) > 1:
                setattr(opt, k, 0)  # the original's: above 1 is reset to 0, not clipped
        opt.thres = EMA_NEW * opt.thres + (1 - EMA_NEW) * thres_old
        opt.thres_safe = EMA_NEW * opt.thres_safe + (1 - EMA_NEW) * thres_safe_old


def train_sims(img_emb, cap_emb, cap_lens, opt, learner=None):
    """The training score (the original xattn_score): (B, R, d) x (C, L, d) -> (B, C), in the
    inputs' dtype, with the threshold learner run after each caption. Caption i is scored with
    the `opt.thres` left by captions 0..i-1, so captions go one at a time; the parts that do
    not depend on the threshold (cosines, relevance branch) are computed for all at once."""
    learner = learner or ThresholdLearner(opt)
    learner.start_batch()
    C, L, _ = cap_emb.shape
    mask = word_mask(cap_lens, L, cap_emb.device)
    A = word_region_cosines(img_emb, cap_emb)                      # (B, R, C, L)
    gram = torch.bmm(img_emb, img_emb.transpose(1, 2))             # (B, R, R)
    pos_r = relevance_scores(A, mask, opt.lambda_softmax)          # (B, C, L)
    row_max = A.detach().max(dim=1)[0]                             # (B, C, L) raw
    # unbind, not A[:, :, i]: the backward of each slice would be a full-size zero tensor
    A_cap, pos_r_cap = A.unbind(2), pos_r.unbind(1)                # C x (B, R, L), C x (B, L)
    cols = []
    for i in range(C):
        n = int(cap_lens[i])
        neg, pos_f = thresholded_scores(A_cap[i][:, :, None, :n], gram, opt.thres,
                                        opt.lambda_softmax)        # (B, 1, n) each
        sim_i = (neg + (pos_f + pos_r_cap[i][:, None, :n])).mean(-1)  # (B, 1)
        # fp32 samples for the threshold's statistics (no-op in fp32): NAAF.fp32_parts
        learner.observe(i, sim_i.detach()[:, 0].float(), row_max[:, i, :n].float())
        cols.append(sim_i)
    return torch.cat(cols, 1)                                      # (B, C)


# ----------------------------------------------------------------------------- wrapper

class NAAF(Matcher):
    """The two encoders, the hinge loss (max violation, hard-wired), Adam and the train step.
    `state_dict()` is the original checkpoint's `'model'` entry: [img_enc, txt_enc] state dicts.

    `forward_sim` follows the mode: after `train_start()` it is the training score (it moves
    the threshold state in `opt`); after `val_start()` the evaluation score at the fixed
    `opt.thres_safe`, with every pair scored at once (in blocks bounded by `sim_budget` bytes).
    """

    sim_budget = 2 ** 27
    # its hinge always takes the hardest negatives: with them, a smaller batch and its own
    # learning rate keep the demo from collapsing
    demo_flags = ["--batch_size", "16", "--learning_rate", "0.0005"]
    fp32_parts = {
        "the threshold learner's samples and statistics (train_sims, ThresholdLearner)":
            "the words' best-region cosines, their means and stds and the quadratic for the "
            "threshold: bf16 rounds a cosine near 0.3 by up to 0.001 (its step there is "
            "0.002), and sums of hundreds of samples in bf16 lose more, so that the learned "
            "threshold would move by rounding alone",
    }
    # the original train.py's defaults where they differ from SGRAF's
    defaults = {"learning_rate": 0.0005, "lr_update": 20, "num_epochs": 20,
                "lambda_softmax": 20.0}

    # ------------------------------------------------------------------ the class
    @classmethod
    def add_options(cls, parser):
        add_naaf_options(parser, add=cls.add_option)

    @classmethod
    def complete_opt(cls, opt):
        super().complete_opt(opt)
        return complete_naaf_opt(opt)

    @classmethod
    def check_opt(cls, opt, distributed=False):
        """Its hinge loss always takes the hardest negatives (hard-wired in the original), so
        --no-max_violation is refused rather than ignored; and it trains in one process."""
        if distributed:
            raise errors.error(
                "torchrun_unsupported", "--module_name NAAF", model="NAAF",
                why="it learns its threshold from the statistics of each batch, so every "
                    "process would learn its own and the checkpoint keep only rank 0's")
        if not opt.max_violation:
            raise errors.error("flag_unsupported", "--no-max_violation", model="NAAF",
                               why="its hinge loss always takes the hardest negatives, as the "
                                   "original")

    @classmethod
    def vocabulary(cls, opt):
        """SCAN's vocab for the basic text encoder, NAAF's GloVe vocab for the GloVe one."""
        path = naaf_vocab_file(opt, opt.vocab_path)
        return vocab.load_vocab(path, loader=load_naaf_vocab), path

    @classmethod
    def recognise(cls, ckpt):
        return "NAAF" if is_naaf_state(ckpt["model"], ckpt["opt"]) else None

    @classmethod
    def infer_flags(cls, state, opt=None):
        img, txt = state[0], state[1] if len(state) > 1 else {}
        shape = checkpoint.state_shape
        layers = [int(m.group(1)) for k in txt
                  for m in [re.match(r"rnn\.weight_ih_l(\d+)", k)] if m]
        embed = "embed.glove.weight" if "embed.glove.weight" in txt else "embed.weight"
        return {"module_name": "NAAF" if is_naaf_state(state, opt) else None,
                "img_dim": shape(img, "fc.weight", 1),
                "embed_size": shape(img, "fc.weight", 0),
                "vocab_size": shape(txt, embed, 0),
                "word_dim": shape(txt, embed, 1),
                "num_layers": max(layers) + 1 if layers else None,
                "precomp_enc_text_type": (("GloVe" if embed != "embed.weight" else "basic")
                                          if layers else None)}

    # ------------------------------------------------------------------ the instance
    def __init__(self, opt, device=None):
        complete_naaf_opt(opt)
        super().__init__(opt, device)
        if opt.precomp_enc_type != "basic":
            raise ValueError("only precomp_enc_type 'basic' is supported, got %r"
                             % (opt.precomp_enc_type,))
        self.img_enc = EncoderImage(opt.img_dim, opt.embed_size, no_imgnorm=opt.no_imgnorm)
        self.txt_enc = build_text_encoder(opt)
        self.criterion = ContrastiveLoss(margin=opt.margin, max_violation=True)
        self.learner = ThresholdLearner(opt)
        self.training = True
        self.setup()

    def modules(self):
        return [self.img_enc, self.txt_enc]

    def param_groups(self):
        # the original's order (text encoder, then img_enc.fc): Adam's state follows it
        return [{"params": ([p for p in self.txt_enc.parameters() if p.requires_grad] +
                            list(self.img_enc.fc.parameters())),
                 "lr": self.opt.learning_rate}]

    def state_dict(self):
        return [self.img_enc.state_dict(), _rename(self.txt_enc.state_dict(), _OURS, _THEIRS)]

    def load_state_dict(self, state_dict, strict=True):
        if len(state_dict) != 2:
            raise ValueError("expected 2 state dicts (img_enc, txt_enc), got %d"
                             % len(state_dict))
        self.img_enc.load_state_dict(state_dict[0], strict=strict)
        self.txt_enc.load_state_dict(_rename(state_dict[1], _THEIRS, _OURS), strict=strict)

    def resume(self, ckpt):
        """Weights, optimizer, iteration, and the learned threshold, which lives in opt."""
        super().resume(ckpt)
        restore_threshold_state(self.opt, ckpt["opt"])

    def train_start(self):
        self.training = True
        super().train_start()

    def val_start(self):
        self.training = False
        super().val_start()

    def forward_emb(self, images, captions, lengths, **extra):
        images = images.to(self.device, non_blocking=True)
        captions = captions.to(self.device, non_blocking=True)
        img_embs = self.img_enc(images)                            # (B, R, d)
        cap_embs = self.txt_enc(captions, lengths)                 # (C, L, d)
        return img_embs, cap_embs, lengths

    def forward_sim(self, img_embs, cap_embs, cap_lens):
        """(n_images, n_captions) scores: see the class docstring for the two modes."""
        if self.training:
            return train_sims(img_embs, cap_embs, cap_lens, self.opt, self.learner)
        return self.eval_sims(img_embs, cap_embs, cap_lens)

    def eval_sims(self, img_embs, cap_embs, cap_lens, thres=None):
        """Evaluation scores (B, C) float64 at `thres` (default opt.thres_safe). Captions are
        grouped by length so each block is padded only to its own longest caption."""
        self.opt.using_intra_info = True  # as the original's xattn_score_test
        thres = self.opt.thres_safe if thres is None else thres
        img_embs = torch.as_tensor(img_embs, device=self.device)
        cap_embs = torch.as_tensor(cap_embs, device=self.device)
        lens = torch.as_tensor(cap_lens, dtype=torch.int64)
        B, R, _ = img_embs.shape
        sims = torch.zeros(B, len(lens), dtype=torch.float64, device=self.device)
        if B == 0 or len(lens) == 0:
            return sims
        order = torch.argsort(lens, descending=True).to(self.device)
        # about 12 live (images, R, captions, L) tensors in the working dtype
        im_step = min(B, 128)
        per_word = 12 * im_step * R * img_embs.element_size()
        with torch.no_grad():
            for i in range(0, B, im_step):
                img = img_embs[i:i + im_step]
                gram = torch.bmm(img, img.transpose(1, 2))         # (b, R, R)
                start = 0
                while start < len(order):
                    L = int(lens[order[start]])                    # the block's longest
                    idx = order[start:start + max(1, self.sim_budget // (per_word * L))]
                    sims[i:i + im_step, idx] = naaf_sims(
                        img, cap_embs[idx, :L], lens[idx.cpu()], thres,
                        self.opt.lambda_softmax, intra=True, gram=gram)
                    start += len(idx)
        return sims

    def score(self, img_embs, cap_embs, cap_lens, shard_size=None, **extra):
        """Every pair at the fixed test threshold `opt.thres_safe`, in memory-bounded blocks
        (eval_sims); `shard_size` is not needed."""
        self.val_start()
        return self.eval_sims(img_embs, cap_embs, cap_lens).cpu().numpy()

    attention_info = ("SCAN's text-to-image attention of NAAF's relevance branch: for each "
                      "word, a softmax over the image's regions (temperature "
                      "{opt.lambda_softmax:g})")

    def word_region_attention(self, img_embs, cap_embs, cap_lens, **extra):
        """The weights of the positive relevance branch (relevance_attention) of each pair
        (image k, caption k) at evaluation: (cap_lens[k], R) each. (The thresholded branch's
        weights are not shown: a word whose regions all fall below the threshold has none.)"""
        self.val_start()
        out = []
        with torch.no_grad():
            for k, n in enumerate(cap_lens):
                img = torch.as_tensor(img_embs[k:k + 1], device=self.device)       # (1, R, d)
                cap = torch.as_tensor(cap_embs[k:k + 1, :int(n)], device=self.device)  # (1, L, d)
                A = word_region_cosines(img, cap)                   # (1, R, 1, L)
                beta = relevance_attention(A, None, self.opt.lambda_softmax)
                out.append(beta[0, :, 0, :].t().double().cpu().numpy())  # (L, R)
        return out

    def forward_loss(self, sims, ids=None):
        with fp32(sims) as sims:  # the loss in fp32 under --precision bf16
            loss = self.criterion(sims)
        # "Loss" as SGRAF's (the original NAAF's log says "Le"): the log line, TensorBoard and
        # runs.stop_on_nonfinite, which stops a non-finite loss before the step, read it
        self.logger.update("Loss", loss.item(), sims.size(0))
        return loss

    def train_loss(self, images, captions, lengths, ids=None, **extra):
        """The batch's captions are in collate order (longest first), which the threshold
        learner sees."""
        img_embs, cap_embs, cap_lens = self.forward_emb(images, captions, lengths)
        sims = train_sims(img_embs, cap_embs, cap_lens, self.opt, self.learner)
        loss = self.forward_loss(sims, ids=ids)
        return loss, loss

    # ------------------------------------------------------------------ benchmark (bench.py)
    # the original evaluation's shard_xattn(..., shard_size=128), caption by caption
    bench_ref_shard = 128
    no_reference_step_why = ("naaf.py has none; the step's threshold learner goes caption by "
                             "caption")

    @classmethod
    def add_bench_options(cls, parser):
        parser.add_argument("--thres_safe", type=float, default=0.3,
                            help="NAAF's test threshold (a checkpoint's learned opt.thres_safe)")
        parser.add_argument("--naaf_ref_fp64", action="store_true",
                            help="NAAF's per-caption reference in float64, as the original "
                                 "evaluates")

    @classmethod
    def bench_model(cls, args, name, variant=None):
        """The original's own options (complete_naaf_opt: lambda_softmax 20, the basic text
        encoder, learning rate 5e-4) and the test threshold of --thres_safe, default 0.3: the
        learned test threshold of the repository's NAAF fixture checkpoints (written by the
        original code: thres_safe 0.2998, mismatched words' best-region cosine 0.334 +-
        0.069)."""
        opt = bench_opt(args, name)
        del opt.bi_gru, opt.learning_rate  # SGRAF's, not the original NAAF's
        opt.thres_safe = args.thres_safe
        complete_naaf_opt(opt)
        return cls(opt), opt

    @classmethod
    def bench_embeddings(cls, args, rng, lens):
        """Embeddings near a BENCH_LATENT-dimensional subspace (naaf_bench_embeddings), so that
        each word's best-region cosine is 0.34 +- 0.07 as in the fixtures and the threshold
        splits the words (independent random 1024-d vectors would leave every cosine below it,
        and the positive branch at 0)."""
        img, cap = naaf_bench_embeddings(args, rng, lens)
        return img, cap, lens.tolist(), {}

    @classmethod
    def bench_precision(cls, args):
        return "fp32, thres_safe %g" % args.thres_safe  # no bf16 path

    @classmethod
    def bench_reference_label(cls, args):
        return "per-caption (%s)" % ("fp64" if args.naaf_ref_fp64 else "fp32")

    @classmethod
    def original_flops(cls, name, n_img, lens, R=36, d=1024, s=256, shard=100, intra=True):
        """xattn_score_test, `shard` images a shard: per pair the cosines (L x d x R) and the
        context (L x R x d), and with `intra` (evaluation) the smoothed mask (L x L x 1); per
        caption and image shard the word-word attention (L x d x L). intra=False: the training
        score."""
        n_im_shards = -(-n_img // shard)
        return sum(n_img * (4 * L * R * d + (2 * L * L if intra else 0)) +
                   (n_im_shards * 2 * L * L * d if intra else 0) for L in lens)

    def percaption_scores(self, args, img_embs, cap_embs, cap_lens, **extra):
        """The original's shard_xattn; float32 unless --naaf_ref_fp64 (the original evaluates
        float64 copies)."""
        return percaption_naaf_scores(self, img_embs, cap_embs, cap_lens, args.naaf_ref_fp64,
                                      self.bench_ref_shard)


BENCH_LATENT = 32  # bench.py's embeddings: the dimension of the subspace they lie near


def naaf_bench_embeddings(args, rng, lens, noise=0.3):
    """Unit vectors along z W + noise n: z ~ N(0, I_k), W a random k x d matrix of N(0, 1/k)
    entries (k = BENCH_LATENT), n ~ N(0, I_d). Cosines about N(0, 0.16), so each word's best of
    36 regions is at 0.34 +- 0.07 (d 1024; about the same at bench.py's --quick d 128)."""
    k, d = BENCH_LATENT, args.embed_size
    basis = rng.standard_normal((k, d)) * np.sqrt(1.0 / k)

    def vectors(*shape):
        v = rng.standard_normal(shape + (k,)) @ basis + noise * rng.standard_normal(shape + (d,))
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
    img = vectors(args.n_img, 36)
    cap = vectors(len(lens), int(lens.max()))
    cap *= (np.arange(lens.max())[None, :] < lens[:, None])[:, :, None]
    return img, cap


def percaption_naaf_scores(model, img_embs, cap_embs, cap_lens, fp64=False, shard_size=128):
    """The original NAAF shard_xattn: shard_size x shard_size shards, each scored caption by
    caption by xattn_score_test (naaf_sims_percaption) at opt.thres_safe: the oracle of
    NAAF.score."""
    opt, dtype = model.opt, torch.float64 if fp64 else torch.float32
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(0, len(img_embs), shard_size):
        for j in range(0, len(cap_embs), shard_size):
            lens = cap_lens[j:j + shard_size]
            with torch.no_grad():
                im = torch.from_numpy(img_embs[i:i + shard_size]).to(model.device, dtype)
                ca = torch.from_numpy(cap_embs[j:j + shard_size]).to(model.device, dtype)
                sim = naaf_sims_percaption(im, ca, lens, opt.thres_safe, opt.lambda_softmax,
                                           intra=True)
            sims[i:i + shard_size, j:j + shard_size] = sim.cpu().numpy()
    return sims
