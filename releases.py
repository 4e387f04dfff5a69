"""The released data and checkpoints that download.py fetches: one `Item` per thing a user
needs (SCAN's features and vocabularies, each checkpoint the authors of SGRAF, DAA, NAAF, GSMN and
HREM released), with its source URL and the numbers its authors report, copied from their five
READMEs, and the exact evaluation.py command that reproduces each number once installed.
"""
import difflib
import os
from collections import namedtuple

import errors

DEFAULT_DATA_PATH, DEFAULT_VOCAB_PATH, DEFAULT_DEST = "data", "vocab", os.path.join("runs",
                                                                                  "released")

Result = namedtuple("Result", "label published command")
Item = namedtuple("Item", "name kind matcher dataset url file size sha256 modules source "
                          "results")

SCAN_KAGGLE = "https://www.kaggle.com/datasets/kuanghueilee/scan-features"
SCAN_DRIVE = "https://drive.google.com/drive/u/0/folders/1os1Kr7HeTbh8FajBNegW8rjJf6GIhFqC"


def ckpt_path(dest, name, module):
    """Where a checkpoint item's model of `module` is installed."""
    return os.path.join(dest, name, "%s.pth.tar" % module)


def _eval(*models, split="test", fold5=False, vocab=True):
    """The evaluation.py command of installed checkpoints (item name, module)."""
    cmd = "python evaluation.py --model_path %s" % ckpt_path(DEFAULT_DEST, *models[0])
    if len(models) > 1:
        cmd += " --model_path2 %s" % ckpt_path(DEFAULT_DEST, *models[1])
    cmd += " --data_path %s" % DEFAULT_DATA_PATH
    if vocab:  # HREM reads BERT's vocabulary: evaluation.py refuses a --vocab_path it ignores
        cmd += " --vocab_path %s" % DEFAULT_VOCAB_PATH
    return cmd + " --split %s" % split + (" --fold5" if fold5 else "")


def _drive(kind, ident):
    return ("https://drive.google.com/file/d/%s/view?usp=sharing" % ident if kind == "file" else
            "https://drive.google.com/drive/folders/%s?usp=sharing" % ident)


def _sgraf(name, data_name, numbers):
    """SGRAF's Flickr30K or COCO archive (the SGR and SAF models and their logs)."""
    results = []
    protocols = [("test", False, "")] if data_name == "f30k" else \
        [("testall", True, "COCO 1K "), ("testall", False, "COCO 5K ")]
    for (split, fold5, proto), nums in zip(protocols, numbers):
        for label, models, n in (("SGR", [(name, "SGR")], nums[0]),
                                 ("SAF", [(name, "SAF")], nums[1]),
                                 ("SGRAF", [(name, "SGR"), (name, "SAF")], nums[2])):
            results.append(Result(proto + label, n, _eval(*models, split=split, fold5=fold5)))
    return results


R = "i2t R@1 R@5 R@10 / t2i R@1 R@5 R@10: "
ITEMS = [
    Item("scan-data", "data", "-", "f30k_precomp, coco_precomp",
         "https://iudata.blob.core.windows.net/scan/data.zip", "data.zip", None, None, (),
         "DAA README (SCAN's wget link); also %s and %s (SGRAF README)" % (SCAN_KAGGLE,
                                                                          SCAN_DRIVE), []),
    Item("scan-vocab", "vocab", "-", "f30k_precomp, coco_precomp",
         "https://iudata.blob.core.windows.net/scan/vocab.zip", "vocab.zip", None, None, (),
         "DAA README (SCAN's wget link); also %s" % SCAN_DRIVE, []),
    Item("sgraf-f30k", "checkpoint", "SGR, SAF", "f30k_precomp",
         _drive("file", "1OBRIn1-Et49TDu8rk0wgP0wKXlYRk4Uj"), "sgraf-f30k.zip", None, None,
         ("SGR", "SAF"), "SGRAF README (Flickr30K_SGRAF: models and logs; numbers: its updated results)",
         _sgraf("sgraf-f30k", "f30k", [[R + "76.6 93.7 96.6 / 56.1 80.9 87.0",
                                        R + "75.6 92.7 96.9 / 56.5 82.0 88.4",
                                        R + "78.4 94.6 97.5 / 58.2 83.0 89.1"]])),
    Item("sgraf-coco", "checkpoint", "SGR, SAF", "coco_precomp",
         _drive("file", "1SpuORBkTte_LqOboTgbYRN5zXhn4M7ag"), "sgraf-coco.zip", None, None,
         ("SGR", "SAF"), "SGRAF README (MSCOCO_SGRAF: models and logs; numbers: its updated results)",
         _sgraf("sgraf-coco", "coco", [[R + "77.3 96.0 98.6 / 62.1 89.6 95.3",
                                        R + "78.0 95.9 98.5 / 62.2 89.5 95.4",
                                        R + "79.2 96.5 98.6 / 63.5 90.2 95.8"],
                                       [R + "57.3 83.2 90.6 / 40.5 69.6 80.3",
                                        R + "55.5 83.8 91.8 / 40.1 69.7 80.4",
                                        R + "58.8 84.8 92.1 / 41.6 70.9 81.5"]])),
    Item("daa-coco-sgr", "checkpoint", "SGR + DAA", "coco_precomp",
         _drive("file", "1hCiXyQBrYF7eP7JtNTaHQoqSZ18-mb2X"), "daa-coco-sgr.pth.tar", None,
         None, ("SGR",), "DAA README", [
             Result("COCO 1K", R + "78.0 95.8 98.6 / 62.6 88.8 93.7, ASP 68.5 / 62.8",
                    _eval(("daa-coco-sgr", "SGR"), split="testall", fold5=True)),
             Result("COCO 5K", R + "56.5 84.1 91.1 / 40.8 70.2 80.4, ASP 68.4 / 62.6",
                    _eval(("daa-coco-sgr", "SGR"), split="testall"))]),
    Item("daa-coco-saf", "checkpoint", "SAF + DAA", "coco_precomp",
         _drive("file", "1o-Wch7pJMwOyf-RqEvsXgAUBhIO9fv8g"), "daa-coco-saf.pth.tar", None,
         None, ("SAF",), "DAA README", [
             Result("COCO 1K", R + "78.0 95.6 98.4 / 62.8 89.8 95.2, ASP 67.2 / 61.6",
                    _eval(("daa-coco-saf", "SAF"), split="testall", fold5=True)),
             Result("COCO 5K", R + "56.2 83.5 90.9 / 40.5 70.1 80.7, ASP 67.0 / 61.4",
                    _eval(("daa-coco-saf", "SAF"), split="testall")),
             Result("COCO 1K SGRAF (with daa-coco-sgr)",
                    R + "80.2 96.4 98.8 / 65.0 90.7 95.8, ASP 68.3 / 62.7",
                    _eval(("daa-coco-sgr", "SGR"), ("daa-coco-saf", "SAF"), split="testall",
                          fold5=True)),
             Result("COCO 5K SGRAF (with daa-coco-sgr)",
                    R + "60.0 86.4 92.4 / 43.5 72.3 82.5, ASP 68.2 / 62.5",
                    _eval(("daa-coco-sgr", "SGR"), ("daa-coco-saf", "SAF"), split="testall"))]),
    Item("daa-f30k-sgr", "checkpoint", "SGR + DAA", "f30k_precomp",
         _drive("file", "1Q0Ttw4yViWnupJA1whTAYGYHr-O56D4L"), "daa-f30k-sgr.pth.tar", None,
         None, ("SGR",), "DAA README", [
             Result("Flickr30K", R + "73.8 92.9 96.3 / 56.6 80.7 84.9, ASP 65.5 / 59.0",
                    _eval(("daa-f30k-sgr", "SGR")))]),
    Item("daa-f30k-saf", "checkpoint", "SAF + DAA", "f30k_precomp",
         _drive("file", "1hvixWqDDCbkbBYK28dyZeEI6Nlc0qfAx"), "daa-f30k-saf.pth.tar", None,
         None, ("SAF",), "DAA README", [
             Result("Flickr30K", R + "73.9 93.0 96.2 / 56.9 81.9 87.9, ASP 65.0 / 58.4",
                    _eval(("daa-f30k-saf", "SAF"))),
             Result("Flickr30K SGRAF (with daa-f30k-sgr)",
                    R + "78.0 94.2 97.6 / 59.9 83.4 89.2, ASP 65.8 / 59.2",
                    _eval(("daa-f30k-sgr", "SGR"), ("daa-f30k-saf", "SAF")))]),
    Item("naaf-f30k-glove", "checkpoint", "NAAF (GloVe)", "f30k_precomp",
         _drive("file", "1e3I5Uk2UGHPql4KLIrQW5L7ek3ih34rh"), "naaf-f30k-glove.pth.tar", None,
         None, ("NAAF",), "NAAF README (\"for Flickr30K model\")", [
             Result("Flickr30K", R + "80.6 95.4 98.0 / 60.0 83.9 89.9, rsum 507.9 (the one "
                    "set the README gives, after both links)", _eval(("naaf-f30k-glove",
                                                                     "NAAF")))]),
    Item("naaf-f30k", "checkpoint", "NAAF (no GloVe)", "f30k_precomp",
         _drive("file", "1NpZZYXmmejgd_nam79IdETSYIuRjo-7p"), "naaf-f30k.pth.tar", None, None,
         ("NAAF",), "NAAF README (\"for Flickr30K model without using GloVe\")", [
             Result("Flickr30K", "not stated separately (see naaf-f30k-glove)",
                    _eval(("naaf-f30k", "NAAF")))]),
    Item("gsmn-f30k-dense", "checkpoint", "GSMN (dense)", "f30k_precomp",
         _drive("file", "1kEi92w49Et5D2WVOv-Lc52HcpF2SPNNF"), "gsmn-f30k-dense.pth.tar", None,
         None, ("GSMN",), "GSMN README", [
             Result("Flickr30K (with gsmn-extras)",
                    R + "74.4 91.1 95.4 / 54.1 79.9 86.5, rsum 481.4",
                    _eval(("gsmn-f30k-dense", "GSMN")))]),
    Item("gsmn-f30k-sparse", "checkpoint", "GSMN (sparse)", "f30k_precomp",
         _drive("file", "1vTPDToCJNLPU80K0ISXRmpSzys6-MjBT"), "gsmn-f30k-sparse.pth.tar", None,
         None, ("GSMN",), "GSMN README", [
             Result("Flickr30K (with gsmn-extras)",
                    R + "72.8 91.0 95.8 / 52.8 78.8 85.6, rsum 476.8",
                    _eval(("gsmn-f30k-sparse", "GSMN")))]),
    Item("gsmn-extras", "extras", "GSMN", "f30k_precomp, coco_precomp",
         _drive("file", "1ZVLIN7uSh3dqYAEldelyYF2ei9vicJvZ"), "gsmn-extras.zip", None, None, (),
         "GSMN README (text features, boxes and dependencies, Flickr30K and MSCOCO)", []),
    Item("hrem-f30k", "checkpoint", "HREM", "f30k_precomp",
         _drive("folder", "1sIWjmtTNGMs8HBQhM48QR9u0twOv_rB6"), "hrem-f30k.zip", None, None,
         ("HREM",), "HREM README (a Drive folder: checkpoint and logs)", [
             Result("Flickr30K", "i2t R@1 R@5 / t2i R@1 R@5: 84.4 96.7 / 62.4 86.6",
                    _eval(("hrem-f30k", "HREM"), vocab=False))]),
    Item("hrem-coco", "checkpoint", "HREM", "coco_precomp",
         _drive("folder", "1e5bGjK6Z7Cmuj0M2dIET0lbLyFMm8BiM"), "hrem-coco.zip", None, None,
         ("HREM",), "HREM README (a Drive folder: checkpoint and logs)", [
             Result("COCO 1K", "i2t R@1 R@5 / t2i R@1 R@5: 81.9 96.9 / 65.9 91.4",
                    _eval(("hrem-coco", "HREM"), split="testall", fold5=True, vocab=False)),
             Result("COCO 5K", "i2t R@1 R@5 / t2i R@1 R@5: 62.5 87.4 / 44.0 73.9",
                    _eval(("hrem-coco", "HREM"), split="testall", vocab=False))]),
]


def item(name):
    for it in ITEMS:
        if it.name == name:
            return it
    close = difflib.get_close_matches(name, [it.name for it in ITEMS], n=1)
    raise errors.error("item_unknown", name,
                       close=" (did you mean %s?)" % close[0] if close else "")



def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" % (n, unit)) if unit == "B" else "%.1f %s" % (n, unit)
        n /= 1000.0


# ----------------------------------------------------------------------------- --list

def list_table():
    """The text `--list` prints: one line per item, then its published numbers and the
    evaluation.py command that reproduces each."""
    lines = ["%-17s %-16s %-26s %-8s %s" % ("NAME", "MATCHER", "DATASET", "SIZE", "SOURCE")]
    for it in ITEMS:
        lines.append("%-17s %-16s %-26s %-8s %s" % (it.name, it.matcher, it.dataset,
                                                     human(it.size) if it.size else "-",
                                                     it.url))
        lines.append("    from: %s" % it.source)
        for r in it.results:
            lines.append("    %s: %s" % (r.label, r.published))
            lines.append("      %s" % r.command)
    return "\n".join(lines)
