"""Fixtures shared by several test files."""
import pytest
import torch

from divot.presets import tokenizer_config
from divot.tokenizer import DivotTokenizer


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny ops, restored afterwards.

    The LLM tests' activations are tiny (e.g. (2, 156, 128)); with a second thread each op
    waits on thread hand-offs, 10-20× slower when the 2-core machine is busy.
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny random Divot tokenizer, saved the way pretrain_tokenizer.py saves it (no de-tokenizer)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tokenizer_run") / "tokenizer"
    DivotTokenizer(tokenizer_config("tiny")).save_pretrained(out)
    return out
