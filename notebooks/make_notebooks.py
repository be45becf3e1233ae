"""
Writes the four notebooks of the course from the cells below, so that their shared first cell (where
the outputs come from, and a tiny run when there are none) is written once and stays the same in all.

    python notebooks/make_notebooks.py             # write notebooks/*.ipynb without outputs
    python notebooks/make_notebooks.py --execute   # and run them against out/ (after `bash pipeline.sh`)

The committed notebooks carry the outputs of --execute after a full `bash pipeline.sh` on a CPU.
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# The first code cell of every notebook. {needed}: the stages whose outputs the notebook reads; {tiny}:
# the stages a tiny run makes when they are missing.
SETUP = '''\
import os
import sys
import tempfile
from dataclasses import asdict
from html import escape
from pathlib import Path

from IPython.display import HTML, display

sys.path.insert(0, str(Path("..").resolve()))  # the repository root: model.py, task.py, train_*.py
import plots  # beside this notebook; it picks the Agg backend, so the inline backend is set after it
import train_ppo
import train_reward
import train_sft
from model import load_checkpoint

%matplotlib inline

OUT = os.environ.get("RLHF_OUT", "../out")  # what `bash pipeline.sh` wrote


def tiny_run(out, stages):
    """The pipeline with very small settings (half a minute on a CPU), for a clone without out/: every
    cell runs and every figure is drawn, but nothing is learned. Stages already in `out` are kept."""
    sft, reward = f"{{out}}/sft/ckpt.pt", f"{{out}}/reward/ckpt.pt"
    if not Path(sft).is_file():
        train_sft.main(train_sft.Config(out_dir=f"{{out}}/sft", n_train=500, n_eval=50, eval_prompts=8, batch_size=16,
                                        max_iters=30, warmup_iters=5, eval_interval=10))
    if "reward" in stages and not Path(reward).is_file():
        train_reward.main(train_reward.Config(out_dir=f"{{out}}/reward", sft=sft, n_train=300, n_eval=50, norm_prompts=16,
                                              max_iters=20, warmup_iters=5, eval_interval=10))
    for name, kl_coef in (("ppo", 0.1), ("ppo_nokl", 0.0)):
        if name in stages and not Path(f"{{out}}/{{name}}/ckpt.pt").is_file():
            train_ppo.main(train_ppo.Config(out_dir=f"{{out}}/{{name}}", sft=sft, reward=reward, kl_coef=kl_coef,
                                            iterations=2, prompts_per_iter=8, samples_per_prompt=2, minibatch_size=8,
                                            max_new_tokens=12, eval_prompts=8, ppo_epochs=1, eval_interval=1))


if not all(Path(OUT, stage, "ckpt.pt").is_file() for stage in {needed}):
    OUT = os.environ.get("RLHF_TINY") or tempfile.mkdtemp(prefix="rlhf_tiny_")
    print(f"no pipeline outputs in {{os.environ.get('RLHF_OUT', '../out')}}: a tiny run into {{OUT}} stands in")
    tiny_run(OUT, {tiny})


def changed_args(stage):
    """The training arguments of OUT/stage/ckpt.pt that differ from its script's defaults (paths left out)."""
    ckpt = load_checkpoint(Path(OUT, stage, "ckpt.pt"), ("sft", "reward", "ppo"))
    script = {{"sft": train_sft, "reward": train_reward, "ppo": train_ppo}}[ckpt["stage"]]
    defaults = asdict(script.Config())
    changed = {{k: v for k, v in ckpt["train_args"].items() if k not in ("out_dir", "sft", "reward") and v != defaults.get(k)}}
    return f"{{script.__name__}}.Config() defaults" + (f" except {{changed}}" if changed else "") + f", {{ckpt['step']}} steps"


def table(rows):
    """A list of dicts as an HTML table; floats with 2 decimals."""
    cell = lambda v: f"<td style='text-align:left'>{{escape(f'{{v:.2f}}' if isinstance(v, float) else str(v))}}</td>"
    head = "".join(f"<th style='text-align:left'>{{escape(k)}}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(cell(v) for v in row.values()) + "</tr>" for row in rows)
    display(HTML(f"<table><tr>{{head}}</tr>{{body}}</table>"))


print(f"OUT = {{OUT}}")
for stage in [s for s in {tiny} if Path(OUT, s, "ckpt.pt").is_file()]:
    print(f"  {{stage}}: {{changed_args(stage)}}")
'''

ABOUT_OUTPUTS = ("The outputs saved in this notebook come from `bash pipeline.sh` on a 2-core CPU, every script with "
                 "its default `Config`; the first cell prints each checkpoint's arguments. Without `../out` (or "
                 "`$RLHF_OUT`) it trains a tiny stand-in first, so every cell runs on a fresh clone in about a minute.")


def setup(needed, tiny=None):
    as_list = lambda names: "[" + ", ".join(f'"{n}"' for n in names) + "]"
    return new_code_cell(SETUP.format(needed=as_list(needed), tiny=as_list(tiny or needed)))


# -----------------------------------------------------------------------------
# 1. The model and sampling

NB1 = [
    new_markdown_cell(
        "# 1. The model and how it samples\n\n"
        "Every stage of RLHF trains the same GPT (`model.py`). Before the stages, two things the rest of the "
        "course leans on: how the model samples an answer (PPO's rollouts are samples) and what its attention "
        "looks at.\n\n" + ABOUT_OUTPUTS),
    setup(["sft"]),
    new_code_cell('''\
import time

import torch

import task
from data import EOS_ID, decode_answers, get_tokenizer
from model import policy_from_checkpoint

tok = get_tokenizer()
model = policy_from_checkpoint(load_checkpoint(f"{OUT}/sft/ckpt.pt", "sft")).eval()
print(model.config)
n_wte = model.transformer.wte.weight.numel()
print(f"{model.num_params() / 1e6:.2f}M parameters, of which the token embedding (tied with the output layer) "
      f"is {n_wte / 1e6:.2f}M")'''),
    new_markdown_cell(
        "Most of the tiny model is its token embedding: GPT-2's 50257-token vocabulary is kept so that the same "
        "code takes real GPT-2 weights, although the built-in task uses a few hundred words.\n\n"
        "## Temperature and top-k\n\n"
        "`generate` divides the logits by the temperature before the softmax. Temperature 0 is greedy (always "
        "the most likely token); 1 is the model's own distribution, the one SFT fitted and PPO samples and "
        "optimises; above 1 the distribution flattens towards the noise in its tail. Top-k keeps only the k "
        "most likely tokens, which cuts most of that tail. The gold score (`task.gold_score`, at best 3) says "
        "how good each answer is."),
    new_code_cell('''\
def sample(model, prompts, max_new_tokens=24, seed=0, **kwargs):
    """One answer per prompt, decoded without its EOS."""
    tokens, _, answer_mask = model.generate([tok.encode_ordinary(p) for p in prompts], max_new_tokens, EOS_ID,
                                            seed=seed, **kwargs)
    return decode_answers(tok, tokens, answer_mask)


settings = {"greedy": dict(temperature=0.0), "T=0.7": dict(temperature=0.7), "T=1": dict(temperature=1.0),
            "T=1.5": dict(temperature=1.5), "T=1, top-k 5": dict(temperature=1.0, top_k=5)}
prompts = task.make_prompts(3, "eval", seed=0)  # held-out: never seen in training
many = task.make_prompts(128, "eval", seed=1)
rows, means = [], []
for name, kwargs in settings.items():
    for p, a in zip(prompts, sample(model, prompts, **kwargs)):
        rows.append({"setting": name, "prompt": task.parse_prompt(p).request, "answer": repr(a), "gold": task.gold_score(p, a)})
    gold = [task.gold_score(p, a) for p, a in zip(many, sample(model, many, seed=1, **kwargs))]
    means.append({"setting": name, f"mean gold, {len(many)} held-out prompts": sum(gold) / len(gold)})
table(rows)
table(means)'''),
    new_markdown_cell(
        "Lower temperatures trade variety for quality. PPO nevertheless samples at temperature 1: it improves "
        "the policy itself, and needs the answers the policy would really give, bad ones included, to learn "
        "which to make less likely.\n\n"
        "## Why a KV cache\n\n"
        "Without a cache every new token runs the whole sequence through the model again, so an answer of n "
        "tokens costs about n times the prompt's work again and again. The cache keeps each layer's keys and "
        "values, and each step runs one new position. The tokens must come out the same (greedy, so there is "
        "no randomness to differ in):"),
    new_code_cell('''\
@torch.no_grad()
def greedy_without_cache(model, prompt_ids, max_new_tokens):
    idx = torch.tensor([prompt_ids])
    for _ in range(max_new_tokens):
        next_token = model(idx)[:, -1].argmax(-1, keepdim=True)  # the whole sequence, every step
        idx = torch.cat([idx, next_token], dim=1)
        if next_token.item() == EOS_ID:
            break
    return idx[0, len(prompt_ids):].tolist()


prompt_ids = tok.encode_ordinary(prompts[0])
t0 = time.time()
plain = greedy_without_cache(model, prompt_ids, 40)
t1 = time.time()
tokens, _, answer_mask = model.generate([prompt_ids], 40, EOS_ID, temperature=0.0)
t2 = time.time()
cached = tokens[0, answer_mask[0].bool()].tolist()
print(f"same tokens: {plain == cached} ({len(cached)} tokens: {tok.decode(cached)!r})")
print(f"without cache {1000 * (t1 - t0):.0f} ms, with cache {1000 * (t2 - t1):.0f} ms")'''),
    new_markdown_cell(
        "On a model this small and answers this short the times are close: Python overhead dominates. The "
        "cache pays off with long sequences and big models, where re-running the prefix is most of the work.\n\n"
        "## Attention\n\n"
        "One head of the last layer on a prompt and a good answer. Row i is the query token i, column j the key "
        "it attends to; everything above the diagonal is the causal mask (a token cannot see its future). "
        "Change `layer` and `head` to see how heads specialise."),
    new_code_cell("plots.plot_attention(OUT, layer=None, head=0);"),
]

# -----------------------------------------------------------------------------
# 2. SFT

NB2 = [
    new_markdown_cell(
        "# 2. Supervised fine-tuning\n\n"
        "`train_sft.py` trains the GPT to imitate demonstrations, with the cross-entropy on answer tokens only. "
        "The loss says how well it imitates; the gold score of its sampled answers (held-out prompts, "
        "temperature 1) says how good the imitation is.\n\n" + ABOUT_OUTPUTS),
    setup(["sft"]),
    new_code_cell("plots.plot_sft(OUT);"),
    new_markdown_cell(
        "The demonstrations are of mixed quality on purpose (their mean gold score is about 1.9 of a possible "
        "3.0). Imitation learns their distribution, flaws included, and a small model learns it imperfectly, so "
        "the gold score of its samples stays below even the demonstrations' average. Going beyond the "
        "demonstrators is what the reward model and PPO are for.\n\n"
        "## Before and after\n\n"
        "The same held-out prompts answered by an untrained GPT of the same shape and by the SFT model, both "
        "sampled at temperature 1:"),
    new_code_cell('''\
import torch

import task
from data import get_tokenizer
from model import GPT, GPTConfig, policy_from_checkpoint
from train_sft import sample_answers

tok = get_tokenizer()
ckpt = load_checkpoint(f"{OUT}/sft/ckpt.pt", "sft")
sft = policy_from_checkpoint(ckpt).eval()
torch.manual_seed(ckpt["train_args"]["seed"])
untrained = GPT(GPTConfig(**ckpt["model_config"])).eval()

prompts = task.make_prompts(8, "eval", seed=0)
before = sample_answers(untrained, tok, prompts, 64, 24, 1.0, seed=0)
after = sample_answers(sft, tok, prompts, 64, 24, 1.0, seed=0)
table([{"prompt": task.parse_prompt(p).request, "untrained": repr(b), "gold before": task.gold_score(p, b),
        "SFT": repr(a), "gold after": task.gold_score(p, a)} for p, b, a in zip(prompts, before, after)])'''),
    new_markdown_cell(
        "## Which parts of the judge SFT satisfies\n\n"
        "The gold score is a sum of named terms (`task.gold_terms`). Their means over many held-out prompts, "
        "for the demonstrations themselves and for the SFT model's samples, show what imitation picked up. In "
        "the run saved here the form (topic, capital, period) is learned almost as well as the demonstrators "
        "do it, and the penalties are copied too; the content lags: the model knows that an answer names a mood "
        "or a colour before it knows which one."),
    new_code_cell('''\
def mean_terms(pairs):
    terms = [task.gold_terms(p, a) for p, a in pairs]
    return {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]} | {"gold": sum(task.gold_score(p, a) for p, a in pairs) / len(pairs)}


many = task.make_prompts(256, "eval", seed=1)
demos = [(r["prompt"], r["response"]) for r in task.demonstrations(256, "eval", seed=1)]
samples = list(zip(many, sample_answers(sft, tok, many, 64, 24, 1.0, seed=1)))
table([{"answers": "demonstrations", **mean_terms(demos)}, {"answers": "SFT samples", **mean_terms(samples)}])'''),
]

# -----------------------------------------------------------------------------
# 3. The reward model

NB3 = [
    new_markdown_cell(
        "# 3. The reward model\n\n"
        "`train_reward.py` turns the SFT model into a scalar scorer and fits it to noisy comparisons with the "
        "Bradley-Terry loss. Two accuracies matter: against the labels it was trained on (noisy, so they cap it), "
        "and against the gold judge the labellers were trying to follow.\n\n" + ABOUT_OUTPUTS),
    setup(["sft", "reward"]),
    new_code_cell("plots.plot_reward_model(OUT);"),
    new_markdown_cell(
        "The simulated labellers agree with the gold judge on only about 77% of pairs, so no reward model can "
        "score much higher on their labels. Agreement with the gold judge can be higher than the label "
        "accuracy: the noise of many labels averages out. Only differences of rewards are trained; the offset "
        "sets the SFT policy's own answers to 0, the scale PPO starts from.\n\n"
        "## Held-out pairs\n\n"
        "Each row is one labelled comparison the reward model never trained on. `label ok`: the reward model "
        "prefers the labeller's choice; `gold ok`: it orders the pair as the gold judge does (a gold tie says "
        "nothing)."),
    new_code_cell('''\
import torch

import task
from data import Truncation, get_tokenizer
from model import model_from_checkpoint
from train_reward import reward_batch

tok = get_tokenizer()
ckpt = load_checkpoint(f"{OUT}/reward/ckpt.pt", "reward")
rm = model_from_checkpoint(ckpt).eval()
cfg = train_reward.Config(**ckpt["train_args"])
trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)


@torch.no_grad()
def rewards(prompt, answers):
    return rm(*reward_batch([(prompt, answers, None)], tok, trunc, "cpu")).tolist()


rows = []
for r in task.preferences(10, "eval", seed=cfg.seed + 3, noise=cfg.label_noise):  # the eval split train_reward.py uses
    (r_c, r_r), (g_c, g_r) = rewards(r["prompt"], [r["chosen"], r["rejected"]]), (r["chosen_score"], r["rejected_score"])
    rows.append({"prompt": task.parse_prompt(r["prompt"]).request, "chosen": repr(r["chosen"]), "rejected": repr(r["rejected"]),
                 "r_chosen": r_c, "r_rejected": r_r, "gold chosen": g_c, "gold rejected": g_r,
                 "label ok": r_c > r_r, "gold ok": "tie" if g_c == g_r else (r_c > r_r) == (g_c > g_r)})
table(rows)'''),
    new_markdown_cell(
        "## Off the map\n\n"
        "The comparisons only contain answers like the demonstrators' own. Answers nobody labelled are where "
        "a reward model guesses, and where PPO will look for reward. A few hand-written answers to one prompt, "
        "from ideal to absurd, with the reward model's score beside the gold judge's:"),
    new_code_cell('''\
prompt = task.format_prompt("Write a happy sentence about the sea.")
answers = [task.reference_answer(prompt), " The sea is happy.", " The sea is happy and bright and lovely and sunny.",
           " The sea is happy happy bright bright lovely lovely lovely.", " The sea is sad.", " The sea.",
           " happy happy happy happy happy happy happy happy", " A banana is yellow."]
table([{"answer": repr(a), "reward model": r, "gold": task.gold_score(prompt, a)} for a, r in zip(answers, rewards(prompt, answers))])'''),
    new_markdown_cell(
        "Wherever the two orders disagree (in the run saved here, the bare `' The sea.'` outscores the ideal "
        "answer), PPO can gain reward without gaining gold. Notebook 4 shows a policy that does."),
]

# -----------------------------------------------------------------------------
# 4. PPO

NB4 = [
    new_markdown_cell(
        "# 4. PPO\n\n"
        "`train_ppo.py` samples answers from the policy, scores them with the reward model, and pushes the "
        "policy towards the better ones, while a per-token KL penalty holds it near the SFT model. The reward "
        "model's score is what PPO optimises; the gold score is what we actually wanted.\n\n" + ABOUT_OUTPUTS),
    setup(["sft", "reward", "ppo"], ["sft", "reward", "ppo", "ppo_nokl"]),
    new_code_cell("plots.plot_ppo(OUT);"),
    new_markdown_cell(
        "The KL is the price of the improvement: each nat of it is paid, `kl_coef` per nat, out of the reward. "
        "While the reward model is right about the answers the policy moves to, reward-model score and gold "
        "score rise together.\n\n"
        "## Reward hacking\n\n"
        "The same run without the KL penalty (`--kl_coef 0`, `OUT/ppo_nokl`, if the pipeline made it). Nothing "
        "keeps the policy among the answers the reward model was trained on, so it drifts to wherever the "
        "reward model over-rates answers: the reward-model score keeps rising while the gold score falls."),
    new_code_cell('''\
from pathlib import Path

if Path(OUT, "ppo_nokl", "metrics.jsonl").is_file():
    plots.plot_reward_hacking(OUT)
else:
    print(f"no {OUT}/ppo_nokl: run  python train_ppo.py --kl_coef 0 --iterations 60 --out_dir {OUT}/ppo_nokl")'''),
    new_markdown_cell(
        "## Before and after\n\n"
        "The same held-out prompts answered by the SFT model (PPO's start and its reference), by the PPO "
        "policy, and by the policy trained without the KL penalty, all sampled at temperature 1 with the same "
        "seed, with the reward model's score and the gold judge's for each answer. In the run saved here the "
        "policy without the leash answers in strings of digits and stock words, which the reward model rates "
        "above the SFT model's answers and the gold judge below them."),
    new_code_cell('''\
import torch

import task
from data import Truncation, get_tokenizer
from model import model_from_checkpoint, policy_from_checkpoint
from train_reward import reward_batch
from train_sft import sample_answers

tok = get_tokenizer()
ppo_ckpt = load_checkpoint(f"{OUT}/ppo/ckpt.pt", "ppo")
cfg = train_ppo.Config(**ppo_ckpt["train_args"])
policies = {"SFT": policy_from_checkpoint(load_checkpoint(f"{OUT}/sft/ckpt.pt", "sft")), "PPO": policy_from_checkpoint(ppo_ckpt)}
if Path(OUT, "ppo_nokl", "ckpt.pt").is_file():
    policies["PPO, kl_coef 0"] = policy_from_checkpoint(load_checkpoint(f"{OUT}/ppo_nokl/ckpt.pt", "ppo"))
rm = model_from_checkpoint(load_checkpoint(f"{OUT}/reward/ckpt.pt", "reward")).eval()


@torch.no_grad()
def answer_and_score(policy, prompts, seed=0):
    answers = sample_answers(policy.eval(), tok, prompts, cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.temperature, seed)
    groups = [(p, [a], None) for p, a in zip(prompts, answers)]
    r = rm(*reward_batch(groups, tok, Truncation(cfg.max_prompt_tokens, cfg.max_new_tokens + 1), "cpu")).tolist()
    return answers, r, [task.gold_score(p, a) for p, a in zip(prompts, answers)]


prompts = task.make_prompts(6, "eval", seed=0)
results = {name: answer_and_score(policy, prompts) for name, policy in policies.items()}
table([{"prompt": task.parse_prompt(p).request if name == "SFT" else "", "policy": name, "answer": repr(answers[i]),
        "reward model": r[i], "gold": gold[i]}
       for i, p in enumerate(prompts) for name, (answers, r, gold) in results.items()])

many = task.make_prompts(128, "eval", seed=1)
means = []
for name, policy in policies.items():
    answers, r, gold = answer_and_score(policy, many, seed=1)
    means.append({"policy": name, "mean reward model": sum(r) / len(r), "mean gold": sum(gold) / len(gold),
                  "mean words": sum(len(a.split()) for a in answers) / len(answers)})
table(means)'''),
    new_markdown_cell(
        "## What the rollouts looked like\n\n"
        "`train_ppo.py` logs a few of its training samples (`samples.jsonl`) every `sample_interval` iterations; "
        "the first and the last logged iteration of each run:"),
    new_code_cell('''\
for run in ["ppo", "ppo_nokl"]:
    log = plots.read_log(Path(OUT, run, "samples.jsonl"))
    if log:
        steps = sorted({s["step"] for s in log})
        table([{"run": run, "iteration": s["step"], "prompt": task.parse_prompt(s["prompt"]).request,
                "answer": repr(s["answer"]), "reward": s["reward"], "gold": s["gold"]}
               for s in log if s["step"] in (steps[0], steps[-1])])'''),
]

NOTEBOOKS = {"1_model_and_sampling": NB1, "2_sft": NB2, "3_reward_model": NB3, "4_ppo": NB4}


def main(execute=False):
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        if execute:
            from nbclient import NotebookClient

            NotebookClient(nb, kernel_name="python3", timeout=1200, record_timing=False,
                           resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"wrote {HERE / name}.ipynb" + (" with outputs" if execute else ""))


if __name__ == "__main__":
    main(execute="--execute" in sys.argv[1:])
