"""Every stage under torchrun with two CPU processes (gloo) against one process with the same global batch
(support/distributed.py): the same losses and weights, the same gradient on every rank, one writer, a resume,
and a batch that does not split refused in one line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_rounds import pipeline

SFT = ["--max_iters", "20", "--n_train", "300", "--n_eval", "20", "--eval_prompts", "16", "--eval_interval", "10",
       "--batch_size", "8", "--grad_accum", "2"]
REWARD = ["--n_train", "24", "--n_eval", "16", "--k", "4", "--batch_size", "8", "--max_iters", "6",
          "--eval_interval", "3"]
PPO = ["--n_prompts", "64", "--prompts_per_iter", "8", "--minibatch_size", "4", "--eval_prompts", "16",
       "--eval_interval", "2", "--reward_scaling", "--adaptive_kl"]


def launch(args, nproc=1, timeout=300):
    """A script run as one process, or under torchrun with nproc CPU processes: (exit code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                  if nproc > 1 else []) + args
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def records(path):
    """metrics.jsonl without the speeds and times (they are the only values allowed to differ)."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s") and k != "wall_s"}
            for line in path.read_text().splitlines()]


# Bradley-Terry sees only differences of rewards: their common level (the head's bias, and what moves every
# reward alike) has a gradient of 0 up to float noise, which AdamW's normalisation turns into steps of the size
# of the learning rate, different in two runs; the differences (margin, accuracy, loss) agree
LEVEL = ("reward_chosen_mean", "reward_rejected_mean", "offset", "reward_head.proj.bias")


def assert_close_logs(one, two):
    assert [r["step"] for r in one] == [r["step"] for r in two]  # each step written once: rank 0 writes
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in set(a) - set(LEVEL):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a["step"], key)


def assert_close_weights(path_one, path_two):
    one, two = (torch.load(p, weights_only=False)["model"] for p in (path_one, path_two))
    for key in set(one) - set(LEVEL):
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT and the reward model, each as one process and as two; PPO as two (from the same models)."""
    base = tmp_path_factory.mktemp("distributed")
    outs = {}
    for nproc in (1, 2):
        out = base / f"nproc{nproc}"
        code, stdout, stderr = launch(["train_sft.py", "--out_dir", str(out / "sft")] + SFT, nproc)
        assert code == 0, stderr[-3000:]
        code, stdout, stderr = launch(["train_reward.py", "--sft", str(out / "sft" / "ckpt.pt"), "--out_dir",
                                       str(out / "reward")] + REWARD, nproc)
        assert code == 0, stderr[-3000:]
        outs[nproc] = out, stdout
    return outs


def test_sft_and_reward_model_with_two_processes_equal_one(runs):
    """Same global batch, same result: every logged loss and metric and the final weights agree to float
    tolerance (the gradient is summed in another order). SFT runs with grad_accum 2 as well: its loss is a
    mean over the tokens of every micro-batch of every rank."""
    (one, _), (two, stdout) = runs[1], runs[2]
    for stage in ("sft", "reward"):
        assert_close_logs(records(one / stage / "metrics.jsonl"), records(two / stage / "metrics.jsonl"))
        assert_close_weights(one / stage / "ckpt.pt", two / stage / "ckpt.pt")
    # the labellers ranked the same answers: the ranks shared out the sampling and gathered it
    assert (one / "reward" / "comparisons.jsonl").read_text() == (two / "reward" / "comparisons.jsonl").read_text()
    assert stdout.count("step 6: eval_loss") == 1  # rank 0 alone prints


def test_ppo_with_two_processes_evaluates_as_one_and_resumes_exactly(runs, tmp_path):
    """Each rank samples its share of the rollout with its own seed, so the training differs from one
    process's; the held-out eval (the same prompts and seeds, shared out) does not. A run stopped at
    iteration 2 and resumed under torchrun continues exactly as the run that did not stop."""
    out, _ = runs[2]
    models = ["--sft", str(out / "sft" / "ckpt.pt"), "--reward", str(out / "reward" / "ckpt.pt")]
    code, _, stderr = launch(["train_ppo.py", *models, "--out_dir", str(tmp_path / "one"), "--iterations", "1"] + PPO)
    assert code == 0, stderr[-3000:]
    code, stdout, stderr = launch(["train_ppo.py", *models, "--out_dir", str(tmp_path / "whole"), "--iterations", "4"]
                                  + PPO, nproc=2)
    assert code == 0, stderr[-3000:]
    whole = records(tmp_path / "whole" / "metrics.jsonl")
    assert whole[0] == records(tmp_path / "one" / "metrics.jsonl")[0]  # iteration 0's eval
    assert [r["step"] for r in whole if "reward" in r] == [1, 2, 3, 4] and stdout.count("iteration 4:") == 1

    stopped = tmp_path / "stopped"
    for iterations, resume in (("2", []), ("4", ["--resume"])):
        code, _, stderr = launch(["train_ppo.py", *models, "--out_dir", str(stopped), "--iterations", iterations]
                                 + PPO + resume, nproc=2)
        assert code == 0, stderr[-3000:]
    assert records(stopped / "metrics.jsonl") == whole
    assert_close_weights(stopped / "ckpt.pt", tmp_path / "whole" / "ckpt.pt")


GRADIENTS = """
import json, sys, torch
sys.path.insert(0, {repo!r})
from model import GPT, GPTConfig, PolicyWithValue, RewardModel
from support import distributed
import train_ppo, train_reward, train_sft

CPU = distributed.setup(torch.device("cpu"))
torch.manual_seed(0)
config = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
g = torch.Generator().manual_seed(1)
out = {{}}

def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])

def compare(name, model, full_loss, share_loss):
    # the whole batch on this rank alone, then this rank's share weighted and synced
    model.zero_grad(); full_loss().backward(); full = grads(model)
    model.zero_grad(); share_loss().backward(); distributed.sync_gradients(model); synced = grads(model)
    every = [torch.zeros_like(synced) for _ in range(2)]
    torch.distributed.all_gather(every, synced)
    out[name] = {{"error": (synced - full).abs().max().item() / full.abs().max().item(),
                 "same_on_every_rank": torch.equal(every[0], every[1])}}

# SFT: examples of different lengths, so the ranks hold different numbers of answer tokens
gpt = GPT(config)
examples = [(torch.randint(1, 50, (p,), generator=g).tolist(), torch.randint(1, 50, (a,), generator=g).tolist())
            for p, a in ((3, 5), (6, 2), (2, 9), (4, 4), (7, 1), (5, 6))]
n_answer = sum(len(a) for _, a in examples)
loss = lambda batch: train_sft.sft_loss(gpt, *train_sft.sft_batch(batch, 0)) / n_answer
compare("sft", gpt, lambda: loss(examples), lambda: loss(distributed.share(examples)))

# reward model: groups of 2 and 3 answers, so the ranks hold different numbers of pairs
rm = RewardModel(config)
torch.nn.init.normal_(rm.reward_head.proj.weight, std=0.5)
groups = [{{"prompt": torch.randint(1, 50, (3,), generator=g).tolist(),
           "answers": [torch.randint(1, 50, (n,), generator=g).tolist() for n in sizes]}}
          for sizes in ((2, 4), (3, 1, 5), (4, 2), (1, 3, 2))]
n_pairs = len(train_reward.comparison_pairs(groups)[0])
def share_bt():
    loss, r_c, _ = train_reward.pair_loss(rm, distributed.share(groups), 0, 0.0, CPU)
    return loss * (len(r_c) / n_pairs)
compare("reward", rm, lambda: train_reward.pair_loss(rm, groups, 0, 0.0, CPU)[0], share_bt)

# PPO: a mini-batch whose rows hold different numbers of actions; whitening over every rank's rollout
model = PolicyWithValue(config)
cfg = train_ppo.Config(logprob_impl="torch")
tokens = torch.randint(1, 50, (6, 12), generator=g)
attention = torch.ones_like(tokens)
actions = torch.zeros(6, 12)
for row, n in enumerate((3, 7, 1, 5, 8, 2)):
    actions[row, 12 - n:] = 1
advantages = torch.randn(6, 12, generator=g) * actions
returns, values_old, logp_old = (torch.randn(6, 12, generator=g) * actions for _ in range(3))
def ppo_loss(rows):
    logp, _, values = train_ppo.policy_forward(model, tokens[rows], attention[rows], actions[rows], cfg)
    pg, _, _ = train_ppo.ppo_policy_loss(logp, logp_old[rows], advantages[rows], actions[rows], 0.2)
    vf, _ = train_ppo.ppo_value_loss(values, values_old[rows], returns[rows], actions[rows], 0.2)
    return pg + 0.5 * vf
mine = distributed.share(torch.arange(6))
compare("ppo", model, lambda: ppo_loss(torch.arange(6)),
        lambda: ppo_loss(mine) * distributed.share_weight(actions[mine].sum()))
whitened = train_ppo.masked_whiten(advantages[mine], actions[mine])
alone = train_ppo.masked_whiten(advantages, actions)  # the whole rollout as one process sees it
out["whiten_error"] = (whitened - alone[mine]).abs().max().item()
json.dump(out, open(sys.argv[1] + f"/rank{{distributed.RANK}}.json", "w"))
distributed.finish(0)
"""


def test_after_a_step_every_rank_holds_the_global_batchs_gradient(tmp_path):
    """SFT's, the reward model's and PPO's losses on each rank's share, weighted by its share of the tokens
    (pairs) and all-reduced, give every rank the gradient one process computes on the whole batch, and the
    same bits on both ranks; PPO's advantage whitening uses every rank's mean and variance."""
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS.format(repo=str(REPO)))
    code, _, stderr = launch([str(script), str(tmp_path)], nproc=2)
    assert code == 0, stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage in ("sft", "reward", "ppo"):
            assert out[stage]["error"] < 1e-5 and out[stage]["same_on_every_rank"], (rank, stage, out[stage])
        assert out["whiten_error"] < 1e-5


def test_a_batch_that_does_not_split_is_one_line_from_rank_0(tmp_path):
    """Refused before any work on every rank (no rank left waiting), said once."""
    code, stdout, stderr = launch(["train_sft.py", "--out_dir", str(tmp_path), "--batch_size", "7"], nproc=2)
    assert code != 0 and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch_size 7 does not split across 2 processes; use a multiple of 2, or another "
                      "--nproc_per_node"]
    assert "exitcode  : 2" in stderr  # torchrun's own report: each process exited with code 2
    assert not (tmp_path / "metrics.jsonl").exists()


def test_pipeline_with_nproc_runs_every_stage_under_torchrun(tmp_path):
    """NPROC=2 bash pipeline.sh: every training stage under torchrun, the PPO runs one after the other; a
    RESUME=1 with another NPROC is another command, refused rather than mixed."""
    out = tmp_path / "out"
    code, log = pipeline(out, ROUNDS="1", NPROC="2", SIDE_BY_SIDE="auto")
    assert code == 0, log[-3000:]
    for stage in ("sft", "reward", "ppo", "ppo_nokl"):
        assert (out / stage / "done").read_text().startswith(
            "python -m torch.distributed.run --standalone --nproc_per_node 2 train_")
    assert "runs beside ppo" not in log and (out / "report.md").is_file()
    code, log = pipeline(out, ROUNDS="1", RESUME="1")
    assert code == 2 and f"pipeline.sh: {out}/sft was made by another command" in log
