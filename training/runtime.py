"""Runtime shared by every training script: accelerator, checkpoints, seeding, logging.

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
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from divot import config as cfglib

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step_(\d+)$")


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


# --------------------------------------------------------------------------- checkpoints


def _atomic_write_text(path: Path, text: str) -> None:
    # write-then-rename: a reader sees the old file or the new one, never half of one
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:  # makes the renames durable; some filesystems refuse, the renames stay atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class CheckpointManager:
    """Crash-safe training checkpoints under ``output_dir/checkpoints/step_00000123/``.

    A checkpoint is ``accelerator.save_state`` (models, optimizers, schedulers, RNG states
    of every process, DeepSpeed shards) plus ``trainer_state.json`` (``extra``). It is
    written into ``step_X.tmp`` and renamed into place only when complete, then the
    ``latest`` pointer file is replaced atomically. A killed run leaves at worst a
    ``.tmp`` directory, which is never loaded. Multi-node runs need ``output_dir`` on a
    filesystem shared by all nodes (every rank writes its own DeepSpeed shard).
    """

    def __init__(self, output_dir: str | os.PathLike, keep_last: int | None = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{int(step):08d}"

    def save(self, accelerator: Accelerator, step: int, extra: dict | None = None) -> Path:
        """Save on all ranks (collective); returns the final checkpoint directory."""
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()  # no rank writes into a tmp dir being cleared
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every shard is on disk before the rename
        if accelerator.is_main_process:
            state = {"step": int(step), **(extra or {})}
            _atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2, default=str))
            self._publish(tmp, final)
            _atomic_write_text(self.root / LATEST_FILE, final.name + "\n")
            _fsync_dir(self.root)
            self._prune(keep=final)
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()  # nobody goes on (or reads `latest`) before it is published
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        old = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved twice (e.g. right after a resume)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            m = _STEP_RE.match(d.name)
            if m and d.is_dir() and (d / STATE_FILE).is_file():
                found.append((int(m.group(1)), d))
        return [d for _, d in sorted(found)]

    def _prune(self, keep: Path) -> None:
        if not self.keep_last or self.keep_last <= 0:
            return
        for d in self.checkpoints()[: -self.keep_last]:
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)

    def remove_stale(self) -> None:
        """Delete ``.tmp``/``.old`` leftovers of a killed run. Only while no save runs."""
        if not self.root.is_dir():
            return
        for d in self.root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.suffix in (".tmp", ".old"):
                logger.warning("removing incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)

    def latest(self, accelerator: Accelerator | None = None) -> Path | None:
        """Newest complete checkpoint or None; call while no save runs. Deletes stale
        ``.tmp`` dirs (with an accelerator: from its main process only)."""
        if accelerator is None or accelerator.is_main_process:
            self.remove_stale()
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if _STEP_RE.match(named.name) and (named / STATE_FILE).is_file():
                return named
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def load(self, accelerator: Accelerator, path: str | os.PathLike) -> dict:
        """Restore everything ``save`` wrote (collective); returns its ``extra`` dict."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        accelerator.load_state(str(path))
        relink_schedulers(accelerator)
        logger.info("resumed from %s", path)
        return json.loads(state_file.read_text())

    def load_latest(self, accelerator: Accelerator) -> dict | None:
        """``load(latest())`` or None when there is nothing to resume from."""
        path = self.latest(accelerator)
        accelerator.wait_for_everyone()  # stale-dir cleanup done before anyone reads
        return None if path is None else self.load(accelerator, path)

    def resume(self, accelerator: Accelerator, resume: bool) -> tuple[dict | None, int]:
        """(trainer state, step to go on from): the latest checkpoint with ``--resume``, else a fresh start."""
        state = self.load_latest(accelerator) if resume else None
        if resume and state is None:
            logger.warning("--resume given but %s holds no checkpoint; starting from scratch", self.root)
        return state, int(state["step"]) if state else 0


def stepping_optimizer(opt):
    """The innermost torch Optimizer under accelerate/DeepSpeed wrappers (the one that steps)."""
    found = opt if isinstance(opt, torch.optim.Optimizer) else None
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            found = opt
    return found


def relink_schedulers(accelerator: Accelerator) -> int:
    """Point prepared LR schedulers at the optimizer that really steps; returns how many moved.

    With ZeRO optimizer offload accelerate swaps the torch optimizer for DeepSpeed's CPU
    Adam, sharing its param-group dicts -- until ``load_state_dict`` installs new ones:
    then the scheduler writes LRs into the orphaned torch optimizer and training silently
    keeps the LR of the save step. Called by ``CheckpointManager.load``.
    """
    moved = 0
    for sched in getattr(accelerator, "_schedulers", []):  # accelerate keeps no public list
        inner = getattr(sched, "scheduler", None)
        opts = getattr(sched, "optimizers", None) or []
        if inner is None or len(opts) != 1:
            continue
        target = stepping_optimizer(opts[0])
        if target is not None and inner.optimizer is not target:
            inner.optimizer = target
            moved += 1
    return moved


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
        _atomic_write_text(out / "config.yaml", text)
        _atomic_write_text(out / "runtime.yaml", runtime)
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
