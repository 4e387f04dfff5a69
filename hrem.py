"""HREM: Hierarchical Relation Modeling for image-text matching.

Fu, Mao, Zhang, Zhang, "Learning Semantic Relationship among Instances for Image-Text
Matching", CVPR 2023, following the original code (CrossmodalGroup/HREM, HEAD 1ad2612:
lib/encoders.py, lib/mlp.py, lib/mca.py, lib/loss.py, graph_lib.py, lib/vse.py,
lib/image_caption.py) formula by formula. Every parameter name is the original's, so the
authors' checkpoints ({'model': [img_enc, txt_enc]}) load strictly (except the
`bert.embeddings.position_ids` buffer that older `transformers` saved), and so do the
criterion's state dicts.

HREM is a dual encoder at test time: an image and a caption are each encoded once into one
l2-normalised vector, and a pair is scored by their dot product. The instance-level relation
modelling (a transformer over all the images and captions of a batch, with connection masks
and relevance weights learned from word-region alignments) lives in the training criterion
only; it is never used at inference.

Read top to bottom:
  BERT          bert_source, load_bert_config, load_tokenizer, build_bert: `--bert_path` is a
                local Hugging Face directory or a hub name; the weights of a trained model come
                from its checkpoint
  captions      CaptionTokenizer: BERT WordPiece of raw captions (the `transformers` tokenizer,
                ids equal to the original's) and their augmentation (mask / random token /
                delete)
  regions       drop_regions (region dropout), pad_batch (the original collate after
                augmentation)
  encoders      FC_MLP, maxk_pool / avg_pool over valid positions, EncoderImageAggr,
                EncoderText_BERT
  criterion     triplet_loss (distance-weighted negative sampling), AdjacencyLearning
                (word-region statistics), AdjacencyModel (connection masks and relevance
                weights), GraphLoss (fusion transformer, the four triplet losses, the KL
                regulariser, the warm-up counted in iterations)
  score         dot_scores: the (images, captions) dot products in memory-bounded blocks
  data          HREMDataset, collate_fn (contract.Matcher's data hooks)
  the matcher   HREM (contract.Matcher): options, checkpoints, optimizer groups and schedule,
                the train step (augmentations, then the criterion), evaluation, retrieve.py's
                query (no attention to --explain)

Letters in shape comments: B images, C captions (B = C in training), N regions, T tokens,
d embed_size, h BERT hidden size, K topk.
"""
import argparse
import copy
import json
import logging
import os
import random
import shutil
import socket
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import errors
from contract import Matcher, TextQuery, fp32, l2norm, memory_budget
from loss import ContrastiveLoss

log = logging.getLogger(__name__)

BERT_HUB_DEFAULT = "bert-base-uncased"
# the weight files `from_pretrained` reads from a local directory
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json")
# a buffer that `transformers` < 4.31 saved in the state dict and later versions do not
POSITION_IDS = "bert.embeddings.position_ids"


# ----------------------------------------------------------------------------- BERT

def _looks_like_path(name):
    """A path rather than a hub name ("bert-base-uncased", "org/name")."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or
            (os.sep != "/" and os.sep in name) or os.path.exists(name))


def _hub_reachable(timeout=3.0):
    """Whether the Hugging Face endpoint answers a TCP connection within `timeout` seconds
    (`from_pretrained` itself retries for minutes when there is no network)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                             else 80)), timeout).close()
        return True
    except OSError:
        return False


def _where(path):
    return "--bert_path %s" % path


def bert_source(path):
    """(what to give `from_pretrained`, local_files_only) for `--bert_path`: a local directory
    (checked to hold a BERT config and vocabulary), or a hub name, found in the local cache or
    fetched when the hub is reachable. Raises a one-line UsageError otherwise."""
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise errors.error("bert_not_model_dir", _where(path))
        try:
            with open(cfg, encoding="utf-8") as f:
                model_type = json.load(f).get("model_type", "bert")
        except (OSError, ValueError, AttributeError) as e:
            raise errors.error("bert_config", _where(path), reason="is not readable json (%s)"
                               % errors.first_line(e)) from None
        if model_type != "bert":
            raise errors.error("bert_config", _where(path),
                               reason="describes a %r model, not BERT" % model_type)
        if not any(os.path.isfile(os.path.join(path, f))
                   for f in ("vocab.txt", "tokenizer.json")):
            raise errors.error("bert_no_vocab", _where(path))
        return path, True
    if os.path.isfile(path):
        raise errors.error("path_not_dir", _where(path), found=path,
                           expected="--bert_path DIR, a directory holding a BERT's config.json "
                                    "and vocab.txt")
    if _looks_like_path(path):
        raise errors.error("bert_missing", _where(path))
    from transformers import BertConfig
    try:  # the hub name in the local cache
        BertConfig.from_pretrained(path, local_files_only=True)
        return path, True
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise errors.error("bert_offline", _where(path))
    return path, False


def _from_bert_path(cls, path, what):
    """`cls.from_pretrained` of `--bert_path` (a directory, or a hub name when online); an
    unreadable file is a one-line `bert_unreadable` error naming `what`."""
    src, local = bert_source(path)
    try:
        return cls.from_pretrained(src, local_files_only=local)
    except (OSError, ValueError) as e:
        raise errors.error("bert_unreadable", _where(path), what=what,
                           reason=errors.first_line(e)) from None


def load_bert_config(path):
    """The BertConfig of `--bert_path`."""
    from transformers import BertConfig
    return _from_bert_path(BertConfig, path, "config")


def load_tokenizer(path):
    """The BERT WordPiece tokenizer of `--bert_path`: transformers' fast BertTokenizer (the
    `tokenizers` library; its word_ids() group the sub-tokens of each word)."""
    from transformers import BertTokenizerFast
    return _from_bert_path(BertTokenizerFast, path, "tokenizer")


def has_bert_weights(path):
    """Whether `--bert_path` can give pretrained weights (a hub name is assumed to)."""
    if not os.path.isdir(path):
        return True
    return any(os.path.isfile(os.path.join(path, f)) for f in BERT_WEIGHT_FILES)


def build_bert(path, pretrained=True, config=None):
    """A BertModel: the pretrained weights of `--bert_path` (training from scratch), or the
    architecture of its config with random weights (`pretrained=False`: a checkpoint's
    weights replace them, or `--bert_init random`). `config` (a BertConfig) skips the path."""
    from transformers import BertModel
    if config is not None:
        return BertModel(config)
    if not pretrained:
        return BertModel(load_bert_config(path))
    src, local = bert_source(path)
    if not has_bert_weights(path):
        raise errors.error("bert_weights", _where(path),
                           files=" or ".join(BERT_WEIGHT_FILES[:2]))
    try:
        return BertModel.from_pretrained(src, local_files_only=local)
    except Exception as e:  # noqa: BLE001 (a damaged weight file: OSError, or the
        #                     safetensors library's own error type)
        raise errors.error("bert_unreadable", _where(path), what="weights",
                           reason=errors.first_line(e)) from None


def describe_bert(n_layers, hidden, vocab, intermediate):
    return "hidden size %s, %s layers, %s tokens, FFN %s" % (hidden, n_layers, vocab,
                                                            intermediate)


def bert_of_state(txt_state):
    """describe_bert of the BERT in a text encoder's state dict."""
    layers = {k.split(".")[3] for k in txt_state if k.startswith("bert.encoder.layer.")}
    emb = txt_state.get("bert.embeddings.word_embeddings.weight")
    inter = txt_state.get("bert.encoder.layer.0.intermediate.dense.weight")
    return describe_bert(len(layers), None if emb is None else emb.shape[1],
                         None if emb is None else emb.shape[0],
                         None if inter is None else inter.shape[0])


# ----------------------------------------------------------------------------- captions

class CaptionTokenizer:
    """Raw caption -> BERT token ids, as the original's PrecompRegionDataset: the basic
    tokenisation (clean-up, lower case, accents stripped, split on spaces and punctuation),
    then WordPiece on each word (a word it cannot split is one [UNK]), then [CLS] ... [SEP].
    No truncation. The tokenizer of `transformers` does it all (its `basic_tokenizer` and
    `wordpiece_tokenizer` attributes, which the original calls, are gone in version 5);
    `split_special_tokens` keeps a literal "[MASK]" in a caption three tokens, as the
    original's basic tokenizer does.

    The attention mask of the text encoder is `ids != 0`, so [PAD] must be id 0."""

    def __init__(self, tokenizer, where="the tokenizer"):
        self.tokenizer = tokenizer
        ids = {k: getattr(tokenizer, k + "_token_id") for k in ("pad", "cls", "sep", "mask")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise errors.error("bert_vocab", where, problem="has no %s token" % ", ".join(
                "[%s]" % k.upper() for k in missing))
        if ids["pad"] != 0:
            raise errors.error("bert_vocab", where, problem="gives [PAD] the id %d, but the "
                               "text encoder masks padding as id 0" % ids["pad"])
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = (ids["pad"], ids["cls"],
                                                               ids["sep"], ids["mask"])
        # the original draws `random.choice(list(tokenizer.vocab.keys()))`: vocab.txt's tokens
        # (no added ones) in its order
        backend = getattr(tokenizer, "backend_tokenizer", None)
        base = (backend.get_vocab(with_added_tokens=False) if backend is not None else
                tokenizer.get_vocab())
        self.choice_ids = sorted(base.values())
        self.size = len(tokenizer.get_vocab())

    def __len__(self):
        return self.size

    def words(self, caption):
        """The WordPiece ids of each basic-tokenised word: [[ids of word 0], ...]."""
        enc = self.tokenizer(caption, add_special_tokens=False, split_special_tokens=True)
        groups, last = [], None
        for tid, w in zip(enc["input_ids"], enc.word_ids()):
            if w != last or not groups:
                groups.append([])
                last = w
            groups[-1].append(tid)
        return groups

    def encode(self, caption):
        """[CLS] + WordPiece ids + [SEP], no augmentation (evaluation)."""
        return [self.cls_id] + [t for w in self.words(caption) for t in w] + [self.sep_id]

    def augment(self, words, rng):
        """The training ids of a caption given as `words()` (process_caption_bert, train=True):
        each word, with probability 0.2, becomes [MASK] for each of its sub-tokens (half of
        those cases), a random vocabulary token for each sub-token (a tenth), or is deleted
        (the rest). `rng` is a random.Random; the draws are the original's, in its order."""
        out = [self.cls_id]
        for sub in words:
            prob = rng.random()
            if prob < 0.20:
                prob /= 0.20
                if prob < 0.5:
                    out.extend([self.mask_id] * len(sub))
                elif prob < 0.6:
                    out.extend(rng.choice(self.choice_ids) for _ in sub)
                # else: deleted
            else:
                out.extend(sub)
        out.append(self.sep_id)
        return out


# ----------------------------------------------------------------------------- regions

def drop_regions(image, rng, p=0.20):
    """Region dropout (size augmentation): each region is kept when a uniform draw exceeds p.
    `rng` is a numpy RandomState (one `rand(N)` per image, as the original)."""
    keep = rng.rand(image.shape[0]) > p
    return image[torch.from_numpy(np.nonzero(keep)[0])]


def pad_batch(images, captions, ids, img_ids):
    """The original collate_fn: items sorted by caption length (longest first, stable), regions
    and token ids zero-padded. images: list of (N_i, D) tensors; captions: list of id lists.
    Returns images (B, N, D), img_lengths (B,), captions (B, T), lengths (B,), ids, img_ids."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]), reverse=True)
    images = [images[i] for i in order]
    captions = [captions[i] for i in order]
    img_lengths = torch.tensor([len(im) for im in images])
    all_images = images[0].new_zeros(len(images), int(img_lengths.max()), images[0].shape[-1])
    for i, im in enumerate(images):
        all_images[i, :len(im)] = im
    lengths = torch.tensor([len(c) for c in captions])
    targets = torch.zeros(len(captions), int(lengths.max()), dtype=torch.int64)
    for i, c in enumerate(captions):
        targets[i, :len(c)] = torch.as_tensor(c, dtype=torch.int64)
    return (all_images, img_lengths, targets, lengths, [ids[i] for i in order],
            torch.as_tensor([int(img_ids[i]) for i in order]))


# ----------------------------------------------------------------------------- encoders

def init_xavier(module):
    """lib/encoders.init_weights: Xavier-uniform Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            m.bias.data.fill_(0.)


class MLP(nn.Module):
    """lib/mlp.MLP with BatchNorm: Linear -> BN -> ReLU ... -> Linear. The last BatchNorm is
    created (its parameters are in the checkpoints) but never used. A (B, N, D) input is
    flattened to (B*N, D), so padded regions take part in the batch statistics."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h,
                                                                    h + [output_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in h + [output_dim])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers)):
            x = F.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        return x.view(*shape[:-1], self.output_dim)


class FC_MLP(nn.Module):
    """x -> Linear(x) + MLP(x)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.fc = nn.Linear(input_dim, output_dim)
        self.mlp = MLP(input_dim, hidden_dim, output_dim, num_layers)

    def forward(self, x):
        return self.fc(x) + self.mlp(x)


def valid_mask(lengths, n, device):
    """(B, n) True on the first lengths[b] positions."""
    return torch.arange(n, device=device)[None, :] < lengths.to(device)[:, None]


def maxk_pool(x, lengths, valid, k=2):
    """Mean of the top-k values of each dimension over the valid positions: (B, n, d) -> (B, d).
    As the original's loop, k becomes min(k, length) at a sample shorter than k and stays so
    for the samples after it (a length >= 2 everywhere, the normal case, leaves k = 2)."""
    top = x.masked_fill(~valid[:, :, None], float("-inf")).topk(min(k, x.shape[1]), dim=1)[0]
    ks = torch.cummin(lengths.clamp(max=k), 0)[0]
    if bool((ks == top.shape[1]).all()):
        return top.mean(1)
    pooled = [top[i, :int(ki)].mean(0) for i, ki in enumerate(ks)]  # the rare case, exactly
    return torch.stack(pooled, 0)


def avg_pool(x, lengths, valid):
    """Mean over the valid positions: (B, n, d) -> (B, d). Padded outputs are never read (the
    transformer's evaluation fast path zeroes them, its training path does not)."""
    return x.masked_fill(~valid[:, :, None], 0).sum(1) / lengths.to(x.dtype)[:, None]


def transformer(d, nhead, dropout, num_layers=1):
    """One post-LayerNorm transformer encoder layer, feed-forward size d, ReLU (PyTorch's
    defaults), batch first (the original transposes to sequence first; the parameters and the
    maths are the same, and evaluation can take PyTorch's fused path). No nested tensors: the
    padded positions are computed and ignored by the pooling."""
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=nhead, dim_feedforward=d,
                                       dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)


class EncoderImageAggr(nn.Module):
    """Regions (B, N, img_dim) with lengths -> global embedding (B, d):
    v = l2norm(w * maxk_pool(FC_MLP(x)) + (1 - w) * mean(TF(FC_MLP(x)))), w = residual_weight.
    With graph=True (training) it also returns the un-normalised embedding and the pre-pool
    region features (B, N, d) that the criterion's adjacency learning reads."""

    def __init__(self, img_dim, embed_size, nhead, dropout, residual_weight=0.8,
                 no_imgnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_imgnorm = no_imgnorm
        self.residual_weight = residual_weight
        self.fc = FC_MLP(img_dim, embed_size // 2, embed_size, 2)
        init_xavier(self.fc)
        self.aggr = transformer(embed_size, nhead, dropout)

    def forward(self, images, lengths, graph=False):
        x = self.fc(images)                                       # (B, N, d)
        valid = valid_mask(lengths, x.shape[1], x.device)
        res = maxk_pool(x, lengths, valid)                        # (B, d)
        att = avg_pool(self.aggr(x, src_key_padding_mask=~valid), lengths, valid)
        w = self.residual_weight
        emb = w * res + (1 - w) * att
        out = emb if self.no_imgnorm else l2norm(emb, dim=-1)
        return (out, emb, x) if graph else out


class EncoderText_BERT(nn.Module):
    """Token ids (C, T), 0-padded, with lengths ([CLS]/[SEP] included) -> global embedding
    (C, d): BERT's last hidden states (attention mask ids != 0) -> Linear(h, d) -> the same
    pooling and transformer as the images. graph=True also returns the un-normalised embedding
    and the word features (C, T, d)."""

    def __init__(self, bert, embed_size, nhead, dropout, residual_weight=0.8,
                 no_txtnorm=False):
        super().__init__()
        self.embed_size = embed_size
        self.no_txtnorm = no_txtnorm
        self.residual_weight = residual_weight
        self.bert = bert
        # the original hard-codes 768 (BERT-base); the size comes from the BERT config here
        self.linear = nn.Linear(bert.config.hidden_size, embed_size)
        self.aggr = transformer(embed_size, nhead, dropout)

    def forward(self, captions, lengths, graph=False):
        bert_emb = self.bert(input_ids=captions, attention_mask=(captions != 0).float())[0]
        x = self.linear(bert_emb)                                 # (C, T, d)
        valid = valid_mask(lengths, x.shape[1], x.device)
        res = maxk_pool(x, lengths, valid)                        # (C, d)
        att = avg_pool(self.aggr(x, src_key_padding_mask=~valid), lengths, valid)
        w = self.residual_weight
        emb = w * res + (1 - w) * att
        out = emb if self.no_txtnorm else l2norm(emb, dim=-1)
        return (out, emb, x) if graph else out


def load_encoder_states(img_enc, txt_enc, state_dicts, strict=True):
    """The original checkpoint's 'model' ([img_enc, txt_enc] state dicts) into the encoders,
    strictly: only the `bert.embeddings.position_ids` buffer is tolerated (saved by older
    `transformers`, absent from newer ones), so a prefix or size mismatch is never hidden."""
    if len(state_dicts) != 2:
        raise ValueError("expected 2 state dicts (img_enc, txt_enc), got %d" % len(state_dicts))
    img_enc.load_state_dict(state_dicts[0], strict=strict)
    txt = dict(state_dicts[1])
    if POSITION_IDS not in txt_enc.state_dict():
        txt.pop(POSITION_IDS, None)
    txt_enc.load_state_dict(txt, strict=strict)


# ----------------------------------------------------------------------------- criterion

# the triplet loss of lib/loss.TripletLoss: hard-coded there
TRIPLET_MARGIN = 0.2
TRIPLET_DIM = 512        # the "embedding dimension" of the distance weights (the model's is d)
TRIPLET_CUT_OFF = 0.5    # distances below are clamped


def triplet_loss(sims, pos, neg, cutoff, margin=TRIPLET_MARGIN, dim=TRIPLET_DIM):
    """Triplet loss with distance-weighted negative sampling (Wu et al., "Sampling Matters in
    Deep Embedding Learning", ICCV 2017), one direction: rows of `sims` are anchors. For each
    positive pair (a, p), one negative is drawn from the distance weights of row a
    (torch.multinomial, the global generator) and the loss is relu(margin + s_an - s_ap),
    summed. If some anchor has no admissible negative the draw fails and the loss is 0, as in
    the original."""
    anchor, positive = pos.nonzero(as_tuple=True)
    with torch.no_grad():  # the weights only choose indices
        dist = (2 - 2 * sims).sqrt().clamp(min=TRIPLET_CUT_OFF)
        log_w = ((2.0 - dim) * dist.log() -
                 ((dim - 3.0) / 2.0) * (1.0 - 0.25 * (dist * dist)).log())
        bad = torch.isinf(log_w) | torch.isnan(log_w)
        log_w = log_w * neg
        log_w[bad] = 0.
        weight = (log_w - log_w.max(dim=1, keepdim=True)[0]).exp()
        weight = weight * (neg & (dist < cutoff)).float()
        weight = weight / (weight.sum(dim=1, keepdim=True) + 1e-20)
        weight = weight[anchor]                                   # (P, candidates)
        try:
            negative = torch.multinomial(weight, 1).squeeze(1)
        except RuntimeError:  # a row without admissible negatives
            return torch.zeros([], requires_grad=True, device=sims.device)
    return F.relu(margin + sims[anchor, negative] - sims[anchor, positive]).sum()


class TripletLoss(nn.Module):
    """Both directions (image -> caption rows, caption -> image rows) of triplet_loss; the
    positives are the pairs whose images are the same (several captions of one image in a
    batch are all positives). The cut-off of the distance weights is 1.9 on COCO, 1.7
    otherwise (chosen by the original from `--dataset`)."""

    def __init__(self, cutoff=1.7):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, im, s, img_ids):
        sims = im @ s.t()                                         # (B, C)
        img_ids = img_ids.to(sims.device)
        pos = img_ids[None, :] == img_ids[:, None]
        loss_im = triplet_loss(sims, pos, ~pos, self.cutoff)
        loss_s = triplet_loss(sims.t(), pos.t(), ~pos.t(), self.cutoff)
        return loss_im + loss_s


class VSELoss(ContrastiveLoss):
    """`--base_loss vse` / `--gnn_loss vse` (lib/loss.ContrastiveLoss): the VSE++ hinge of
    v @ t^T; with --mask_repeat every pair of the same image is masked as a positive, else the
    diagonal only. Sum of violations until `max_violation` is switched on (after
    --vse_mean_warmup_epochs epochs)."""

    def __init__(self, margin=0.2, max_violation=False, mask_repeat=True):
        super().__init__(margin=margin, max_violation=max_violation)
        self.mask_repeat = mask_repeat

    def forward(self, im, s, img_ids):
        scores = im @ s.t()
        mask = None
        if self.mask_repeat:
            img_ids = img_ids.to(scores.device)
            mask = img_ids[:, None] == img_ids[None, :]
        return super().forward(scores, mask=mask)


def loss_select(kind, cutoff=1.7, margin=0.2, max_violation=False, mask_repeat=True):
    """lib/loss.loss_select: 'trip' (the default) or 'vse'."""
    if kind == "trip":
        return TripletLoss(cutoff)
    if kind == "vse":
        return VSELoss(margin, max_violation, mask_repeat)
    raise ValueError("loss must be trip or vse, got %r" % (kind,))


class AdjacencyLearning(nn.Module):
    """The cross-modal edges of lib/mca.AdjacencyLearning (scan=True, img_len_use=False,
    res=True, T=1, sigma=1). For caption i and image b, from the l2-normalised word features
    X_i (its first n_i = max(len_i, K) tokens: padding too when the caption is shorter than K)
    and region features R_b (padding included), S = LeakyReLU_0.1(X_i R_b^T) (n_i, N):
      t2i: S normalised over the n_i words, max over all N regions -> row (n_i,);
           mean_ti[i, b] = mean of row over the len_i real words, topk_ti[i, b] = top-K of row;
      i2t: S normalised over the N regions, max over the len_i real words -> col (N,);
           mean_it[b, i] = mean of col, topk_it[b, i] = top-K of col.
    The relevance weights are W_ti = MLP_t2i(topk_ti) + mean_ti, W_it = MLP_i2t(topk_it) +
    mean_it, with MLP = Linear(K, K) -> ReLU -> Dropout(0) -> Linear(K, 1).

    The inputs are detached in the original, so the statistics carry no gradient: they are
    computed without autograd, for all captions at once in blocks of `budget` bytes (the
    original loops over the captions)."""

    budget = 2 ** 28

    def __init__(self, topk=10, sigma=1.0, T=1.0, dropout_rate=0.0):
        super().__init__()
        self.topk = topk
        self.sigma = sigma
        self.T = T
        self.mlp_t2i = nn.Sequential(nn.Linear(topk, topk), nn.ReLU(inplace=True),
                                     nn.Dropout(dropout_rate), nn.Linear(topk, 1))
        self.mlp_i2t = copy.deepcopy(self.mlp_t2i)  # the same initial weights

    @torch.no_grad()
    def statistics(self, regions, words, cap_lens):
        """regions (B, N, d), words (C, T, d), cap_lens (C,) ->
        topk_ti (C, B, K), mean_ti (C, B), topk_it (B, C, K), mean_it (B, C)."""
        K = self.topk
        B, N, _ = regions.shape
        C = words.shape[0]
        lens = cap_lens.to(words.device)
        n_sel = lens.clamp(min=K)
        if words.shape[1] < int(n_sel.max()):  # no caption reaches K tokens (the original
            words = F.pad(words, (0, 0, 0, int(n_sel.max()) - words.shape[1]))  # fails here)
        T = words.shape[1]
        R = F.normalize(regions, dim=-1).reshape(B * N, -1)       # (B*N, d)
        X = F.normalize(words, dim=-1)                            # (C, T, d)
        pos = torch.arange(T, device=words.device)
        sel = pos[None, :] < n_sel[:, None]                       # (C, T) the n_i words
        real = pos[None, :] < lens[:, None]                       # (C, T) the len_i words
        step = max(1, self.budget // (4 * T * B * N * 4))
        out = [[], [], [], []]
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            S = (X[c0:c1].reshape(-1, X.shape[-1]) @ R.t()).view(c1 - c0, T, B, N)
            S = F.leaky_relu(S, 0.1) * sel[c0:c1, :, None, None]  # (c, T, B, N)
            row = F.normalize(S, dim=1).amax(3).transpose(1, 2)   # (c, B, T)
            out[0].append(row.masked_fill(~sel[c0:c1, None, :], float("-inf"))
                          .topk(K, dim=2)[0])                     # (c, B, K)
            out[1].append(row.masked_fill(~real[c0:c1, None, :], 0).sum(2) /
                          lens[c0:c1, None].to(row.dtype))        # (c, B)
            col = (F.normalize(S, dim=3)
                   .masked_fill(~real[c0:c1, :, None, None], float("-inf")).amax(1))  # (c, B, N)
            out[2].append(col.topk(K, dim=2)[0])                  # (c, B, K)
            out[3].append(col.mean(2))                            # (c, B)
        topk_ti, mean_ti, topk_it, mean_it = (torch.cat(o, 0) for o in out)
        return topk_ti, mean_ti, topk_it.transpose(0, 1), mean_it.t()

    def forward(self, regions, words, cap_lens):
        """-> relation_ti (C, B), relation_it (B, C), mean_ti (C, B), mean_it (B, C)."""
        topk_ti, mean_ti, topk_it, mean_it = self.statistics(regions, words, cap_lens)
        relation_ti = self.mlp_t2i(topk_ti).squeeze(-1) + mean_ti
        relation_it = self.mlp_i2t(topk_it).squeeze(-1) + mean_it
        return relation_ti, relation_it, mean_ti, mean_it

    def kl_div(self, A, B):
        """KL(softmax(B/T) || softmax(A/T)) per row, averaged over rows (F.kl_div's order)."""
        return F.kl_div(F.log_softmax(A / self.T, dim=-1), F.softmax(B / self.T, dim=-1),
                        reduction="batchmean") * (self.T ** 2)

    def relation_reg_loss(self, relation_ti, relation_it, img_emb, cap_emb):
        """The regulariser: the learned cross-modal weights follow the (detached) guide
        exp(-||v - t|| / sigma) as distributions over each row."""
        guide = torch.exp(-torch.cdist(img_emb, cap_emb) / self.sigma).detach()  # (B, C)
        return self.kl_div(guide, relation_it) + self.kl_div(guide.t(), relation_ti)


class AdjacencyModel(nn.Module):
    """The four connection masks and relevance weights of lib/mca.AdjacencyModel.
    Connections: each row keeps its int(n * threshold) most similar columns (>= the k-th
    largest: ties add edges); i2i/t2t by the embeddings' dot products, i2t/t2i by the mean
    word-region statistics. Relevance: exp(-||x_i - x_j|| / sigma) within a modality (with
    gradient), AdjacencyLearning's learned weights across."""

    def __init__(self, threshold=0.5, topk=10, sigma=1.0):
        super().__init__()
        self.threshold = threshold
        self.sigma = sigma
        self.adj_learning = AdjacencyLearning(topk=topk, sigma=sigma)

    def topk_connect(self, sims, n):
        k = int(n * self.threshold)
        return (sims - sims.topk(k=k, dim=1)[0][:, -1:]) >= 0

    def forward(self, img_emb, cap_emb, regions, words, cap_lens):
        n_img, n_cap = img_emb.shape[0], cap_emb.shape[0]
        with torch.no_grad():
            connect_tt = self.topk_connect(cap_emb @ cap_emb.t(), n_cap)
            connect_ii = self.topk_connect(img_emb @ img_emb.t(), n_img)
        relation_ii = torch.exp(-torch.cdist(img_emb, img_emb) / self.sigma)
        relation_tt = torch.exp(-torch.cdist(cap_emb, cap_emb) / self.sigma)
        relation_ti, relation_it, mean_ti, mean_it = self.adj_learning(
            regions.detach(), words.detach(), cap_lens)
        connect_ti = self.topk_connect(mean_ti, n_img)
        connect_it = self.topk_connect(mean_it, n_cap)
        reg_loss = self.adj_learning.relation_reg_loss(relation_ti, relation_it, img_emb,
                                                       cap_emb)
        connect = {"i2i": connect_ii, "t2t": connect_tt, "i2t": connect_it, "t2i": connect_ti}
        relation = {"i2i": relation_ii, "t2t": relation_tt, "i2t": relation_it,
                    "t2i": relation_ti}
        return connect, relation, reg_loss


class GraphLoss(nn.Module):
    """The training criterion of graph_lib.GraphLoss:
        L = trip(v, t) + [iter >= warmup] (trip(v, t~) + trip(v~, t) + trip(v~, t~) + w_reg reg)
    where v~, t~ come from one transformer layer over the sequence [v_1..v_B, t_1..t_B] whose
    attention logits get the float mask mask_weight * W, -inf where not connected (blocks
    [[i2i, i2t], [t2i, t2t]]). `iter_count` counts the calls (the warm-up is in iterations);
    it is saved with our checkpoints. The parts of the last call are in `self.parts`."""

    def __init__(self, embed_size=1024, nhead=16, dropout=0.1, num_layers_enc=1,
                 threshold=0.5, topk=10, mask_weight=1.0, reg_loss_weight=10.0, warmup=8000,
                 norm_input=True, cross_loss=True, cutoff=1.7, base_loss="trip",
                 gnn_loss="trip", margin=0.2, max_violation=False, mask_repeat=True):
        super().__init__()
        self.iter_count = 0
        self.warmup = warmup
        self.mask_weight = mask_weight
        self.reg_loss_weight = reg_loss_weight
        self.norm_input = norm_input
        self.cross_loss = cross_loss
        self.base_loss = loss_select(base_loss, cutoff, margin, max_violation, mask_repeat)
        self.gnn_loss = loss_select(gnn_loss, cutoff, margin, max_violation, mask_repeat)
        # sequence first, as the original (one sequence of 2B embeddings)
        layer = nn.TransformerEncoderLayer(d_model=embed_size, nhead=nhead,
                                           dim_feedforward=embed_size, dropout=dropout)
        self.gnn = nn.TransformerEncoder(layer, num_layers=num_layers_enc,
                                         enable_nested_tensor=False)
        self.adj_model = AdjacencyModel(threshold=threshold, topk=topk)
        self.parts = {}

    def set_max_violation(self, on):
        """The hardest negative from now on (the VSE losses only; the original switches it on
        after --vse_mean_warmup_epochs epochs)."""
        for loss in (self.base_loss, self.gnn_loss):
            if isinstance(loss, VSELoss):
                loss.max_violation = on

    def forward(self, img, cap, img_ids):
        """img = (v, v unnormalised, regions (B, N, d)); cap = (t, t unnormalised, words
        (C, T, d), cap_lens (C,)); img_ids (B,) the image of each pair."""
        img_emb, img_notnorm, regions = img
        cap_emb, cap_notnorm, words, cap_lens = cap
        bs = img_emb.shape[0]
        loss = base = self.base_loss(img_emb, cap_emb, img_ids)
        self.parts = {"base": base.detach()}
        if self.iter_count >= self.warmup:
            connect, relation, reg = self.adj_model(img_emb, cap_emb, regions, words, cap_lens)
            connect_mask = torch.cat((torch.cat((connect["i2i"], connect["i2t"]), 1),
                                      torch.cat((connect["t2i"], connect["t2t"]), 1)), 0)
            relation_mask = torch.cat((torch.cat((relation["i2i"], relation["i2t"]), 1),
                                       torch.cat((relation["t2i"], relation["t2t"]), 1)), 0)
            mask = self.mask_weight * relation_mask.masked_fill(~connect_mask, float("-inf"))
            if self.norm_input:
                all_embs = torch.cat((img_emb, cap_emb), 0)
            else:
                all_embs = torch.cat((img_notnorm, cap_notnorm), 0)
            out = self.gnn(all_embs.unsqueeze(1), mask).squeeze(1)  # (2B, d)
            img_gnn, cap_gnn = torch.split(out, bs, dim=0)
            img_gnn, cap_gnn = F.normalize(img_gnn), F.normalize(cap_gnn)
            gnn = []
            if self.cross_loss:
                gnn.append(self.gnn_loss(img_emb, cap_gnn, img_ids))
                gnn.append(self.gnn_loss(img_gnn, cap_emb, img_ids))
            gnn.append(self.gnn_loss(img_gnn, cap_gnn, img_ids))
            loss = loss + sum(gnn) + self.reg_loss_weight * reg
            self.parts.update(gnn=[g.detach() for g in gnn], reg=reg.detach(),
                              connect=connect, relation={k: v.detach()
                                                         for k, v in relation.items()})
        self.iter_count += 1
        return loss


# ----------------------------------------------------------------------------- score

def dot_scores(img_embs, cap_embs, device=None, block=4096, dtype=torch.float64):
    """sims[i, j] = <v_i, t_j>: (n_img, d) x (n_cap, d) -> (n_img, n_cap) float64 numpy, in
    blocks of `block` captions so that only one block's product is on the device at a time
    (the original multiplies float64 copies of the float32 embeddings: so does this)."""
    img = torch.as_tensor(np.asarray(img_embs), device=device).to(dtype)
    n_img, n_cap = img.shape[0], len(cap_embs)
    sims = np.zeros((n_img, n_cap), dtype=np.float64)
    for j in range(0, n_cap, block):
        cap = torch.as_tensor(np.asarray(cap_embs[j:j + block]), device=device).to(dtype)
        sims[:, j:j + len(cap)] = (img @ cap.t()).cpu().numpy()
    return sims




# ----------------------------------------------------------------------------- data

class HREMDataset(data.PrecompDataset):
    """A split as the original's PrecompRegionDataset reads it: region features and raw
    captions, tokenised by BERT's WordPiece (`tokenizer`, a CaptionTokenizer).

    Training items are (image, ids, index, image index, words): the caption's WordPiece ids per
    word, from which HREM.train_loss draws the augmentations (region dropout, mask / random
    token / delete) in the training process, from the generators that --seed seeds and
    checkpoints save (the original draws them unseeded in the loader's workers). Evaluation
    items are (image, ids, index, image index), and carry the image only with the first
    caption of each image (an empty one, 0 regions, with the others): each image is encoded
    once, not once per caption (encode_data keeps every im_div-th image)."""

    def __init__(self, data_path, split, tokenizer, opt, train=False):
        super().__init__(data_path, split, None, feat_format=getattr(opt, "feat_format", "auto"),
                         img_dim=getattr(opt, "img_dim", None))
        self.tokenizer, self.train = tokenizer, train

    def __getitem__(self, index):
        img_id = index // self.im_div
        caption = self.captions[index]
        if self.train or index % self.im_div == 0:
            image = torch.from_numpy(np.array(self.images[img_id], dtype=np.float32))
        else:
            image = torch.zeros(0, self.images.shape[2])
        if self.train:
            words = self.tokenizer.words(caption)
            ids = [self.tokenizer.cls_id] + [t for w in words for t in w] + \
                [self.tokenizer.sep_id]
            return image, ids, index, img_id, words
        return image, self.tokenizer.encode(caption), index, img_id


def collate_fn(items):
    """Items -> data.Batch, in the sampler's order (the training step sorts a batch after
    augmenting it, as the original's collate): images (B, N, D) zero-padded with
    `img_lengths` (B,) (0: an image given with another caption), token ids (B, T)
    zero-padded with `lengths`, `img_ids`, and for training the captions' `words`."""
    images, caps, ids, img_ids = zip(*[it[:4] for it in items])
    img_lengths = torch.tensor([len(im) for im in images])
    all_images = torch.zeros(len(images), max(1, int(img_lengths.max())), images[0].shape[-1])
    for i, im in enumerate(images):
        all_images[i, :len(im)] = im
    lengths = [len(c) for c in caps]
    targets = torch.zeros(len(caps), max(lengths), dtype=torch.int64)
    for i, c in enumerate(caps):
        targets[i, :len(c)] = torch.as_tensor(c, dtype=torch.int64)
    extra = {"img_ids": list(img_ids), "img_lengths": img_lengths}
    if len(items[0]) == 5:
        extra["words"] = [it[4] for it in items]
    return data.Batch(all_images, targets, lengths, list(ids), **extra)


# ----------------------------------------------------------------------------- the matcher

# validation once per epoch only, as the original (its --val_step is never read)
VAL_PER_EPOCH = 10 ** 9
BERT_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert_demo")


def loss_cutoff(opt):
    """The distance cut-off of the triplet weights: 1.9 for COCO, 1.7 otherwise (the original
    chooses by `--dataset coco|f30k`; without it, `--data_name coco_precomp` says the same)."""
    name = getattr(opt, "dataset", None) or getattr(opt, "data_name", "") or ""
    return 1.9 if str(name).startswith("coco") else 1.7


class HREM(Matcher):
    """The two encoders, the GraphLoss criterion, AdamW and the train step (lib/vse.VSEModel),
    and dot-product scoring. `state_dict()` is the original checkpoint's 'model' entry:
    [img_enc, txt_enc] state dicts; our checkpoints add the criterion's state and its
    iteration counter (the graph losses' warm-up), which the original does not save.

    AdamW (weight decay 1e-4 on every group) with the original's groups, in its order: the
    text encoder without BERT (lr), BERT (0.1 lr), the image encoder (lr), the criterion
    (lr x graph_lr_factor); the rate is multiplied by decay_rate at each epoch of
    lr_schedules."""

    state_names = ("img_enc", "txt_enc")
    optional_keys = ("txt_enc." + POSITION_IDS,)
    drop_last = True
    collate_fn = staticmethod(collate_fn)
    fp32_parts = {
        "the criterion (GraphLoss: its triplet or VSE loss, the cross-modal graph and its "
        "regulariser)": "a loss: the distance cut-off of the triplet weights (1.7, 1.9) and "
                        "the softmax-weighted graph over 2B nodes compare scores that bf16 "
                        "would tie",
    }
    vocab_path_unused = "its captions are tokenised by the WordPiece vocabulary of --bert_path"
    defaults = {"learning_rate": 5e-4, "num_epochs": 30, "max_violation": False,
                "log_step": 200, "val_step": VAL_PER_EPOCH, "workers": 8}
    # the demo's BERT (bert_demo/: 2 layers of 128, random weights), the original's learning
    # rate, the demo's batch of 32 (more steps: rsum 579 on the synthetic test split in 4
    # epochs, where the original's batch of 128 reaches 317 in 3) and the graph losses after
    # 40 iterations (warm-up in iterations)
    demo_flags = ["--bert_path", BERT_DEMO, "--bert_init", "random",
                  "--learning_rate", "0.0005", "--warmup", "40", "--val_split", "dev",
                  "--num_epochs", "4"]

    @classmethod
    def add_options(cls, parser):
        g = parser.add_argument_group("HREM (hrem.py)")
        add = cls.add_option
        add(g, "--bert_path", default=BERT_HUB_DEFAULT,
            help="BERT: a local Hugging Face directory (config.json, vocab.txt, weights) or a "
                 "hub name (fetched when online); the original hard-codes bert-base-uncased")
        add(g, "--bert_init", default="pretrained", choices=["pretrained", "random"],
            help="start BERT from the weights of --bert_path, or from random weights")
        add(g, "--dataset", default=None, choices=["f30k", "coco"],
            help="the triplet loss's distance cut-off (coco 1.9, f30k 1.7); default: from "
                 "--data_name")
        add(g, "--val_split", default=None, choices=["test", "testall", "dev"],
            help="the split that selects model_best (default: the original's test, testall "
                 "for COCO)")
        add(g, "--lr_schedules", default=[15, 25], type=int, nargs="+",
            help="epochs at which the learning rate is multiplied by --decay_rate")
        add(g, "--decay_rate", default=0.1, type=float, help="learning-rate decay")
        add(g, "--graph_lr_factor", default=1.0, type=float,
            help="learning-rate factor of the criterion (instance-level relations)")
        add(g, "--base_loss", default="trip", choices=["trip", "vse"],
            help="loss of the embeddings: distance-weighted triplet, or VSE++")
        add(g, "--gnn_loss", default="trip", choices=["trip", "vse"],
            help="loss of the relation-enhanced embeddings")
        add(g, "--warmup", default=8000, type=int,
            help="iterations before the instance-level graph losses start")
        add(g, "--residual_weight", default=0.8, type=float,
            help="weight of the max-pooled embedding against the transformer's")
        add(g, "--num_layers_enc", default=1, type=int,
            help="transformer layers of the instance-level relation model")
        add(g, "--nhead", default=16, type=int, help="attention heads of the transformers")
        add(g, "--dropout", default=0.1, type=float, help="dropout of the transformers")
        add(g, "--mask_weight", default=1.0, type=float,
            help="weight of the relevance in the attention mask (the original's commands: 1.0 "
                 "Flickr30K, 1.5 COCO)")
        add(g, "--threshold", default=0.5, type=float,
            help="share of each row kept as connections")
        add(g, "--topk", default=10, type=int, help="word-region scores per relevance weight")
        add(g, "--reg_loss_weight", default=10.0, type=float,
            help="weight of the relevance regulariser")
        add(g, "--norm_input", default=1, type=int,
            help="relate the l2-normalised embeddings (1) or the raw ones (0)")
        add(g, "--cross_loss", default=1, type=int,
            help="also the losses of one enhanced against one plain embedding")
        add(g, "--size_augment", default=1, type=int,
            help="region dropout (20%%) in training")
        add(g, "--mask_repeat", default=1, type=int,
            help="VSE loss: mask every pair of the same image, not only the diagonal")
        add(g, "--vse_mean_warmup_epochs", default=1, type=int,
            help="VSE loss: epochs with the sum of violations before the hardest negative")

    @classmethod
    def add_eval_options(cls, parser):
        parser.add_argument("--bert_path", default=None,
                            help="BERT models: the directory (or hub name) of the BERT whose "
                                 "config and vocabulary the checkpoint was trained with "
                                 "(default: the checkpoint's; bert-base-uncased for the "
                                 "original's)")
        return ["bert_path"]

    @classmethod
    def option_defaults(cls):
        """{dest: default} of this matcher's own flags, then `defaults`."""
        p = argparse.ArgumentParser()
        cls.add_options(p)
        return dict(vars(p.parse_args([])), **cls.defaults)

    @classmethod
    def complete_opt(cls, opt):
        """An original checkpoint's opt: its --dataset names the data (f30k -> f30k_precomp),
        and its --bert_path (the authors' directory, never read: the original hard-codes
        bert-base-uncased) becomes bert-base-uncased."""
        if not hasattr(opt, "bert_init"):  # not written by us
            if not hasattr(opt, "data_name") and getattr(opt, "dataset", None):
                opt.data_name = "%s_precomp" % opt.dataset
            if not os.path.isdir(str(getattr(opt, "bert_path", ""))):
                opt.bert_path = BERT_HUB_DEFAULT
        for k, v in cls.option_defaults().items():
            if not hasattr(opt, k):
                setattr(opt, k, v)
        return opt

    @classmethod
    def check_opt(cls, opt, distributed=False):
        if distributed:
            raise errors.error("torchrun_unsupported", "--module_name %s" % opt.module_name,
                               model=opt.module_name,
                               why="its criterion relates every image and caption of a batch "
                                   "(a transformer over the batch), so each process would "
                                   "relate only its own share")
        errors.check_positive(opt, ("nhead", "topk", "num_layers_enc"))
        errors.check_nonnegative(opt, ("warmup", "dropout", "reg_loss_weight", "decay_rate",
                                       "graph_lr_factor"))
        if opt.embed_size % opt.nhead:
            raise errors.error("flag_divides", "--nhead %d" % opt.nhead,
                               what="--embed_size %d" % opt.embed_size)
        if not 0 < opt.threshold <= 1 or int(opt.batch_size * opt.threshold) < 1:
            raise errors.error("flag_range", "--threshold %s" % opt.threshold,
                               range="in (0, 1], with --batch_size x threshold >= 1")
        if opt.val_split is None:
            opt.val_split = "testall" if loss_cutoff(opt) == 1.9 else "test"
        bert_source(opt.bert_path)
        if opt.bert_init == "pretrained" and not opt.resume and not has_bert_weights(
                opt.bert_path):
            raise errors.error("bert_weights", _where(opt.bert_path),
                               files=" or ".join(BERT_WEIGHT_FILES[:2]))

    @classmethod
    def vocabulary(cls, opt):
        """(CaptionTokenizer of --bert_path, --bert_path)."""
        tok = CaptionTokenizer(load_tokenizer(opt.bert_path), _where(opt.bert_path))
        size = load_bert_config(opt.bert_path).vocab_size
        if len(tok) > size:
            raise errors.error("bert_vocab", _where(opt.bert_path),
                               problem="has %d tokens, more than the %d of its config"
                                       % (len(tok), size))
        return tok, opt.bert_path

    @classmethod
    def dataset(cls, data_path, split, vocab, opt, train=False):
        return HREMDataset(data_path, split, vocab, opt, train=train)

    @classmethod
    def check_train_data(cls, n_captions, batch_size):
        if n_captions < batch_size:
            raise errors.error("batch_too_large", "--batch_size %d" % batch_size, n=n_captions)

    @classmethod
    def recognise(cls, ckpt):
        state = ckpt["model"]
        if (len(state) == 2 and "fc.fc.weight" in state[0] and
                any(k.startswith("bert.") for k in state[1])):
            return "HREM"
        return None

    @classmethod
    def infer_flags(cls, state, opt=None):
        img = state[0] if state else {}
        return {"img_dim": checkpoint.state_shape(img, "fc.fc.weight", 1),
                "embed_size": checkpoint.state_shape(img, "fc.fc.weight", 0)}

    @classmethod
    def for_checkpoint(cls, opt, device=None):
        """BERT from the config of --bert_path only: the checkpoint holds its weights."""
        return cls(opt, device=device, pretrained=False)

    # ------------------------------------------------------------------ the instance
    def __init__(self, opt, device=None, bert=None, pretrained=None):
        super().__init__(opt, device)
        self.img_enc = EncoderImageAggr(opt.img_dim, opt.embed_size, opt.nhead, opt.dropout,
                                        opt.residual_weight, no_imgnorm=opt.no_imgnorm)
        if bert is None:
            if pretrained is None:
                pretrained = getattr(opt, "bert_init", "pretrained") == "pretrained"
            bert = build_bert(opt.bert_path, pretrained=pretrained)
        self.txt_enc = EncoderText_BERT(bert, opt.embed_size, opt.nhead, opt.dropout,
                                        opt.residual_weight, no_txtnorm=opt.no_txtnorm)
        self.criterion = GraphLoss(
            embed_size=opt.embed_size, nhead=opt.nhead, dropout=opt.dropout,
            num_layers_enc=opt.num_layers_enc, threshold=opt.threshold, topk=opt.topk,
            mask_weight=opt.mask_weight, reg_loss_weight=opt.reg_loss_weight,
            warmup=opt.warmup, norm_input=bool(opt.norm_input),
            cross_loss=bool(opt.cross_loss), cutoff=loss_cutoff(opt),
            base_loss=opt.base_loss, gnn_loss=opt.gnn_loss, margin=opt.margin,
            max_violation=opt.max_violation, mask_repeat=bool(opt.mask_repeat))
        self.criterion.to(self.device)
        self.captions = None  # the CaptionTokenizer of the augmentations, when first needed
        self.setup()

    def modules(self):
        return [self.img_enc, self.txt_enc]

    def load_state_dict(self, state_dict, strict=True):
        load_encoder_states(self.img_enc, self.txt_enc, state_dict, strict=strict)

    def train_start(self):
        super().train_start()
        self.criterion.train()

    def val_start(self):
        super().val_start()
        self.criterion.eval()

    def check_checkpoint(self, ckpt, path):
        """An HREM checkpoint's BERT has the size of the one of --bert_path (other
        checkpoints: the generic comparison says what they are)."""
        if self.recognise(ckpt) is None:
            return
        theirs = bert_of_state(ckpt["model"][1])
        ours = bert_of_state(self.txt_enc.state_dict())
        if theirs != ours:
            raise errors.error("bert_mismatch", _where(self.opt.bert_path), ours=ours,
                               theirs=theirs, checkpoint=os.path.basename(path))

    # ------------------------------------------------------------------ optimisation
    def param_groups(self):
        lr = self.opt.learning_rate
        bert = {id(p) for p in self.txt_enc.bert.parameters()}
        return [
            {"params": [p for p in self.txt_enc.parameters() if id(p) not in bert], "lr": lr},
            {"params": list(self.txt_enc.bert.parameters()), "lr": lr * 0.1},
            {"params": list(self.img_enc.parameters()), "lr": lr},
            {"params": list(self.criterion.parameters()),
             "lr": lr * self.opt.graph_lr_factor},
        ]

    def make_optimizer(self, groups):
        return torch.optim.AdamW(groups, lr=self.opt.learning_rate, weight_decay=1e-4)

    def lr_factor(self, epoch):
        """decay_rate per epoch of lr_schedules reached (the original multiplies the current
        rate at the start of those epochs)."""
        n = len({m for m in self.opt.lr_schedules if m <= epoch})
        return self.opt.decay_rate ** n

    def start_epoch(self, epoch, lr_scale=1):
        super().start_epoch(epoch, lr_scale)
        # the VSE losses take the hardest negative after their warm-up epochs (the triplet
        # losses, the default, have no such switch)
        self.criterion.set_max_violation(self.opt.max_violation or
                                         epoch >= self.opt.vse_mean_warmup_epochs)

    def augment(self, images, img_lengths, words, ids, img_ids):
        """The original's training items and collate: each caption augmented (python's
        `random`), each image's regions dropped (numpy's global generator), then sorted by
        caption length and padded. Both generators are seeded by --seed and saved in the
        checkpoints, so a run and its --resume draw the same."""
        if self.captions is None:
            self.captions = CaptionTokenizer(load_tokenizer(self.opt.bert_path),
                                             _where(self.opt.bert_path))
        caps = [self.captions.augment(w, random) for w in words]
        ims = [images[k, :int(n)] for k, n in enumerate(img_lengths)]
        if self.opt.size_augment:
            ims = [drop_regions(im, np.random) for im in ims]
        return pad_batch(ims, caps, ids, img_ids)

    def train_loss(self, images, captions, lengths, ids=None, img_ids=None, img_lengths=None,
                   words=None, **extra):
        """The criterion's loss of a batch. With `words` (a training loader's batch) the
        augmentations are drawn first."""
        if img_lengths is None:
            img_lengths = torch.full((images.shape[0],), images.shape[1])
        if img_ids is None:
            img_ids = ids
        if words is not None:
            images, img_lengths, captions, lengths, ids, img_ids = self.augment(
                images, img_lengths, words, ids, img_ids)
        img_enc, txt_enc = self.trained()
        lengths = torch.as_tensor(lengths).to(self.device)
        img = img_enc(images.to(self.device, non_blocking=True),
                      torch.as_tensor(img_lengths).to(self.device), graph=True)
        cap = txt_enc(captions.to(self.device, non_blocking=True), lengths, graph=True)
        with fp32((img, cap)) as (img, cap):  # HREM.fp32_parts
            loss = self.criterion(img, cap + (lengths,), torch.as_tensor(img_ids))
        n = len(lengths)
        self.logger.update("Loss", loss.item(), n)
        parts = self.criterion.parts
        self.logger.update("Base", parts["base"].item(), n)
        if "reg" in parts:
            self.logger.update("GNN", sum(g.item() for g in parts["gnn"]), n)
            self.logger.update("Reg", parts["reg"].item(), n)
        return loss, loss

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extra(self):
        return {"criterion": self.criterion.state_dict(),
                "criterion_iter_count": self.criterion.iter_count}

    def resume(self, ckpt):
        """Also the criterion's weights and warm-up counter (a checkpoint without them, e.g.
        the authors': a new criterion, counted from the checkpoint's iteration)."""
        super().resume(ckpt)
        if "criterion" in ckpt:
            self.criterion.load_state_dict(ckpt["criterion"])
        self.criterion.iter_count = ckpt.get("criterion_iter_count", ckpt["Eiters"])

    # ------------------------------------------------------------------ evaluation
    def forward_emb(self, images, captions, lengths, img_lengths=None, **extra):
        """Global embeddings: images (B, N, D) with img_lengths -> (B, d) (zero rows for the
        images that an evaluation item leaves out, length 0); token ids (C, T) with lengths ->
        (C, d)."""
        if img_lengths is None:
            img_lengths = torch.full((images.shape[0],), images.shape[1])
        img_lengths = torch.as_tensor(img_lengths)
        keep = img_lengths > 0
        img_emb = torch.zeros(len(img_lengths), self.opt.embed_size, device=self.device)
        if bool(keep.any()):
            img_emb[keep.to(self.device)] = self.img_enc(
                images[keep].to(self.device, non_blocking=True),
                img_lengths[keep].to(self.device))
        cap_emb = self.txt_enc(captions.to(self.device, non_blocking=True),
                               torch.as_tensor(lengths).to(self.device))
        return img_emb, cap_emb, lengths

    # ------------------------------------------------------------------ search (retrieve.py)
    no_attention_why = ("it is a dual encoder: an image and a caption are each one vector, "
                        "scored by their dot product, with no word x region attention")

    def query_batch(self, text, vocab):
        """Free text -> [CLS] WordPiece ids [SEP], as HREMDataset encodes the split's captions
        (`vocab`: the CaptionTokenizer of --bert_path); the unknown words are those that
        WordPiece cannot split (one [UNK]), as written in the query (lower-cased where the
        tokenizer lower-cases)."""
        tok = vocab.tokenizer
        enc = tok(text, add_special_tokens=False, split_special_tokens=True,
                  return_offsets_mapping=True)
        ids = [vocab.cls_id] + list(enc["input_ids"]) + [vocab.sep_id]
        spans = {}                                           # word -> (start, end, has [UNK])
        for tid, w, (a, b) in zip(enc["input_ids"], enc.word_ids(), enc["offset_mapping"]):
            s0, e0, unk = spans.get(w, (a, b, False))
            spans[w] = (min(s0, a), max(e0, b), unk or tid == tok.unk_token_id)
        lower = getattr(tok, "do_lower_case", False)
        unknown = [text[a:b].lower() if lower else text[a:b]
                   for a, b, unk in spans.values() if unk]
        return TextQuery(torch.tensor([ids], dtype=torch.int64), [len(ids)], {},
                         tok.convert_ids_to_tokens(ids), unknown, len(spans))

    def forward_text(self, captions, lengths, **extra):
        """The caption half of forward_emb: (C, d) global embeddings."""
        return (self.txt_enc(captions.to(self.device),
                             torch.as_tensor(lengths).to(self.device)), lengths)

    def score(self, img_embs, cap_embs, cap_lens, shard_size=None, **extra):
        """img @ cap^T in float64 (the original's numpy product of float64 copies), in
        blocks of captions bounded by the memory budget (or `shard_size` captions)."""
        n_img, d = np.shape(img_embs)
        block = shard_size or max(1, memory_budget() // (8 * (n_img + d)))
        return dot_scores(img_embs, cap_embs, device=self.device, block=block)

    # ------------------------------------------------------------------ two-stage retrieval
    embeds_alone = True  # one vector per image and per caption, scored by their dot product

    def shortlist_embeddings(self, img_embs, cap_embs, cap_lens):
        """The global embeddings as they are (float32): `score` is their dot product."""
        return (np.asarray(img_embs, dtype=np.float32), np.asarray(cap_embs, dtype=np.float32))

    # ------------------------------------------------------------------ benchmark (bench.py)
    # a dual encoder: its evaluation is encoding (each image once, each caption once, in
    # batches of 128) plus one blocked matrix product, timed end to end on random region
    # features and token ids at BERT's demo size (bert_demo/config.json, 2 layers of 128) and
    # BERT-base's (12 layers of 768, random weights: no download); no reference here, the speed
    # against the original code is measured side by side with it (README, Speed)
    dual_encoder = True
    bench_train_note = ", graph losses on"
    BENCH_BERTS = {"demo": "demo (2 x 128)", "base": "base (12 x 768)"}

    @classmethod
    def add_bench_options(cls, parser):
        parser.add_argument("--hrem_n_img", type=int, default=1000,
                            help="HREM evaluation: images (x 5 captions)")
        parser.add_argument("--hrem_bert", default="demo,base",
                            help="HREM: BERT sizes, comma-separated: demo (bert_demo/), base "
                                 "(BERT-base)")

    @classmethod
    def check_bench_args(cls, args):
        errors.check_choices(args, "hrem_bert", tuple(cls.BENCH_BERTS))
        errors.check_positive(args, ["hrem_n_img"])
        if args.quick:
            args.hrem_n_img, args.hrem_bert = 20, "demo"

    @classmethod
    def bench_variants(cls, args):
        return [(b, "%s BERT" % cls.BENCH_BERTS[b]) for b in args.hrem_bert.split(",")]

    @classmethod
    def bench_model(cls, args, name, variant="demo"):
        """The original's defaults and BERT at the demo's size or BERT-base's (random
        weights)."""
        from transformers import BertConfig, BertModel
        opt = argparse.Namespace(img_dim=args.img_dim, embed_size=args.embed_size,
                                 no_imgnorm=False, no_txtnorm=False, grad_clip=2.0, margin=0.2,
                                 max_violation=False, device=args.device,
                                 data_name="f30k_precomp", bert_path=BERT_DEMO,
                                 bert_init="random", precision=args.precision)
        cls.complete_opt(opt)
        cfg = BertConfig.from_pretrained(BERT_DEMO) if variant == "demo" else BertConfig()
        return cls(opt, bert=BertModel(cfg)), opt

    def bench_eval_steps(self, args, rng):
        """--hrem_n_img images (random features) encoded once and 5x as many captions (random
        token ids, bench_captions) in batches of 128, then `score`."""
        n_img, n_cap, bs = args.hrem_n_img, 5 * args.hrem_n_img, 128
        images = torch.from_numpy(rng.standard_normal((n_img, 36, args.img_dim))
                                  .astype(np.float32)).abs()
        caps, lens = bench_captions(args, rng, n_cap, self.txt_enc.bert.config.vocab_size)
        full, dev = torch.full((bs,), 36), self.device
        self.forward_emb(images[:2], caps[:2], lens[:2], img_lengths=full[:2])  # warm-up

        def encode_images(out):
            return torch.cat([self.img_enc(images[i:i + bs].to(dev),
                                           full[:len(images[i:i + bs])].to(dev))
                              for i in range(0, n_img, bs)])

        def encode_captions(out):
            return torch.cat([self.txt_enc(caps[j:j + bs, :int(lens[j:j + bs].max())].to(dev),
                                           lens[j:j + bs].to(dev))
                              for j in range(0, n_cap, bs)])

        def score(out):
            return self.score(out["images"].float().cpu().numpy(),
                              out["captions"].float().cpu().numpy(), lens.tolist())
        return n_img, n_cap, [("images", encode_images), ("captions", encode_captions),
                              ("score", score)]

    def bench_train_inputs(self, args, rng):
        """A batch of --batch random pairs with the graph losses on (past the warm-up), the
        augmentations drawn in the step (bert_demo's vocabulary for the random tokens)."""
        n = args.batch
        images = torch.from_numpy(rng.standard_normal((n, 36, args.img_dim))
                                  .astype(np.float32)).abs()
        vocab = self.txt_enc.bert.config.vocab_size
        words = [[[int(t)] for t in rng.integers(5, vocab, size=rng.integers(
            args.min_len - 2, args.max_len - 1))] for _ in range(n)]
        caps = [[2] + [w[0] for w in ws] + [3] for ws in words]
        lens = [len(c) for c in caps]
        captions = torch.zeros(n, max(lens), dtype=torch.int64)
        for k, c in enumerate(caps):
            captions[k, :len(c)] = torch.tensor(c)
        img_ids = list(range(n))
        self.criterion.iter_count = self.opt.warmup  # the graph losses on
        return images, captions, lens, img_ids, dict(img_ids=img_ids,
                                                     img_lengths=torch.full((n,), 36),
                                                     words=words)

    def bench_gallery_files(self, opt, root):
        """--bert_path: a folder of this BERT's config and bert_demo's WordPiece vocabulary
        (which covers the synthetic captions)."""
        opt.bert_path = os.path.join(root, "bert")
        self.txt_enc.bert.config.save_pretrained(opt.bert_path)
        for f in ("vocab.txt", "tokenizer_config.json"):
            shutil.copy(os.path.join(BERT_DEMO, f), opt.bert_path)


def bench_captions(args, rng, n, vocab_size):
    """Random token ids ([CLS] 2 ... [SEP] 3, others >= 5), 0-padded, and their lengths, in
    [--min_len, --max_len] with [CLS] and [SEP]."""
    lens = rng.integers(args.min_len, args.max_len + 1, size=n)
    ids = torch.zeros(n, int(lens.max()), dtype=torch.int64)
    for k, L in enumerate(lens):
        ids[k, 0], ids[k, L - 1] = 2, 3
        ids[k, 1:L - 1] = torch.from_numpy(rng.integers(5, vocab_size, size=L - 2))
    return ids, torch.from_numpy(lens)
