"""SGRAF: Similarity Graph Reasoning (SGR) and Attention Filtration (SAF) for image-text matching.

Diao, Zhang, Ma, Lu, "Similarity Reasoning and Filtration for Image-Text Matching", AAAI 2021,
following the original code (Paranioar/SGRAF, python3.6 branch) formula by formula: every
parameter and buffer name is the original's, so the authors' checkpoints load strictly.

Read top to bottom:
  encoders       EncoderImage (FC + l2norm), EncoderText (bi-GRU, halves averaged, l2norm)
  global vectors VisualSA, TextSA (self-attention pooling)
  per pair       SCAN_attention (word -> region), local and global similarity vectors
  reasoning      GraphReasoning (SGR), AttentionFiltration (SAF)
  score          EncoderSimilarity: sigmoid(Linear(similarity vector)); `forward` scores all
                 pairs at once with the exact fast kernels of similarity.py, and
                 `forward_percaption` is the original loop, kept as the reference
  wrapper        SGRAF (contract.Matcher): the three encoders, the optimizer, the train step,
                 the sharded scoring

naaf.py and gsmn.py take the two encoders from here; the contract itself is contract.py.

Letters in shape comments: B images, C captions, R regions (36), L words, d embed_size,
s sim_dim.
"""
import re
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import checkpoint
import daa
import data
import errors
import similarity
from contract import Matcher, bench_opt, fp32, l1norm, l2norm, memory_budget
from daa import DAALoss
from loss import ContrastiveLoss


def init_xavier(modules):
    """The original's initialisation, written once: Xavier-uniform Linear weights with zero bias,
    BatchNorm weight 1 and bias 0. Only the modules given are touched (not their children)."""
    for m in modules:
        if isinstance(m, nn.Linear):
            r = np.sqrt(6.0) / np.sqrt(m.in_features + m.out_features)
            m.weight.data.uniform_(-r, r)
            m.bias.data.fill_(0)
        elif isinstance(m, nn.BatchNorm1d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


# ----------------------------------------------------------------------------- encoders

class EncoderImage(nn.Module):
    """Region features (B, R, img_dim) -> region embeddings (B, R, d)."""

    def __init__(self, img_dim, embed_size, no_imgnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_imgnorm = no_imgnorm
        self.fc = nn.Linear(img_dim, embed_size)
        init_xavier([self.fc])

    def forward(self, images):
        img_emb = self.fc(images)  # (B, R, d)
        if not self.no_imgnorm:
            img_emb = l2norm(img_emb, dim=-1)
        return img_emb


class EncoderText(nn.Module):
    """Word ids (C, L) -> word embeddings (C, L, d) by a (bi-)GRU; the two directions are
    averaged, not concatenated."""

    def __init__(self, vocab_size, word_dim, embed_size, num_layers, use_bi_gru=False,
                 no_txtnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(0.4)
        self.use_bi_gru = use_bi_gru
        self.cap_rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                              bidirectional=use_bi_gru)
        self.embed.weight.data.uniform_(-0.1, 0.1)  # GRU keeps PyTorch's default init

    def forward(self, captions, lengths):
        x = self.dropout(self.embed(captions))  # (C, L, word_dim)
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.cap_rnn(packed)
        cap_emb, _ = pad_packed_sequence(out, batch_first=True)  # (C, L, d or 2d)
        if self.use_bi_gru:
            half = cap_emb.size(2) // 2
            cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2  # (C, L, d)
        if not self.no_txtnorm:
            cap_emb = l2norm(cap_emb, dim=-1)
        return cap_emb


# ----------------------------------------------------------------------------- global vectors

class VisualSA(nn.Module):
    """Global image vector by self-attention over regions. The local branch's BatchNorm1d has
    the R regions as channels (statistics over images and features), as the original."""

    def __init__(self, embed_dim, dropout_rate, num_region):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim),
                                             nn.BatchNorm1d(num_region),
                                             nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim),
                                              nn.BatchNorm1d(embed_dim),
                                              nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        for seq in self.children():
            init_xavier(seq)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, local, raw_global):
        # local: (B, R, d) regions, or (C, L, d) words for TextSA
        l_emb = self.embedding_local(local)                       # (B, R, d)
        g_emb = self.embedding_global(raw_global)                 # (B, d)
        weights = self.embedding_common(l_emb * g_emb.unsqueeze(1)).squeeze(2)  # (B, R)
        weights = self.softmax(weights)
        new_global = (weights.unsqueeze(2) * local).sum(dim=1)    # (B, d): the INPUT vectors
        return l2norm(new_global, dim=-1)


class TextSA(VisualSA):
    """Global caption vector by self-attention over its real words (no BatchNorm); the same
    attention pooling as VisualSA (`forward` is inherited)."""

    def __init__(self, embed_dim, dropout_rate):
        nn.Module.__init__(self)
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim),
                                             nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim),
                                              nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        for seq in self.children():
            init_xavier(seq)
        self.softmax = nn.Softmax(dim=1)


# ----------------------------------------------------------------------------- reasoning

class GraphReasoning(nn.Module):
    """One SGR step over the L+1 similarity nodes: edges = softmax_k((Wq n)(Wk n)^T) with no
    1/sqrt(s) scaling, new nodes = ReLU(Wg(edges @ nodes))."""

    def __init__(self, sim_dim):
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        self.relu = nn.ReLU()
        init_xavier(self.children())

    def forward(self, sim_emb):
        sim_query = self.graph_query_w(sim_emb)                   # (B, L+1, s)
        sim_key = self.graph_key_w(sim_emb)                       # (B, L+1, s)
        sim_edge = torch.softmax(torch.bmm(sim_query, sim_key.transpose(1, 2)), dim=-1)
        return self.relu(self.sim_graph_w(torch.bmm(sim_edge, sim_emb)))  # (B, L+1, s)


class AttentionFiltration(nn.Module):
    """SAF: gates sigmoid(BN(Linear(node))), L1-normalised over the nodes; the gated sum of the
    nodes, l2-normalised. BatchNorm1d(1) sees all B x (L+1) gate logits of one caption."""

    def __init__(self, sim_dim):
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        init_xavier(self.children())

    def forward(self, sim_emb):
        logits = self.attn_sim_w(sim_emb).transpose(1, 2)         # (B, 1, L+1)
        sim_attn = l1norm(torch.sigmoid(self.bn(logits)), dim=-1)
        sim_saf = torch.matmul(sim_attn, sim_emb).squeeze(1)      # (B, s)
        return l2norm(sim_saf, dim=-1)


def SCAN_attention(query, context, smooth, eps=1e-8):
    """Text-to-image attention of SCAN. query: words (n, L, d); context: regions (n, R, d).
    Returns the attended region context of every word, (n, L, d), l2-normalised.
    Op for op as the original (its two `.contiguous()` copies included), so that the
    per-caption reference also runs at the original's speed (bench.py compares with it)."""
    attn = torch.bmm(context, query.transpose(1, 2))              # (n, R, L)
    attn = F.leaky_relu(attn, 0.1)
    attn = l2norm(attn, 2)                                        # across the words
    attn = attn.transpose(1, 2).contiguous()                      # (n, L, R)
    attn = F.softmax(attn * smooth, dim=2)                        # over regions
    attnT = attn.transpose(1, 2).contiguous()                     # (n, R, L)
    weighted = torch.bmm(context.transpose(1, 2), attnT)          # (n, d, L)
    return l2norm(weighted.transpose(1, 2), dim=-1)               # (n, L, d)


# ----------------------------------------------------------------------------- similarity

class EncoderSimilarity(nn.Module):
    """Score every (image, caption) pair: (B, R, d) x (C, L, d) -> (B, C) in (0, 1)."""

    def __init__(self, embed_size, sim_dim, module_name, sgr_step=3, num_region=36):
        super().__init__()
        self.module_name = module_name
        self.v_global_w = VisualSA(embed_size, 0.4, num_region)
        self.t_global_w = TextSA(embed_size, 0.4)
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        self.sigmoid = nn.Sigmoid()
        if module_name == "SGR":
            self.SGR_module = nn.ModuleList([GraphReasoning(sim_dim) for _ in range(sgr_step)])
        elif module_name == "SAF":
            self.SAF_module = AttentionFiltration(sim_dim)
        else:
            raise ValueError("module_name must be SGR or SAF, got %r" % (module_name,))
        # Only the direct Linear children: the sub-modules above initialised their own layers.
        init_xavier(self.children())

    def scorer(self, bn_stats=None):
        """The head as similarity.py's kernels take it: nodes of a block of pairs -> scores."""
        if self.module_name == "SGR":
            return similarity.sgr_scorer(self.SGR_module, self.sim_eval_w)
        return similarity.saf_scorer(self.SAF_module, self.sim_eval_w, bn_stats)

    def forward(self, img_emb, cap_emb, cap_lens, img_glo=None, cap_glo=None, out=None,
                loss_fn=None, word_pairs=None):
        """All pairs at once (similarity.py): img_emb (B, R, d), cap_emb (C, L, d) -> (B, C).
        The global vectors may be given precomputed (`image_globals`, `caption_globals`);
        without autograd the scores can be written into `out` (B, C). `word_pairs`: (image,
        word) pairs per block (memory; similarity.WORD_PAIRS by default).

        In SAF training the BatchNorm statistics are per caption and its running stats are
        updated once per caption, as the original.

        With `loss_fn` (SGR training) it returns `similarity.subset_loss(...)`, (loss,
        surrogate, scores), instead: going through `forward` lets a DistributedDataParallel
        wrapper see the step (its reducer is prepared from the outputs of `forward`)."""
        if img_glo is None:
            img_glo = self.image_globals(img_emb)                 # (B, d)
        if cap_glo is None:
            cap_glo = self.caption_globals(cap_emb, cap_lens)     # (C, d)
        parts = (img_emb, cap_emb, cap_lens, img_glo, cap_glo, self.sim_tranloc_w,
                 self.sim_tranglo_w)
        if loss_fn is not None:
            return similarity.subset_loss(*parts, self.scorer(), loss_fn)
        saf_train = self.module_name == "SAF" and self.SAF_module.bn.training
        stats, order = ([], []) if saf_train else (None, None)
        sims = similarity.similarity_matrix(*parts, self.scorer(stats), per_caption=saf_train,
                                            block_order=order, word_pairs=word_pairs, out=out)
        if saf_train:
            similarity.update_bn_per_caption(self.SAF_module.bn, stats, torch.cat(order))
        return sims

    def image_globals(self, img_emb):
        """VisualSA global vectors (B, d)."""
        return self.v_global_w(img_emb, img_emb.mean(1))

    def caption_globals(self, cap_emb, cap_lens):
        """TextSA global vectors over each caption's real words (C, d)."""
        return similarity.caption_globals(self.t_global_w, cap_emb, cap_lens)

    def forward_percaption(self, img_emb, cap_emb, cap_lens):
        """The original computation, one caption at a time against all images, op for op
        (the caption is `repeat`ed over the images, not broadcast), so that it also has the
        original's speed and memory. It is the reference that the fast paths are tested and
        benchmarked against."""
        n_image = img_emb.size(0)
        img_glo = self.v_global_w(img_emb, img_emb.mean(1))       # (B, d)
        sim_all = []
        for i in range(cap_emb.size(0)):
            n_word = int(cap_lens[i])
            cap_i = cap_emb[i, :n_word, :].unsqueeze(0)           # (1, L, d)
            cap_i_expand = cap_i.repeat(n_image, 1, 1)            # (B, L, d)
            cap_glo_i = self.t_global_w(cap_i, cap_i.mean(1))     # (1, d)

            context = SCAN_attention(cap_i_expand, img_emb, smooth=9.0)
            sim_loc = l2norm(self.sim_tranloc_w((context - cap_i_expand).pow(2)), dim=-1)
            sim_glo = l2norm(self.sim_tranglo_w((img_glo - cap_glo_i).pow(2)), dim=-1)
            sim_emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)  # (B, L+1, s)

            if self.module_name == "SGR":
                for module in self.SGR_module:
                    sim_emb = module(sim_emb)
                sim_vec = sim_emb[:, 0, :]                        # the global node
            else:
                sim_vec = self.SAF_module(sim_emb)
            sim_all.append(self.sigmoid(self.sim_eval_w(sim_vec)))  # (B, 1)
        return torch.cat(sim_all, 1)                              # (B, C)


# ----------------------------------------------------------------------------- SGRAF

class SGRAF(Matcher):
    """The three encoders, the hinge loss (and DAA), Adam, the train step and the sharded
    scoring. `state_dict()` is the original checkpoint's `'model'` entry: [img_enc, txt_enc,
    sim_enc] state dicts.

    Under torchrun, `ddp()` wraps the encoders in DistributedDataParallel for the train step
    only: `img_enc`, `txt_enc`, `sim_enc` stay the bare modules, so `state_dict()` never has
    DDP's `module.` prefix and evaluation never makes a collective call."""

    state_names = ("img_enc", "txt_enc", "sim_enc")
    num_regions = (36, "VisualSA's BatchNorm1d(36)")
    fp32_parts = {
        "SAF's gate BatchNorm (similarity.saf_head)":
            "its per-caption statistics of the B x (L+1) gate logits: in bf16 (8 bits of "
            "mantissa) the variance of close logits loses its digits, and the running stats "
            "(updated per caption) would drift",
        "DAA's two terms (forward_loss)": "part of the loss; they rank the batch's scores "
                                          "against the semantics, which bf16 ties",
    }
    # the sum of violations: from random weights on the demo's small dataset, whose images
    # share concepts, the hardest-negative hinge (the default for real data) collapses every
    # score to one value, as VSE++ warns for training from scratch
    demo_flags = ["--sim_dim", "64", "--no-max_violation"]

    @classmethod
    def add_options(cls, parser):
        g = parser.add_argument_group("SGR, SAF (model.py)")
        add = cls.add_option
        add(g, "--sim_dim", default=256, type=int, help="dimension of the similarity vectors")
        add(g, "--sgr_step", default=3, type=int, help="number of SGR reasoning steps")
        add(g, "--daa_weight", default=0.0, type=float,
            help="weight of the DAA ranking loss (0 disables it)")
        add(g, "--daa_rowwise", action="store_true",
            help="rank each query's candidates within its own row (fixes the original's index "
                 "slip; changes the numbers)")
        add(g, "--sum_violation_warmup", default=0, type=int,
            help="epochs of sum-of-violations hinge before the hardest negative (as "
                 "VSE-infinity's warm-up; 0, the original, disables it)")

    @classmethod
    def check_opt(cls, opt, distributed=False):
        errors.check_positive(opt, ("sim_dim", "sgr_step"))
        errors.check_nonnegative(opt, ("daa_weight", "sum_violation_warmup"))

    @classmethod
    def check_train_data(cls, n_captions, batch_size):
        # a shuffled epoch whose last batch holds one pair crashes in BatchNorm1d
        data.check_last_batch(n_captions, batch_size)

    @classmethod
    def recognise(cls, ckpt):
        state = ckpt["model"]
        if len(state) == 3 and "fc.weight" in state[0]:
            return cls.infer_flags(state)["module_name"]
        return None

    @classmethod
    def infer_flags(cls, state, opt=None):
        img, txt = state[0], state[1] if len(state) > 1 else {}
        sim = state[2] if len(state) > 2 else {}
        shape = checkpoint.state_shape
        layers = [int(m.group(1)) for k in txt
                  for m in [re.match(r"cap_rnn\.weight_ih_l(\d+)", k)] if m]
        steps = {k.split(".")[1] for k in sim if k.startswith("SGR_module.")}
        module = ("SGR" if steps else
                  "SAF" if any(k.startswith("SAF_module.") for k in sim) else None)
        return {"module_name": module, "img_dim": shape(img, "fc.weight", 1),
                "embed_size": shape(img, "fc.weight", 0),
                "vocab_size": shape(txt, "embed.weight", 0),
                "word_dim": shape(txt, "embed.weight", 1),
                "num_layers": max(layers) + 1 if layers else None,
                "bi_gru": any(k.endswith("_reverse") for k in txt) if layers else None,
                "sim_dim": shape(sim, "sim_eval_w.weight", 1),
                "sgr_step": len(steps) if steps else None}

    def __init__(self, opt, device=None):
        super().__init__(opt, device)
        self.img_enc = EncoderImage(opt.img_dim, opt.embed_size, no_imgnorm=opt.no_imgnorm)
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size,
                                   opt.num_layers, use_bi_gru=opt.bi_gru,
                                   no_txtnorm=opt.no_txtnorm)
        self.sim_enc = EncoderSimilarity(opt.embed_size, opt.sim_dim, opt.module_name,
                                         opt.sgr_step)
        self.criterion = ContrastiveLoss(margin=opt.margin, max_violation=opt.max_violation)
        self.daa = (DAALoss(opt.daa_weight, rowwise=getattr(opt, "daa_rowwise", False))
                    if getattr(opt, "daa_weight", 0) > 0 else None)
        self.tfidf = None
        self.setup()

    def modules(self):
        return [self.img_enc, self.txt_enc, self.sim_enc]

    def param_groups(self):
        # The original's parameter order (text, image, similarity): Adam's state follows it.
        return [{"params": (list(self.txt_enc.parameters()) + list(self.img_enc.parameters()) +
                            list(self.sim_enc.parameters())),
                 "lr": self.opt.learning_rate}]

    def start_epoch(self, epoch, lr_scale=1):
        super().start_epoch(epoch, lr_scale)
        # optional warm-up (not in the original): the sum of violations for the first epochs
        self.criterion.max_violation = (self.opt.max_violation and
                                        epoch >= getattr(self.opt, "sum_violation_warmup", 0))

    def ddp(self, device_ids=None):
        """Wrap the encoders in DistributedDataParallel (the process group must be initialised;
        `device_ids=[local_rank]` on CUDA, None on CPU). DDP averages the gradients over the
        processes in the backward pass and broadcasts rank 0's BatchNorm buffers at each
        training forward. On CUDA the BatchNorm layers become SyncBatchNorm (the same
        parameters and buffers, so the optimizer and the checkpoint keys are unchanged).
        sim_enc needs `find_unused_parameters`: in SGR's pair-subset step SGR's folded key bias
        (graph_key_w.bias) is never in the graph, and in a batch where no pair violates the
        margin only the global vectors are; such parameters keep grad None on every rank and
        after_backward fills the exact zero, as in a single process."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.device.type == "cuda":
            self.sim_enc = nn.SyncBatchNorm.convert_sync_batchnorm(self.sim_enc)
        self._ddp = (DDP(self.img_enc, device_ids=device_ids),
                     DDP(self.txt_enc, device_ids=device_ids),
                     DDP(self.sim_enc, device_ids=device_ids, find_unused_parameters=True))
        return self

    def forward_emb(self, images, captions, lengths, **extra):
        """Region and word embeddings by the bare encoders (evaluation)."""
        return self._embed(self.img_enc, self.txt_enc, images, captions, lengths)

    def _embed(self, img_enc, txt_enc, images, captions, lengths):
        images = images.to(self.device, non_blocking=True)
        captions = captions.to(self.device, non_blocking=True)
        img_embs = img_enc(images)                                # (B, R, d)
        cap_embs = txt_enc(captions, lengths)                     # (C, L, d)
        return img_embs, cap_embs, lengths

    def forward_sim(self, img_embs, cap_embs, cap_lens):
        return self.sim_enc(img_embs, cap_embs, cap_lens)

    def forward_loss(self, sims, ids=None):
        """The hinge loss of a (B, B) score matrix, plus DAA's two terms when `--daa_weight`
        is set (`ids`: the batch's caption indices in the split, for the semantics). In fp32
        under --precision bf16 (contract.fp32)."""
        with fp32(sims) as sims:
            loss = self.criterion(sims)
            if self.daa is not None:
                self.logger.update("Hinge", loss.item(), sims.size(0))
                sems = daa.batch_semantics(self.tfidf, None, ids).to(sims.device)
                daa_i2t, daa_t2i = self.daa(sims, sems)
                self.logger.update("DAA_i2t", daa_i2t.item(), sims.size(0))
                self.logger.update("DAA_t2i", daa_t2i.item(), sims.size(0))
                loss = loss + daa_i2t + daa_t2i
        self.logger.update("Loss", loss.item(), sims.size(0))
        return loss

    def set_semantics(self, captions):
        """The training split's captions, for DAA's TF-IDF semantics (no-op without DAA)."""
        if self.daa is not None:
            self.tfidf = daa.caption_tfidf(captions)

    def train_loss(self, images, captions, lengths, ids=None, **extra):
        # through the DDP wrappers under torchrun (each process scores its own batch; the
        # backward averages the gradients over the processes)
        img_enc, txt_enc, sim_enc = self.trained()
        img_embs, cap_embs, cap_lens = self._embed(img_enc, txt_enc, images, captions, lengths)
        if self.sim_enc.module_name == "SGR" and self.daa is None:
            # only the pairs whose score the loss's gradient touches get a graph (exact: every
            # score is a function of its pair alone once the global vectors are computed):
            # EncoderSimilarity.subset_loss, called through forward. Not with DAA, whose
            # gradient reaches every pair: there one pass with autograd over the whole matrix
            # is cheaper than a no-grad pass followed by that same pass.
            loss, surrogate, _ = sim_enc(img_embs, cap_embs, cap_lens,
                                         loss_fn=lambda sims: self.forward_loss(sims, ids=ids))
            return loss, surrogate
        # SAF's training BatchNorm ties all images of a caption; DAA's gradient is dense: the
        # full graph
        loss = self.forward_loss(sim_enc(img_embs, cap_embs, cap_lens), ids=ids)
        return loss, loss

    def after_backward(self):
        if self.sim_enc.module_name == "SGR":  # the folded key bias: exactly zero gradient
            for m in self.sim_enc.SGR_module:
                if m.graph_key_w.bias.grad is None:
                    m.graph_key_w.bias.grad = torch.zeros_like(m.graph_key_w.bias)

    attention_info = ("SCAN's text-to-image attention: for each word, a softmax over the image's "
                      "regions (temperature 9)")

    def word_region_attention(self, img_embs, cap_embs, cap_lens, **extra):
        """SCAN's text-to-image attention of each pair (image k, caption k), the weights with
        which SGR and SAF build each word's attended context: (cap_lens[k], R) each, computed
        by the same function as the scores (similarity.cross_attention)."""
        self.val_start()
        out = []
        with torch.no_grad():
            for k, n in enumerate(cap_lens):
                V = torch.as_tensor(np.asarray(img_embs[k:k + 1], dtype=np.float32),
                                    device=self.device)            # (1, R, d)
                W = torch.as_tensor(np.asarray(cap_embs[k:k + 1, :int(n)], dtype=np.float32),
                                    device=self.device)            # (1, L, d)
                attn = similarity.cross_attention(V, W)            # (1, L, R)
                out.append(attn[0].double().cpu().numpy())
        return out

    def gallery_inputs(self, img_embs, chunk=256):
        """VisualSA's global vector of every image (n_images, d), the query-independent part
        of the scores (at full dimensions about 8x the rest of one caption's scores)."""
        self.val_start()
        out = np.empty((len(img_embs), img_embs.shape[-1]), dtype=np.float32)
        with torch.no_grad():
            for i in range(0, len(img_embs), chunk):
                im = torch.from_numpy(np.asarray(img_embs[i:i + chunk], dtype=np.float32))
                out[i:i + chunk] = self.sim_enc.image_globals(im.to(self.device)).float().cpu()
        return {"img_glo": out}

    def caption_inputs(self, cap_embs, cap_lens, chunk=256):
        """TextSA's global vector of every caption (n_captions, d): at full dimensions about
        half of the time of scoring one image against its candidate captions."""
        self.val_start()
        out = np.empty((len(cap_embs), cap_embs.shape[-1]), dtype=np.float32)
        with torch.no_grad():
            for j in range(0, len(cap_embs), chunk):
                lens = [int(n) for n in cap_lens[j:j + chunk]]
                ca = torch.from_numpy(np.ascontiguousarray(cap_embs[j:j + chunk, :max(lens)],
                                                           dtype=np.float32))
                out[j:j + chunk] = self.sim_enc.caption_globals(ca.to(self.device),
                                                                lens).float().cpu()
        return {"cap_glo": out}

    def score(self, img_embs, cap_embs, cap_lens, shard_size=None, img_glo=None, cap_glo=None,
              **extra):
        """The (n_images, n_captions) similarity matrix, float64 as the original, scored shard by
        shard and written into the result as each shard is done. `img_glo`: the images' global
        vectors (n_images, d) when computed beforehand (gallery_inputs); `cap_glo`: the
        captions' (n_captions, d) likewise (caption_inputs).

        `shard_size` given: shards of shard_size images x shard_size captions (the original's
        100). None: the shard sizes follow the memory available (`memory_budget`); the peak
        does not grow with the number of images or captions. The image global vectors are
        computed once per image shard, the caption ones once per caption shard (kept when they
        are small). `opt.precision == 'bf16'` scores under bf16 autocast (CUDA, or CPUs with
        bf16)."""
        self.val_start()
        device, sim_enc = self.device, self.sim_enc
        n_im, n_cap = len(img_embs), len(cap_embs)
        sims = np.zeros((n_im, n_cap))
        if n_im == 0 or n_cap == 0:
            return sims
        r, d = img_embs.shape[1], img_embs.shape[2]
        if shard_size:
            im_shard = cap_shard = int(shard_size)
        else:
            budget = memory_budget()
            # per image: the regions and VisualSA's temporaries; per caption: its words, a
            # length-block copy, the score columns
            im_shard = max(1, min(n_im, budget // 2 // (4 * r * d * 4)))
            per_cap = cap_embs.shape[1] * d * 4 * 2 + im_shard * 4 * 2
            cap_shard = max(1, min(n_cap, budget // 2 // per_cap))
        keep_cap_glo = n_cap * d * 4 <= 2 ** 27
        cap_glo_cache = {}
        bf16 = getattr(self.opt, "precision", "fp32") == "bf16"
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        shards = [(i, j) for i in range(0, n_im, im_shard) for j in range(0, n_cap, cap_shard)]
        glo, img_at = None, None
        for i, j in self.progress(shards, desc="shard_attn_scores"):
            im_end, ca_end = min(i + im_shard, n_im), min(j + cap_shard, n_cap)
            lens = cap_lens[j:ca_end]
            with torch.no_grad(), amp:
                im = torch.from_numpy(np.asarray(img_embs[i:im_end], dtype=np.float32)).to(device)
                ca = torch.from_numpy(np.ascontiguousarray(cap_embs[j:ca_end, :max(lens)],
                                                           dtype=np.float32)).to(device)
                if img_at != i:
                    img_at = i
                    glo = (sim_enc.image_globals(im) if img_glo is None else
                           torch.from_numpy(np.asarray(img_glo[i:im_end])).to(device))
                glo_c = cap_glo_cache.get(j)
                if glo_c is None:
                    glo_c = (sim_enc.caption_globals(ca, lens) if cap_glo is None else
                             torch.from_numpy(np.asarray(cap_glo[j:ca_end])).to(device))
                    if keep_cap_glo:
                        cap_glo_cache[j] = glo_c
                sim = sim_enc(im, ca, lens, img_glo=glo, cap_glo=glo_c)
            sims[i:im_end, j:ca_end] = sim.float().cpu().numpy()
        return sims

    # ------------------------------------------------------------------ reference and benchmark
    def forward_sim_percaption(self, img_embs, cap_embs, cap_lens):
        """The original's scores of a batch, caption by caption, with autograd (the reference
        of the train step: Matcher.reference_train_step)."""
        return self.sim_enc.forward_percaption(img_embs, cap_embs, cap_lens)

    def percaption_scores(self, args, img_embs, cap_embs, cap_lens, **extra):
        return percaption_shard_scores(self, img_embs, cap_embs, cap_lens, self.bench_ref_shard)

    trains_with_daa = True

    @classmethod
    def bench_model(cls, args, name, variant=None):
        """SGR or SAF at bench.py's sizes, 3 SGR steps, DAA at bench.py's --daa_weight."""
        opt = bench_opt(args, name)
        opt.sim_dim, opt.sgr_step = args.sim_dim, 3
        opt.daa_weight, opt.daa_rowwise = args.daa_weight, False
        return cls(opt), opt

    @classmethod
    def bench_precision(cls, args):
        return args.precision  # bf16 autocast in score

    @classmethod
    def original_flops(cls, name, n_img, lens, R=36, d=1024, s=256, shard=100, intra=True,
                       sgr_step=3):
        """Per pair with L words: SCAN scores (R x d x L) and context (L x R x d);
        sim_tranloc_w on L vectors (d -> s) and sim_tranglo_w on one; per SGR step three
        Linear(s, s) on the L+1 nodes and two (L+1) x (L+1) x s products; SAF: Linear(s, 1) and
        the weighted sum of the L+1 nodes; sim_eval_w. Per caption: TextSA (two Linear(d, d)
        and Linear(d, 1) on L words). Per shard of `shard` captions: VisualSA on all the images
        (the original recomputes it per call)."""
        total = 0
        for L in lens:
            N = L + 1
            pair = 2 * R * d * L * 2 + 2 * L * d * s + 2 * d * s + 2 * s
            if name == "SGR":
                pair += sgr_step * (3 * 2 * N * s * s + 2 * 2 * N * N * s)
            else:
                pair += 2 * N * s + 2 * N * s
            total += n_img * pair + 2 * L * d * d + 2 * d * d + 2 * L * d
        n_shards = -(-len(lens) // shard)
        total += n_shards * n_img * (2 * R * d * d + 2 * d * d + 2 * R * d)
        return total


def percaption_shard_scores(model, img_embs, cap_embs, cap_lens, shard_size=100):
    """The original shard_attn_scores: 100 x 100 shards, caption by caption
    (EncoderSimilarity.forward_percaption): the oracle of SGRAF.score."""
    sims = np.zeros((len(img_embs), len(cap_embs)))
    for i in range(0, len(img_embs), shard_size):
        for j in range(0, len(cap_embs), shard_size):
            lens = cap_lens[j:j + shard_size]
            with torch.no_grad():
                im = torch.from_numpy(img_embs[i:i + shard_size]).to(model.device)
                ca = torch.from_numpy(cap_embs[j:j + shard_size, :max(lens)]).to(model.device)
                sim = model.sim_enc.forward_percaption(im, ca, lens)
            sims[i:i + shard_size, j:j + shard_size] = sim.cpu().numpy()
    return sims
