"""LLM groundwork: text tokenizer + prompt formats, GMM head, projectors, query-block attention mask."""
import json
import math
from pathlib import Path

import pytest
import torch

from llm import attention, gmm, projectors
from llm import text_tokenizer as tt

RELEASE = json.loads((Path(__file__).parent / "data" / "divot_release_keys.json").read_text())
Q = tt.NUM_QUERY_TOKENS


# ---------------------------------------------------------------- text tokenizer
@pytest.fixture(scope="module")
def tok():
    return tt.load_text_tokenizer()


def test_tokenizer_has_mistral_vocab_plus_70_single_token_specials(tok):
    assert len(tok) == tt.MISTRAL_V1_VOCAB_SIZE + 70
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<s>", 1, "</s>", 2)
    specials = tt.special_tokens()
    assert specials[:6] == ["<vid>", "</vid>", "<frame>", "</frame>", "<img>", "</img>"]
    assert specials[6] == "<frame_00000>" and specials[-1] == "<frame_00063>"
    assert tok.convert_tokens_to_ids(specials) == list(range(32000, 32070))
    # Never split, also inside running text; plain text is untouched by them.
    text = "x<vid><frame><frame_00042></frame></vid>y"
    pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
    assert pieces[1:6] == ["<vid>", "<frame>", "<frame_00042>", "</frame>", "</vid>"]
    ids = tt.special_token_ids(tok)
    assert ids["<vid>"] == 32000 and ids["query"][0] == 32006 and len(ids["query"]) == 64
    # Mistral v0.1's known ids for "[INST]".
    assert tok.encode("[INST]", add_special_tokens=False) == [733, 16289, 28793]


def test_tokenizer_reload_keeps_ids_and_num_query_tokens_is_configurable(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = tt.load_text_tokenizer(tmp_path)
    assert len(again) == len(tok)
    assert again.convert_tokens_to_ids(tt.special_tokens()) == list(range(32000, 32070))
    small = tt.load_text_tokenizer(num_query_tokens=4)
    assert len(small) == 32000 + 10
    assert tt.query_block_ids(small, 4) == [32002, 32006, 32007, 32008, 32009, 32003]


def _supervised(enc):
    return enc.input_ids[enc.labels != tt.IGNORE_INDEX].tolist()


def test_comprehension_prompt_ids_labels_and_clip_mask(tok):
    enc = tt.encode_comprehension(tok, "What colour is the circle?", "red", num_clips=2)
    clip = "<frame>" + "".join(tt.query_tokens()) + "</frame>"
    prompt = f"[INST] <vid>{clip}{clip}</vid>What colour is the circle? [/INST]\n"
    expected = [1] + tok.encode(prompt, add_special_tokens=False) + tok.encode(prompt + "red", add_special_tokens=False)[-1:] + [2]
    assert enc.input_ids.tolist() == expected
    assert tok.decode(enc.input_ids).replace("<s> ", "<s>") == f"<s>{prompt}red</s>"
    assert tok.convert_ids_to_tokens(enc.input_ids[-3:].tolist()) == ["<0x0A>", "red", "</s>"]
    # Only the answer and </s> are supervised; labels equal the ids there.
    assert _supervised(enc) == expected[-2:]
    assert (enc.labels[:-2] == tt.IGNORE_INDEX).all()
    # Clip mask: the 2×64 placeholders, clip-major, each clip between <frame> and </frame>.
    ids = tt.special_token_ids(tok)
    pos = enc.clip_mask.nonzero().squeeze(1)
    assert len(pos) == 128 and enc.input_ids[pos].tolist() == list(ids["query"]) * 2
    assert enc.input_ids[pos[0] - 1] == ids["<frame>"] and enc.input_ids[pos[63] + 1] == ids["</frame>"]
    assert not enc.query_mask.any() and enc.num_clips == 2


def test_generation_prompt_query_block_and_labels(tok):
    enc = tt.encode_generation(tok, "a red circle moves to the left")
    ids = tt.special_token_ids(tok)
    prompt = "[INST] Generate a video of a red circle moves to the left [/INST]\n"
    head = [1] + tok.encode(prompt, add_special_tokens=False)
    block = [ids["<vid>"], ids["<frame>"], *ids["query"], ids["</frame>"], ids["</vid>"]]
    assert enc.input_ids.tolist() == head + block
    qpos = enc.query_mask.nonzero().squeeze(1)
    assert qpos.tolist() == list(range(len(head) + 2, len(head) + 2 + Q))
    assert _supervised(enc) == [ids["<vid>"], ids["<frame>"], ids["</vid>"]]
    assert not enc.clip_mask.any() and enc.num_query_blocks == 1
    # Inference prompt: stops after "[/INST]\n"; the model has to write <vid> itself.
    start = tt.encode_generation(tok, "a red circle moves to the left", with_video=False)
    assert start.input_ids.tolist() == head and not (start.labels != tt.IGNORE_INDEX).any()


def test_multi_turn_chat_supervises_only_replies(tok):
    turns = [tt.Turn("Describe it.", num_clips=1, reply="A blue square slides up."),
             tt.Turn("What colour is it?")]
    enc = tt.encode_chat(tok, turns)
    text = tok.decode(enc.input_ids).replace("<s> ", "<s>")
    # Each user message is encoded on its own, so a later "[INST]" starts with "▁[" as in
    # mistral-common's v1 chat encoding (decoded as " [").
    assert text.endswith("</vid>Describe it. [/INST]\nA blue square slides up.</s> [INST] What colour is it? [/INST]\n")
    second = tok.encode("[INST] What colour is it? [/INST]\n", add_special_tokens=False)
    assert enc.input_ids[-len(second):].tolist() == second
    assert tok.decode(_supervised(enc)) == "A blue square slides up.</s>"
    assert enc.clip_mask.sum() == Q
    with pytest.raises(ValueError, match="only the last turn"):
        tt.encode_chat(tok, [tt.Turn("a"), tt.Turn("b")])
    # Special tokens typed into the user's text cannot smuggle in placeholders.
    with pytest.raises(ValueError, match="placeholders"):
        tt.encode_comprehension(tok, "what is <frame_00003>?", "x", num_clips=1)


def test_pad_batch_right_and_left(tok):
    a = tt.encode_comprehension(tok, "Q?", "yes", num_clips=1)
    b = tt.encode_generation(tok, "a white triangle stays still")
    for side in ("right", "left"):
        batch = tt.pad_batch([a, b], pad_id=tok.eos_token_id, padding_side=side)
        length = max(len(a.input_ids), len(b.input_ids))
        assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, length) for k in batch}
        short = 0 if len(a.input_ids) < len(b.input_ids) else 1
        real = batch["attention_mask"][short].bool()
        assert real.sum() == min(len(a.input_ids), len(b.input_ids))
        assert (batch["labels"][short][~real] == tt.IGNORE_INDEX).all()
        assert batch["query_mask"][1].sum() == Q and batch["clip_mask"][0].sum() == Q


# ---------------------------------------------------------------- GMM head
def _inv_softplus(v):
    return math.log(math.expm1(v))


def test_gmm_layout_split_and_variance_clamp():
    k, d = 2, 3
    raw = torch.arange(gmm.gmm_out_dim(k, d), dtype=torch.float32)
    raw[k * d:2 * k * d] = -100.0
    p = gmm.split_gmm_params(raw, k)
    assert p.means.tolist() == [[0, 1, 2], [3, 4, 5]]  # component-major (k, d)
    assert torch.allclose(p.variances, torch.full((k, d), gmm.MIN_VARIANCE))
    assert p.logits.tolist() == [12, 13]
    assert gmm.GMMHead(16, 256).out_dim == 8208
    with pytest.raises(ValueError):
        gmm.split_gmm_params(torch.zeros(8207), 16)


def test_gmm_nll_matches_hand_computation_1d():
    # k=2, d=1: raw = [μ1, μ2, v1_raw, v2_raw, l1, l2]
    mu, var, logit, x = (-1.0, 2.0), (0.5, 1.5), (0.3, -0.4), 0.7
    raw = torch.tensor([*mu, *(_inv_softplus(v) for v in var), *logit], dtype=torch.float64)
    z = math.exp(logit[0]) + math.exp(logit[1])
    density = sum(math.exp(l) / z * math.exp(-(x - m) ** 2 / (2 * v)) / math.sqrt(2 * math.pi * v)
                  for m, v, l in zip(mu, var, logit))
    nll = gmm.gmm_nll(gmm.split_gmm_params(raw, 2), torch.tensor([x], dtype=torch.float64))
    assert nll.item() == pytest.approx(-math.log(density), rel=1e-6)


def test_gmm_nll_is_divided_by_d_and_averaged_over_tokens():
    # One component, d=3 independent dims: NLL/d = mean of the per-dim Gaussian NLLs.
    mu, var, x = [0.0, 1.0, -2.0], [1.0, 0.25, 4.0], [0.5, 0.0, 1.0]
    raw = torch.tensor([*mu, *(_inv_softplus(v) for v in var), 0.0], dtype=torch.float64)
    per_dim = [0.5 * math.log(2 * math.pi * v) + (a - m) ** 2 / (2 * v) for m, v, a in zip(mu, var, x)]
    head = gmm.GMMHead(num_components=1, token_dim=3)
    one = head.nll(raw, torch.tensor(x, dtype=torch.float64))
    assert one.item() == pytest.approx(sum(per_dim) / 3, rel=1e-9)
    # Mean over tokens: a second, perfectly-fitted token averages in; a mask removes it.
    raws = torch.stack([raw, raw])
    targets = torch.tensor([x, mu], dtype=torch.float64)
    other = head.nll(raw, targets[1]).item()
    assert head.nll(raws, targets).item() == pytest.approx((one.item() + other) / 2, rel=1e-9)
    assert head.nll(raws, targets, mask=torch.tensor([True, False])).item() == pytest.approx(one.item())


def _mixture_raw(n, weights=(0.3, 0.7), mu=(-2.0, 3.0), var=(0.5, 2.0)):
    raw = torch.tensor([*mu, *(_inv_softplus(v) for v in var), *(math.log(w) for w in weights)])
    return gmm.split_gmm_params(raw.expand(n, -1), 2)


def test_gmm_sampling_statistics_and_variance_scale():
    n, w, mu, var = 20000, (0.3, 0.7), (-2.0, 3.0), (0.5, 2.0)
    params = _mixture_raw(n)
    mean = sum(a * m for a, m in zip(w, mu))
    for scale in (1.0, 0.1):
        expected_var = sum(a * (scale * v + m * m) for a, v, m in zip(w, var, mu)) - mean ** 2
        s = gmm.gmm_sample(params, torch.Generator().manual_seed(0), variance_scale=scale).squeeze(-1)
        assert s.shape == (n,)
        assert s.mean().item() == pytest.approx(mean, abs=0.08)
        assert s.var().item() == pytest.approx(expected_var, abs=0.25)
    # Within one component the scale multiplies the variance exactly.
    single = gmm.split_gmm_params(torch.tensor([1.0, _inv_softplus(4.0), 0.0]).expand(n, -1), 1)
    for scale in (1.0, 0.1):
        s = gmm.gmm_sample(single, torch.Generator().manual_seed(1), variance_scale=scale)
        assert s.var().item() == pytest.approx(4.0 * scale, rel=0.05)
    # Low temperature picks the heavier component almost always.
    cold = gmm.gmm_sample(params, torch.Generator().manual_seed(2), variance_scale=0.0, temperature=0.05)
    assert (cold == mu[1]).float().mean() > 0.99


def test_gmm_sampling_is_seeded_and_modes():
    params = _mixture_raw(64)
    a = gmm.gmm_sample(params, torch.Generator().manual_seed(5))
    b = gmm.gmm_sample(params, torch.Generator().manual_seed(5))
    c = gmm.gmm_sample(params, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean = gmm.gmm_sample(params, mode="mean")
    assert torch.allclose(mean, torch.full((64, 1), 0.3 * -2.0 + 0.7 * 3.0), atol=1e-5)
    assert torch.equal(gmm.gmm_sample(params, mode="mode"), torch.full((64, 1), 3.0))
    with pytest.raises(ValueError):
        gmm.gmm_sample(params, mode="median")


# ---------------------------------------------------------------- projectors
def test_projector_shapes_keys_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    inp = projectors.InputProjector(projectors.InputProjectorConfig(token_dim=16, hidden_size=64))
    out = projectors.OutputProjector(projectors.OutputProjectorConfig(hidden_size=64, token_dim=16, num_components=4))
    assert inp(torch.randn(2, 5, 16)).shape == (2, 5, 64)
    raw = out(torch.randn(2, 5, 64))
    assert raw.shape == (2, 5, 2 * 4 * 16 + 4)
    assert gmm.split_gmm_params(raw, 4).means.shape == (2, 5, 4, 16)
    out.save_pretrained(tmp_path)
    back = projectors.OutputProjector.from_pretrained(tmp_path)
    assert back.config == out.config and torch.equal(back.proj[2].weight, out.proj[2].weight)


def test_token_mixing_starts_as_the_paper_projector_and_reads_across_tokens(tmp_path):
    torch.manual_seed(0)
    cfg = projectors.InputProjectorConfig(token_dim=8, hidden_size=16, token_mixing=True, num_tokens=4)
    mixed = projectors.InputProjector(cfg)
    plain = projectors.InputProjector(projectors.InputProjectorConfig(token_dim=8, hidden_size=16))
    plain.load_state_dict(mixed.state_dict(), strict=False)
    x = torch.randn(3, 4, 8)
    assert torch.equal(mixed(x), plain(x))                # M = 0 at the start
    # A difference between tokens 0 and 3 (motion, say) reaches token 1 only through M.
    with torch.no_grad():
        mixed.mix[1, 0], mixed.mix[1, 3] = -1.0, 1.0
    y = x.clone()
    y[:, 3] += 1.0
    assert not torch.allclose(mixed(y)[:, 1], mixed(x)[:, 1]) and torch.equal(plain(y)[:, 1], plain(x)[:, 1])
    with pytest.raises(ValueError, match="whole clips"):
        mixed(torch.randn(3, 5, 8))
    mixed.save_pretrained(tmp_path)
    back = projectors.InputProjector.from_pretrained(tmp_path)
    assert back.config == cfg and torch.equal(back(x), mixed(x))
    from llm.llm_config import llm_config
    assert llm_config("tiny").token_mixing and not llm_config("paper").token_mixing


def test_paper_projectors_match_release_keys_and_shapes():
    with torch.device("meta"):  # no memory for the 100M-parameter output projector
        built = {"input_resampler.": projectors.InputProjector(projectors.InputProjectorConfig()),
                 "output_resampler.": projectors.OutputProjector(projectors.OutputProjectorConfig())}
    ours = {prefix + k: list(v.shape) for prefix, m in built.items() for k, v in m.state_dict().items()}
    assert ours == RELEASE["agent"]
    fake = {k: torch.zeros(1) for k in RELEASE["agent"]}
    assert set(projectors.from_release_state_dict(built["output_resampler."], fake)) == \
        {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"}


# ---------------------------------------------------------------- attention mask
def test_query_block_mask_structure():
    q = torch.tensor([[0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    allowed = attention.query_block_mask(q, pad, dtype=torch.bool)[0, 0]
    assert allowed.shape == (7, 7)
    assert allowed[1, 2] and allowed[4, 5]            # bidirectional inside each block
    assert not allowed[1, 4] and not allowed[2, 5]    # an earlier block never sees a later one
    assert not allowed[0, 1] and not allowed[3, 4]    # text stays causal
    assert not allowed[5, 6] and allowed[6, 6]        # padding hidden; diagonal always kept
    additive = attention.query_block_mask(q, pad, dtype=torch.float16)
    assert additive.dtype == torch.float16
    assert torch.equal(additive[0, 0] == 0, allowed)
    assert (additive[0, 0][~allowed] == torch.finfo(torch.float16).min).all()
    window = attention.query_block_mask(torch.zeros(1, 7, dtype=torch.bool), dtype=torch.bool, sliding_window=2)
    assert window[0, 0, 6].tolist() == [False] * 5 + [True, True]


def _tiny_mistral(impl):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=32070, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_query_block_mask_in_tiny_mistral(impl):
    model = _tiny_mistral(impl)
    assert model.config._attn_implementation == impl
    length, block = 14, range(4, 9)
    q = torch.zeros(1, length, dtype=torch.bool)
    q[0, block.start:block.stop] = True
    mask = attention.query_block_mask(q, dtype=torch.float32)
    torch.manual_seed(1)
    embeds = torch.randn(1, length, 64)

    @torch.no_grad()
    def hidden(x, m):
        return model.model(inputs_embeds=x, attention_mask=m).last_hidden_state[0]

    base = hidden(embeds, mask)
    for p in (2, 6, 8, 11):  # before, inside (twice) and after the block
        moved = embeds.clone()
        moved[0, p] += 1.0
        changed = (hidden(moved, mask) - base).abs().amax(-1) > 1e-6
        for i in range(p):
            same_block = i in block and p in block
            # (a) a later query reaches an earlier query; (b) nothing else looks ahead.
            assert changed[i] == same_block, (p, i)
        assert changed[p:].all()
    # (c) with no query block the mask is plain causal: same logits as no mask at all.
    ids = torch.randint(0, 32070, (2, length))
    plain = attention.query_block_mask(torch.zeros(2, length, dtype=torch.bool), dtype=torch.float32)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids, attention_mask=plain).logits, ref, atol=1e-5)
        # Padding folds in the same way as transformers' own 2-D mask (right padding).
        pad = torch.ones(2, length, dtype=torch.long)
        pad[1, -3:] = 0
        ours = model(input_ids=ids, attention_mask=attention.query_block_mask(
            torch.zeros(2, length, dtype=torch.bool), pad, dtype=torch.float32)).logits
        theirs = model(input_ids=ids, attention_mask=pad).logits
        assert torch.allclose(ours[pad.bool()], theirs[pad.bool()], atol=1e-5)
