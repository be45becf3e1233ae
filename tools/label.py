"""
Be the labeller: rank a policy's answers (or a file's) by hand in the terminal. Each judgement is appended
to a JSONL file in the rankings format that train_reward.py reads, so your labels can train a reward model.

    python tools/label.py --policy out/sft/ckpt.pt              # 10 prompts of the built-in task, 2 answers each
    python tools/label.py --policy out/ppo/ckpt.pt --k 4 --n 50 --out round2.jsonl
    python tools/label.py --policy out/sft/ckpt.pt --prompts my_prompts.jsonl --n 0      # every prompt of a file
    python tools/label.py --candidates ../shared/data/preferences_sample.jsonl    # judge a data set's answers again
    python train_reward.py --data labels.jsonl --out_dir out/reward_mine         # a reward model of them alone
    python train_reward.py --extra_data labels.jsonl --out_dir out/reward_both   # or beside the simulated labellers
    printf '21\\nt\\n' | python tools/label.py --policy out/sft/ckpt.pt    # stdin may be a pipe or a file

Keys, each followed by Enter:
    213   your ranking, best first: answer 2, then 1, then 3 (every answer once); with two answers a
          single digit, 2, says which one is better
    t     a tie: no answer is better      s   skip: you cannot tell
    q     quit (so do Ctrl-C and the end of the input)       ?   help

One line per judgement, written and flushed at once:
    a ranking      {"prompt", "answers": [best first, ...], "labeller": "human"}
    a tie, a skip  {"prompt", "answers": [as shown], "tie": true, ...}, or "skip": true
data.load_preferences skips ties and skips: they teach no order, but they are your place in the file.
The prompts and their answers are a fixed function of the flags (the seed), so running the same command
again finds its judgements in --out and goes on with the next prompt: stopping loses only the prompt on
the screen. A file's answers (--candidates) are shown in a shuffled order, since a file often stores
them best first and the first answer shown would lead you.

On the built-in task the gold judge (task.gold_score) scores each answer once you have judged it, and
the tool counts how often your order agrees with the judge's, over the pairs it tells apart: how noisy
are the simulated labellers of train_reward.py (--label_noise) compared with you?
"""

import json
import os
import random
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py and support/ are one folder up
from support import task
from support.checkpoint import load_checkpoint, policy_from_checkpoint
from support.data import Tokenizer, Truncation, encode_prompt, load_preferences, load_prompts, read_jsonl
from support.sampling import sample_answers
from support.errors import UsageError
from support.training import check, check_flags, flag, parse_args, pick_device, run

MAX_K = 4  # as many answers as one can read at once and rank by one key each
PROMPT = "rank> "
KEYS = "a ranking best first (e.g. 213), t tie, s skip, q quit, ? help"
HELP = """keys, each followed by Enter:
  213  your ranking, best first: here 2 is best, then 1, then 3; every answer once
  2    with two answers: 2 is the better one (the same as 21)
  t    a tie: no answer is better (written down; reward training skips it)
  s    skip: you cannot tell (written down, so the session moves on; reward training skips it)
  q    quit: nothing is written for this prompt; run the same command to continue (so do Ctrl-C and the end
       of the input)
On the built-in task, the gold judge's scores are shown after each judgement, never before it."""


@dataclass
class Config:
    """Rank a policy's sampled answers (or a file's) by hand; each judgement is appended to --out as a ranking."""

    policy: str = flag("", "sft or ppo ckpt.pt whose sampled answers you rank")
    candidates: str = flag("", "instead of --policy: a preference JSONL (pairs, rankings, HH-RLHF, TL;DR) whose "
                           "answers you rank again, shown in a shuffled order")
    prompts: str = flag("", "with --policy: a JSONL of prompts (any format with prompts) instead of the built-in "
                        "task's training prompts")
    out: str = flag("labels.jsonl", "JSONL your judgements are appended to; the same command continues a session")
    n: int = flag(10, "prompts in the session; from --prompts or --candidates the file's first n (0: all)")
    k: int = flag(2, "with --policy: answers sampled per prompt, 2 to 4")
    temperature: float = flag(1.0, "with --policy: sampling temperature; 1.0 samples the policy itself")
    max_new_tokens: int = flag(32, "with --policy: longest answer, in tokens")
    seed: int = flag(1337, "which prompts, answers and shuffles: the same seed gives the same session", min=0,
                     max=2**31 - 1)
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention implementation", choices=("auto", "triton", "sdpa", "naive"))


def check_config(cfg):
    check_flags(cfg)
    check(bool(cfg.policy) != bool(cfg.candidates),
          "pass --policy CKPT (rank its sampled answers) or --candidates FILE (rank a file's answers), one of them")
    check(not cfg.prompts or cfg.policy, "--prompts goes with --policy (--candidates files bring their own prompts)")
    check(2 <= cfg.k <= MAX_K, f"--k must be 2 to {MAX_K} (answers you rank with one key each), got {cfg.k}")
    check(cfg.n > 0 or (cfg.n == 0 and (cfg.prompts or cfg.candidates)),
          f"--n must be positive (0, all of it, needs --prompts or --candidates), got {cfg.n}")
    check(cfg.temperature > 0, f"--temperature must be positive (greedy sampling gives {cfg.k} copies of one answer), "
                               f"got {cfg.temperature}")
    check(cfg.max_new_tokens > 0, f"--max_new_tokens must be positive, got {cfg.max_new_tokens}")
    check(not Path(cfg.out).is_dir(), f"--out {cfg.out} is a folder; name a JSONL file")
    check(not cfg.candidates or Path(cfg.out).resolve() != Path(cfg.candidates).resolve(),
          "--out must not be the --candidates file: your judgements would be mixed with the answers they judge")


def check_stdin():
    """A terminal, a file or a pipe, once there is a question to ask. A job started without input gets
    /dev/null (a character device, like a terminal, but not one) or a socket: the session would end at once,
    before the first key, unexplained."""
    try:
        tty, mode = sys.stdin.isatty(), os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no stdin at all, or a closed one
        tty, mode = False, 0
    if not (tty or stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise UsageError("stdin is neither a terminal, a file nor a pipe; run tools/label.py in a terminal or pipe the "
                         "keys in (e.g. printf '21\\n12\\n' | python tools/label.py ...)")


# -----------------------------------------------------------------------------
# The pieces: the session's items, the keys, the judge's agreement, the place in the file


def distinct(answers):
    """Each answer once, in order, empty ones dropped (load_preferences would skip a ranking holding one)."""
    return list(dict.fromkeys(a for a in answers if a.strip()))


def policy_items(cfg, device):
    """(prompt, answers) for the session: K samples per prompt, all drawn up front in batches with one seed,
    so a prompt's answers do not depend on where a session resumed."""
    ckpt = load_checkpoint(cfg.policy, ("sft", "ppo"))
    tok = Tokenizer.from_state(ckpt["tokenizer"])
    model = policy_from_checkpoint(ckpt, cfg.attn_impl).to(device).eval()
    block = model.config.block_size
    check(cfg.max_new_tokens < block, f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                                      f"{cfg.policy}'s block size {block}")
    if cfg.prompts:
        prompts = load_prompts(cfg.prompts, "--prompts")[: cfg.n or None]
    else:
        prompts = task.make_prompts(cfg.n, "train", cfg.seed)
    trunc = Truncation(block - cfg.max_new_tokens, cfg.max_new_tokens)
    prompt_ids = [encode_prompt(tok, p, trunc, cfg.prompts or "prompt") for p in prompts]
    if trunc.prompts_cut:
        print(trunc.report())
    print(f"sampling {cfg.k} answers to each of {len(prompts)} prompts from {cfg.policy} ({ckpt['stage']}, step "
          f"{ckpt['step']})")
    samples = sample_answers(model, [ids for ids in prompt_ids for _ in range(cfg.k)], cfg.max_new_tokens,
                             tok.eos_id, cfg.temperature, cfg.seed)
    return [(p, distinct(tok.decode_answer(a) for a in samples[i * cfg.k : (i + 1) * cfg.k]))
            for i, p in enumerate(prompts)]


def candidate_items(records, n, seed):
    """(prompt, answers) for the session from preference records: the first n (0: all), each record's answers
    in a shuffled order, since a file often stores them best first; at most MAX_K of them, drawn at random."""
    items = []
    for i, record in enumerate(records[: n or None]):
        answers = distinct(record["answers"])
        random.Random(f"label:{seed}:{i}").shuffle(answers)  # seeded per record: the same order on resume
        items.append((record["prompt"], answers[:MAX_K]))
    return items


def parse_key(line, k):
    """What one line of input asks, with k answers shown: ("rank", answer indices best first), ("tie", None),
    ("skip", None), ("quit", None) or ("help", None); None for a line that is not a key."""
    key = "".join(line.split()).lower()
    if key in ("t", "s", "q", "?"):
        return {"t": "tie", "s": "skip", "q": "quit", "?": "help"}[key], None
    if not key or any(c not in "123456789"[:k] for c in key) or len(set(key)) != len(key):
        return None
    order = [int(c) - 1 for c in key]
    if len(order) == k:
        return "rank", order
    if k == 2 and len(order) == 1:  # the better of two says the whole ranking
        return "rank", [order[0], 1 - order[0]]
    return None


def keys_hint(k):
    example = {2: "2 (or 21)", 3: "213", 4: "2143"}[k]
    return f"rank the {k} answers best first, each once, e.g. {example}; or t tie, s skip, q quit, ? help"


def gold_scores(prompt, answers):
    """The gold judge's score of each answer on a prompt of the built-in task, else None."""
    gold = [task.gold_or_none(prompt, a) for a in answers]
    return None if None in gold else gold


def gold_agreement(order, gold):
    """(agreed, pairs): over the pairs that the gold judge tells apart (different gold scores), how many
    the ranking `order` (answer indices best first) puts in the judge's order."""
    agreed = pairs = 0
    for place, i in enumerate(order):
        for j in order[place + 1 :]:
            if gold[i] != gold[j]:
                pairs += 1
                agreed += gold[i] > gold[j]
    return agreed, pairs


def judgement(prompt, answers, action, order):
    """The JSONL record of one judgement: a ranking best first, or a tie or skip of the answers as shown."""
    if action == "rank":
        return {"prompt": prompt, "answers": [answers[i] for i in order], "labeller": "human"}
    return {"prompt": prompt, "answers": answers, action: True, "labeller": "human"}


def append_judgement(path, record):
    """Append one judgement to the labels file, on disk at once: the file is the session's state. The file is
    made at the first judgement, so a session that judged nothing leaves none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    glued = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        if glued:
            f.write("\n")  # a last line saved without its newline: ours must not be glued to it
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_labels(path):
    """The judgements in a labels file (none if it is missing or empty), as (prompt, answers, record): lines
    without a text prompt and a list of answers, if any, are not judgements. A line that is not JSON is
    an error naming it (a silent restart would ask every question again)."""
    path = Path(path)
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        return []
    return [(obj["prompt"], [str(a) for a in obj["answers"]], obj) for _, obj in read_jsonl(path)
            if isinstance(obj.get("prompt"), str) and isinstance(obj.get("answers"), list)]


def judged(labels, items):
    """How many of the session's items, from the first, already have a judgement among the labels. These
    are matched to the items in order, by prompt and answers: a judgement of another session (another
    seed, policy or file) matches none, so one file can gather many sessions."""
    done = 0
    for prompt, answers, _ in labels:
        if done < len(items) and (prompt, sorted(answers)) == (items[done][0], sorted(items[done][1])):
            done += 1
    return done


def file_agreement(labels):
    """(rankings, agreed, pairs) over the rankings of the built-in task among the labels."""
    rankings = agreed = pairs = 0
    for prompt, answers, obj in labels:
        gold = gold_scores(prompt, answers)
        if gold is not None and not obj.get("tie") and not obj.get("skip"):
            rankings += 1
            a, p = gold_agreement(range(len(gold)), gold)  # stored best first
            agreed, pairs = agreed + a, pairs + p
    return rankings, agreed, pairs


def agreed_text(agreed, pairs):
    return f"{agreed} of {pairs} pairs ({agreed / pairs:.0%})"


# -----------------------------------------------------------------------------
# The session


def ask(k):
    """The next judgement from stdin; a bad key or ? prints a line and asks again. The end of the input and
    Ctrl-C quit. Without a terminal the key is echoed, so that the output reads as a session."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(PROMPT) if interactive else input()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return "quit", None
        if not interactive:
            print(PROMPT + line)
        key = parse_key(line, k)
        if key is None:
            print(f"({line.strip()!r} is not a key here: {keys_hint(k)})")
        elif key[0] == "help":
            print(HELP)
        else:
            return key


def session(cfg, device):
    """Show each prompt not yet judged in --out, ask, append the judgement; the agreement with the gold
    judge as it goes and at the end."""
    if cfg.policy:
        items = policy_items(cfg, device)
    else:
        items = candidate_items(load_preferences(cfg.candidates, "--candidates"), cfg.n, cfg.seed)
    n_all, items = len(items), [item for item in items if len(item[1]) >= 2]
    check(items, f"none of the {n_all} prompts has 2 distinct answers to rank"
          + (": try a higher --temperature" if cfg.policy else ""))
    if len(items) < n_all:
        print(f"({n_all - len(items)} of {n_all} prompts passed over: fewer than 2 distinct answers"
              + (", try a higher --temperature)" if cfg.policy else ")"))
    done = judged(read_labels(cfg.out), items)
    if done:
        print(f"resuming: {done} judgement{'s' * (done > 1)} already in {cfg.out}")
    if done < len(items):
        check_stdin()  # only now: a finished session needs no keys, whatever its stdin
        print(f"keys: {KEYS}")
    agreed = pairs = 0
    for number, (prompt, answers) in enumerate(items[done:], start=done + 1):
        print(f"\n[{number}/{len(items)}] {prompt}")
        for i, answer in enumerate(answers, start=1):
            print(f"  {i}) " + answer.strip().replace("\n", "\n     "))
        action, order = ask(len(answers))
        if action == "quit":
            print(f"stopped at prompt {number} of {len(items)}, nothing written for it; {number - 1} judged in "
                  f"{cfg.out}: run the same command to continue")
            break
        append_judgement(cfg.out, judgement(prompt, answers, action, order))
        gold = gold_scores(prompt, answers)
        if gold is not None:  # only now: shown before, the judge's scores would make the judgement
            line = "gold: " + "  ".join(f"{i}) {g:+.2f}" for i, g in enumerate(gold, start=1))
            if action == "rank":
                a, p = gold_agreement(order, gold)
                agreed, pairs = agreed + a, pairs + p
                line += f"; you agreed on {a} of {p} pairs here" if p else "; it tells none of them apart"
                line += f", {agreed_text(agreed, pairs)} so far" if pairs else ""
            print(line)
    else:
        print(f"\nall {len(items)} prompts of this session are judged in {cfg.out}"
              + ("; another --seed gives new ones" if cfg.policy and not cfg.prompts else ""))
    if pairs:
        print(f"this session, you agreed with the gold judge on {agreed_text(agreed, pairs)}")
    rankings, file_agreed, file_pairs = file_agreement(read_labels(cfg.out))
    if file_pairs:
        print(f"{cfg.out} as a whole ({rankings} ranking{'s' * (rankings > 1)} on the built-in task): agreed with the "
              f"gold judge on {agreed_text(file_agreed, file_pairs)}")


def main(cfg):
    check_config(cfg)
    device = pick_device(cfg.device, cfg.attn_impl)
    try:
        session(cfg, device)
    except KeyboardInterrupt:  # Ctrl-C outside a question (at one, ask() quits); run() would advise --resume
        print(f"\nstopped; every judgement made is in {cfg.out}: run the same command to continue")


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
