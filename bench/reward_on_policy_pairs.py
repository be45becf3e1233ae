"""How well reward models agree with the gold judge on the SFT policy's own answers: the pairs PPO will
show them. Each reward checkpoint is evaluated on the same held-out rankings (train_reward.py's eval of
the built-in task: the SFT policy's K answers to held-out prompts, ranked by the simulated labellers).

    python train_reward.py --sft out/sft/ckpt.pt --candidates demonstrator --out_dir out/reward_demo
    python bench/reward_on_policy_pairs.py out/sft/ckpt.pt out/reward/ckpt.pt out/reward_demo/ckpt.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_reward  # noqa: E402
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint  # noqa: E402
from support.comparisons import task_comparisons  # noqa: E402
from support.data import Tokenizer, Truncation  # noqa: E402
from support.training import parse_args, run  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        sys.exit(2)
    sft_ckpt = load_checkpoint(argv[0], ("sft", "ppo"))
    policy = policy_from_checkpoint(sft_ckpt).eval()
    tok = Tokenizer.from_state(sft_ckpt["tokenizer"])
    cfg = parse_args(train_reward.Config, [])  # the defaults: n_eval, k, label_noise, seed of train_reward.py
    first = load_checkpoint(argv[1], "reward")["train_args"]
    cfg.seed = first["seed"]
    cfg.max_prompt_tokens, cfg.max_answer_tokens = first["max_prompt_tokens"], first["max_answer_tokens"]
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    groups = task_comparisons([policy], tok, cfg.n_eval, "eval", cfg.seed + 3, trunc, cfg)
    n_pairs = len(train_reward.comparison_pairs(groups)[0])
    print(f"{len(groups)} held-out prompts, {n_pairs} pairs of the SFT policy's answers")
    for path in argv[1:]:
        ckpt = load_checkpoint(path, "reward")
        metrics = train_reward.evaluate(model_from_checkpoint(ckpt), groups, tok.eos_id, cfg, torch.device("cpu"))
        print(f"{path}: trained on {ckpt['train_args']['candidates']} answers; agreement with the gold judge "
              f"{metrics['gold_agreement']:.3f}, accuracy on the labels {metrics['eval_accuracy']:.3f}")


if __name__ == "__main__":
    run(main)
