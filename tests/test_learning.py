"""The synthetic data is learnable: a small SGR trained for a few epochs beats an untrained one
by far on the test split, and the same training on captions shuffled across images does not
(it stays near chance). Reduced sizes of what demo.py does."""
import os

import numpy as np
import pytest

import demo
import evaluation
import train
from helpers import tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--embed_size", "256", "--word_dim", "128", "--sim_dim", "64", "--batch_size", "32",
         "--learning_rate", "0.001", "--no-max_violation", "--num_epochs", "3",
         "--lr_update", "10", "--workers", "0", "--val_step", "100000", "--log_step", "1000",
         "--seed", "0", "--device", "cpu", "--img_dim", "64", "--data_name", "synth_precomp"]


def shuffle_train_captions(data_path):
    """Give every training image the captions of another image (whole groups of five)."""
    path = os.path.join(data_path, "synth_precomp", "train_caps.txt")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    groups = [lines[i:i + 5] for i in range(0, len(lines), 5)]
    perm = np.random.default_rng(0).permutation(len(groups))
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(c + "\n" for g in perm for c in groups[g]))


def train_and_test(root, shuffled=False):
    data_path, vocab_path = tiny_dataset(root, n_train=300, n_dev=10, n_test=100,
                                        img_dim=64)
    if shuffled:
        shuffle_train_captions(data_path)
    run = os.path.join(root, "run")
    flags = FLAGS + ["--data_path", data_path, "--vocab_path", vocab_path, "--model_name",
                     os.path.join(run, "checkpoint"), "--logger_name", os.path.join(run, "log")]
    untrained = os.path.join(root, "untrained.pth.tar")
    demo.save_untrained(flags, untrained)
    before = evaluation.evalrank(untrained, data_path=data_path, split="test",
                                 vocab_path=vocab_path, device="cpu")["rsum"]
    train.main(flags)
    after = evaluation.evalrank(os.path.join(run, "checkpoint", "checkpoint_2.pth.tar"),
                                data_path=data_path, split="test", vocab_path=vocab_path,
                                device="cpu")["rsum"]
    return before, after


def test_learns(tmp_path):
    before, after = train_and_test(str(tmp_path))
    assert after >= 3 * before, (before, after)


def test_shuffled_captions_stay_near_chance(tmp_path):
    # chance on 100 images: R@1, R@5, R@10 = 1, 5, 10 % each way, rsum 32 (trained on the
    # real captions, the same model reaches ~380)
    before, after = train_and_test(str(tmp_path), shuffled=True)
    assert after < 2.5 * 32, (before, after)
