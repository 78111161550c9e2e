"""Helpers for tests that start training scripts in subprocesses (plain or ``accelerate launch``).

Importing it from a test module works because pytest puts ``tests/`` on ``sys.path`` (the folder
is not a package).
"""
from __future__ import annotations

import os
import socket


def subprocess_env(**overrides: str) -> dict:
    """The environment of a CPU-only child process (two threads unless ``overrides`` say otherwise)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **overrides}


def free_port() -> int:
    """A TCP port free right now on localhost, for ``--main_process_port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
