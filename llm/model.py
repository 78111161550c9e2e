"""Divot-LLM: a Mistral with LoRA that reads Divot tokens and writes them through a GMM head.

DESIGN.md §4. Comprehension: each clip's 64 placeholder embeddings are replaced by the input
projector's image of its Divot tokens. Generation: the 64 query tokens after ``<vid><frame>``
attend to each other bidirectionally (the rest stays causal, :mod:`llm.attention`); their
last hidden states (after the final RMSNorm) go through the output projector into the GMM
head. Loss = ``ce_weight`` · next-token CE + ``gmm_weight`` · GMM NLL / d.

``autoregressive_queries`` (not in the paper): the query block is causal like the text, and
query position i also reads token i − 1 of its block through the output projector's
``feedback`` map (teacher forcing in training, the drawn token in
:meth:`DivotLLM.generate_video_tokens`). Why: tokens tied to places (the ``tiny`` tokenizer's
grid) make a clip's tokens depend on each other through where the object is, which a prompt
leaves open; n independent draws scatter the object (docs/RESULTS.md, "tokens tied to places").
A generated video earlier in a chat stays in the history as its query block without the tokens
drawn for it, as with the parallel block. Measured on ``tiny``: no better (docs/RESULTS.md).

Which parameters train (:meth:`DivotLLM.set_stage`): LoRA, the fully trained base parameters
of :mod:`llm.lora` (RMSNorms, embeddings, LM head) and the projectors, except the output
projector in ``sft-comp`` and the input projector in ``sft-gen``. Each SFT stage starts from
the merged pretrain weights with a fresh LoRA (:meth:`DivotLLM.save_merged`, then
:meth:`DivotLLM.from_pretrained` on the merged directory).

Axes: b = batch, L = sequence, c = clips, g = query blocks, n = tokens per clip / block (64),
h = LLM hidden size, d = Divot token width, v = vocabulary.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from llm import checkpoint, lora
from llm.attention import query_block_mask
from llm.gmm import GMMHead, gmm_mean, gmm_sample
from llm.llm_config import LLMConfig, sync_with_base
from llm.projectors import InputProjector, InputProjectorConfig, OutputProjector, OutputProjectorConfig
from llm.sampling import next_token
from llm.text_tokenizer import (FRAME_START, IGNORE_INDEX, VID_START, load_text_tokenizer,
                                special_token_ids)

logger = logging.getLogger(__name__)

# stage → (input projector trains, output projector trains)
STAGES = {"pretrain": (True, True), "sft-comp": (True, False), "sft-gen": (False, True)}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass
class DivotLLMOutput:
    loss: torch.Tensor | None       # weighted sum of the terms present
    ce_loss: torch.Tensor | None    # None without labels
    gmm_loss: torch.Tensor | None   # None without target_tokens; 0 (graph kept) with zero blocks
    logits: torch.Tensor | None     # (b, L, v); None with return_logits=False
    hidden_states: torch.Tensor     # (b, L, h) last layer, after the final RMSNorm
    gmm_raw: torch.Tensor           # (g, n, 2kd + k) raw GMM parameters of each query block

    def __getitem__(self, key: str):
        return getattr(self, key)


def resolve_tokenizer_path(cfg: LLMConfig) -> str | None:
    """``tokenizer_path``, else ``base_path`` when it holds a tokenizer, else None (mistral-common)."""
    if cfg.tokenizer_path is not None:
        return cfg.tokenizer_path
    if cfg.base_path is not None and any((Path(cfg.base_path) / f).is_file() for f in _TOKENIZER_FILES):
        return cfg.base_path
    return None


class DivotLLM(nn.Module):
    """``lm`` (peft-wrapped ``MistralForCausalLM``), ``input_projector``, ``output_projector``,
    ``gmm`` (parameter-free head), ``text_tokenizer`` and its ``special_ids``."""
    config_class = LLMConfig

    def __init__(self, config: LLMConfig, text_tokenizer=None):
        super().__init__()
        tok = text_tokenizer if text_tokenizer is not None else load_text_tokenizer(
            resolve_tokenizer_path(config), config.num_query_tokens)
        self.text_tokenizer = tok
        self.special_ids = special_token_ids(tok, config.num_query_tokens)
        # Divot's specials are appended to the text vocabulary: a random base gets the rows
        # before them, then grows like a pretrained one would.
        ids = self.special_ids
        base_vocab = min(*ids["query"], *(v for k, v in ids.items() if k.startswith("<")))
        base = lora.build_base(config, base_vocab)
        if config.base_path is not None:
            config = sync_with_base(config, base.config)
        self.config = config
        lora.grow_vocab(base, len(tok))
        self.lm = lora.wrap_lora(base, config)
        dtype = lora.TORCH_DTYPES[config.dtype]
        self.input_projector = InputProjector(InputProjectorConfig(
            config.token_dim, config.hidden_size, config.token_mixing, config.num_query_tokens)).to(dtype)
        self.output_projector = OutputProjector(OutputProjectorConfig(
            config.hidden_size, config.token_dim, config.gmm_components, config.autoregressive_queries)).to(dtype)
        self.gmm = GMMHead(config.gmm_components, config.token_dim)
        self.stage = "pretrain"
        self.set_stage(self.stage)

    # ------------------------------------------------------------------ parts
    @property
    def base_model(self):
        """The (LoRA-injected) ``MistralForCausalLM``."""
        return self.lm.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, or ``</s>`` (Mistral has none); padding is masked anyway."""
        pad = self.text_tokenizer.pad_token_id
        return self.special_ids["eos"] if pad is None else pad

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def set_stage(self, stage: str) -> int:
        """Freeze/unfreeze for ``pretrain`` / ``sft-comp`` / ``sft-gen``; returns trainable count."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
        train_in, train_out = STAGES[stage]
        self.requires_grad_(False)
        for p in [*lora.lora_parameters(self.lm).values(), *lora.fully_trained_parameters(self.base_model).values()]:
            p.requires_grad_(True)
        self.input_projector.requires_grad_(train_in)
        self.output_projector.requires_grad_(train_out)
        self.stage = stage
        count = self.num_parameters(trainable_only=True)
        logger.info("stage %s: %d trainable of %d parameters", stage, count, self.num_parameters())
        return count

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, clip_mask: torch.Tensor | None = None,
              clip_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(b, L) ids → (b, L, h) embeddings, clip placeholders replaced clip-major by
        ``input_projector(clip_tokens)``; ``clip_tokens`` is (c, n, d) with c·n = clip_mask.sum()."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        marked = 0 if clip_mask is None else int(clip_mask.sum())
        if clip_tokens is None:
            if marked:
                raise ValueError(f"clip_mask marks {marked} placeholder positions but no clip_tokens were given")
            return embeds
        n, d = self.config.num_query_tokens, self.config.token_dim
        if clip_tokens.ndim != 3 or tuple(clip_tokens.shape[1:]) != (n, d):
            raise ValueError(f"clip_tokens must be (clips, {n}, {d}), got {tuple(clip_tokens.shape)}")
        if marked != clip_tokens.shape[0] * n:
            raise ValueError(f"clip_mask marks {marked} placeholder positions but clip_tokens holds "
                             f"{clip_tokens.shape[0]} clips × {n} = {clip_tokens.shape[0] * n}")
        if clip_mask is None:  # zero clips and no mask: nothing to place
            return embeds
        proj = self.input_projector(clip_tokens.to(self.device, self.input_projector.proj[0].weight.dtype))
        # masked_scatter fills masked positions in row-major order: exactly the clip-major order.
        return embeds.masked_scatter(rearrange(clip_mask.to(self.device).bool(), "b l -> b l 1"),
                                     rearrange(proj, "c n h -> (c n) h").to(embeds.dtype))

    def attention_mask_4d(self, query_mask: torch.Tensor, attention_mask: torch.Tensor | None,
                          dtype: torch.dtype) -> torch.Tensor:
        """(b, 1, L, L) additive mask: causal, padding hidden, query blocks bidirectional
        (causal too with ``autoregressive_queries``)."""
        if self.config.autoregressive_queries:
            query_mask = torch.zeros_like(query_mask, dtype=torch.bool)
        return query_block_mask(query_mask, attention_mask, dtype=dtype, sliding_window=self.config.sliding_window)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, clip_mask: torch.Tensor | None = None,
                clip_tokens: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
                target_tokens: torch.Tensor | None = None, return_logits: bool = True,
                **ignored) -> DivotLLMOutput:
        """One batch of the data contract (``model(**batch)``; keys like ``task`` are ignored).

        ``return_logits=False`` applies the LM head only where ``labels`` supervise a token
        (same ``ce_loss``, ``logits`` None): the full (b, L, 32070) logits dominate a small
        model's step and a 7B's activation memory.
        """
        embeds = self.embed(input_ids, clip_mask, clip_tokens)
        if query_mask is None:
            query_mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        if self.config.autoregressive_queries:
            embeds = self._add_feedback(embeds, query_mask, target_tokens)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        mask = self.attention_mask_4d(query_mask.bool(), attention_mask, embeds.dtype)
        # Positions count real tokens only, so left padding would also be read right.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.base_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        logits = self.base_model.lm_head(hidden) if return_logits else None
        ce = None if labels is None else self._ce_loss(hidden, logits, labels)
        raw = self._gmm_raw(hidden, query_mask)
        gmm = None if target_tokens is None else self._gmm_loss(raw, target_tokens)
        terms = [w * t for w, t in ((self.config.ce_weight, ce), (self.config.gmm_weight, gmm)) if t is not None]
        loss = sum(terms[1:], terms[0]) if terms else None
        return DivotLLMOutput(loss, ce, gmm, logits, hidden, raw)

    def _add_feedback(self, embeds: torch.Tensor, query_mask: torch.Tensor,
                      target_tokens: torch.Tensor | None) -> torch.Tensor:
        """Teacher forcing: each query position's embedding + the feedback of the target token
        before it in its block (row-major order of ``query_mask``, like ``target_tokens``)."""
        blocks = int(query_mask.sum()) // self.config.num_query_tokens
        if blocks == 0:
            return embeds
        if target_tokens is None:
            raise ValueError("autoregressive_queries: a forward over query blocks needs their target_tokens "
                             "(query position i reads token i - 1); use generate_video_tokens to sample")
        self._check_targets(blocks, target_tokens)
        fed = rearrange(self.output_projector.feed_back(target_tokens.to(self.device)), "g n h -> (g n) h")
        added = torch.zeros_like(embeds).masked_scatter(rearrange(query_mask.to(self.device).bool(), "b l -> b l 1"),
                                                        fed.to(embeds.dtype))
        return embeds + added

    def _check_targets(self, blocks: int, target_tokens: torch.Tensor) -> None:
        expected = (blocks, self.config.num_query_tokens, self.config.token_dim)
        if tuple(target_tokens.shape) != expected:
            raise ValueError(f"target_tokens must be {expected} (one per query block), "
                             f"got {tuple(target_tokens.shape)}")

    def _ce_loss(self, hidden: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE over supervised positions (labels shifted here, HF convention)."""
        shift_labels = labels[:, 1:].to(hidden.device)
        supervised = shift_labels != IGNORE_INDEX
        if logits is None:  # only the rows that carry a label
            picked = self.base_model.lm_head(hidden[:, :-1][supervised])
        else:
            picked = logits[:, :-1][supervised]
        total = F.cross_entropy(picked.float(), shift_labels[supervised], reduction="sum")
        # A batch without supervised text (all generation) gives 0, not NaN.
        return total / supervised.sum().clamp(min=1)

    def _gmm_raw(self, hidden: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        n = self.config.num_query_tokens
        count = int(query_mask.sum())
        if count % n:
            raise ValueError(f"query_mask marks {count} positions, not a multiple of {n} query tokens per block")
        picked = rearrange(hidden[query_mask.to(hidden.device).bool()], "(g n) h -> g n h", n=n)
        # Run even on zero blocks: the projector then joins the graph with zero gradients,
        # which distributed data parallel needs on batches without generation samples.
        return self.output_projector(picked.to(self.output_projector.proj[0].weight.dtype))

    def _gmm_loss(self, raw: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
        self._check_targets(raw.shape[0], target_tokens)
        if raw.shape[0] == 0:
            return raw.float().sum() * 0.0
        return self.gmm.nll(raw, target_tokens.to(raw.device))

    # ------------------------------------------------------------------ inference
    @contextmanager
    def inference(self):
        """No gradients and eval mode (LoRA dropout off) inside; the training mode is restored."""
        was_training = self.training
        self.eval()  # LoRA dropout off
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _prompt(self, input_ids, extra: int, what: str) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"{what} takes one non-empty prompt, (1, L) or a list of ids; got {tuple(ids.shape)}")
        limit = self.config.max_position_embeddings
        if ids.shape[1] + extra > limit:
            raise ValueError(f"prompt too long: {ids.shape[1]} tokens + {extra} new exceed "
                             f"max_position_embeddings {limit}")
        return ids

    @staticmethod
    def _row(mask: torch.Tensor | None, ids: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """A (1, L + pad) bool mask from an optional (L,) / (1, L) one, padded with False."""
        row = torch.zeros(1, ids.shape[1], dtype=torch.bool, device=ids.device) if mask is None \
            else torch.as_tensor(mask, device=ids.device).bool().reshape(1, -1)
        if row.shape[1] != ids.shape[1]:
            raise ValueError(f"mask length {row.shape[1]} != prompt length {ids.shape[1]}")
        return F.pad(row, (0, pad), value=False)

    def generate_text(self, input_ids, clip_mask=None, clip_tokens=None, max_new_tokens: int = 64,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None, stop_ids: Sequence[int] | None = None,
                      on_token: Callable[[int], None] | None = None, query_mask=None) -> list[int]:
        """New token ids after the prompt (KV cache), up to and including a stop id
        (default ``</s>`` and ``<vid>``). ``on_token`` streams each id; ``query_mask`` marks
        query blocks already in the prompt (a chat history with a generated video)."""
        ids = self._prompt(input_ids, max_new_tokens, "generate_text")
        stop = set((self.special_ids["eos"], self.special_ids[VID_START]) if stop_ids is None else stop_ids)
        new: list[int] = []
        with self.inference():
            embeds = self.embed(ids, self._row(clip_mask, ids), clip_tokens)
            mask = self.attention_mask_4d(self._row(query_mask, ids), None, embeds.dtype)
            out = self.base_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
            for step in range(max_new_tokens):
                logits = self.base_model.lm_head(out.last_hidden_state[0, -1])
                token = next_token(logits, do_sample, temperature, top_p, generator)
                new.append(token)
                if on_token is not None:
                    on_token(token)
                if token in stop or step == max_new_tokens - 1:
                    break
                # Plain causal step: transformers builds the mask (and any sliding window) itself.
                out = self.base_model.model(input_ids=torch.tensor([[token]], device=self.device),
                                            past_key_values=out.past_key_values, use_cache=True)
        return new

    def generate_video_tokens(self, input_ids, clip_mask=None, clip_tokens=None, variance_scale: float | None = None,
                              temperature: float = 1.0, use_mean: bool = False,
                              generator: torch.Generator | None = None, query_mask=None) -> torch.Tensor:
        """(n, d) Divot tokens for the video the prompt asks for.

        The prompt ends just after ``<vid>`` (as written by :meth:`generate_text`), or before
        it (e.g. after ``[/INST]\\n``; ``<vid>`` is then appended). ``<frame>`` + the query
        tokens follow; one forward with the query-block mask gives the GMM (n forwards with a
        KV cache, one per token, with ``autoregressive_queries``), which is sampled (seeded by
        ``generator``, variance × ``variance_scale``, default the config's) or read as its
        mixture mean (``use_mean``).
        """
        n = self.config.num_query_tokens
        vid = self.special_ids[VID_START]
        ids = self._prompt(input_ids, n + 2, "generate_video_tokens")
        block = ([] if int(ids[0, -1]) == vid else [vid]) + [self.special_ids[FRAME_START], *self.special_ids["query"]]
        full = torch.cat([ids, torch.tensor([block], device=self.device)], dim=1)
        query = self._row(query_mask, ids, len(block))
        query[0, -n:] = True
        scale = self.config.variance_scale if variance_scale is None else variance_scale

        def draw(hidden: torch.Tensor) -> torch.Tensor:  # (m, h) → (m, d)
            raw = self.output_projector(hidden).float()
            # gmm_sample draws on the generator's device.
            params = self.gmm.split(raw if generator is None else raw.to(generator.device))
            if use_mean:
                return gmm_mean(params, temperature)
            return gmm_sample(params, generator, variance_scale=scale, temperature=temperature)

        with self.inference():
            embeds = self.embed(full, self._row(clip_mask, ids, len(block)), clip_tokens)
            mask = self.attention_mask_4d(query, None, embeds.dtype)
            if self.config.autoregressive_queries:
                tokens = self._draw_autoregressive(embeds, mask, draw)
            else:
                hidden = self.base_model.model(inputs_embeds=embeds, attention_mask=mask,
                                               use_cache=False).last_hidden_state
                tokens = draw(hidden[0, -n:])
        return tokens.to(self.device)

    def _draw_autoregressive(self, embeds: torch.Tensor, mask: torch.Tensor,
                             draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Draw the query block's n tokens one by one; query i + 1 reads token i (KV cache)."""
        n = self.config.num_query_tokens
        first = embeds.shape[1] - n + 1  # through the first query position
        out = self.base_model.model(inputs_embeds=embeds[:, :first], attention_mask=mask[:, :, :first, :first],
                                    use_cache=True)
        tokens = []
        for i in range(n):
            tokens.append(draw(out.last_hidden_state[0, -1:]))
            if i == n - 1:
                break
            fed = self.output_projector.feedback(tokens[-1].to(self.device, self.output_projector.feedback.weight.dtype))
            step = embeds[:, first + i:first + i + 1] + fed[None].to(embeds.dtype)
            out = self.base_model.model(inputs_embeds=step, past_key_values=out.past_key_values, use_cache=True)
        return torch.cat(tokens)

    # ------------------------------------------------------------------ LoRA merge + checkpoints
    def merge_lora(self, on_merged: Callable[[nn.Module], None] | None = None) -> None:
        """Merge the LoRA into the base weights and start a fresh LoRA (B = 0): the model
        computes the same function, the next stage trains a new adapter. ``on_merged`` sees
        the plain merged ``MistralForCausalLM`` before the new adapter is injected. LoRA
        parameters are new objects afterwards: build the optimizer after merging."""
        base = lora.merge_lora(self.lm)
        try:
            if on_merged is not None:
                on_merged(base)
        finally:
            self.lm = lora.wrap_lora(base, self.config)
            self.lm.train(self.training)  # new adapter modules are created in training mode
            self.set_stage(self.stage)

    def save_merged(self, directory: str | os.PathLike) -> None:
        """Merge the LoRA (see :meth:`merge_lora`) and write a merged checkpoint: ``llm/`` (a
        Hugging Face model + tokenizer directory), the projectors and ``config.json`` with
        ``base_path`` = ``llm``. ``from_pretrained`` on it starts with a fresh LoRA."""
        self.merge_lora(on_merged=lambda base: checkpoint.write_merged(self, base, directory))

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Training checkpoint (layout in :mod:`llm.checkpoint`); ``state_dict`` overrides the
        module's own (e.g. full weights gathered under ZeRO-3)."""
        checkpoint.save_checkpoint(self, directory, state_dict)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "DivotLLM":
        """Restore a training checkpoint exactly, or start from a merged one with a fresh LoRA."""
        cfg, layout = checkpoint.read_config(directory)
        model = cls(cfg, text_tokenizer=checkpoint.load_checkpoint_tokenizer(directory, cfg, layout))
        checkpoint.load_weights(model, directory, layout)
        return model

