"""
Data for every stage: the GPT-2 tokenizer (offline), readers for the real JSONL formats, and the
tokenize / truncate / pad steps that turn text into batches.

Formats read (one JSON object per line; blank lines are skipped):
    demonstrations   {"prompt", "response"}                                  -> SFT
    TL;DR            {"subreddit", "title", "post", "summary"}               -> SFT
    (and any preference format below: SFT takes its chosen answers)
    preferences      {"prompt", "chosen", "rejected"[, "chosen_score", "rejected_score"]} -> reward model
    HH-RLHF          {"chosen", "rejected"}: full dialogues, split at the last "\n\nAssistant:"
    TL;DR compared   {"info": {...}, "summaries": [{"text"}, {"text"}], "choice": 0 | 1}
Every record becomes a dict with the generic keys (prompt/response or prompt/chosen/rejected).
"""

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from model import LoadError

REPO = Path(__file__).resolve().parent
SHARED_DATA = REPO.parent / "shared" / "data"
EOS_ID = 50256  # <|endoftext|>: the end of every answer, and the padding token
ASSISTANT = "\n\nAssistant:"


class DataError(LoadError):
    """A data file that cannot be used as it is; the message names the file (and line) and the fix."""


# -----------------------------------------------------------------------------
# Tokenizer

GPT2_BPE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
_tokenizer = None


def get_tokenizer():
    """tiktoken's GPT-2 encoding, loaded only from a local cache (TIKTOKEN_CACHE_DIR, by default the
    shared folder beside this repository): a machine without internet gets one clear line, not a
    network traceback."""
    global _tokenizer
    if _tokenizer is None:
        cache = os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
        missing = [f for f in GPT2_BPE_FILES if not (Path(cache) / f).is_file()]
        if missing:
            raise DataError(
                f"GPT-2 tokenizer files not found in TIKTOKEN_CACHE_DIR={cache}; point it at a folder holding "
                f"{' and '.join(GPT2_BPE_FILES)} (the two GPT-2 BPE files, see ../shared/data/README.md)"
            )
        import tiktoken

        _tokenizer = tiktoken.get_encoding("gpt2")
    return _tokenizer


# -----------------------------------------------------------------------------
# JSONL readers


def read_jsonl(path):
    """(line number, object) for each non-blank line; any other line is an error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file; pass a JSONL file, or --data default for the built-in task")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got a {type(obj).__name__}")
            records.append((lineno, obj))
    if not records:
        raise DataError(f"{path}: the file holds no records")
    return records


def _fields(path, lineno, obj, required, optional=()):
    """Check that `required` are strings and `optional` (if present) numbers; name the line if not."""
    for key in required:
        if key not in obj:
            raise DataError(f"{path}:{lineno}: missing field '{key}' (expected {', '.join(required)})")
        if not isinstance(obj[key], str):
            raise DataError(f"{path}:{lineno}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    for key in optional:
        if key in obj and (isinstance(obj[key], bool) or not isinstance(obj[key], (int, float))):
            raise DataError(f"{path}:{lineno}: field '{key}' must be a number, got {type(obj[key]).__name__}")


def tldr_prompt(subreddit, title, post):
    """The usual TL;DR prompt (OpenAI's summarize-from-feedback); the summary follows with a space."""
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def split_dialogue(path, lineno, chosen, rejected):
    """HH-RLHF stores two full dialogues that share everything up to an assistant turn: the shared part,
    up to and including the last "\n\nAssistant:" they have in common, is the prompt; the rest of each
    is its answer. (Usually that is the last turn; a few real rows continue the chosen dialogue longer.)"""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common) + len(ASSISTANT)
    if cut < len(ASSISTANT):
        raise DataError(f"{path}:{lineno}: 'chosen' and 'rejected' do not share a prompt ending in '\\n\\nAssistant:'")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def load_demonstrations(path):
    """SFT data: {prompt, response} lines, TL;DR {subreddit, title, post, summary} lines, or preference
    data (generic or HH-RLHF), whose chosen answer is taken as the demonstration, as is usual for SFT
    on HH-RLHF."""
    out = []
    for lineno, obj in read_jsonl(path):
        if "response" not in obj and "chosen" in obj:
            _fields(path, lineno, obj, ("chosen", "rejected"))
            if "prompt" in obj:
                _fields(path, lineno, obj, ("prompt",))
                out.append({"prompt": obj["prompt"], "response": obj["chosen"]})
            else:
                prompt, chosen, _ = split_dialogue(path, lineno, obj["chosen"], obj["rejected"])
                out.append({"prompt": prompt, "response": chosen})
        elif "summary" in obj and "post" in obj:
            _fields(path, lineno, obj, ("subreddit", "title", "post", "summary"))
            out.append({"prompt": tldr_prompt(obj["subreddit"], obj["title"], obj["post"]), "response": obj["summary"]})
        else:
            _fields(path, lineno, obj, ("prompt", "response"))
            out.append({"prompt": obj["prompt"], "response": obj["response"]})
    return out


def load_preferences(path):
    """Reward-model data: generic {prompt, chosen, rejected[, scores]}, HH-RLHF dialogues, or TL;DR
    comparisons, each line recognised by its keys."""
    out = []
    for lineno, obj in read_jsonl(path):
        if "summaries" in obj:  # TL;DR comparisons
            info, summaries, choice = obj.get("info"), obj.get("summaries"), obj.get("choice")
            if not isinstance(info, dict) or not isinstance(summaries, list) or len(summaries) != 2 or choice not in (0, 1):
                raise DataError(f"{path}:{lineno}: a TL;DR comparison needs 'info', two 'summaries' and 'choice' 0 or 1")
            _fields(path, lineno, info, ("subreddit", "title", "post"))
            for s in summaries:
                if not isinstance(s, dict):
                    raise DataError(f"{path}:{lineno}: each summary must be an object with a 'text'")
                _fields(path, lineno, s, ("text",))
            prompt = tldr_prompt(info["subreddit"], info["title"], info["post"])
            out.append({"prompt": prompt, "chosen": summaries[choice]["text"], "rejected": summaries[1 - choice]["text"]})
        elif "prompt" not in obj and "chosen" in obj:  # HH-RLHF
            _fields(path, lineno, obj, ("chosen", "rejected"))
            prompt, chosen, rejected = split_dialogue(path, lineno, obj["chosen"], obj["rejected"])
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            _fields(path, lineno, obj, ("prompt", "chosen", "rejected"), ("chosen_score", "rejected_score"))
            record = {k: obj[k] for k in ("prompt", "chosen", "rejected")}
            if "chosen_score" in obj and "rejected_score" in obj:
                record["chosen_score"] = float(obj["chosen_score"])
                record["rejected_score"] = float(obj["rejected_score"])
            out.append(record)
    return out


def load_prompts(path):
    """Prompts for PPO from any of the formats above (only the prompt is kept), or {prompt} lines."""
    out = []
    for lineno, obj in read_jsonl(path):
        if "prompt" in obj:
            _fields(path, lineno, obj, ("prompt",))
            out.append(obj["prompt"])
        elif "post" in obj:
            _fields(path, lineno, obj, ("subreddit", "title", "post"))
            out.append(tldr_prompt(obj["subreddit"], obj["title"], obj["post"]))
        elif "chosen" in obj:
            _fields(path, lineno, obj, ("chosen", "rejected"))
            out.append(split_dialogue(path, lineno, obj["chosen"], obj["rejected"])[0])
        else:
            raise DataError(f"{path}:{lineno}: no 'prompt' (or TL;DR 'post', or HH 'chosen') field")
    return out


# -----------------------------------------------------------------------------
# Tokenize, truncate, pad


@dataclass
class Truncation:
    """Explicit truncation rules, and a count of what they cut, reported by the scripts."""

    max_prompt_tokens: int
    max_answer_tokens: int
    prompts_cut: int = 0
    answers_cut: int = 0
    seen: int = 0

    def report(self):
        return (f"truncation: {self.prompts_cut}/{self.seen} prompts cut to their last {self.max_prompt_tokens} tokens, "
                f"{self.answers_cut}/{self.seen} answers cut to their first {self.max_answer_tokens} tokens")


def encode_prompt(tok, prompt, trunc):
    ids = tok.encode_ordinary(prompt)
    if len(ids) > trunc.max_prompt_tokens:
        trunc.prompts_cut += 1
        ids = ids[-trunc.max_prompt_tokens :]  # keep the end: it is what the answer follows
    return ids


def encode_example(tok, prompt, answer, trunc):
    """(prompt ids, answer ids). The answer ends with EOS, the token that teaches the model to stop,
    unless it was cut: a cut answer must not teach stopping mid-sentence."""
    trunc.seen += 1
    prompt_ids = encode_prompt(tok, prompt, trunc)
    answer_ids = tok.encode_ordinary(answer)
    if len(answer_ids) + 1 > trunc.max_answer_tokens:
        trunc.answers_cut += 1
        return prompt_ids, answer_ids[: trunc.max_answer_tokens]
    return prompt_ids, answer_ids + [EOS_ID]


def decode_answers(tok, tokens, answer_mask):
    """The generated part of each row as text, without the EOS that ended it."""
    return [tok.decode([t for t, keep in zip(row, mask) if keep and t != EOS_ID])
            for row, mask in zip(tokens.tolist(), answer_mask.tolist())]


def pad_batch(sequences, pad_id=EOS_ID, side="right", device="cpu"):
    """A list of id lists -> (ids (B, T), attention_mask (B, T)), padded on the given side."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, s in enumerate(sequences):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[b, cols] = torch.tensor(s, dtype=torch.long)
        mask[b, cols] = 1
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# Running a stage: flags with help text, device, metrics log, progress


def flag(default, help):
    """A config field with its help text beside it; `--help` shows it."""
    return field(default=default, metadata={"help": help})


def parse_args(config_class, argv=None):
    """Command-line flags from a config dataclass: one --name per field, its help from flag(...)."""
    parser = argparse.ArgumentParser(description=config_class.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(config_class):
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return config_class(**vars(parser.parse_args(argv)))


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (the matmuls in bf16, the reductions and the weights in fp32); fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class MetricsLog:
    """Metrics appended as one JSON object per line: what the notebooks plot. On resume, the lines written
    after the checkpoint's step are dropped so that the log reads as one uninterrupted run."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """A one-line progress bar on a terminal (a plain line per update in a log file or notebook)."""

    def __init__(self, name, total, start=0):
        self.name, self.total, self.t0, self.start = name, total, time.time(), start
        self.tty = sys.stderr.isatty()

    def update(self, step, **metrics):
        done = step / max(self.total, 1)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        line = f"[{self.name}] [{bar}] {step}/{self.total} | {text} | {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def run(main):
    """Run a script's main; a LoadError (bad file, bad flag, wrong checkpoint) is one line, no traceback."""
    try:
        main()
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
