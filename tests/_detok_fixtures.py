"""A tiny random de-tokenizer for sampling tests (conditioning, long videos)."""
import torch

from divot import diffusion
from divot.detokenizer import DetokenizerConfig, DivotDetokenizer
from divot.unet import UNetConfig

F, SIZE = 8, 16


def tiny_detokenizer(parameterization: str = "v", seed: int = 0) -> DivotDetokenizer:
    """A tiny pixel-space de-tokenizer whose zero-initialised layers (output, temporal
    projections) are randomised too, so frames interact and outputs are not trivial."""
    torch.manual_seed(seed)
    unet = UNetConfig(in_channels=48, out_channels=48, block_out_channels=(16, 16), attention_levels=(False, True),
                      layers_per_block=1, head_channels=8, cross_attention_dim=16, norm_num_groups=4, ff_mult=1,
                      num_frames=F)
    cfg = DetokenizerConfig(token_dim=8, num_tokens=4, context_tokens=4, context_dim=16, resampler_depth=1,
                            resampler_heads=2, resampler_dim_head=8, num_frames=F, frame_size=SIZE, space="pixel",
                            pixel_patch=4, unet=unet, noise=diffusion.NoiseConfig(parameterization=parameterization))
    model = DivotDetokenizer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
