"""Converters from the official Divot release's state dicts to this project's modules.

Pure functions: a state dict in, (state dict, report) out; loading is the caller's job.
The release's tokenizer (``Divot_tokenizer.bin``) already uses our submodule names
(``temporal_encoder.*``, ``norm``, ``image_proj_model.*``), so its rename table is the
identity; its OpenCLIP ViT lives under ``vit_model.model.visual.*`` (usually not
stored in the tokenizer file) and maps to ``vit.model.*`` through timm's own
OpenCLIP → timm filter. Shapes are checked against the target module.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

RELEASE_VIT_PREFIX = "vit_model.model."
# Release prefix → ours. Identity for the tokenizer body; listed so the mapping is explicit.
TOKENIZER_RENAMES = {"temporal_encoder.": "temporal_encoder.", "norm.": "norm.",
                     "image_proj_model.": "image_proj_model."}


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the target module, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not used
    shape_mismatch: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        parts = [f"{len(self.converted)} converted"]
        for name in ("missing", "unexpected", "shape_mismatch"):
            items = getattr(self, name)
            if items:
                parts.append(f"{len(items)} {name.replace('_', ' ')} (e.g. {', '.join(items[:3])})")
        return "; ".join(parts)


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def convert_release_tokenizer(release: dict[str, torch.Tensor], target: nn.Module,
                              ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Release tokenizer state dict → ``DivotTokenizer`` state dict.

    ViT keys in the file are converted too (OpenCLIP layout → timm); when the file has none,
    the ViT's keys are reported missing and are expected from ``vit.checkpoint`` instead.
    """
    own = target.state_dict()
    out, report = {}, ConversionReport()
    vit_keys = {k[len(RELEASE_VIT_PREFIX):]: v for k, v in release.items() if k.startswith(RELEASE_VIT_PREFIX)}
    for key, value in release.items():
        if key.startswith(RELEASE_VIT_PREFIX):
            continue
        new = _rename(key, TOKENIZER_RENAMES)
        if new is None or new not in own:
            report.unexpected.append(key)
        elif tuple(own[new].shape) != tuple(value.shape):
            report.shape_mismatch.append(f"{key}: {tuple(value.shape)} vs {tuple(own[new].shape)}")
        else:
            out[new] = value
            report.converted.append(key)
    if vit_keys:
        out.update(_convert_vit(vit_keys, target, report))
    report.missing = sorted(k for k in own if k not in out)
    logger.info("release tokenizer: %s", report.summary())
    return out, report


def _convert_vit(openclip: dict[str, torch.Tensor], target: nn.Module, report: ConversionReport):
    """OpenCLIP ``visual.*`` keys → ``vit.model.*`` via timm's checkpoint filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    vit = target.vit.model
    visual = {k: v for k, v in openclip.items() if k.startswith("visual.")}
    report.unexpected.extend(RELEASE_VIT_PREFIX + k for k in openclip if not k.startswith("visual."))
    converted = checkpoint_filter_fn(visual, vit)
    own = vit.state_dict()
    out = {}
    for k, v in converted.items():
        if k not in own:
            if not k.startswith("head"):  # the projection head is unused: features come before it
                report.unexpected.append(f"vit:{k}")
        elif tuple(own[k].shape) != tuple(v.shape):
            report.shape_mismatch.append(f"vit:{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            out["vit.model." + k] = v
            report.converted.append(f"vit:{k}")
    return out


def load_release_tokenizer(path: str, target: nn.Module, allow_missing_vit: bool = True) -> ConversionReport:
    """Load ``Divot_tokenizer.bin`` (or .safetensors) into ``target``; raises on anything but a
    ViT that the file does not hold (the release loads it from OpenCLIP separately)."""
    from divot.vit import load_state_dict_file
    state, report = convert_release_tokenizer(load_state_dict_file(path), target)
    missing = [k for k in report.missing if not (allow_missing_vit and k.startswith("vit."))]
    if missing or report.shape_mismatch:
        raise ValueError(f"{path} does not fit the tokenizer: {report.summary()}")
    target.load_state_dict(state, strict=False)
    return report
