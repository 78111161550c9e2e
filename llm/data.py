"""Divot-LLM training data in one import: the sources (:mod:`llm.data_sources`), the clip
features (:mod:`llm.features`) and the batch collator (:mod:`llm.collate`)."""
from llm.collate import LLMCollator, pad_token_id
from llm.data_sources import (
    CAPTION_PROMPTS,
    CaptionJsonlSource,
    ConversationSource,
    MixtureSource,
    ShapesCaptionSource,
    ShapesGenerationSource,
    ShapesQASource,
    format_mc_answer,
    format_multiple_choice,
    iter_video_refs,
    make_sample,
)
from llm.features import ClipFeatures, FeatureCacheMiss, VideoRef, load_clip_features

__all__ = [
    "CAPTION_PROMPTS", "CaptionJsonlSource", "ClipFeatures", "ConversationSource", "FeatureCacheMiss",
    "LLMCollator", "MixtureSource", "ShapesCaptionSource", "ShapesGenerationSource", "ShapesQASource",
    "VideoRef", "format_mc_answer", "format_multiple_choice", "iter_video_refs", "load_clip_features",
    "make_sample", "pad_token_id",
]
