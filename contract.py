"""The contract: what every matcher provides, and the few helpers they all share.

A matcher (SGRAF in model.py, naaf.NAAF, gsmn.GSMN, hrem.HREM, ...) is one file with a subclass
of `Matcher` plus one line in matchers.py's registry. train.py, evaluation.py, retrieve.py,
bench.py and the checks reach a matcher only through this class, so that none of them needs to
know which matchers exist, and adding one is writing one class.

What a matcher must provide (the rest has a default here; override what differs):
  an instance     modules() (the checkpoint's state dicts, in `state_names` order), the
                  train step (train_loss), the embeddings (forward_emb), the scores (score)
  the class       to be of use, its flags (add_options) and its checkpoints' recognition
                  (recognise, infer_flags; the default recognises none); for bench.py, its
                  model at the benchmark's sizes (bench_model) and, when it is scored pair by
                  pair, the original's per-caption scores (percaption_scores), the oracles
                  of its fast paths

It lives apart from every matcher so that a change to it shows as a change to the contract, and
so that a matcher need not load another one to implement it: naaf.py and gsmn.py take only
SCAN's two encoders from model.py, and hrem.py loads nothing of SGRAF (no GRU, no DAA, no
scikit-learn).

Also here, shared by the matchers: l1norm and l2norm (the originals' normalisations, eps after
the root), the train step's precision (train_autocast; fp32, the parts that stay fp32 under
`--precision bf16`), memory_budget (the size of a scoring shard), TextQuery (a free-text
query), and the random inputs of bench.py's jobs at the benchmark's sizes (bench_opt, random_lengths,
random_batch, random_embeddings), which the matchers' bench hooks build on.
"""
import os
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.utils.clip_grad import clip_grad_norm_
from tqdm import tqdm

import data
import errors
import vocab
from meters import LogCollector
from vocab import END, START, encode_caption_with_oov, tokenize


def l1norm(X, dim, eps=1e-8):
    """X / (sum |X| + eps) along dim."""
    return X / (X.abs().sum(dim=dim, keepdim=True) + eps)


def l2norm(X, dim=-1, eps=1e-8):
    """X / (||X|| + eps) along dim: the eps is added after the square root, as the original."""
    return X / (X.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def train_autocast(device, precision):
    """The train step's autocast, chosen once per model (nanoGPT's `ctx`): bf16 autocast on
    `device` (CPU or CUDA) for `--precision bf16`, nothing for fp32 (the default, the originals'
    arithmetic). Autocast computes the matmuls (and, on CUDA, the GRU) in bf16; the weights, their
    gradients and Adam's state stay fp32, as does what a matcher marks with `fp32`."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def to_fp32(x):
    """x with every floating tensor in it (nested tuples and lists too) in float32; a float32
    tensor is returned as is (no copy: the fp32 path is unchanged)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(to_fp32(v) for v in x)
    return x


@contextmanager
def fp32(x):
    """`with fp32(x) as x:` a part of the train step that stays fp32 under --precision bf16
    (the loss, a matcher's statistics): x in float32 (to_fp32) and autocast off on its device.
    Without autocast, x as is and nothing else."""
    t = x
    while isinstance(t, (tuple, list)):
        t = next((v for v in t if isinstance(v, (torch.Tensor, tuple, list))), None)
    dev = t.device.type if isinstance(t, torch.Tensor) else "cpu"
    if not torch.is_autocast_enabled(dev):
        yield x
        return
    with torch.autocast(dev, enabled=False):
        yield to_fp32(x)


def memory_budget():
    """Bytes a scoring shard may use: an eighth of the available memory, kept between 16 MB and
    64 MB, so that the peak stays below the per-caption path's (the result matrix is the
    caller's, outside this budget)."""
    avail = 2 ** 31
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(max(avail // 8, 2 ** 24), 2 ** 26)


# A free-text query as a matcher's text encoder takes it (Matcher.query_batch): the batch of one
# caption for `forward_text` (captions (1, L) ids, lengths [L], extra {name: [value]}), the
# tokens the encoder sees (one per position: the rows of an attention map), the words the
# vocabulary does not know (mapped to its unknown token) and, where tokens are not words
# (WordPiece), the number of words (None: the tokens but the special ones, <...> and [...]).
TextQuery = namedtuple("TextQuery", "captions lengths extra tokens unknown n_words",
                       defaults=(None,))


class Matcher:
    """What every matcher provides to train.py, evaluation.py and the checks: a matcher is one
    file with a subclass of this, plus one line in matchers.py's registry. The class itself
    (without an instance) owns its flags, its vocabulary, its data, its checkpoint layout; an
    instance owns its modules, optimizer, train step and scoring. Override what differs.

    Letters: B images, C captions, R regions, L words, d embed_size.
    """
    state_names = ("img_enc", "txt_enc")  # the state dicts of the checkpoint's 'model', in order
    defaults = {}          # flag defaults that differ from the shared parser's for this matcher
    num_regions = None     # (count, why) when the model needs that many regions per image
    drop_last = False      # drop the last, smaller training batch
    collate_fn = staticmethod(data.collate_fn)  # items -> data.Batch
    score_inputs = {}      # batch extras scoring needs: {name: "image" or "caption"}
    show_progress = True   # off while evaluation.py shows one bar over all the pairs
    optional_keys = ()     # "state_name.key" entries a checkpoint may have or lack (buffers that
    #                        some library versions save)
    vocab_path_unused = None  # why --vocab_path does not apply (None: the vocabulary reads it)
    demo_flags = []        # flags with which demo.py's small model learns in a few minutes
    # train.py --precision bf16: what this matcher keeps in fp32 beyond the contract's (the loss,
    # the weights, the gradients, Adam's state), and why: {part: why} (docs/training.md)
    fp32_parts = {}

    # ------------------------------------------------------------------ options and text
    @classmethod
    def add_option(cls, parser, *flags, **kwargs):
        """parser.add_argument for one of this matcher's flags, recorded as its own (a flag of
        other matchers only is refused with this one). A flag another matcher already added
        (e.g. --lambda_softmax) is shared, not added twice: its default for this matcher goes
        into `defaults`."""
        action = next((parser._option_string_actions[f] for f in flags  # noqa: SLF001
                       if f in parser._option_string_actions), None)  # noqa: SLF001
        if action is None:
            action = parser.add_argument(*flags, **kwargs)
        cls.own_options().add(action.dest)
        return action

    @classmethod
    def own_options(cls):
        """The dests of the flags this class added with `add_option`."""
        if "_own_options" not in cls.__dict__:
            cls._own_options = set()
        return cls._own_options

    @classmethod
    def add_options(cls, parser):
        """The matcher's own flags, with `cls.add_option` (an argument group of the shared
        parser)."""

    @classmethod
    def complete_opt(cls, opt):
        """Fill what an older or an original checkpoint's `opt` lacks with this matcher's
        defaults (the shared ones are filled by the caller)."""
        for k, v in cls.defaults.items():
            if not hasattr(opt, k):
                setattr(opt, k, v)
        return opt

    @classmethod
    def check_opt(cls, opt, distributed=False):
        """Flags that cannot work with this matcher: raise errors.error(...) before any
        compute (keys flag_unsupported, torchrun_unsupported, flag_positive, ...)."""

    @classmethod
    def vocabulary(cls, opt):
        """(vocab, path): what turns a caption into ids. SCAN's `<data_name>_vocab.json`."""
        path = os.path.join(opt.vocab_path, "%s_vocab.json" % opt.data_name)
        return vocab.load_vocab(path), path

    # ------------------------------------------------------------------ data
    @classmethod
    def dataset(cls, data_path, split, vocab, opt, train=False):
        """The split as this matcher reads it (its items go through `collate_fn`)."""
        return data.PrecompDataset(data_path, split, vocab,
                                   feat_format=getattr(opt, "feat_format", "auto"),
                                   img_dim=getattr(opt, "img_dim", None),
                                   regions=cls.num_regions)

    @classmethod
    def check_train_data(cls, n_captions, batch_size):
        """What the training split must satisfy for this model (e.g. no last batch of one)."""

    @classmethod
    def add_eval_options(cls, parser):
        """Flags that evaluation.py offers to override this matcher's checkpoint options (e.g.
        where a pretrained part's files are); each defaults to None (keep the checkpoint's).
        Returns their dests."""
        return []

    @classmethod
    def for_checkpoint(cls, opt, device=None):
        """The model whose weights a checkpoint will replace (evaluation, --resume): the model
        of the flags, except that a matcher that starts a module from pretrained weights need
        not read them."""
        return cls(opt, device=device)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def recognise(cls, ckpt):
        """The --module_name of a checkpoint (ours or the authors') if it is this matcher's,
        read from its contents; else None."""
        return None

    @classmethod
    def infer_flags(cls, state, opt=None):
        """{flag: value or None}: the flags a state list was built with, as far as its keys
        and shapes say (for the "pass --flag X" of a mismatch)."""
        return {}

    # ------------------------------------------------------------------ the instance
    def __init__(self, opt, device=None):
        self.opt = opt
        self.device = torch.device(device or getattr(opt, "device", None) or
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.grad_clip = opt.grad_clip
        self.Eiters = 0
        self.logger = LogCollector()
        self._ddp = None

    def setup(self):
        """After the subclass built its modules: move them to the device, build the optimizer
        from `param_groups()` and remember each group's base learning rate."""
        for m in self.modules():
            m.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        groups = self.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = self.make_optimizer(groups)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # the train step's precision, opt.precision (train.py --precision; fp32 when absent):
        # its autocast context chosen once
        self.autocast = train_autocast(self.device, getattr(self.opt, "precision", None))

    def modules(self):
        """The nn.Modules whose state dicts make the checkpoint's 'model', in `state_names`
        order."""
        raise NotImplementedError

    def state_dict(self):
        return [m.state_dict() for m in self.modules()]

    def load_state_dict(self, state_dict, strict=True):
        if len(state_dict) != len(self.modules()):
            raise ValueError("expected %d state dicts (%s), got %d"
                             % (len(self.modules()), ", ".join(self.state_names),
                                len(state_dict)))
        for m, sd in zip(self.modules(), state_dict):
            m.load_state_dict(sd, strict=strict)

    def train_start(self):
        for m in self.modules():
            m.train()

    def val_start(self):
        for m in self.modules():
            m.eval()

    # ------------------------------------------------------------------ optimisation
    def param_groups(self):
        """[{'params': [...], 'lr': base learning rate}, ...] for the optimizer; one group of
        every module's parameters by default."""
        return [{"params": [p for m in self.modules() for p in m.parameters()
                            if p.requires_grad],
                 "lr": self.opt.learning_rate}]

    def make_optimizer(self, groups):
        return torch.optim.Adam(groups, lr=self.opt.learning_rate)

    def lr_factor(self, epoch):
        """The learning-rate schedule: x0.1 every `lr_update` epochs (the originals')."""
        return 0.1 ** (epoch // self.opt.lr_update)

    def start_epoch(self, epoch, lr_scale=1):
        """Set every group's learning rate to its own base rate x lr_scale x the schedule, and
        start the epoch's running averages of the log."""
        factor = self.lr_factor(epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_scale * factor
        self.logger = LogCollector()

    def ddp(self, device_ids=None):
        """Wrap the modules in DistributedDataParallel for the train step (torchrun); the bare
        modules stay what `state_dict()` and evaluation see."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self._ddp = [DDP(m, device_ids=device_ids) for m in self.modules()]
        return self

    def trained(self):
        """The modules the train step calls: the DDP wrappers after ddp(), else the bare
        ones."""
        return self._ddp or self.modules()

    def release_ddp(self):
        """Drop the DDP wrappers (their reducers hold the process group), before the group is
        destroyed at the end of a torchrun training (distributed.finish)."""
        self._ddp = None

    def train_loss(self, images, captions, lengths, ids=None, **extra):
        """The loss of one batch: (logged loss, tensor to backpropagate)."""
        raise NotImplementedError

    def train_emb(self, images, captions, lengths, ids=None, **extra):
        """One optimisation step on a batch whose pair k is (image k, caption k); returns the
        loss, detached. The forward pass runs under `self.autocast` (--precision); the loss
        (computed under `fp32` by each matcher), the backward's gradients of the fp32 weights,
        the clipping and Adam's step are fp32 whatever the precision."""
        self.Eiters += 1
        self.logger.update("Eit", self.Eiters)
        self.logger.update("lr", self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad()
        with self.autocast:
            loss, objective = self.train_loss(images, captions, lengths, ids, **extra)
        objective.backward()
        self.after_backward()
        if self.grad_clip > 0:
            clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def reference_train_step(self, images, captions, lengths, ids=None, **extra):
        """The original `train_emb` op for op, the oracle of `train_emb` (tests, bench.py):
        every B x B pair scored caption by caption (`forward_sim_percaption`) in one graph, the
        loss (`forward_loss`), backward, clip, the optimizer step. Timed side by side in one
        process with the original SGRAF code's own step, it runs at the same speed (README,
        Speed)."""
        img, cap, cap_lens = self.forward_emb(images, captions, lengths)
        sims = self.forward_sim_percaption(img, cap, cap_lens, **extra)
        self.optimizer.zero_grad()
        loss = self.forward_loss(sims, ids=ids)
        loss.backward()
        self.after_backward()
        if self.grad_clip > 0:
            clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def after_backward(self):
        """Between the backward pass and the clipping (e.g. exact zero gradients for
        parameters outside the graph)."""

    def set_semantics(self, captions):
        """The training split's captions, for losses that need them (DAA's TF-IDF)."""

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_extra(self):
        """Entries saved beside 'model' in our checkpoints (the state the original loses)."""
        return {}

    def check_checkpoint(self, ckpt, path):
        """Before the generic comparison of keys and shapes (matchers.check_fits): a
        matcher's own, clearer one-line error for a checkpoint that does not fit."""

    def resume(self, ckpt):
        """Continue from one of our checkpoints: weights, optimizer, iteration and extra
        state."""
        self.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.Eiters = ckpt["Eiters"]

    # ------------------------------------------------------------------ evaluation
    def forward_emb(self, images, captions, lengths, **extra):
        """Embeddings for evaluation: (img_emb, cap_emb, cap_lens), per region and per word
        ((B, R, d), (C, L, d)) or global ((B, d), (C, d))."""
        raise NotImplementedError

    def score(self, img_embs, cap_embs, cap_lens, shard_size=None, **extra):
        """The (n_images, n_captions) float64 scores of every pair of the given images and
        captions (numpy arrays from evaluation.encode_data) in eval mode; any block of images
        x captions may be scored on its own, and a pair's score must not depend on the block
        it is scored in (evaluation.py scores the split shard by shard, in as many processes
        as torchrun starts). `extra`: the `score_inputs`. A long loop inside shows its bar
        with `self.progress`."""
        raise NotImplementedError

    def progress(self, iterable, **kwargs):
        """A tqdm bar over a long loop of this model's (e.g. its scoring blocks), off when
        `show_progress` is (evaluation.py shows one bar over all pairs instead)."""
        return tqdm(iterable, leave=False, disable=None if self.show_progress else True,
                    **kwargs)

    # ------------------------------------------------------------------ search and explanation
    # retrieve.py: a free-text query goes through `query_batch` and `forward_text`, then `score`
    # against the split's encodings; `--explain` draws `word_region_attention`.
    # what word_region_attention returns, in words (the figure's title; may name the options,
    # "{opt.lambda_softmax:g}"); None: the matcher has no word x region attention
    attention_info = None
    # why there is none, when attention_info is None (the one-line error of --explain)
    no_attention_why = "it declares no word x region attention (contract.Matcher.attention_info)"

    def query_batch(self, text, vocab):
        """Free text -> a TextQuery (above), tokenised exactly as `dataset` tokenises the split's
        captions, so that a caption of the split gives the ids its evaluation encodes. `vocab`:
        what `vocabulary(opt)` returned. Default: SCAN's `<start> nltk-tokens <end>` through the
        vocabulary, unknown words mapped to `<unk>`."""
        ids, _ = encode_caption_with_oov(vocab, text)
        tokens = [START] + tokenize(text) + [END]
        unknown = [t for t in tokens[1:-1] if t not in vocab.word2idx]
        return TextQuery(torch.tensor([ids], dtype=torch.int64), [len(ids)], {}, tokens, unknown)

    def forward_text(self, captions, lengths, **extra):
        """The caption half of `forward_emb`: (cap_emb (C, L, d) or (C, d), cap_lens), for a
        batch of `query_batch`; the caller is in eval mode without autograd. Default: the SCAN
        family's `self.txt_enc(captions, lengths)`."""
        return self.txt_enc(captions.to(self.device), lengths), lengths

    def gallery_inputs(self, img_embs):
        """What `score` computes from the images alone, computed once for a gallery (and cached
        with it) instead of at every query: {name: array (n_images, ...)}; retrieve.py passes
        each to `score(..., name=rows)`, the rows of the images being scored. Default: {}."""
        return {}

    def word_region_attention(self, img_embs, cap_embs, cap_lens, **extra):
        """The word x region attention weights this matcher computes when it scores the pairs
        (image k, caption k): a list of (cap_lens[k], R) float64 arrays, each row (a word) a
        distribution over the image's regions (sums to 1). Inputs as `score` takes them, one
        image per caption. A matcher that has none keeps `attention_info = None` and says why in
        `no_attention_why`; this default then refuses with that reason."""
        raise errors.error("explain_unsupported", "--explain", model=self.opt.module_name,
                           why=self.no_attention_why)

    # ------------------------------------------------------------------ two-stage retrieval
    # evaluation.py and retrieve.py --shortlist: a matcher whose score of a pair is the dot
    # product of one vector per image and one per caption, each computed alone (a dual encoder),
    # can shortlist candidates for a cross-attention matcher, which re-ranks them.
    embeds_alone = False
    no_shortlist_why = ("it scores each pair by cross-attention, with no vector per image "
                        "and per caption")

    def shortlist_embeddings(self, img_embs, cap_embs, cap_lens):
        """(image vectors (n_images, d), caption vectors (n_captions, d)), float32, from the
        split's encodings (evaluation.encode_data) or a query's (`forward_text`): `score` of a
        pair is their dot product (computed in float64 there). Only when `embeds_alone`."""
        raise errors.error("shortlist_unsupported", "--shortlist", model=self.opt.module_name,
                           why=self.no_shortlist_why)

    # ------------------------------------------------------------------ benchmark (bench.py)
    # bench.py times every matcher of the registry through these and names none. A matcher
    # scored pair by pair (the default) gets: encode; its scores of random embeddings
    # (`bench_embeddings`) against the original's evaluation (`percaption_scores`, in shards of
    # `bench_ref_shard`); its train step against `reference_train_step`. A dual encoder
    # (`dual_encoder`) gets its evaluation timed end to end (`bench_eval_steps`) and its train
    # step, for each of `bench_variants`, with no per-caption reference.
    dual_encoder = False
    bench_ref_shard = 100   # the original evaluation's shards: images x captions
    trains_with_daa = False  # '--what daa': its model has `daa` (the DAA loss, or None)
    # (img_emb, cap_emb, cap_lens, **extra) -> (B, C): the original's per-caption scores with
    # autograd, the reference of the train step; None: the matcher has none, and says why
    forward_sim_percaption = None
    no_reference_step_why = "it declares no forward_sim_percaption (contract.Matcher)"
    bench_train_note = ""   # what the train line adds after the batch size

    @classmethod
    def add_bench_options(cls, parser):
        """bench.py's flags for this matcher alone (its benchmark's own sizes and switches)."""

    @classmethod
    def check_bench_args(cls, args):
        """Those flags' checks (one-line errors before any job), and `--quick`'s small sizes
        for them when args.quick."""

    @classmethod
    def bench_variants(cls, args):
        """[(variant, label)]: the configurations a dual encoder is timed in (e.g. the sizes
        of a pretrained part); the label names it in the printed lines."""
        return [(None, None)]

    @classmethod
    def bench_model(cls, args, name, variant=None):
        """(model, opt): the matcher `name` at the benchmark's sizes, with the original's
        defaults and random weights (the caller seeds torch). Default: the SCAN family's
        shared flags (bench_opt) completed with this matcher's defaults."""
        opt = cls.complete_opt(bench_opt(args, name))
        return cls(opt), opt

    @classmethod
    def bench_embeddings(cls, args, rng, lens):
        """(img, cap, lens, extra): args.n_img images' region embeddings and the captions'
        word embeddings of lengths `lens` (drawn by the caller, the same for every matcher), as
        encode_data returns them, and the score inputs `score` takes (`score_inputs`)."""
        img, cap = random_embeddings(args, rng, lens)
        return img, cap, lens.tolist(), {}

    @classmethod
    def original_flops(cls, name, n_img, lens, R=36, d=1024, s=256, shard=100, intra=True):
        """FLOPs (2 x multiply-adds, matmuls) of the original algorithm scoring n_img images
        against captions of the given lengths (`intra` False: its training score); None when
        not counted."""
        return None

    @classmethod
    def bench_precision(cls, args):
        """The precision of `score`, as the eval line names it."""
        return "fp32"

    @classmethod
    def bench_reference_label(cls, args):
        """How the eval line names `percaption_scores`."""
        return "per-caption"

    @classmethod
    def bench_train_batch(cls, args):
        """The training batch its benchmark uses (a flag of its own, where the reference's
        memory needs a smaller one)."""
        return args.batch

    @classmethod
    def bench_original_code(cls, args):
        """The checkout of the ORIGINAL code whose evaluation bench.py also times
        (`bench_original`), or None."""
        return None

    @classmethod
    def bench_original(cls, args):
        """The original code's evaluation, loaded from bench_original_code(args): an object
        with `scores(img, cap, lens, **extra)` (as `percaption_scores`) and `close()`, which
        unloads it and returns its weights as our `state_dict()`."""
        raise NotImplementedError

    def percaption_scores(self, args, img_embs, cap_embs, cap_lens, **extra):
        """The original evaluation's (n_images, n_captions) float64 scores, op for op: shards of
        bench_ref_shard x bench_ref_shard pairs, caption by caption (the oracle of `score`)."""
        raise NotImplementedError

    def bench_train_inputs(self, args, rng):
        """(images, captions, lengths, ids, extra): a training batch of
        bench_train_batch(args) random pairs, as `train_emb` takes it. Default: random_batch,
        no ids (bench.py gives DAA's), no extra."""
        images, captions, lens = random_batch(args, self.bench_train_batch(args), rng)
        return images, captions, lens, None, {}

    def bench_eval_steps(self, args, rng):
        """A dual encoder's evaluation on random inputs: (n_img, n_cap, [(phase, fn)]), each
        fn(out) computing its phase from the earlier ones' results (out[phase]); bench.py
        times each, without autograd."""
        raise NotImplementedError

    def bench_gallery_files(self, opt, root):
        """Files a checkpoint of this model needs beside it, written under `root` (bench.py's
        '--what retrieve' gallery), with `opt` pointing at them."""


# ----------------------------------------------------------------------------- bench inputs

def bench_opt(args, name):
    """The SCAN family's shared flags at bench.py's sizes (args), the original's defaults."""
    return SimpleNamespace(img_dim=args.img_dim, embed_size=args.embed_size,
                           word_dim=args.word_dim, vocab_size=args.vocab_size, num_layers=1,
                           bi_gru=True, no_imgnorm=False, no_txtnorm=False, module_name=name,
                           grad_clip=2.0, margin=0.2, max_violation=True, learning_rate=2e-4,
                           device=args.device, precision=args.precision)


def random_lengths(args, n, rng):
    """n caption lengths in [--min_len, --max_len], longest first."""
    return np.sort(rng.integers(args.min_len, args.max_len + 1, size=n))[::-1].copy()


def random_batch(args, n, rng):
    """n random pairs: region features (n, 36, img_dim), word ids (<start> 1, words >= 4,
    <end> 2; 0-padded) and their lengths."""
    lens = random_lengths(args, n, rng)
    images = torch.from_numpy(rng.standard_normal((n, 36, args.img_dim)).astype(np.float32))
    captions = torch.zeros(n, int(lens.max()), dtype=torch.int64)
    for k, L in enumerate(lens):
        captions[k, 0], captions[k, L - 1] = 1, 2
        captions[k, 1:L - 1] = torch.from_numpy(rng.integers(4, args.vocab_size, size=L - 2))
    return images, captions, lens.tolist()


def random_embeddings(args, rng, lens):
    """Random l2-normalised region (n_img, 36, d) and word (n_cap, max(lens), d) embeddings,
    zero padded like encode_data's."""
    img = rng.standard_normal((args.n_img, 36, args.embed_size)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    cap = rng.standard_normal((len(lens), lens.max(), args.embed_size)).astype(np.float32)
    cap /= np.linalg.norm(cap, axis=-1, keepdims=True)
    cap *= (np.arange(lens.max())[None, :] < lens[:, None])[:, :, None]
    return img, cap
