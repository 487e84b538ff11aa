import random

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run the CPU tests' paths on CUDA; without a GPU they skip."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so results never depend on test order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _matmul_ceiling_cache(tmp_path_factory):
    """The trainer's MFU ceiling (lmlab.train.mfu), the compiled decoding steps and the C
    kernels are cached in the session's temporary folder, not in ~/.cache or /tmp: tests
    write only to temporary folders."""
    from lmlab.train import mfu

    path = tmp_path_factory.mktemp("cache") / "matmul_ceiling.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mfu, "cache_file", lambda: path)
        # compiled decoding steps too (lmlab.generate.compiled.step_cache_dir); subprocesses
        # inherit the variable
        patch.setenv("LMLAB_COMPILE_CACHE", str(path.parent / "steps"))
        # and the C kernels (lmlab.native.cache_dir)
        patch.setenv("LMLAB_NATIVE_CACHE", str(path.parent / "native"))
        yield


@pytest.fixture
def pattern_loss_drop(tmp_path):
    """Train a model 20 steps on a repeating 6-token pattern with lmlab's trainer; returns
    (loss before, loss after) on the pattern. Shared by the ladder families' tests."""
    from lmlab.train import TrainConfig, train

    def run(model):
        tokens = torch.tensor([1, 2, 3, 4, 5, 6] * 100)
        cfg = TrainConfig(
            out_dir=str(tmp_path / "pattern"),
            max_steps=20,
            batch_size=4,
            seq_len=16,
            progress=False,
            precision="fp32",
            eval_interval=10,
            warmup_steps=2,
            lr=3e-2,  # the default suits transformers; these tiny models learn faster with more
        )
        x, y = tokens[:-1].view(1, -1), tokens[1:]
        with torch.no_grad():
            before = torch.nn.functional.cross_entropy(model(x)[0], y).item()
        train(model, tokens[:500], tokens[500:], cfg)
        with torch.no_grad():
            after = torch.nn.functional.cross_entropy(model(x)[0], y).item()
        return before, after

    return run
