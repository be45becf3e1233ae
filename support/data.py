"""
Data for every stage: the tokenizer, readers for the real JSONL formats, and the tokenize / truncate /
pad steps that turn text into batches.

Formats read (one JSON object per line, UTF-8; blank lines are skipped):
    demonstrations   {"prompt", "response"}                                  -> SFT
    TL;DR            {"subreddit", "title", "post", "summary"}               -> SFT
    (and any preference format below: SFT takes its chosen answers)
    preferences      {"prompt", "chosen", "rejected"[, "chosen_score", "rejected_score"]} -> reward model
    rankings         {"prompt", "answers": [best first, ...][, "scores": [...]]}           -> reward model
                     (tools/label.py's ties and skips, with "tie" or "skip": true, are skipped)
    HH-RLHF          {"chosen", "rejected"}: full dialogues, split at the last "\n\nAssistant:"
    TL;DR compared   {"info": {...}, "summaries": [{"text"}, {"text"}], "choice": 0 | 1}
Every record becomes a dict with the generic keys (prompt/response, or prompt/answers best-first).

Bad input, two kinds:
  - a line that is not what the format says (not UTF-8, not JSON, a missing or mistyped field, a score
    that is NaN or infinite) stops the run with the file and line: the file is broken, fix it;
  - a well-formed line that cannot teach anything (an empty prompt or answer, or HH-RLHF dialogues that
    part ways before their last turn, so the two answers do not answer one prompt) is skipped, and the
    loader prints how many and the first line numbers: real data sets have a few, and one should not
    stop a run on thousands.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import regex
import torch

from support.errors import LoadError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


class DataError(LoadError):
    """A data file that cannot be used as it is; the message names the file (and line) and the fix."""


# -----------------------------------------------------------------------------
# Tokenizer
#
# GPT-2's byte-pair encoding (tiktoken) always does the splitting of text into tokens. A model trained
# from scratch on the built-in task does not need GPT-2's 50257 ids, though: the task's few hundred
# words use a few hundred of them. So such a model gets a compact vocabulary, `table`: its token i is
# GPT-2's token table[i]. The embedding and the LM head shrink from 50257 x C to len(table) x C, which is
# most of a tiny model's parameters and most of its FLOPs per token: every stage runs several times
# faster on a CPU. GPT-2 weights keep the full vocabulary (table None). The table is saved in every
# checkpoint, so a model is always read with the tokenizer it was trained with.

GPT2_BPE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
GPT2_EOS = 50256  # <|endoftext|>: the end of every answer, and the padding token
_bpe = None


def gpt2_bpe():
    """tiktoken's GPT-2 encoding, loaded only from a local cache (TIKTOKEN_CACHE_DIR, by default the
    shared folder beside this repository): a machine without internet gets one clear line, not a
    network traceback."""
    global _bpe
    if _bpe is None:
        cache = os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
        missing = [f for f in GPT2_BPE_FILES if not (Path(cache) / f).is_file()]
        if missing:
            raise DataError(
                f"GPT-2 tokenizer files not found in TIKTOKEN_CACHE_DIR={cache}; point it at a folder holding "
                f"{' and '.join(GPT2_BPE_FILES)} (the two GPT-2 BPE files, see ../shared/data/README.md)"
            )
        import tiktoken

        _bpe = tiktoken.get_encoding("gpt2")
    return _bpe


class Tokenizer:
    """Text <-> token ids: GPT-2's BPE, with the full vocabulary (table=None) or a compact table."""

    def __init__(self, table=None):
        self.bpe = gpt2_bpe()
        self.table = None if table is None else list(table)
        self.spelled = []  # words read with encode(spell=True) that the table has no token for
        if self.table is None:
            self.vocab_size, self.eos_id = self.bpe.n_vocab, GPT2_EOS
        else:
            self.compact_id = {gpt2_id: i for i, gpt2_id in enumerate(self.table)}
            self.vocab_size, self.eos_id = len(self.table), self.compact_id[GPT2_EOS]
            self.compact_bytes = {self.bpe.decode_single_token_bytes(t): i for i, t in enumerate(self.table)
                                  if t != GPT2_EOS}
            self.words = regex.compile(self.bpe._pat_str)  # how GPT-2 splits text into words (tiktoken needs regex)

    def encode(self, text, where="text", spell=False):
        """Token ids of text; `where` (a file name) goes into the error for text the table cannot hold.

        A model can write words the task never does, by joining pieces (" looks" + "o"); GPT-2 then
        reads them as tokens outside the table (" look" + "so"). spell=True, for text a model wrote
        (rankings of its answers, a labelling session), spells such a word with table tokens instead
        and notes it in self.spelled; by default such text is refused, since a model cannot learn from
        words it has no tokens for."""
        ids = self.bpe.encode_ordinary(text)  # special tokens in the text are read as plain text
        if self.table is None:
            return ids
        if all(i in self.compact_id for i in ids):
            return [self.compact_id[i] for i in ids]
        spelled = self.spell_words(text) if spell else None
        if spelled is None:
            unknown = next(i for i in ids if i not in self.compact_id)
            raise DataError(f"{where}: {text[:60]!r} holds {self.bpe.decode([unknown])!r}, outside the compact "
                            "vocabulary of the built-in task's model; train it with --vocab gpt2 to read any text")
        return spelled

    def spell_words(self, text):
        """Table ids of text, word by word as GPT-2 splits it; a word GPT-2 reads as tokens outside the
        table is spelled with table tokens (and noted in self.spelled). None if one cannot be."""
        out = []
        for word in self.words.findall(text):
            ids = self.bpe.encode_ordinary(word)
            if all(i in self.compact_id for i in ids):
                out += [self.compact_id[i] for i in ids]
                continue
            spelled = self.spell(word.encode())
            if spelled is None:
                return None
            self.spelled.append(word)
            out += spelled
        return out

    def spell(self, piece):
        """The fewest table tokens whose bytes join to `piece` (bytes), or None if none do."""
        best = [[]] + [None] * len(piece)  # best[n]: the shortest spelling of piece[:n]
        for end in range(1, len(piece) + 1):
            for start in range(end):
                i = self.compact_bytes.get(piece[start:end])
                if i is not None and best[start] is not None and (
                        best[end] is None or len(best[start]) + 1 < len(best[end])):
                    best[end] = best[start] + [i]
        return best[-1]

    def decode(self, ids):
        if self.table is not None:
            ids = [self.table[i] for i in ids]
        return self.bpe.decode(ids)

    def decode_answer(self, ids):
        """The text of a generated answer, without the EOS that ended it."""
        return self.decode([i for i in ids if i != self.eos_id])

    def state(self):
        """What a checkpoint stores to rebuild this tokenizer."""
        return {"bpe": "gpt2", "table": self.table}

    @classmethod
    def from_state(cls, state):
        return cls(state["table"])

    @classmethod
    def for_texts(cls, texts):
        """A compact vocabulary for a closed world of texts (the built-in task's: task.vocabulary_texts):
        EOS and every GPT-2 token the texts are split into. GPT-2 splits text into words before it merges
        bytes, so a word is always the same tokens wherever it occurs, and any text made of those words is
        covered."""
        bpe = gpt2_bpe()
        ids = {GPT2_EOS}
        for text in texts:
            ids.update(bpe.encode_ordinary(text))
        return cls(sorted(ids))


# -----------------------------------------------------------------------------
# JSONL readers


def read_jsonl(path, flag="--data"):
    """(line number, object) for each non-blank line; any other line is an error naming the line. `flag`
    is the command-line flag that named the file, for the error if there is no such file."""
    path = Path(path)
    if not path.is_file():
        fix = ", or --data default for the built-in task" if flag == "--data" else ""
        raise DataError(f"{path}: no such data file; pass a JSONL file to {flag}{fix}")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
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
    """Check that `required` are strings and `optional` (if present) finite numbers; name the line if not."""
    for key in required:
        if key not in obj:
            raise DataError(f"{path}:{lineno}: missing field '{key}' (expected {', '.join(required)})")
        if not isinstance(obj[key], str):
            raise DataError(f"{path}:{lineno}: field '{key}' must be a string, got {type(obj[key]).__name__}")
    for key in optional:
        if key in obj:
            _number(path, lineno, key, obj[key])


def _number(path, lineno, key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{path}:{lineno}: field '{key}' must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(f"{path}:{lineno}: field '{key}' is {value}; scores must be finite numbers")
    return float(value)


class Skipped:
    """Well-formed lines that cannot teach anything: counted by reason, reported once per file."""

    def __init__(self, path):
        self.path, self.lines = path, {}

    def add(self, lineno, reason):
        self.lines.setdefault(reason, []).append(lineno)

    def usable(self, lineno, prompt, *answers):
        """False (and the line counted) if the prompt or an answer is empty."""
        if not prompt.strip():
            self.add(lineno, "an empty prompt")
            return False
        if not all(a.strip() for a in answers):
            self.add(lineno, "an empty answer")
            return False
        return True

    def report(self):
        for reason, lines in self.lines.items():
            shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
            print(f"{self.path}: skipped {len(lines)} line(s) with {reason} (line {shown})")


def tldr_prompt(subreddit, title, post):
    """The usual TL;DR prompt (OpenAI's summarize-from-feedback); the summary follows with a space."""
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def split_dialogue(path, lineno, chosen, rejected, skipped):
    """HH-RLHF stores two full dialogues that share everything up to their last assistant turn: the
    shared part, up to and including the last "\n\nAssistant:" they have in common, is the prompt; the
    rest of each is its answer. Returns None (and counts the line) when the dialogues part ways earlier,
    so that an "answer" would hold another turn, the human's or the assistant's: then they are not two
    answers to one prompt."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    cut = chosen.rfind(ASSISTANT, 0, common) + len(ASSISTANT)
    if cut < len(ASSISTANT):
        raise DataError(f"{path}:{lineno}: 'chosen' and 'rejected' do not share a prompt ending in '\\n\\nAssistant:'")
    if any(turn in answer for turn in (HUMAN, ASSISTANT) for answer in (chosen[cut:], rejected[cut:])):
        skipped.add(lineno, "dialogues that differ before their last turn")
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _ranking(path, lineno, obj, skipped):
    """A K-wise ranking {prompt, answers best-first[, scores]}; None (and the line counted in `skipped`)
    for a judgement with no order, {prompt, answers, "tie": true} or {..., "skip": true}, as tools/label.py
    writes them so that a labelling session keeps its place in the file."""
    answers = obj["answers"]
    if not isinstance(answers, list) or len(answers) < 2 or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{path}:{lineno}: 'answers' must be a list of two or more strings, best first")
    _fields(path, lineno, obj, ("prompt",))
    for key in ("tie", "skip"):
        if not isinstance(obj.get(key, False), bool):
            raise DataError(f"{path}:{lineno}: field '{key}' must be true or false, got {obj[key]!r}")
    if obj.get("tie") or obj.get("skip"):
        skipped.add(lineno, "a tie or a skip (no order to learn)")
        return None
    record = {"prompt": obj["prompt"], "answers": answers}
    if "scores" in obj:
        scores = obj["scores"]
        if not isinstance(scores, list) or len(scores) != len(answers):
            raise DataError(f"{path}:{lineno}: 'scores' must be a list with one number per answer")
        record["scores"] = [_number(path, lineno, "scores", s) for s in scores]
    return record


def load_preferences(path, flag="--data"):
    """Reward-model data: generic {prompt, chosen, rejected[, scores]}, K-wise rankings, HH-RLHF
    dialogues, or TL;DR comparisons, each line recognised by its keys. Returns records
    {"prompt", "answers" (best first)[, "scores"]}: a pair is a ranking of two. A tie or a skip (tools/label.py)
    teaches no order and is skipped."""
    out, skipped = [], Skipped(path)
    for lineno, obj in read_jsonl(path, flag):
        if "summaries" in obj:  # TL;DR comparisons
            info, summaries, choice = obj.get("info"), obj.get("summaries"), obj.get("choice")
            if (not isinstance(info, dict) or not isinstance(summaries, list) or len(summaries) != 2
                    or choice not in (0, 1) or isinstance(choice, bool)):
                raise DataError(f"{path}:{lineno}: a TL;DR comparison needs 'info', two 'summaries' and 'choice' "
                                "0 or 1")
            _fields(path, lineno, info, ("subreddit", "title", "post"))
            for s in summaries:
                if not isinstance(s, dict):
                    raise DataError(f"{path}:{lineno}: each summary must be an object with a 'text'")
                _fields(path, lineno, s, ("text",))
            record = {"prompt": tldr_prompt(info["subreddit"], info["title"], info["post"]),
                      "answers": [summaries[choice]["text"], summaries[1 - choice]["text"]]}
        elif "answers" in obj:
            record = _ranking(path, lineno, obj, skipped)
            if record is None:
                continue
        elif "prompt" not in obj and "chosen" in obj:  # HH-RLHF
            _fields(path, lineno, obj, ("chosen", "rejected"))
            split = split_dialogue(path, lineno, obj["chosen"], obj["rejected"], skipped)
            if split is None:
                continue
            record = {"prompt": split[0], "answers": [split[1], split[2]]}
        else:
            _fields(path, lineno, obj, ("prompt", "chosen", "rejected"), ("chosen_score", "rejected_score"))
            record = {"prompt": obj["prompt"], "answers": [obj["chosen"], obj["rejected"]]}
            if ("chosen_score" in obj) != ("rejected_score" in obj):
                raise DataError(f"{path}:{lineno}: give both 'chosen_score' and 'rejected_score', or neither")
            if "chosen_score" in obj:
                record["scores"] = [float(obj["chosen_score"]), float(obj["rejected_score"])]
        if skipped.usable(lineno, record["prompt"], *record["answers"]):
            out.append(record)
    skipped.report()
    if not out:
        raise DataError(f"{path}: no usable comparisons (every line was skipped)")
    return out


def load_demonstrations(path, flag="--data"):
    """SFT data: {prompt, response} lines, TL;DR {subreddit, title, post, summary} lines, or preference
    data (generic, rankings or HH-RLHF), whose best answer is taken as the demonstration, as is usual
    for SFT on HH-RLHF."""
    out, skipped = [], Skipped(path)
    for lineno, obj in read_jsonl(path, flag):
        if "response" not in obj and ("chosen" in obj or "answers" in obj):
            if "answers" in obj:
                ranking = _ranking(path, lineno, obj, skipped)
                if ranking is None:
                    continue
                prompt, response = ranking["prompt"], ranking["answers"][0]
            elif "prompt" in obj:
                _fields(path, lineno, obj, ("prompt", "chosen", "rejected"))
                prompt, response = obj["prompt"], obj["chosen"]
            else:
                _fields(path, lineno, obj, ("chosen", "rejected"))
                split = split_dialogue(path, lineno, obj["chosen"], obj["rejected"], skipped)
                if split is None:
                    continue
                prompt, response = split[0], split[1]
        elif "summary" in obj and "post" in obj:
            _fields(path, lineno, obj, ("subreddit", "title", "post", "summary"))
            prompt, response = tldr_prompt(obj["subreddit"], obj["title"], obj["post"]), obj["summary"]
        else:
            _fields(path, lineno, obj, ("prompt", "response"))
            prompt, response = obj["prompt"], obj["response"]
        if skipped.usable(lineno, prompt, response):
            out.append({"prompt": prompt, "response": response})
    skipped.report()
    if not out:
        raise DataError(f"{path}: no usable demonstrations (every line was skipped)")
    return out


def load_prompts(path, flag="--data"):
    """Prompts for PPO from any of the formats above (only the prompt is kept), or {prompt} lines."""
    out, skipped = [], Skipped(path)
    for lineno, obj in read_jsonl(path, flag):
        if "prompt" in obj:
            _fields(path, lineno, obj, ("prompt",))
            prompt = obj["prompt"]
        elif "post" in obj:
            _fields(path, lineno, obj, ("subreddit", "title", "post"))
            prompt = tldr_prompt(obj["subreddit"], obj["title"], obj["post"])
        elif "info" in obj and isinstance(obj["info"], dict):
            _fields(path, lineno, obj["info"], ("subreddit", "title", "post"))
            prompt = tldr_prompt(obj["info"]["subreddit"], obj["info"]["title"], obj["info"]["post"])
        elif "chosen" in obj:
            _fields(path, lineno, obj, ("chosen", "rejected"))
            split = split_dialogue(path, lineno, obj["chosen"], obj["rejected"], skipped)
            if split is None:
                continue
            prompt = split[0]
        else:
            raise DataError(f"{path}:{lineno}: no 'prompt' (or TL;DR 'post', or HH 'chosen') field")
        if skipped.usable(lineno, prompt):
            out.append(prompt)
    skipped.report()
    if not out:
        raise DataError(f"{path}: no usable prompts (every line was skipped)")
    return out


def train_and_eval(load, path, eval_path=""):
    """(training records, held-out records) of load(path): load(eval_path) for the held-out ones if an
    --eval_data file is given, else the last 10% of path's records (at least one)."""
    records = load(path)
    if eval_path:
        return records, load(eval_path, "--eval_data")
    n_eval = max(1, len(records) // 10)
    return records[:-n_eval], records[-n_eval:]


# -----------------------------------------------------------------------------
# Tokenize, truncate, pad


@dataclass
class Truncation:
    """Explicit truncation rules, and a count of what they cut; every stage prints report()."""

    max_prompt_tokens: int
    max_answer_tokens: int
    prompts_cut: int = 0
    answers_cut: int = 0
    prompts_seen: int = 0
    answers_seen: int = 0

    def report(self):
        return (f"truncation: {self.prompts_cut}/{self.prompts_seen} prompts cut to their last "
                f"{self.max_prompt_tokens} tokens, {self.answers_cut}/{self.answers_seen} answers cut to their "
                f"first {self.max_answer_tokens} tokens")


def encode_prompt(tok, prompt, trunc, where="text"):
    trunc.prompts_seen += 1
    ids = tok.encode(prompt, where)
    if len(ids) > trunc.max_prompt_tokens:
        trunc.prompts_cut += 1
        ids = ids[-trunc.max_prompt_tokens :]  # keep the end: it is what the answer follows
    return ids


def encode_answer(tok, answer, trunc, where="text", spell=False):
    """Answer ids ending with EOS, the token that teaches the model to stop, unless the answer was cut:
    a cut answer must not teach stopping mid-sentence. spell: a model wrote it (Tokenizer.encode)."""
    trunc.answers_seen += 1
    ids = tok.encode(answer, where, spell)
    if len(ids) + 1 > trunc.max_answer_tokens:
        trunc.answers_cut += 1
        return ids[: trunc.max_answer_tokens]
    return ids + [tok.eos_id]


def encode_example(tok, prompt, answer, trunc, where="text"):
    """(prompt ids, answer ids), truncated as above."""
    return encode_prompt(tok, prompt, trunc, where), encode_answer(tok, answer, trunc, where)


def answer_ids(tokens, answer_mask, eos_id):
    """The generated ids of each row of generate()'s output (lists), without the EOS that ended it."""
    return [[t for t, keep in zip(row, mask) if keep and t != eos_id]
            for row, mask in zip(tokens.tolist(), answer_mask.tolist())]


def decode_answers(tok, tokens, answer_mask):
    """The generated part of each row as text, without the EOS that ended it."""
    return [tok.decode(ids) for ids in answer_ids(tokens, answer_mask, tok.eos_id)]


def pad_batch(sequences, pad_id, side="right", device="cpu"):
    """A list of id lists -> (ids (B, T), attention_mask (B, T)), padded on the given side."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.long)
    for b, s in enumerate(sequences):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[b, cols] = torch.tensor(s, dtype=torch.long)
        mask[b, cols] = 1
    return ids.to(device), mask.to(device)
