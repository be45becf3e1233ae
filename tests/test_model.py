"""model.py: our GPT against Hugging Face's GPT-2, generation with the KV cache, the attention
implementations, the scalar heads, and the checkpoint format."""

import json

import pytest
import torch

from model import (
    GPT, GPTConfig, PolicyWithValue, RewardModel, attention_naive, attention_sdpa, config_from_preset, generate,
    kv_start_from_mask, last_token_index, position_ids_from_mask,
)
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint, save_checkpoint
from support.errors import LoadError
from support.gpt2 import load_gpt2_weights, read_safetensors
from support.sampling import sample_answers
from support.speedups import real_tokens_forward

transformers = pytest.importorskip("transformers",
                                   reason="the golden test needs the dev extra (pip install -e '.[dev]')")


def small_hf_config():
    return transformers.GPT2Config(
        vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(small_hf_config()).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1: randomise them so a swap would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def hf_folder(request, hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder)  # transformers 5 writes config.json + model.safetensors
    if request.param == "bin":  # the older layout: a torch.save'd state dict (Conv1D weights, transposed)
        (folder / "model.safetensors").unlink()
        torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("attn_impl", ["naive", "sdpa"])
def test_logits_equal_huggingface_gpt2(hf_model, hf_folder, attn_impl):
    ours = load_gpt2_weights(hf_folder, attn_impl=attn_impl).eval()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 101, (3, 17), generator=g)
    with torch.no_grad():
        assert (ours(idx) - hf_model(idx).logits).abs().max() < 1e-4
        # a left-padded batch: HF needs the position ids spelled out, ours derives them from the mask
        mask = torch.ones(3, 17, dtype=torch.long)
        mask[0, :5] = 0
        mask[2, :11] = 0
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        theirs = hf_model(idx, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert (ours(idx, attention_mask=mask)[real] - theirs[real]).abs().max() < 1e-4
        # and each padded row equals the same tokens run alone, unpadded
        alone = ours(idx[2:3, 11:])
        assert (ours(idx, attention_mask=mask)[2, 11:] - alone[0]).abs().max() < 1e-4


def test_safetensors_reader_matches_library(hf_model, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="installed with transformers by the dev extra")
    hf_model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    ours, theirs = read_safetensors(path), safetensors.load_file(path)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_loader_errors_name_the_folder_and_files(tmp_path):
    with pytest.raises(LoadError, match="no such folder"):
        load_gpt2_weights(tmp_path / "nope")
    with pytest.raises(LoadError, match="config.json is missing"):
        load_gpt2_weights(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(small_hf_config().to_dict()))
    with pytest.raises(LoadError, match="model.safetensors or pytorch_model.bin"):
        load_gpt2_weights(tmp_path)


def test_presets_have_gpt2_shapes():
    assert config_from_preset("gpt2").n_embd == 768
    assert GPT(config_from_preset("tiny")).num_params() < 10_000_000
    sizes = {name: (config_from_preset(name).n_layer, config_from_preset(name).n_embd)
             for name in ("gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert sizes == {"gpt2-medium": (24, 1024), "gpt2-large": (36, 1280), "gpt2-xl": (48, 1600)}
    with pytest.raises(ValueError, match="unknown model preset"):
        config_from_preset("gpt5")


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=64, **kw)
    return GPT(cfg).eval()


def test_kv_cache_generation_equals_cache_free_greedy():
    model = tiny_gpt()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22]]
    tokens, attn, answer = generate(model, prompts, max_new_tokens=12, eos_id=96, temperature=0)
    Tp = 7
    # cache-free greedy decoding, one row at a time, no padding at all
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(12):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == 96:
                break
        n = len(seq) - len(p)
        assert tokens[b, Tp : Tp + n].tolist() == seq[len(p):]
        assert answer[b].sum() == n and answer[b, Tp : Tp + n].all()
        assert attn[b].sum() == len(p) + n and attn[b, Tp - len(p):Tp + n].all()


def test_rows_that_end_leave_the_batch_without_changing_the_others():
    """generate runs each distinct prompt's prefill once, and drops the rows that have ended from its
    batch and KV cache once a quarter of them have: with greedy decoding every row is still exactly what
    it is alone, whichever steps the rows end at, repeated prompts or not."""
    model = tiny_gpt(tie_word_embeddings=False)  # tied, a random GPT repeats its last token, in every row
    with torch.no_grad():  # sharper attention: at init the scores are ~0 and a wrong key would go unseen
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    prompts = [[(7 * i) % 90 + j for j in range(1 + i % 4)] for i in range(16)]
    free = [generate(model, [p], 16, eos_id=96, temperature=0)[0][0, len(p):].tolist() for p in prompts]
    # the end token: the one whose first appearance is spread over the most different steps of the rows
    firsts = {}
    for b, row in enumerate(free):
        for step, t in enumerate(row):
            firsts.setdefault(t, {}).setdefault(b, step)
    eos = max(firsts, key=lambda t: len(set(firsts[t].values())))
    ends = sorted(firsts[eos].values())
    assert len(set(ends)) >= 3 and 4 * sum(e < max(ends) for e in ends) >= len(prompts), ends
    prompts += [prompts[5], prompts[0], prompts[5]]  # one prompt's prefill shared by three rows, one by two
    tokens, _, answer = generate(model, prompts, 16, eos_id=eos, temperature=0)
    for b, p in enumerate(prompts):
        alone, _, alone_answer = generate(model, [p], 16, eos_id=eos, temperature=0)
        assert tokens[b][answer[b].bool()].tolist() == alone[0][alone_answer[0].bool()].tolist()


def test_generation_stops_each_row_at_eos_and_is_reproducible():
    model = tiny_gpt()
    with torch.no_grad():  # make EOS likely (about 1 in 6 per step) so that rows stop at different steps
        model.transformer.ln_f.bias.fill_(0.5)
        model.transformer.wte.weight[96] = 0.08
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9]]
    a = generate(model, prompts, 20, eos_id=96, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    b = generate(model, prompts, 20, eos_id=96, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    c = generate(model, prompts, 20, eos_id=96, temperature=1.0, top_k=50, top_p=0.9, seed=124)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    tokens, _, answer = a
    lengths = answer.sum(1).tolist()
    assert len(set(lengths)) > 1 and min(lengths) < answer.size(1) - 3, lengths  # rows stopped on their own
    for row, m in zip(tokens, answer):
        gen = row[m.bool()].tolist()
        assert 96 not in gen[:-1]  # nothing is generated after EOS
        assert (row[3:][~m[3:].bool()] == 96).all()  # the tail after a row stops is EOS padding


def test_sample_answers_batches_are_the_generate_calls_and_report_progress():
    model = tiny_gpt()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8], [9]]
    done = []
    answers = sample_answers(model, prompts, 6, eos_id=96, seed=5, batch_size=2, on_batch=done.append)
    assert done == [2, 4, 5]  # answers finished after each batch: what the reward stage's progress bar shows
    tokens, _, mask = generate(model, prompts[2:4], 6, eos_id=96, seed=5 + 2)
    assert answers[2:4] == [[t for t, m in zip(row, keep) if m] for row, keep in zip(tokens.tolist(), mask.tolist())]


def test_top_k_1_is_greedy():
    model = tiny_gpt()
    greedy = generate(model, [[1, 2, 3]], 8, eos_id=96, temperature=0)[0]
    top1 = generate(model, [[1, 2, 3]], 8, eos_id=96, temperature=1.0, top_k=1, seed=0)[0]
    assert torch.equal(greedy, top1)


def test_attention_impls_agree_with_left_padding_and_grads():
    torch.manual_seed(0)
    B, nh, T, hs = 3, 2, 13, 32
    q, k, v = (torch.randn(B, nh, T, hs, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kv_start = torch.tensor([0, 4, 12])
    outs = []
    for fn in (attention_naive, attention_sdpa):
        y = fn(q, k, v, kv_start)
        g = torch.autograd.grad((y * torch.sin(y)).sum(), (q, k, v))
        outs.append((y, g))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-10)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, atol=1e-10)
    # rows of pure padding (query before its sequence starts) come out as exact zeros, no NaN
    assert (outs[0][0][2, :, :12] == 0).all() and not outs[0][0].isnan().any()


@pytest.mark.parametrize("attn_impl", ["sdpa", "triton"])
def test_model_loss_and_grads_same_for_every_attn_impl(attn_impl):
    idx = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :6] = 0
    results = []
    for impl in ("naive", attn_impl):
        model = tiny_gpt(attn_impl=impl)
        logits = model(idx, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[mask.bool()], idx[mask.bool()])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-5), name


@pytest.mark.parametrize("attn_impl", ["naive", "sdpa", "triton"])
def test_a_padded_batch_computes_each_row_as_alone_and_zeros_at_the_padding(attn_impl):
    # the blocks run on the real tokens only (RealTokens): right, left and both-side padding, and a row
    # without padding, must each give the hidden states and gradients of that row run alone
    rows = [([5, 6, 7, 8, 9], 0, 4), ([10, 11, 12], 6, 0), ([13, 14, 15, 16, 17, 18, 19, 20, 21], 0, 0),
            ([22, 23, 24, 25], 2, 3)]  # (tokens, left padding, right padding), all 9 wide
    idx = torch.tensor([[0] * left + seq + [0] * right for seq, left, right in rows])
    mask = torch.tensor([[0] * left + [1] * len(seq) + [0] * right for seq, left, right in rows])
    model = tiny_gpt(attn_impl=attn_impl)
    weight = torch.randn(9, 64, generator=torch.Generator().manual_seed(1))
    hidden = model.hidden_states(idx, mask)  # (4, 9, 64)
    (hidden * weight).sum().backward()
    batch_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for b, (seq, left, _) in enumerate(rows):
        alone = model.hidden_states(torch.tensor([seq]))[0]
        real = slice(left, left + len(seq))
        assert torch.allclose(hidden[b, real], alone, atol=1e-5), b
        (alone * weight[real]).sum().backward()  # gradients add up over the rows
    assert (hidden[~mask.bool()] == 0).all()
    for name, grad in batch_grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-4), name


def test_real_tokens_forward_equals_the_plain_blocks_on_the_padded_batch():
    """support/speedups.py's packing against the path it replaces: model.py's blocks run on the whole padded
    batch, padding included, read at the real tokens; values and gradients."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0], [1] * 7])
    idx = torch.randint(1, 97, mask.shape, generator=torch.Generator().manual_seed(2)) * mask
    real = mask.bool()
    outputs, grads = [], []
    for packed in (False, True):
        model = tiny_gpt()
        trunk = model.transformer
        x = trunk.wte(idx) + trunk.wpe(position_ids_from_mask(mask))  # (B, T, C)
        kv_start = kv_start_from_mask(mask)
        if packed:
            hidden = real_tokens_forward(trunk, x, mask, kv_start)
            assert (hidden[~real] == 0).all()
        else:
            hidden = x
            for block in trunk.h:
                hidden = block(hidden, kv_start)
            hidden = trunk.ln_f(hidden)
        weight = torch.randn(hidden[real].shape, generator=torch.Generator().manual_seed(3))
        (hidden[real] * weight).sum().backward()
        outputs.append(hidden[real].detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_reward_model_reads_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=32)
    rm = RewardModel(cfg).eval()
    torch.nn.init.normal_(rm.reward_head.proj.weight)
    seq = [3, 4, 5, 6, 7]
    with torch.no_grad():
        alone = rm(torch.tensor([seq]), torch.ones(1, 5, dtype=torch.long))
        right = rm(torch.tensor([seq + [0, 0]]), torch.tensor([[1] * 5 + [0, 0]]))
        left = rm(torch.tensor([[0, 0] + seq]), torch.tensor([[0, 0] + [1] * 5]))
        rm.offset.fill_(0.25)
        shifted = rm(torch.tensor([seq]), torch.ones(1, 5, dtype=torch.long))
    assert torch.allclose(alone, right, atol=1e-6) and torch.allclose(alone, left, atol=1e-6)
    assert torch.allclose(shifted, alone - 0.25)


def test_scalar_heads_start_at_zero():
    cfg = GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=32)
    hidden, values = PolicyWithValue(cfg)(torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long))
    assert hidden.shape == (2, 7, 32) and values.shape == (2, 7) and (values == 0).all()


def test_checkpoint_round_trip_and_stage_check(tmp_path):
    model = tiny_gpt(seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 97, (1, 5))).sum().backward()
    opt.step()
    path = tmp_path / "sft" / "ckpt.pt"
    tokenizer = {"bpe": "gpt2", "table": [5, 9, 50256]}
    save_checkpoint(path, model, "sft", 7, {"lr": 1e-3}, tokenizer, optimizer=opt, extra={"note": "x"})
    ckpt = load_checkpoint(path, ("sft", "ppo"))
    assert ckpt["step"] == 7 and ckpt["train_args"] == {"lr": 1e-3} and ckpt["tokenizer"] == tokenizer
    assert ckpt["extra"] == {"note": "x"}
    again = policy_from_checkpoint(ckpt)
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(idx), model(idx))
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    with pytest.raises(LoadError, match=r"is a 'sft' checkpoint, but a 'reward' .*train_reward.py"):
        load_checkpoint(path, "reward")
    with pytest.raises(LoadError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", "sft")
    with pytest.raises(LoadError, match="no such checkpoint; train one with train_sft.py or train_ppo.py,"):
        load_checkpoint(tmp_path / "missing.pt", ("sft", "ppo"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt", "sft")
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_tiny_preset_uses_exact_gelu_and_older_checkpoints_keep_tanh(tmp_path):
    assert config_from_preset("tiny").gelu_approximate == "none"
    assert config_from_preset("gpt2").gelu_approximate == "tanh" == GPTConfig().gelu_approximate
    model = tiny_gpt(seed=3, gelu_approximate="none")
    x = torch.randn(2, 5, 64)
    mlp = model.transformer.h[0].mlp
    want = mlp.c_proj(0.5 * mlp.c_fc(x) * (1 + torch.erf(mlp.c_fc(x) / 2**0.5)))
    torch.testing.assert_close(mlp(x), want)
    # a checkpoint saved before the field existed was trained with tanh, and must come back with it
    tanh_model = tiny_gpt(seed=3)
    path = tmp_path / "sft" / "ckpt.pt"
    save_checkpoint(path, tanh_model, "sft", 1, {}, {"bpe": "gpt2", "table": None})
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model_config"]["gelu_approximate"]
    again = policy_from_checkpoint(ckpt)
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(idx), tanh_model(idx))
        assert not torch.allclose(model(idx), tanh_model(idx))  # same weights, the other GELU


@pytest.mark.parametrize("value_head", [True, False])  # False: a critic-free run's (train_ppo.py --advantage)
def test_ppo_checkpoint_gives_back_its_policy(value_head, tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=32)
    pv = PolicyWithValue(cfg, value_head=value_head)
    save_checkpoint(tmp_path / "ppo.pt", pv, "ppo", 1, {}, {"bpe": "gpt2", "table": None})
    ckpt = load_checkpoint(tmp_path / "ppo.pt", ("sft", "ppo"))
    again = model_from_checkpoint(ckpt)
    assert isinstance(again, PolicyWithValue) and (again.value_head is not None) == value_head
    idx = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(idx, torch.ones_like(idx))[1], pv(idx, torch.ones_like(idx))[1])
        assert torch.equal(policy_from_checkpoint(ckpt)(idx), pv.policy(idx))


def test_sampling_follows_the_softmax_and_its_filters():
    from model import sample_next_token

    logits = torch.tensor([[0.0, 1.0, 2.0, -50.0, 1.5]]).repeat(100_000, 1)
    g = torch.Generator().manual_seed(0)
    freq = lambda s: torch.bincount(s, minlength=5).float() / len(s)  # noqa: E731
    assert torch.allclose(freq(sample_next_token(logits, 1.0, generator=g)), logits[0].softmax(-1), atol=0.01)
    assert torch.allclose(freq(sample_next_token(logits, 0.5, generator=g)), (logits[0] / 0.5).softmax(-1), atol=0.01)
    top2 = torch.tensor([0.0, 0.0, 2.0, 0.0, 1.5]).masked_fill(torch.tensor([1, 1, 0, 1, 0]).bool(), float("-inf"))
    assert torch.allclose(freq(sample_next_token(logits, 1.0, top_k=2, generator=g)), top2.softmax(-1), atol=0.01)
    # top_p=0.5: token 2 alone has p=0.43 < 0.5, so the nucleus is {2, 4}
    assert torch.allclose(freq(sample_next_token(logits, 1.0, top_p=0.5, generator=g)), top2.softmax(-1), atol=0.01)
    assert (sample_next_token(logits, 0) == 2).all()


@pytest.mark.parametrize("switch", [dict(tie_word_embeddings=False), dict(scale_attn_weights=False),
                                    dict(scale_attn_by_inverse_layer_idx=True), dict(activation_function="gelu"),
                                    dict(activation_function="gelu_pytorch_tanh")])
def test_config_switches_that_change_the_maths_match_huggingface(tmp_path, switch):
    """GPT-2 configs that untie the LM head, change the attention scale or take the exact GELU load with the
    same logits."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, **switch)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # larger weights, so a missing scale would show in the logits
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = load_gpt2_weights(tmp_path, attn_impl="naive").eval()
    idx = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-4
    assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr() or config.tie_word_embeddings


def test_auto_attention_falls_back_to_sdpa_for_head_sizes_the_kernel_lacks():
    from model import resolve_attn_impl

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert resolve_attn_impl("auto", cuda, 64) == "triton"
    with pytest.warns(UserWarning, match="using PyTorch's SDPA instead"):
        assert resolve_attn_impl("auto", cuda, 48) == "sdpa"
    assert resolve_attn_impl("auto", torch.device("cpu"), 64) == "sdpa"
    # asked for by name, a head size the kernel lacks is refused when the model is built, not at its first step
    with pytest.raises(ValueError, match="head sizes"):
        GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=96, attn_impl="triton"))
    checkpoint = {"stage": "sft", "model_config": {"n_embd": 96, "n_head": 2, "n_layer": 1, "vocab_size": 16,
                                                   "block_size": 8}, "model": {}}
    with pytest.raises(LoadError, match="head sizes .* use attn_impl sdpa"):
        model_from_checkpoint(checkpoint, attn_impl="triton")


def test_a_save_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    model = tiny_gpt()
    path = tmp_path / "ckpt.pt"

    def broken_save(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, "sft", 1, {}, {"bpe": "gpt2", "table": None})
    assert not path.exists() and list(tmp_path.iterdir()) == []
