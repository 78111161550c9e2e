"""Divot-LLM checkpoints on disk: the training layout and the merged layout.

Training layout (``_layout: "lora"`` in ``config.json``), written by ``save_pretrained``::

    config.json                 LLMConfig + _class/_layout tags (paths made absolute)
    tokenizer/                  the text tokenizer with Divot's specials
    lora/                       peft adapter (adapter_config.json, adapter_model.safetensors)
    trained_base.safetensors    RMSNorms, embeddings, LM head (Hugging Face names)
    base_model.safetensors      the other base weights, only when base_path is None
    input_projector/  output_projector/   each config.json + model.safetensors

Merged layout (``_layout: "merged"``), written by ``save_merged``::

    config.json                 base_path "llm" (relative paths resolve against this folder)
    llm/                        MistralForCausalLM + tokenizer, Hugging Face format
    input_projector/  output_projector/

Loading a training checkpoint restores every weight; loading a merged one builds the model
on ``llm/`` with a fresh LoRA. Directories written by other libraries (peft, tokenizers,
transformers) are staged in ``NAME.tmp`` and renamed into place; single files go through
:func:`divot.modeling.atomic_save_state_dict`; ``config.json`` is written last.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from divot import config as cfglib
from divot.modeling import (WEIGHTS_NAME, CheckpointError, atomic_save_state_dict, check_state_dict,
                            load_state_dict_strict)
from llm import lora
from llm.llm_config import LLMConfig
from llm.text_tokenizer import load_text_tokenizer

if TYPE_CHECKING:
    from llm.model import DivotLLM

logger = logging.getLogger(__name__)

CLASS_NAME = "DivotLLM"
LAYOUTS = ("lora", "merged")
TOKENIZER_DIR, LORA_DIR, MERGED_DIR = "tokenizer", "lora", "llm"
PROJECTORS = ("input_projector", "output_projector")
TRAINED_BASE_NAME = "trained_base.safetensors"
BASE_WEIGHTS_NAME = "base_model.safetensors"
ADAPTER_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@contextmanager
def staged_dir(final: Path):
    """Yield an empty ``final.tmp`` to write into; on success it replaces ``final``."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _absolute(cfg: LLMConfig) -> LLMConfig:
    # A checkpoint's relative paths resolve against the checkpoint, so store the user's absolute.
    paths = {k: str(Path(v).resolve()) for k in ("base_path", "tokenizer_path") if (v := getattr(cfg, k))}
    return dataclasses.replace(cfg, **paths)


def _save_projectors(model: DivotLLM, directory: Path, state: dict) -> None:
    for name in PROJECTORS:
        getattr(model, name).save_pretrained(directory / name, state_dict=_sub(state, name + "."))


def save_checkpoint(model: DivotLLM, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    lm_state = _sub(state, "lm.")
    with staged_dir(directory / LORA_DIR) as tmp:
        # Never "auto": peft would compare vocab sizes against base_model_name_or_path's config.
        model.lm.save_pretrained(str(tmp), save_embedding_layers=False, state_dict=lm_state)
    trained = set(lora.fully_trained_parameters(model.base_model))
    base = {lora.clean_base_name(k): v for k, v in lm_state.items() if "lora_" not in k}
    atomic_save_state_dict({k: base[k] for k in sorted(trained)}, directory / TRAINED_BASE_NAME)
    if model.config.base_path is None:
        atomic_save_state_dict({k: v for k, v in base.items() if k not in trained}, directory / BASE_WEIGHTS_NAME)
    else:
        (directory / BASE_WEIGHTS_NAME).unlink(missing_ok=True)
    _save_projectors(model, directory, state)
    with staged_dir(directory / TOKENIZER_DIR) as tmp:
        model.text_tokenizer.save_pretrained(str(tmp))
    cfglib.save_json(_absolute(model.config), directory, extra={"_class": CLASS_NAME, "_layout": "lora"})
    logger.info("saved Divot-LLM checkpoint to %s", directory)


def write_merged(model: DivotLLM, merged_base, directory: str | os.PathLike) -> None:
    """The merged layout from an already merged plain ``MistralForCausalLM``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with staged_dir(directory / MERGED_DIR) as tmp:
        merged_base.save_pretrained(str(tmp))
        model.text_tokenizer.save_pretrained(str(tmp))
    _save_projectors(model, directory, model.state_dict())
    cfg = dataclasses.replace(model.config, base_path=MERGED_DIR, tokenizer_path=None)
    cfglib.save_json(cfg, directory, extra={"_class": CLASS_NAME, "_layout": "merged"})
    logger.info("saved merged Divot-LLM to %s", directory)


def read_config(directory: str | os.PathLike) -> tuple[LLMConfig, str]:
    """The checkpoint's config (relative paths resolved against ``directory``) and layout."""
    directory = Path(directory)
    path = directory / cfglib.CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {cfglib.CONFIG_NAME}; is this a Divot-LLM checkpoint?")
    data = json.loads(path.read_text())
    cls_name, layout = data.pop("_class", None), data.pop("_layout", None)
    if cls_name != CLASS_NAME or layout not in LAYOUTS:
        raise CheckpointError(f"{path}: _class {cls_name!r}, _layout {layout!r}; expected {CLASS_NAME!r} "
                              f"and one of {LAYOUTS}")
    try:
        cfg = cfglib.from_dict(LLMConfig, data)
    except cfglib.ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    paths = {k: str(directory / v) for k in ("base_path", "tokenizer_path")
             if (v := getattr(cfg, k)) and not Path(v).is_absolute()}
    return dataclasses.replace(cfg, **paths), layout


def _require(directory: Path, names: list[str]) -> None:
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete Divot-LLM checkpoint, missing {missing}")


def load_checkpoint_tokenizer(directory: str | os.PathLike, cfg: LLMConfig, layout: str):
    """A training checkpoint's own tokenizer; None for a merged one (it lives in ``llm/``)."""
    if layout != "lora":
        return None
    _require(Path(directory), [TOKENIZER_DIR])
    return load_text_tokenizer(Path(directory) / TOKENIZER_DIR, cfg.num_query_tokens)


@torch.no_grad()
def _copy_into(params: dict, state: dict, source: str, what: str) -> None:
    check_state_dict({k: p.shape for k, p in params.items()}, state, source, what)
    for name, p in params.items():
        p.copy_(state[name])


def _load_base(model: DivotLLM, directory: Path) -> None:
    params = lora.base_parameters(model.lm)
    trained = set(lora.fully_trained_parameters(model.base_model))
    state = load_file(str(directory / TRAINED_BASE_NAME))
    if model.config.base_path is None:  # random base: the frozen weights come from the checkpoint too
        state.update(load_file(str(directory / BASE_WEIGHTS_NAME)))
    else:
        params = {k: p for k, p in params.items() if k in trained}
    _copy_into(params, state, str(directory), "the Mistral base")


def _load_lora(model: DivotLLM, directory: Path) -> None:
    state = load_file(str(directory / LORA_DIR / ADAPTER_NAME))
    own = get_peft_model_state_dict(model.lm, save_embedding_layers=False)
    check_state_dict({k: v.shape for k, v in own.items()}, state, str(directory / LORA_DIR), "the LoRA adapter")
    set_peft_model_state_dict(model.lm, state)


def load_weights(model: DivotLLM, directory: str | os.PathLike, layout: str) -> None:
    directory = Path(directory)
    projector_files = [f"{name}/{WEIGHTS_NAME}" for name in PROJECTORS]
    if layout == "lora":
        files = [TRAINED_BASE_NAME, f"{LORA_DIR}/{ADAPTER_NAME}", *projector_files]
        _require(directory, files + ([BASE_WEIGHTS_NAME] if model.config.base_path is None else []))
        _load_base(model, directory)
        _load_lora(model, directory)
    else:
        _require(directory, projector_files)
    for name in PROJECTORS:
        load_state_dict_strict(getattr(model, name), load_file(str(directory / name / WEIGHTS_NAME)),
                               str(directory / name))
    logger.info("loaded Divot-LLM (%s layout) from %s", layout, directory)
