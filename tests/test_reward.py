"""train_reward.py: the Bradley-Terry loss against a hand computation, the K-way pairs, the reward read
at the EOS, a short run on the built-in task, the normalisation offset, and stage errors."""

import json
import math

import pytest
import torch

import train_reward
from support.data import GPT2_EOS, Tokenizer, Truncation
from model import GPTConfig, RewardModel
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.errors import LoadError
from support.comparisons import file_comparisons, load_comparisons, task_comparisons
from train_reward import Config, bradley_terry_loss, comparison_pairs, reward_batch


def test_bradley_terry_loss_equals_hand_computation():
    r_chosen, r_rejected = torch.tensor([1.0, -0.5, 3.0]), torch.tensor([0.0, 0.5, 3.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), math.log(2.0)]
    assert torch.allclose(bradley_terry_loss(r_chosen, r_rejected), torch.tensor(expected))
    # with a margin of 0.5 the chosen answer must win by 0.5 to be as good as a tie
    margin = torch.tensor([0.5, 0.5, 0.5])
    expected = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5)), math.log(1 + math.exp(0.5))]
    assert torch.allclose(bradley_terry_loss(r_chosen, r_rejected, margin), torch.tensor(expected))
    # no overflow for a pair that is wrong by a mile
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4]))).all()


def test_k_answers_give_all_pairs_best_first():
    groups = [{"answers": ["a", "b", "c"], "scores": [3.0, 2.0, 0.5]}, {"answers": ["d", "e"]}]
    better, worse, gap = comparison_pairs(groups)
    assert better.tolist() == [0, 0, 1, 3] and worse.tolist() == [1, 2, 2, 4]
    assert gap.tolist() == [1.0, 2.5, 1.5, 0.0]


def test_reward_batch_ends_each_answer_with_eos_and_the_model_reads_it():
    tok = Tokenizer()
    records = [{"prompt": "Human: hi\n\nAssistant:", "answers": [" A long answer here.", " Short."]}]
    idx, mask = reward_batch(file_comparisons(records, tok, Truncation(64, 48)), tok.eos_id, "cpu")
    last = mask.sum(1) - 1  # right padding: the last real token
    assert idx[0, last[0]] == GPT2_EOS and idx[1, last[1]] == GPT2_EOS and mask[1, -1] == 0
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    torch.nn.init.normal_(rm.reward_head.proj.weight)
    with torch.no_grad():
        batch = rm(idx, mask)
        alone = rm(idx[1:, : last[1] + 1], mask[1:, : last[1] + 1])
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "naive", "triton"])
@pytest.mark.parametrize("buckets", [1, 2, 3, 16])
def test_shared_prompts_and_length_buckets_give_each_answer_its_own_reward_and_gradient(buckets, attn_impl):
    """Each prompt run once for all its answers (SharedPrompts), the answers sorted by length and run in
    slices: every answer keeps its place in the batch, and the reward and gradient of its own
    prompt + answer sequence. The prompts differ in length (left padding), one is alone in its group, and
    more slices than answers is one answer per slice. Triton: the kernel with fewer queries than keys."""
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=64, attn_impl=attn_impl))
    torch.nn.init.normal_(rm.reward_head.proj.weight)
    lengths = [[5, 1, 9], [3, 12], [7], [7, 2, 4, 11]]  # answers of four prompts, not in order of length
    groups = [{"prompt": torch.randint(1, 50, (4 + 3 * i % 7,)).tolist(),
               "answers": [torch.randint(1, 50, (n,)).tolist() for n in answer_lengths]}
              for i, answer_lengths in enumerate(lengths)]
    reference = RewardModel(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=64,
                                      attn_impl="naive"))
    reference.load_state_dict(rm.state_dict())
    idx, mask = reward_batch(groups, 0, "cpu")
    one_batch = reference(idx, mask)  # every answer after its own copy of its prompt
    weights = torch.randn(len(one_batch))  # a loss that tells the answers apart
    (one_batch * weights).sum().backward()
    shared = train_reward.answer_rewards(rm, groups, 0, torch.device("cpu"), buckets)
    (shared * weights).sum().backward()
    assert torch.allclose(shared, one_batch, atol=1e-5)
    # the gradients reach ~100 here (a random head on a random trunk): compare them relatively
    pairs = zip(rm.parameters(), reference.parameters())
    assert all(torch.allclose(p.grad, g.grad, rtol=1e-4, atol=1e-4) for p, g in pairs)


def test_evaluate_on_a_single_held_out_pair_is_finite():
    """A tiny --n_eval can leave one pair: every metric is still a number (a sample std of one value is NaN)."""
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    groups = [{"prompt": [1, 2], "answers": [[3, 4], [5]], "gold": [2.0, 1.0]}]
    metrics = train_reward.evaluate(rm, groups, 0, Config(), torch.device("cpu"))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["reward_chosen_std"] == 0.0 and metrics["gold_agreement"] == 0.5  # the zero head ties it


def test_short_run_beats_chance_on_held_out_pairs(reward_run):
    out, cfg, model, metrics = reward_run
    # The bar. Chance is 0.5 on both measures. The labels are noisy (they agree with the gold judge on
    # ~76% of held-out pairs of the policy's answers), so accuracy on them stays low even for a good
    # reward model; agreement with the judge is the measure that matters. A 150-step run from a 300-step
    # SFT model reaches ~0.58 on the labels and ~0.66 against the judge (the full pipeline: ~0.69 and
    # ~0.87); the bars below say it learned something beyond chance. 256 held-out prompts (~1400
    # pairs), not 64: on 64 the accuracy alone moved by +-0.03 with the sampled answers (0.53-0.56).
    assert metrics["eval_accuracy"] > 0.54, metrics
    assert metrics["gold_agreement"] > 0.6, metrics
    assert metrics["eval_loss"] < math.log(2), metrics  # better than the untrained model's coin flip


def test_offset_makes_the_sft_answers_average_zero(reward_run, sft_run):
    out, cfg, model, metrics = reward_run
    ckpt = load_checkpoint(out / "ckpt.pt", "reward")
    rm = model_from_checkpoint(ckpt).eval()
    assert rm.offset.item() == pytest.approx(metrics["offset"]) and rm.offset.item() != 0.0
    # the SFT policy's own answers to held-out prompts (the eval candidates) now average 0
    sft = load_checkpoint(sft_run / "ckpt.pt", "sft")
    policy = train_reward.policy_from_checkpoint(sft).eval()
    tok = Tokenizer.from_state(sft["tokenizer"])
    cfg.max_prompt_tokens = ckpt["train_args"]["max_prompt_tokens"]
    cfg.max_answer_tokens = ckpt["train_args"]["max_answer_tokens"]
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    own = task_comparisons([policy], tok, cfg.n_eval, "eval", cfg.seed + 3, trunc, cfg)
    with torch.no_grad():
        rewards = train_reward.raw_rewards(rm, own, tok.eos_id, cfg.batch_size, torch.device("cpu")) - rm.offset
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_wrong_stage_checkpoint_is_a_one_line_error(reward_run, tmp_path):
    out, cfg, _, _ = reward_run
    bad = Config(out_dir=str(tmp_path), sft=str(out / "ckpt.pt"))
    with pytest.raises(LoadError, match="is a 'reward' checkpoint, but a 'sft'"):
        train_reward.main(bad)


def test_a_preference_file_loads_for_a_model_with_gpt2_vocabulary(tmp_path):
    """--data with a model of GPT-2's full vocabulary (no compact table, so nothing is ever spelled): the
    comparisons of the file, split into train and held-out, each answer ending with EOS."""
    lines = [{"chosen": f"\n\nHuman: Say {w}.\n\nAssistant: {w}!", "rejected": f"\n\nHuman: Say {w}.\n\nAssistant: No."}
             for w in ("hello", "thanks", "yes", "maybe")]  # HH-RLHF dialogues
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = Config(data=str(data), out_dir=str(tmp_path), batch_size=2, max_prompt_tokens=96, max_answer_tokens=32)
    tok = Tokenizer()
    train, held_out, _ = load_comparisons(cfg, tok, [], {})
    assert (len(train), len(held_out)) == (3, 1)
    assert all(len(g["answers"]) == 2 and all(a[-1] == tok.eos_id for a in g["answers"]) for g in train + held_out)


def test_pair_accuracy_counts_a_tie_as_half():
    acc = train_reward.pair_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert acc.tolist() == [1.0, 0.5, 0.0]
