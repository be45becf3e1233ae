"""
Talk to the pipeline's models in the terminal: one model, or several side by side.

    python tools/chat.py                                      # the PPO policy of out/ (out/ppo/ckpt.pt)
    python tools/chat.py --checkpoint out/sft/ckpt.pt         # any sft or ppo checkpoint (or its folder, out/sft)
    python tools/chat.py --weights DIR                        # a local Hugging Face GPT-2 folder: the base model
    python tools/chat.py --checkpoint out/sft/ckpt.pt,out/ppo/ckpt.pt,out/ppo_nokl/ckpt.pt   # side by side
    echo "What color is a banana?" | python tools/chat.py     # stdin need not be a terminal

Each message is wrapped in the chat format every stage was trained on, "Human: <message>\\n\\nAssistant:",
and the answer is sampled after it, one token at a time from the KV cache, and printed as it comes.

A model trained on the built-in task saw one question at a time, never a conversation: given its own
earlier turns it answers nonsense. So for such a model each message starts a new conversation (the chat
says so once, at the start). The others (GPT-2's weights, a model trained on a data file such as
HH-RLHF's dialogues) keep the conversation, its turns joined as in HH-RLHF,

    Human: <message 1>\\n\\nAssistant: <answer 1>\\n\\nHuman: <message 2>\\n\\nAssistant:

until /reset. A model reads at most block_size tokens (128 for the task's tiny model), its answer
included: the oldest turns are dropped to leave max_new_tokens free, and the chat says so.

Side by side, every model answers each message in turn, and one that keeps the conversation keeps its
own (its own answers). Each answer shows its reward-model score (with out/reward/ckpt.pt beside the
checkpoints, or --reward) and, on a question of the built-in task that starts a conversation, the gold
judge's score; where a score is missing, the answer says why.

Commands: /reset forgets the conversation, /quit (or the end of the input) leaves.
"""

import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # model.py and support/ are one folder up
from model import GPT, KVCache, check_sampling, sample_next_token
from support import task
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint
from support.data import DataError, Tokenizer
from support.errors import LoadError, UsageError
from support.gpt2 import load_gpt2_weights
from support.training import autocast, check, check_flags, flag, parse_args, pick_device, run

COMMANDS = "/reset forgets the conversation, /quit leaves"
EXAMPLE = "What color is a banana?"  # a request of the built-in task, for the hint on unknown words


@dataclass
class Config:
    """Chat with sft or ppo checkpoints (several: side by side) or a GPT-2 folder, in the stages' chat format."""

    checkpoint: str = flag("", "sft or ppo ckpt.pt (or its folder) to talk to; several, comma-separated, answer each "
                           "message side by side (default: out/ppo/ckpt.pt, unless --weights is given)")
    weights: str = flag("", "a local Hugging Face GPT-2 folder (the base model, GPT-2's full vocabulary), alone or "
                        "beside --checkpoint")
    reward: str = flag("auto", "reward-model ckpt.pt that scores each answer; 'auto': reward/ckpt.pt beside the first "
                       "checkpoint's stage folder, if there; 'none': no scores")
    max_new_tokens: int = flag(32, "longest answer, in tokens; the conversation gets the rest of the block size",
                               min=1)
    temperature: float = flag(1.0, "sampling temperature (0: greedy); 1.0 samples the policy that PPO trained",
                              min=0)
    top_k: int = flag(0, "sample among the top_k most likely tokens only (0: all of them)", min=0)
    top_p: float = flag(1.0, "sample from the smallest set of tokens whose probability reaches top_p (1.0: all)",
                        above=0, max=1)
    seed: int = flag(1337, "sampling seed: the same conversation gets the same answers", min=0, max=2**31 - 1)
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention implementation", choices=("auto", "triton", "sdpa", "naive"))


def sampling(cfg):
    """(temperature, top_k, top_p) as sample_next_token takes them: None for a cut that is off."""
    return cfg.temperature, cfg.top_k or None, cfg.top_p if cfg.top_p < 1 else None


def check_config(cfg):
    check_flags(cfg)
    try:
        check_sampling(*sampling(cfg))
    except ValueError as e:  # "temperature must be ...": the flag's own name
        raise UsageError(f"--{e}") from None


# -----------------------------------------------------------------------------
# The pieces: the prompt text, fitting it into the block, streaming an answer, scoring it


def conversation_ids(tok, turns, message):
    """Token ids of the conversation so far and the new message, joined as in HH-RLHF. Each human turn
    is encoded in its chat format; each answer is kept as the tokens the model sampled, since encoding
    its text again could give other tokens (even ones outside a compact vocabulary). A turn begins with
    "\n\n" after an answer's last character, where GPT-2's tokenizer always splits, so these pieces are
    the tokens of the whole text."""
    ids = []
    for i, (human, answer_ids) in enumerate([*turns, (message, [])]):
        ids += tok.encode(("\n\n" if i else "") + task.format_prompt(human), "your message") + answer_ids
    return ids


def fit_turns(tok, turns, message, budget):
    """(prompt ids, number of oldest turns dropped) for the longest recent history that fits in `budget`
    tokens with the new message; (None, len(turns)) if the message alone does not fit. A word of the
    message outside the tokenizer's vocabulary raises data.DataError."""
    for dropped in range(len(turns) + 1):
        ids = conversation_ids(tok, turns[dropped:], message)
        if len(ids) <= budget:
            return ids, dropped
    return None, len(turns)


def unknown_words(tok, message):
    """The words of a message that tok cannot encode (with a compact vocabulary: words outside the task),
    without the punctuation around them."""
    unknown = []
    for word in message.split():
        try:
            tok.encode(" " + word)  # as in the prompt, where every word of the message follows a space
        except DataError:
            unknown.append(word.strip(string.punctuation) or word)
    return unknown


@torch.no_grad()
def stream_answer(model, prompt_ids, max_new_tokens, eos_id, temperature, top_k, top_p, generator):
    """Yield the answer's token ids one by one, the EOS that ends it included: GPT.generate for one prompt,
    written as a generator so that each token can be printed before the next is computed. One row has no
    padding, so no attention mask is needed and positions simply continue from the cache's length."""
    device = model.lm_head.weight.device
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    with autocast(device):
        logits = model(idx, kv_cache=cache)[:, -1]  # (1, V): the prefill, the whole prompt in one pass
    for i in range(max_new_tokens):
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (1,)
        token = next_token.item()  # a sync point, once per token: it is printed now
        yield token
        if token == eos_id or i + 1 == max_new_tokens:
            return  # no forward pass for a token that will not be sampled
        with autocast(device):
            logits = model(next_token[:, None], kv_cache=cache)[:, -1]  # (1, V): one new position


@torch.no_grad()
def reward_score(reward_model, ids):
    """The reward model's score of one (prompt, answer) sequence, read at its last token (the EOS), as PPO
    scores a rollout."""
    device = reward_model.reward_head.proj.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    with autocast(device):
        return reward_model(idx, torch.ones_like(idx)).item()


# -----------------------------------------------------------------------------
# Loading the models


@dataclass
class Speaker:
    """One model of the chat, with its own tokenizer, sampling stream and conversation."""

    name: str
    model: GPT
    tok: Tokenizer
    generator: torch.Generator
    keeps_turns: bool  # False: trained on one question at a time, each message starts a new conversation
    turns: list = field(default_factory=list)  # (message, answer token ids) so far
    reward_model: torch.nn.Module | None = None  # what scores its answers (a reward model with its tokenizer)


def checkpoint_paths(cfg):
    """--checkpoint's files; a stage folder (out/sft) stands for the ckpt.pt its stage writes there."""
    paths = [p.strip() for p in cfg.checkpoint.split(",") if p.strip()]
    paths = [str(Path(p) / "ckpt.pt") if Path(p).is_dir() else p for p in paths]
    return paths or ([] if cfg.weights else ["out/ppo/ckpt.pt"])


def load_speakers(cfg, device):
    loaded = []
    for path in checkpoint_paths(cfg):
        ckpt = load_checkpoint(path, ("sft", "ppo"))  # a reward checkpoint is a LoadError naming both stages
        vocab = f"the task's {len(ckpt['tokenizer']['table'])}-token vocabulary" if ckpt["tokenizer"]["table"] \
            else "GPT-2's vocabulary"
        about = f"{ckpt['stage']} checkpoint, step {ckpt['step']}, {vocab}"
        # the stage's --data: 'default' is the built-in task, one question per example
        keeps_turns = ckpt["train_args"].get("data", "default") != "default"
        loaded.append((Path(path).parent.name, path, policy_from_checkpoint(ckpt, cfg.attn_impl),
                       Tokenizer.from_state(ckpt["tokenizer"]), about, keeps_turns))
    if cfg.weights:
        loaded.append((Path(cfg.weights).name, cfg.weights, load_gpt2_weights(cfg.weights, cfg.attn_impl),
                       Tokenizer(), "GPT-2 weights, GPT-2's vocabulary", True))
    names = [name for name, *_ in loaded]
    speakers = []
    for name, path, model, tok, about, keeps_turns in loaded:
        name = name if names.count(name) == 1 else path  # two ppo/ckpt.pt of different runs: their paths
        check(cfg.max_new_tokens < model.config.block_size,
              f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a message in {name}'s block size "
              f"{model.config.block_size}")
        print(f"{name}: {path} ({about}, {model.num_params() / 1e6:.2f}M parameters, block size "
              f"{model.config.block_size})")
        generator = torch.Generator(device=device).manual_seed(cfg.seed)  # the same stream for every model
        speakers.append(Speaker(name, model.to(device).eval(), tok, generator, keeps_turns))
    one_question = [sp.name for sp in speakers if not sp.keeps_turns]
    if one_question:
        print(f"{', '.join(one_question)}: trained on the built-in task's questions one at a time, so each message "
              "starts a new conversation")
    return speakers


def load_reward_model(cfg, speakers, device):
    """Give each speaker the reward model that scores its answers: --reward, or reward/ckpt.pt beside the
    first checkpoint. It reads token ids, so it scores only the models with its tokenizer."""
    paths = checkpoint_paths(cfg)
    if cfg.reward == "none" or (cfg.reward == "auto" and not paths):
        return
    path = Path(cfg.reward) if cfg.reward != "auto" else Path(paths[0]).parent.parent / "reward" / "ckpt.pt"
    if cfg.reward == "auto" and not path.is_file():
        print(f"(no reward model at {path}: answers come without reward scores; add them with --reward PATH)")
        return
    ckpt = load_checkpoint(path, "reward")
    scored = [sp for sp in speakers if ckpt["tokenizer"] == sp.tok.state()]
    if not scored:
        raise LoadError(f"{path} was trained with another tokenizer than {', '.join(sp.name for sp in speakers)}; "
                        "pass the reward model of their run, or --reward none")
    reward_model = model_from_checkpoint(ckpt, cfg.attn_impl).to(device).eval()
    for sp in scored:
        sp.reward_model = reward_model
    others = [sp.name for sp in speakers if sp not in scored]
    print(f"reward: {path} scores the answers of {', '.join(sp.name for sp in scored)}"
          + (f" (not {', '.join(others)}: another vocabulary)" if others else ""))


# -----------------------------------------------------------------------------
# The chat


def print_answer(sp, prompt_ids, cfg):
    """Stream one answer to the terminal as it is sampled; returns its token ids (with the EOS, if any)."""
    print(f"{sp.name}>", end="", flush=True)
    answer_ids, shown = [], ""
    for token in stream_answer(sp.model, prompt_ids, cfg.max_new_tokens, sp.tok.eos_id, *sampling(cfg), sp.generator):
        answer_ids.append(token)
        text = sp.tok.decode_answer(answer_ids)
        if not text.endswith("\ufffd"):  # a character split over two byte tokens waits for its second half
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(sp.tok.decode_answer(answer_ids)[len(shown):], end="")
    return answer_ids


def respond(sp, message, cfg):
    """One model's turn: fit the conversation into its block, stream the answer, score it, and remember it
    if the model keeps the conversation."""
    block = sp.model.config.block_size
    try:
        prompt_ids, dropped = fit_turns(sp.tok, sp.turns, message, block - cfg.max_new_tokens)
    except DataError:  # a compact vocabulary: the model has never seen a word outside the task
        unknown = " ".join(unknown_words(sp.tok, message)) or message
        print(f"{sp.name}> (this model knows only the built-in task's words, not {unknown!r}; try e.g. "
              f"{EXAMPLE!r}" + ("; the conversation goes on)" if sp.keeps_turns else ")"))
        return
    if prompt_ids is None:
        print(f"{sp.name}> (that message does not fit: with --max_new_tokens {cfg.max_new_tokens} the block size "
              f"{block} leaves {block - cfg.max_new_tokens} tokens; write less or lower --max_new_tokens)")
        return
    if dropped:
        print(f"{sp.name}> (dropped the oldest {dropped} turn(s) of the conversation to fit the block size {block} "
              f"with --max_new_tokens {cfg.max_new_tokens})")
        sp.turns = sp.turns[dropped:]
    answer_ids = print_answer(sp, prompt_ids, cfg)
    answer = sp.tok.decode_answer(answer_ids)
    notes = [] if answer_ids[-1] == sp.tok.eos_id else [f"cut at {cfg.max_new_tokens} tokens"]
    if sp.reward_model is not None:
        reward_block = sp.reward_model.config.block_size
        notes.append(f"reward {reward_score(sp.reward_model, prompt_ids + answer_ids):.2f}"
                     if len(prompt_ids) + len(answer_ids) <= reward_block
                     else f"no reward: longer than the reward model's block size {reward_block}")
    if sp.turns:
        notes.append("no gold: the judge scores a question alone, not a conversation (/reset)")
    elif (gold := task.gold_or_none(task.format_prompt(message), answer)) is None:
        notes.append("no gold: not a question of the built-in task")
    else:
        notes.append(f"gold {gold:.2f}")
    print(f"   [{', '.join(notes)}]", flush=True)
    if sp.keeps_turns:
        sp.turns.append((message, [t for t in answer_ids if t != sp.tok.eos_id]))


def read_message(interactive):
    """The next line of input, or None at its end. Without a terminal the message is echoed, so that
    the transcript reads as a conversation."""
    try:
        line = input("you> ") if interactive else input()
    except EOFError:
        if interactive:
            print()
        return None
    if not interactive:
        print(f"you> {line}")
    return line.strip()


def main(cfg):
    check_config(cfg)
    device = pick_device(cfg.device, cfg.attn_impl)
    speakers = load_speakers(cfg, device)
    load_reward_model(cfg, speakers, device)
    interactive = sys.stdin.isatty()
    print(f"commands: {COMMANDS if any(sp.keeps_turns for sp in speakers) else '/quit leaves'}")
    try:
        while (message := read_message(interactive)) is not None:
            if message == "/quit":
                break
            if message == "/reset":
                for sp in speakers:
                    sp.turns.clear()
                print("(conversation forgotten)")
            elif message.startswith("/"):
                print(f"(unknown command {message}; {COMMANDS})")
            elif message:
                for sp in speakers:
                    respond(sp, message, cfg)
    except KeyboardInterrupt:  # Ctrl-C leaves the chat quietly (run() would advise --resume)
        print()


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
