"""Small builders shared by the tests: a tiny synthetic dataset and tiny model flags."""
import os

from synthetic import make_synthetic

TINY_DIMS = ["--img_dim", "32", "--embed_size", "16", "--word_dim", "8"]
# the tiny dims of a matcher's own flags (a flag of another matcher is refused)
TINY_OWN = {"SGR": ["--sim_dim", "8"], "SAF": ["--sim_dim", "8"]}


def tiny_dims(module="SGR"):
    return TINY_DIMS + TINY_OWN.get(module, [])


def tiny_dataset(root, n_train=40, n_dev=10, n_test=10, img_dim=32, seed=0, **kw):
    """A SCAN-format synthetic dataset under root/data, its vocab under root/vocab."""
    data_path, vocab_path = os.path.join(root, "data"), os.path.join(root, "vocab")
    make_synthetic(data_path, "synth_precomp", vocab_path, seed=seed, n_train=n_train,
                   n_dev=n_dev, n_test=n_test, img_dim=img_dim, **kw)
    return data_path, vocab_path


def train_args(data_path, vocab_path, run_dir, *extra):
    module = extra[extra.index("--module_name") + 1] if "--module_name" in extra else "SGR"
    return (["--data_path", data_path, "--data_name", "synth_precomp", "--vocab_path",
             vocab_path, "--model_name", os.path.join(run_dir, "checkpoint"),
             "--logger_name", os.path.join(run_dir, "log"), "--workers", "0",
             "--batch_size", "10", "--log_step", "2", "--device", "cpu"] + tiny_dims(module) +
            list(extra))
