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
  wrapper        SGRAF: the three encoders, the optimizer and the train step
  factory        build_model: SGRAF for --module_name SGR/SAF, naaf.NAAF for NAAF

Letters in shape comments: B images, C captions, R regions (36), L words, d embed_size,
s sim_dim.
"""
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.clip_grad import clip_grad_norm_
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import daa
import similarity
from daa import DAALoss
from loss import ContrastiveLoss  # noqa: F401  (the original exposes it from model.py)
from meters import LogCollector

log = logging.getLogger(__name__)


def l1norm(X, dim, eps=1e-8):
    """X / (sum |X| + eps) along dim."""
    return X / (X.abs().sum(dim=dim, keepdim=True) + eps)


def l2norm(X, dim=-1, eps=1e-8):
    """X / (||X|| + eps) along dim: the eps is added after the square root, as the original."""
    return X / (X.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


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

    def __init__(self, embed_size, sim_dim, module_name="AVE", sgr_step=3, num_region=36):
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

    def forward(self, img_emb, cap_emb, cap_lens, img_glo=None, cap_glo=None, out=None,
                loss_fn=None):
        """All pairs at once (similarity.py): img_emb (B, R, d), cap_emb (C, L, d) -> (B, C).
        The global vectors may be given precomputed (`image_globals`, `caption_globals`);
        without autograd the scores can be written into `out` (B, C).

        With `loss_fn` (SGR training) it returns `similarity.subset_loss(self, ..., loss_fn)`,
        (loss, surrogate, scores), instead: going through `forward` lets a
        DistributedDataParallel wrapper see the step (its reducer is prepared from the
        outputs of `forward`, and subset_loss calls the submodules directly)."""
        if loss_fn is not None:
            return similarity.subset_loss(self, img_emb, cap_emb, cap_lens, loss_fn)
        return similarity.similarity_matrix(self, img_emb, cap_emb, cap_lens, img_glo, cap_glo,
                                            out=out)

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


# ----------------------------------------------------------------------------- wrapper

class SGRAF:
    """The three encoders, the hinge loss, Adam, and the train step. `state_dict()` is the
    original checkpoint's `'model'` entry: [img_enc, txt_enc, sim_enc] state dicts.

    Under torchrun, `ddp()` wraps the encoders in DistributedDataParallel for the train step
    only: `img_enc`, `txt_enc`, `sim_enc` stay the bare modules, so `state_dict()` never has
    DDP's `module.` prefix and evaluation never makes a collective call."""

    def __init__(self, opt, device=None):
        self.opt = opt
        self.device = torch.device(device or getattr(opt, "device", None) or
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.grad_clip = opt.grad_clip
        self.img_enc = EncoderImage(opt.img_dim, opt.embed_size, no_imgnorm=opt.no_imgnorm)
        self.txt_enc = EncoderText(opt.vocab_size, opt.word_dim, opt.embed_size,
                                   opt.num_layers, use_bi_gru=opt.bi_gru,
                                   no_txtnorm=opt.no_txtnorm)
        self.sim_enc = EncoderSimilarity(opt.embed_size, opt.sim_dim, opt.module_name,
                                         opt.sgr_step)
        for m in self.modules():
            m.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.criterion = ContrastiveLoss(margin=opt.margin, max_violation=opt.max_violation)
        # The original's parameter order (text, image, similarity): Adam's state follows it.
        self.params = (list(self.txt_enc.parameters()) + list(self.img_enc.parameters()) +
                       list(self.sim_enc.parameters()))
        self.optimizer = torch.optim.Adam(self.params, lr=opt.learning_rate)
        self.Eiters = 0
        self.logger = LogCollector()
        self.daa = (DAALoss(opt.daa_weight, rowwise=getattr(opt, "daa_rowwise", False))
                    if getattr(opt, "daa_weight", 0) > 0 else None)
        self.tfidf = None
        self._ddp = None  # (img, txt, sim) DistributedDataParallel wrappers after ddp()

    def ddp(self, device_ids=None):
        """Wrap the encoders in DistributedDataParallel (the process group must be initialised;
        `device_ids=[local_rank]` on CUDA, None on CPU). DDP averages the gradients over the
        processes in the backward pass and broadcasts rank 0's BatchNorm buffers at each
        training forward. On CUDA the BatchNorm layers become SyncBatchNorm (the same
        parameters and buffers, so the optimizer and the checkpoint keys are unchanged).
        sim_enc needs `find_unused_parameters`: in SGR's pair-subset step SGR's folded key bias
        (graph_key_w.bias) is never in the graph, and in a batch where no pair violates the
        margin only the global vectors are; such parameters keep grad None on every rank and
        train_emb fills the exact zero, as in a single process."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.device.type == "cuda":
            self.sim_enc = nn.SyncBatchNorm.convert_sync_batchnorm(self.sim_enc)
        self._ddp = (DDP(self.img_enc, device_ids=device_ids),
                     DDP(self.txt_enc, device_ids=device_ids),
                     DDP(self.sim_enc, device_ids=device_ids, find_unused_parameters=True))
        return self

    def _trained(self):
        """The modules the train step calls: the DDP wrappers after ddp(), else the bare
        encoders."""
        return self._ddp or (self.img_enc, self.txt_enc, self.sim_enc)

    def modules(self):
        return [self.img_enc, self.txt_enc, self.sim_enc]

    def state_dict(self):
        return [m.state_dict() for m in self.modules()]

    def load_state_dict(self, state_dict, strict=True):
        if len(state_dict) != len(self.modules()):
            raise ValueError("expected %d state dicts (img_enc, txt_enc, sim_enc), got %d"
                             % (len(self.modules()), len(state_dict)))
        for m, sd in zip(self.modules(), state_dict):
            m.load_state_dict(sd, strict=strict)

    def train_start(self):
        for m in self.modules():
            m.train()

    def val_start(self):
        for m in self.modules():
            m.eval()

    def forward_emb(self, images, captions, lengths):
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

    def forward_loss(self, sims, ids=None, **kwargs):
        """The hinge loss of a (B, B) score matrix, plus DAA's two terms when `--daa_weight`
        is set (`ids`: the batch's caption indices in the split, for the semantics)."""
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

    def train_emb(self, images, captions, lengths, ids=None, *args):
        """One optimisation step on a batch whose pair k is (image k, caption k)."""
        self.Eiters += 1
        self.logger.update("Eit", self.Eiters)
        self.logger.update("lr", self.optimizer.param_groups[0]["lr"])

        # through the DDP wrappers under torchrun (each process scores its own batch; the
        # backward averages the gradients over the processes)
        img_enc, txt_enc, sim_enc = self._trained()
        img_embs, cap_embs, cap_lens = self._embed(img_enc, txt_enc, images, captions, lengths)
        self.optimizer.zero_grad()
        if self.sim_enc.module_name == "SGR" and self.daa is None:
            # only the pairs whose score the loss's gradient touches get a graph (exact: every
            # score is a function of its pair alone once the global vectors are computed):
            # similarity.subset_loss, called by EncoderSimilarity.forward. Not with DAA, whose
            # gradient reaches every pair: there one pass with autograd over the whole matrix
            # is cheaper than a no-grad pass followed by that same pass.
            loss, surrogate, _ = sim_enc(img_embs, cap_embs, cap_lens,
                                         loss_fn=lambda sims: self.forward_loss(sims, ids=ids))
            surrogate.backward()
        else:
            # SAF's training BatchNorm ties all images of a caption; DAA's gradient is dense:
            # the full graph
            sims = sim_enc(img_embs, cap_embs, cap_lens)
            loss = self.forward_loss(sims, ids=ids)
            loss.backward()
        if self.sim_enc.module_name == "SGR":  # the folded key bias: exactly zero gradient
            for m in self.sim_enc.SGR_module:
                if m.graph_key_w.bias.grad is None:
                    m.graph_key_w.bias.grad = torch.zeros_like(m.graph_key_w.bias)
        if self.grad_clip > 0:
            clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach()


# ----------------------------------------------------------------------------- factory

MODULE_NAMES = ("SGR", "SAF", "NAAF")


def build_model(opt, device=None):
    """The matcher `--module_name` names: SGR or SAF (SGRAF above) or NAAF (naaf.NAAF, the
    same interface: train_start/val_start, forward_emb, forward_sim, train_emb,
    state_dict, optimizer, logger, Eiters)."""
    if opt.module_name == "NAAF":
        import naaf  # here: naaf imports this module
        return naaf.NAAF(opt, device=device)
    return SGRAF(opt, device=device)
