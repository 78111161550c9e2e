"""Runtime shared by every training script: accelerator, seeding, logging, export
(checkpoints: :mod:`training.checkpoints`).

Typical use (the same code runs single-process, under DDP and under DeepSpeed ZeRO-2/3)::

    accelerator = make_accelerator(log_dir=out / "tb", micro_batch_size=cfg.batch_size,
                                   grad_clip=cfg.grad_clip)
    setup_logging(accelerator)
    seed_everything(cfg.seed)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(out, keep_last=2)
    state = ckpt.load_latest(accelerator) or {"step": 0}
    ...
    ckpt.save(accelerator, step, {"data_position": pos, "config": cfg_dict})

Rules for the scripts (they follow from how DeepSpeed and accelerate work):

- ``lr_scheduler.step()`` once per *optimizer* step: the accelerator is built with
  ``step_scheduler_with_optimizer=False``, so schedules count optimizer steps whatever
  the world size (accelerate's default steps them ``num_processes`` times per call).
- ``accelerator.clip_grad_norm_(params, grad_clip)`` clips without DeepSpeed; under
  DeepSpeed the engine clips (``gradient_clipping``, filled from ``grad_clip``) and the
  call only returns the global norm.
- DeepSpeed drives one engine per Accelerator: put everything trained into one module.
- Under DeepSpeed bf16 cast float inputs to :func:`model_input_dtype` (no autocast).
- Every rank calls ``CheckpointManager.save``/``load`` and ``unwrap_for_save``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.util
import logging
import os
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from divot import config as cfglib
from training.checkpoints import atomic_write_text

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- accelerator


def _launched_distributed() -> bool:
    # torchrun / accelerate launch export these; a plain `python script.py` does not.
    return int(os.environ.get("LOCAL_RANK", "-1")) != -1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    log_dir: str | os.PathLike | None = None,
    cpu: bool | None = None,
    micro_batch_size: int | None = None,
    grad_clip: float | None = None,
    timeout_s: int = 1800,
) -> Accelerator:
    """Build the Accelerator every training script uses.

    mixed_precision: None takes the launcher's value (``accelerate launch`` config,
        ``--mixed_precision``), "no" otherwise; an explicit value overrides the launcher.
    gradient_accumulation_steps: used unless the launcher or a DeepSpeed config sets an
        integer (DeepSpeed's wins); read the effective value back from
        ``accelerator.gradient_accumulation_steps``.
    log_dir: enables tensorboard tracking into this directory (call
        ``accelerator.init_trackers(name, config=flat_dict)`` afterwards).
    cpu: True forces CPU; None leaves it to the launcher. Note that accelerate turns
        DeepSpeed *off* when ``cpu``/``use_cpu`` is set, so DeepSpeed-on-CPU runs leave it
        unset and rely on the gloo backend chosen here.
    micro_batch_size / grad_clip: fill DeepSpeed ``"auto"`` entries (see
        :func:`resolve_deepspeed_auto`); ignored without DeepSpeed.
    """
    handler = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if _launched_distributed() and (cpu or not torch.cuda.is_available()):
        # Without this, accelerate leaves the backend unset on a CUDA-less machine and
        # concludes world size 1 while DeepSpeed initialised gloo with world size N.
        handler["backend"] = "gloo"
    kwargs = dict(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[InitProcessGroupKwargs(**handler)],
        step_scheduler_with_optimizer=False,
    )
    if cpu is not None:
        kwargs["cpu"] = cpu
    if log_dir is not None:
        if importlib.util.find_spec("tensorboard") is not None:
            kwargs.update(log_with="tensorboard", project_dir=str(log_dir))
        else:
            logger.warning("tensorboard is not installed: metrics will not be logged")
    accelerator = Accelerator(**kwargs)
    _use_all_cores(accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        resolve_deepspeed_auto(accelerator, micro_batch_size, grad_clip)
    return accelerator


def _use_all_cores(accelerator: Accelerator) -> None:
    """One CPU process gets every core it may run on.

    ``accelerate launch`` exports OMP_NUM_THREADS=1 unless told otherwise, which suits
    several processes sharing a machine but halves a lone CPU process's speed on 2 cores.
    DIVOT_NUM_THREADS overrides the choice.
    """
    if accelerator.num_processes != 1 or accelerator.device.type != "cpu":
        return
    wanted = int(os.environ.get("DIVOT_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
        logger.info("using %d CPU threads", wanted)


def resolve_deepspeed_auto(
    accelerator: Accelerator, micro_batch_size: int | None = None, grad_clip: float | None = None
) -> dict:
    """Fill the DeepSpeed config's "auto" entries that accelerate cannot fill itself.

    accelerate derives ``train_micro_batch_size_per_gpu`` only from a DataLoader passed to
    the same ``prepare`` call as the model (it raises otherwise), and replaces an "auto"
    ``gradient_clipping`` with a hard-coded 1.0. Setting them here, before ``prepare``,
    makes the training script's config the single source of truth. ``train_batch_size``
    stays "auto": ``prepare`` computes micro x accumulation x world size. An "auto"
    accumulation takes ``accelerator.gradient_accumulation_steps``; an integer in the
    DeepSpeed config overrides it. Returns the (mutated) DeepSpeed config dict.
    """
    plugin = accelerator.state.deepspeed_plugin
    cfg = plugin.deepspeed_config
    ds_gas = cfg.get("gradient_accumulation_steps", "auto")
    if ds_gas == "auto":
        cfg["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
    elif int(ds_gas) != accelerator.gradient_accumulation_steps:
        logger.info("gradient accumulation: using the DeepSpeed config's %s (requested %s)",
                    ds_gas, accelerator.gradient_accumulation_steps)
        accelerator.gradient_accumulation_steps = int(ds_gas)
    if micro_batch_size is not None:
        ds_mbs = cfg.get("train_micro_batch_size_per_gpu", "auto")
        if ds_mbs == "auto":
            cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
        elif int(ds_mbs) != int(micro_batch_size):
            logger.warning("DeepSpeed train_micro_batch_size_per_gpu=%s but the data loader yields %s",
                           ds_mbs, micro_batch_size)
    if grad_clip is not None and cfg.get("gradient_clipping", "auto") == "auto":
        cfg["gradient_clipping"] = float(grad_clip)
        plugin.gradient_clipping = float(grad_clip)
    return cfg


def model_input_dtype(accelerator: Accelerator) -> torch.dtype:
    """dtype for floating-point inputs fed to a prepared model.

    DeepSpeed bf16/fp16 converts the module's weights themselves and does not autocast,
    so fp32 inputs fail ("mat1 and mat2 must have the same dtype"); cast them to this.
    accelerate's own mixed precision autocasts instead, and inputs stay fp32.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        cfg = plugin.deepspeed_config
        if cfg.get("bf16", {}).get("enabled") is True:
            return torch.bfloat16
        if cfg.get("fp16", {}).get("enabled") is True:
            return torch.float16
    return torch.float32


def runtime_summary(accelerator: Accelerator) -> dict:
    """What the launcher actually gave us, for the logs and ``runtime.yaml``."""
    summary = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "torch": str(torch.__version__),
    }
    if accelerator.state.deepspeed_plugin is not None:
        summary["deepspeed_config"] = _plain(accelerator.state.deepspeed_plugin.deepspeed_config)
    return summary


# --------------------------------------------------------------------------- misc


def seed_everything(seed: int, device_specific: bool = False) -> None:
    """Seed Python, numpy and torch (all devices). ``device_specific`` adds the rank."""
    set_seed(int(seed), device_specific=device_specific)


def setup_logging(accelerator: Accelerator, level: int = logging.INFO) -> None:
    """INFO on the main process, WARNING elsewhere, with time and rank in every line."""
    main = accelerator.is_main_process
    logging.basicConfig(
        level=level if main else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank{accelerator.process_index}] %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
    if not main:
        # DeepSpeed's logger has its own handler and does not propagate
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _plain(obj):
    """Turn a config into YAML/JSON-safe builtins (paths, tuples, enums, dataclasses)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # subclasses (TorchVersion, IntFlag) -> the builtin
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy / torch scalars
    return str(obj)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` with non-scalar leaves as strings (tracker hparams)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_dict(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def log_resolved_config(accelerator: Accelerator, cfg_dict, output_dir: str | os.PathLike) -> Path:
    """Write ``output_dir/config.yaml`` (+ ``runtime.yaml``) from the main process and log it."""
    out = Path(output_dir)
    text = yaml.safe_dump(_plain(cfg_dict), sort_keys=False)
    runtime = yaml.safe_dump(_plain(runtime_summary(accelerator)), sort_keys=False)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", text)
        atomic_write_text(out / "runtime.yaml", runtime)
    logger.info("resolved config:\n%s", text)
    logger.info("runtime:\n%s", runtime)
    return out / "config.yaml"


def unwrap_for_save(accelerator: Accelerator, model) -> tuple[torch.nn.Module, dict]:
    """The plain module and its *complete* state dict, for exporting weights (collective).

    Under ZeRO-3 every rank holds a shard of each parameter (the module's own
    ``state_dict()`` has empty tensors); ``accelerator.get_state_dict`` gathers the full
    weights on the main process, which needs ``stage3_gather_16bit_weights_on_model_save``
    (``zero3_save_16bit_model``) on, else accelerate raises. Other ranks get ``{}``: save
    from the main process, e.g. ``torch.save(sd, f)`` or ``save_pretrained(d, state_dict=sd)``.
    """
    module = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model, unwrap=True)
    return module, _match_module_names(module, state_dict or {})


def _match_module_names(module: torch.nn.Module, state_dict: dict) -> dict:
    """The gathered weights under exactly the names of ``module.state_dict()``.

    DeepSpeed's ZeRO-3 gather walks the parameters and buffers: it names a tensor registered
    twice only once (diffusers' ``Downsample2D`` holds its conv as ``conv`` and ``Conv2d_0``),
    and it ignores a module's own ``state_dict`` override (the de-tokenizer leaves its external
    VAE out). Either way the export would not load strictly.
    """
    if not state_dict:
        return state_dict
    names: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    for group in names.values():
        present = next((n for n in group if n in state_dict), None)
        if present is not None:
            for n in group:
                state_dict.setdefault(n, state_dict[present])
    return {k: state_dict[k] for k in module.state_dict() if k in state_dict}


def start_run(cfg, output_dir: str | os.PathLike) -> Accelerator:
    """The common start of every training script: the accelerator (from ``cfg``'s
    ``mixed_precision``, ``gradient_accumulation_steps``, ``batch_size``, ``grad_clip``),
    logging, seeding with ``cfg.seed``, and the resolved config saved and logged."""
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision, log_dir=Path(output_dir) / "tb",
                                   gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                   micro_batch_size=cfg.batch_size, grad_clip=cfg.grad_clip)
    setup_logging(accelerator)
    seed_everything(cfg.seed)
    log_resolved_config(accelerator, cfglib.to_dict(cfg), output_dir)
    return accelerator
