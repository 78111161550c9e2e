"""Divot-LLM model: attention structure, losses, checkpoints, LoRA merge, stages, inference."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MistralForCausalLM

from divot.modeling import CheckpointError
from llm import lora
from llm.gmm import gmm_mean
from llm import text_tokenizer as tt
from llm.llm_config import llm_config
from llm.model import DivotLLM

Q = tt.NUM_QUERY_TOKENS
D = 32  # tiny token_dim
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tt.load_text_tokenizer()


def tiny(tok, seed=0, **overrides):
    torch.manual_seed(seed)
    return DivotLLM(llm_config("tiny", **overrides), text_tokenizer=tok)


def make_batch(tok, seed=0):
    """Caption sample with 2 clips + generation sample (shorter, right-padded)."""
    cap = tt.encode_comprehension(tok, "Describe the video.", "a red circle moves to the left", num_clips=2)
    gen = tt.encode_generation(tok, "a blue square slides up")
    batch = tt.pad_batch([cap, gen], pad_id=tok.eos_token_id)
    g = torch.Generator().manual_seed(seed)
    batch["clip_tokens"] = torch.randn(2, Q, D, generator=g)
    batch["target_tokens"] = torch.randn(1, Q, D, generator=g)
    batch["task"] = ["caption", "generate"]
    return batch


def train_steps(model, batch, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(**batch, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append((out.loss.item(), out.ce_loss.item(), out.gmm_loss.item()))
    model.eval()
    return losses


def lora_b(model):
    return [p for n, p in model.lm.named_parameters() if "lora_B" in n]


# ---------------------------------------------------------------- attention through the real model
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_query_block_bidirectional_rest_causal(tok, impl):
    model = tiny(tok, attn_implementation=impl).eval()
    assert model.base_model.config._attn_implementation == impl
    batch = make_batch(tok)
    for p in lora_b(model):  # a non-trivial LoRA, so the adapters are part of what is checked
        torch.nn.init.normal_(p, std=0.02)

    @torch.no_grad()
    def hidden(b):
        return model(**b).hidden_states

    def changed(b):
        return (hidden(b) - base).abs().amax(-1) > 1e-5  # (b, L)

    base = hidden(batch)
    qpos = batch["query_mask"][1].nonzero().squeeze(1)
    # (a) The last query token's input (its embedding row) reaches every earlier query ...
    moved = {**batch, "input_ids": batch["input_ids"].clone()}
    moved["input_ids"][1, qpos[-1]] = 1234  # a text row: all 70 new rows start equal (the mean)
    diff = changed(moved)
    assert diff[1, qpos].all()
    assert not diff[1, :qpos[0]].any() and not diff[0].any()  # ... but nothing before the block
    # (b) The second clip's tokens: clips are causal, the first clip never sees them.
    cpos = batch["clip_mask"][0].nonzero().squeeze(1)
    clip2 = {**batch, "clip_tokens": batch["clip_tokens"].clone()}
    clip2["clip_tokens"][1] += 1.0
    diff = changed(clip2)
    assert not diff[0, :cpos[Q]].any() and diff[0, cpos[Q]:batch["attention_mask"][0].sum()].all()
    # (c) A later text token never changes an earlier position (caption question, </vid> after queries).
    for row, pos in ((0, int(cpos[-1]) + 4), (1, int(qpos[-1]) + 2)):
        text = {**batch, "input_ids": batch["input_ids"].clone()}
        text["input_ids"][row, pos] = 1234
        diff = changed(text)
        assert not diff[row, :pos].any() and diff[row, pos]
    # (d) Padding is invisible to the real tokens.
    real = batch["attention_mask"][1].bool()
    padded = {**batch, "input_ids": batch["input_ids"].clone()}
    padded["input_ids"][1, ~real] = 999
    assert not changed(padded)[1, real].any()


# ---------------------------------------------------------------- losses and training
def test_losses_match_references_and_training_lowers_them(tok):
    model = tiny(tok).eval()
    batch = make_batch(tok)
    with torch.no_grad():
        out = model(**batch)
        fast = model(**batch, return_logits=False)
        # CE: the same number as transformers' own shifted loss on the same logits.
        lm = model.base_model
        ref_ce = lm.loss_function(out.logits, batch["labels"], vocab_size=lm.config.vocab_size)
        # GMM: NLL/d of the output projector read at the query positions.
        h = out.hidden_states[batch["query_mask"]].reshape(1, Q, -1)
        ref_gmm = model.gmm.nll(model.output_projector(h), batch["target_tokens"])
    assert torch.isfinite(out.ce_loss) and torch.isfinite(out.gmm_loss)
    assert out.ce_loss.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert fast.ce_loss.item() == pytest.approx(out.ce_loss.item(), rel=1e-5) and fast.logits is None
    assert out.gmm_loss.item() == pytest.approx(ref_gmm.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + out.gmm_loss.item(), rel=1e-6)
    assert out.gmm_raw.shape == (1, Q, 2 * 16 * D + 16) and out.logits.shape == (2, batch["input_ids"].shape[1], 32070)
    # Comprehension only: no query blocks → gmm 0 with the projector still in the graph.
    only = {k: (v[:1] if k not in ("clip_tokens", "target_tokens", "task") else v) for k, v in batch.items()}
    only["target_tokens"] = torch.zeros(0, Q, D)
    empty = model(**only)
    assert empty.gmm_loss.item() == 0.0 and empty.gmm_raw.shape[0] == 0
    empty.loss.backward()
    assert model.output_projector.proj[0].weight.grad is not None
    model.zero_grad()
    losses = train_steps(model, batch, steps=8, lr=3e-3)
    first, last = losses[0], losses[-1]
    assert last[0] < 0.8 * first[0] and last[1] < first[1] and last[2] < first[2], losses


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    batch = make_batch(tok)
    grads = []
    for checkpointing in (False, True):
        model = tiny(tok, gradient_checkpointing=checkpointing, lora_dropout=0.0)
        for p in lora_b(model):
            torch.nn.init.normal_(p, std=0.02)
        calls, mlp = [], model.base_model.model.layers[0].mlp
        forward = mlp.forward
        # Counted through forward itself: torch does not fire module hooks while recomputing.
        mlp.forward = lambda x: (calls.append(1), forward(x))[1]
        model(**batch).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed during backward
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_bad_inputs_raise_clear_errors(tok):
    model = tiny(tok).eval()
    batch = make_batch(tok)
    with pytest.raises(ValueError, match="clip_mask marks 128 .* 1 clips"):
        model(**{**batch, "clip_tokens": batch["clip_tokens"][:1]})
    with pytest.raises(ValueError, match="no clip_tokens"):
        model(**{**batch, "clip_tokens": None})
    with pytest.raises(ValueError, match="target_tokens must be"):
        model(**{**batch, "target_tokens": torch.zeros(2, Q, D)})
    with pytest.raises(ValueError, match="clip_tokens must be"):
        model(**{**batch, "clip_tokens": torch.zeros(2, Q, D + 1)})


# ---------------------------------------------------------------- vocabulary, stages
def test_new_embedding_rows_start_at_the_mean(tok):
    model = tiny(tok)
    for emb in (model.base_model.get_input_embeddings(), model.base_model.get_output_embeddings()):
        w = emb.weight.detach()
        assert w.shape == (32070, 128)
        mean = w[:32000].mean(0)
        assert torch.allclose(w[32000:], mean.expand(70, -1), atol=1e-7)
        assert not torch.allclose(w[:32000], mean.expand(32000, -1))  # old rows untouched (random)
    # A base that already has the rows is not resized.
    base = model.base_model
    assert lora.grow_vocab(base, 32070) == 0


def test_set_stage_freezes_what_it_should(tok):
    model = tiny(tok)
    named = dict(model.named_parameters())
    always = [n for n in named if "lora_" in n or "norm" in n or "embed_tokens" in n or "lm_head" in n]
    frozen = [n for n in named if "base_layer" in n]
    assert len(frozen) == 2 * 7 and len([n for n in always if "lora_" in n]) == 2 * 7 * 2
    for stage, inp, out in (("pretrain", True, True), ("sft-comp", True, False), ("sft-gen", False, True)):
        count = model.set_stage(stage)
        assert all(named[n].requires_grad for n in always), stage
        assert not any(named[n].requires_grad for n in frozen), stage
        assert all(p.requires_grad == inp for p in model.input_projector.parameters()), stage
        assert all(p.requires_grad == out for p in model.output_projector.parameters()), stage
        assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_stage("finetune")


# ---------------------------------------------------------------- checkpoints and merge
def test_save_load_round_trip_after_training(tok, tmp_path):
    model = tiny(tok)
    batch = make_batch(tok)
    train_steps(model, batch, steps=1, lr=1e-2)
    assert all(p.abs().max() > 0 for p in lora_b(model))
    with torch.no_grad():
        ref = model(**batch)
    model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert names == {"config.json", "tokenizer", "lora", "input_projector", "output_projector",
                     "trained_base.safetensors", "base_model.safetensors"}
    back = DivotLLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        got = back(**batch)
    assert back.config == model.config
    for key in ("logits", "hidden_states", "gmm_raw", "loss"):
        assert torch.equal(got[key], ref[key]), key
    # Incompatible: another LoRA rank names the mismatching adapter tensors.
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_r": 8}))
    with pytest.raises(CheckpointError, match=r"LoRA adapter(.|\n)*shape mismatch"):
        DivotLLM.from_pretrained(tmp_path / "ckpt")
    cfg_path.write_text(json.dumps(cfg))
    # Missing file: named in the error.
    (tmp_path / "ckpt" / "trained_base.safetensors").unlink()
    with pytest.raises(CheckpointError, match="trained_base.safetensors"):
        DivotLLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no config.json"):
        DivotLLM.from_pretrained(tmp_path / "nowhere")


def _merge_script():
    spec = importlib.util.spec_from_file_location("merge_lora_script", ROOT / "scripts" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_matches_lora_model_and_restarts_with_fresh_lora(tok, tmp_path, capsys):
    model = tiny(tok)
    batch = make_batch(tok)
    train_steps(model, batch, steps=1, lr=1e-2)
    model.save_pretrained(tmp_path / "ckpt")
    ids = batch["input_ids"][1:, :20]
    with torch.no_grad():
        ref = model(**batch)
        ref_text = model(input_ids=ids).logits
    # The script merges the saved checkpoint; the in-memory model merges itself.
    assert _merge_script().main([str(tmp_path / "ckpt"), str(tmp_path / "merged")]) == 0
    assert "llm/model.safetensors" in capsys.readouterr().out
    model.merge_lora()
    assert all(torch.all(p == 0) for p in lora_b(model))
    hf = MistralForCausalLM.from_pretrained(tmp_path / "merged" / "llm", local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "merged" / "llm", local_files_only=True)
    assert len(hf_tok) == 32070 and hf_tok.convert_tokens_to_ids("<frame_00063>") == 32069
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ref_text, atol=1e-4)
        merged_in_memory = model(**batch)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["base_path"] == "llm"
    fresh = DivotLLM.from_pretrained(tmp_path / "merged").eval()
    assert fresh.config.base_path == str(tmp_path / "merged" / "llm")
    assert all(torch.all(p == 0) for p in lora_b(fresh)) and len(lora_b(fresh)) == 2 * 7
    with torch.no_grad():
        got = fresh(**batch)
    for out in (got, merged_in_memory):
        assert torch.allclose(out.logits, ref.logits, atol=1e-4)
        assert torch.allclose(out.gmm_raw, ref.gmm_raw, atol=1e-4)
    # An SFT stage on the merged base: its checkpoint points at merged/llm, stores no base
    # weights, and restores exactly.
    fresh.set_stage("sft-comp")
    train_steps(fresh, batch, steps=1, lr=1e-2)
    fresh.save_pretrained(tmp_path / "sft")
    assert not (tmp_path / "sft" / "base_model.safetensors").exists()
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["base_path"] == str(tmp_path / "merged" / "llm")
    with torch.no_grad():
        sft_ref = fresh(**batch)
        sft_back = DivotLLM.from_pretrained(tmp_path / "sft").eval()(**batch)
    assert torch.equal(sft_back.logits, sft_ref.logits) and torch.equal(sft_back.gmm_raw, sft_ref.gmm_raw)


# ---------------------------------------------------------------- inference
def test_generate_video_tokens_seeded(tok):
    model = tiny(tok)
    prompt = tt.encode_generation(tok, "a red circle moves to the left", with_video=False).input_ids
    with_vid = torch.cat([prompt, torch.tensor([model.special_ids["<vid>"]])])

    def sample(ids, seed, **kw):
        return model.generate_video_tokens(ids, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(prompt, 0), sample(prompt, 0), sample(prompt, 1)
    assert a.shape == (Q, D) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample(with_vid, 0), a)  # <vid> appended when the prompt lacks it
    mean = model.generate_video_tokens(prompt, use_mean=True)
    assert torch.equal(mean, model.generate_video_tokens(prompt, use_mean=True))
    # Same seed, same components: the noise around the chosen means scales with sqrt(variance_scale).
    mu = sample(prompt, 0, variance_scale=0.0)
    full, quarter = sample(prompt, 0, variance_scale=1.0) - mu, sample(prompt, 0, variance_scale=0.25) - mu
    assert full.abs().max() > 1e-3 and torch.allclose(quarter, 0.5 * full, atol=1e-5)
    assert torch.allclose(sample(prompt, 0) - mu, 0.1 ** 0.5 * full, atol=1e-5)  # config default 0.1
    assert model.training  # inference restores the mode it found


def _ar_model(tok):
    """Autoregressive query blocks with a non-zero feedback map (it starts at zero)."""
    model = tiny(tok, autoregressive_queries=True).eval()
    torch.nn.init.normal_(model.output_projector.feedback.weight, std=0.5)
    return model


def test_autoregressive_queries_causal_and_teacher_forced(tok):
    model = _ar_model(tok)
    batch = make_batch(tok)
    qpos = batch["query_mask"][1].nonzero().squeeze(1)
    with torch.no_grad():
        base = model(**batch)
        moved = {**batch, "target_tokens": batch["target_tokens"].clone(),
                 "input_ids": batch["input_ids"].clone()}
        moved["target_tokens"][0, 10] += 1.0   # read by query position 11 onwards
        moved["input_ids"][1, qpos[20]] = 1234  # a later query row: causal now, unseen by 0..19
        diff = (model(**moved).gmm_raw - base.gmm_raw).abs().amax(-1)[0]  # (n,)
    assert not diff[:11].any() and diff[11:].all()
    with pytest.raises(ValueError, match="needs their target_tokens"):
        model(**{**batch, "target_tokens": None})


def test_autoregressive_generation_matches_teacher_forcing(tok):
    """Drawing token by token with the KV cache = one teacher-forced forward on the drawn tokens."""
    model = _ar_model(tok)
    enc = tt.encode_generation(tok, "a red circle moves to the left")
    prompt = enc.input_ids[:int(enc.query_mask.nonzero()[0]) - 1]  # up to and including <vid>
    mean = model.generate_video_tokens(prompt, use_mean=True)
    drawn = model.generate_video_tokens(prompt, generator=torch.Generator().manual_seed(0))
    assert mean.shape == drawn.shape == (Q, D) and not torch.allclose(mean, drawn)
    batch = {"input_ids": enc.input_ids[None], "query_mask": enc.query_mask[None], "target_tokens": mean[None]}
    with torch.no_grad():
        raw = model(**batch).gmm_raw[0]
    assert torch.allclose(gmm_mean(model.gmm.split(raw.float())), mean, atol=1e-4)


def test_generate_text_greedy_cache_stop_and_limits(tok):
    model = tiny(tok).eval()
    enc = tt.encode_comprehension(tok, "Describe the video.", num_clips=1)
    clips = torch.randn(1, Q, D, generator=torch.Generator().manual_seed(3))
    kw = {"clip_mask": enc.clip_mask, "clip_tokens": clips, "stop_ids": ()}
    streamed = []
    new = model.generate_text(enc.input_ids, max_new_tokens=6, on_token=streamed.append, **kw)
    assert len(new) == 6 and streamed == new
    assert model.generate_text(enc.input_ids.tolist(), max_new_tokens=6, **kw) == new
    # The KV-cache loop equals greedy decoding by full forwards.
    ids, mask = enc.input_ids.clone(), enc.clip_mask.clone()
    for _ in range(6):
        with torch.no_grad():
            logits = model(input_ids=ids[None], clip_mask=mask[None], clip_tokens=clips).logits
        ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
        mask = torch.cat([mask, torch.zeros(1, dtype=torch.bool)])
    assert ids[len(enc.input_ids):].tolist() == new
    # A stop id ends generation and is included; sampling is seeded.
    assert model.generate_text(enc.input_ids, max_new_tokens=6, clip_mask=enc.clip_mask, clip_tokens=clips,
                               stop_ids=(new[1],)) == new[:2]
    draw = [model.generate_text(enc.input_ids, max_new_tokens=4, do_sample=True, top_p=0.9,
                                generator=torch.Generator().manual_seed(7), **kw) for _ in range(2)]
    assert draw[0] == draw[1] and len(draw[0]) == 4
    with pytest.raises(ValueError, match="prompt too long"):
        model.generate_text(enc.input_ids, max_new_tokens=2048, **kw)
    with pytest.raises(ValueError, match="no clip_tokens"):
        model.generate_text(enc.input_ids, clip_mask=enc.clip_mask)


# ---------------------------------------------------------------- paper sizes
def test_paper_preset_parameter_count_on_meta(tok):
    cfg = llm_config("paper")
    with torch.device("meta"):
        base = lora.build_base(cfg, tt.MISTRAL_V1_VOCAB_SIZE)
        model = DivotLLM(cfg, text_tokenizer=tok)
    assert sum(p.numel() for p in base.parameters()) == 7_241_732_096  # Mistral-7B-v0.1
    assert model.device.type == "meta"
    h, v = 4096, 32070
    base_after = 7_241_732_096 + 2 * 70 * h
    lora_count = 32 * 32 * (2 * (h + h) + 2 * (h + 1024) + 3 * (h + 14336))
    inp = 256 * h + h + h * h + h
    out = h * 8208 + 8208 + 8208 * 8208 + 8208
    assert model.num_parameters() == base_after + lora_count + inp + out
    assert model.base_model.get_input_embeddings().weight.shape == (v, h)
    assert model.output_projector.proj[2].weight.shape == (8208, 8208)
