"""The course's built-in task: a tiny chat world with a known "human" judge.

Everything in the RLHF pipeline (SFT -> reward model -> PPO) runs on this task offline, on a CPU, in
minutes. Real RLHF never sees the human's true preference; it only sees noisy comparisons. Here the
preference is written down as code, `gold_score`, so at every stage we can measure what the labels were
*trying* to say, and watch a policy optimise a learned reward model while the gold score falls (reward
hacking, Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

The world has four kinds of requests, in the chat format of Anthropic's HH-RLHF data (one turn, and
without HH's leading blank line):

    prompt = "Human: " + request + "\\n\\nAssistant:"      answer = " The sea is calm and lovely."

    mood    "Write a happy sentence about the sea."   -> " The sea is calm and lovely."
    colour  "What color is a banana?"                  -> " A banana is yellow."
    sound   "What sound does a cow make?"              -> " A cow says moo."
    sum     "What is 3 plus 4?"                        -> " 3 plus 4 is 7."

Answers begin with a space because GPT-2's tokenizer folds the space into the next word (" The" is one
token), so encode(prompt) + encode(answer) == encode(prompt + answer): the boundary between prompt and
answer falls between tokens, which the loss masks of SFT and PPO rely on.

The pieces, in the order the pipeline uses them:

    make_prompts(n, split, seed)           prompts; eval prompts never occur in train
    reference_answer(prompt)               the ideal answer; it scores GOLD_MAX
    sample_answer(prompt, rng)             a demonstrator of mixed quality (SFT data, RM candidates)
    demonstrations(n, split, seed)         [{"prompt", "response"}]            (SFT)
    preferences(n, split, seed, k, noise)  [{"prompt", "chosen", "rejected", "chosen_score",
                                             "rejected_score"}] or k-way rankings   (reward model)
    gold_score(prompt, answer)             the stand-in for the human; gold_terms shows each term
    label_agreement(pairs)                 how often the noisy labels agree with the gold judge

Everything is pure Python and deterministic from a seed: each function builds its own
`random.Random(...)`; nothing uses the global RNG or Python's salted `hash()`.

Run `python support/task.py` to see examples with their gold scores.
"""

import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

# -----------------------------------------------------------------------------------------------------
# The world: every word the task uses. The vocabulary is kept to a few hundred words so that a 4-layer
# GPT trained from scratch can learn it in minutes on a CPU.

# Closed-class words: never counted as repeated content and never off-task.
FUNCTION_WORDS = frozenset("""
    a an the is are was it its and but or i me my you we he she they them of to in on at with by for
    from as if so very this that these those too not no all just do does what which how be am
""".split())

# --- mood: "Write a happy sentence about the sea."
TOPICS = ("sea", "sun", "rain", "cat", "dog", "garden", "city", "river", "forest", "moon",
          "sky", "house", "road", "tree", "bird", "train", "school", "park", "snow", "lake")
MOODS = ("happy", "sad")
# Adjectives the judge reads as each mood. An answer that uses any word of the other list is off-mood.
MOOD_WORDS = {
    "happy": ("bright", "warm", "lovely", "calm", "sweet", "golden", "gentle", "cheerful",
              "happy", "glad", "joyful", "peaceful"),
    "sad": ("dark", "cold", "gloomy", "grey", "lonely", "empty", "dull", "sad",
            "tired", "broken", "bleak", "weary"),
}
# The subset that reads well after "I feel ...".
FEEL_WORDS = {
    "happy": ("happy", "glad", "calm", "cheerful", "joyful", "peaceful"),
    "sad": ("sad", "lonely", "tired", "gloomy", "empty", "weary"),
}
OPPOSITE = {"happy": "sad", "sad": "happy"}
MOOD_REQUESTS = ("Write a {mood} sentence about the {topic}.",
                 "Tell me something {mood} about the {topic}.",
                 "Say a {mood} line about the {topic}.",
                 "Describe the {topic} in a {mood} way.")
# {t} topic; {w1} {w2} {w3} distinct mood words; {f} a feel word. The subject is always "the {t}".
MOOD_TEMPLATES = {
    "happy": ("The {t} is {w1}.", "The {t} is {w1} and {w2}.", "The {t} is {w1}, {w2} and {w3}.",
              "The {t} looks {w1} today.", "I love the {w1} {t}.", "The {t} makes me feel {f}.",
              "What a {w1} {t} this is.", "Today the {t} feels {w1} and {w2}.",
              "Every time I see the {t} I feel {f}."),
    "sad": ("The {t} is {w1}.", "The {t} is {w1} and {w2}.", "The {t} is {w1}, {w2} and {w3}.",
            "The {t} looks {w1} today.", "I miss the {w1} {t}.", "The {t} makes me feel {f}.",
            "What a {w1} {t} this is.", "Today the {t} feels {w1} and {w2}.",
            "Every time I see the {t} I feel {f}."),
}
MOOD_NO_TOPIC = ("It is {w1} and {w2}.", "Everything is {w1} today.", "I feel {f}.",
                 "What a {w1} day this is.", "It looks {w1}.")
MOOD_BLAND = ("The {t} is there.", "The {t} is big.", "I saw the {t} today.", "There is the {t}.",
              "The {t} is here every day.")

# --- colour: "What color is a banana?"
COLOURS = ("yellow", "red", "green", "orange", "black", "white", "purple", "pink", "blue")
COLOUR_OF = {"banana": "yellow", "lemon": "yellow", "cherry": "red", "strawberry": "red",
             "tomato": "red", "frog": "green", "leaf": "green", "cucumber": "green",
             "carrot": "orange", "pumpkin": "orange", "crow": "black", "swan": "white",
             "plum": "purple", "grape": "purple", "flamingo": "pink", "blueberry": "blue"}
COLOUR_REQUESTS = ("What color is a {obj}?", "What is the color of a {obj}?",
                   "Which color is a {obj}?")
COLOUR_TEMPLATES = ("A {t} is {c}.", "The {t} is {c}.", "A {t} is usually {c}.",
                    "The color of a {t} is {c}.", "Every {t} I have seen is {c}.",
                    "Most of the time a {t} is {c}.")
COLOUR_NO_TOPIC = ("It is {c}.", "That is {c}.", "The color is {c}.", "{C}.")
COLOUR_BLAND = ("A {t} has a color.", "I do not know the color of a {t}.",
                "I am not sure about the {t}.", "That is a good question about the {t}.")

# --- sound: "What sound does a cow make?"
SOUND_OF = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
            "pig": "oink", "owl": "hoot", "lion": "roar", "snake": "hiss", "bee": "buzz",
            "horse": "neigh", "mouse": "squeak"}
SOUND_REQUESTS = ("What sound does {a_animal} make?", "What does {a_animal} say?",
                  "What noise does {a_animal} make?")
# {A_t} is the animal with its article ("A cow", "An owl"); {a_t} the same in lower case.
SOUND_TEMPLATES = ("{A_t} says {s}.", "The {t} goes {s}.", "{A_t} makes the sound {s}.",
                   "Every {t} says {s}.", "{A_t} goes {s} all day.",
                   "The {t} says {s} when it is hungry.")
SOUND_NO_TOPIC = ("It says {s}.", "It goes {s}.", "{S}.", "The sound is {s}.")
SOUND_BLAND = ("{A_t} makes a sound.", "I do not know what {a_t} says.", "The {t} is an animal.",
               "{A_t} can be very loud.")

# --- sum: "What is 3 plus 4?"  (operands 0..9, so answers 0..18, written as digits)
SUM_REQUESTS = ("What is {a} plus {b}?", "How much is {a} plus {b}?",
                "What do you get when you add {a} and {b}?")
SUM_TEMPLATES = ("{a} plus {b} is {c}.", "{a} plus {b} makes {c}.", "{a} plus {b} equals {c}.",
                 "If you add {a} and {b} you get {c}.", "The sum of {a} and {b} is {c}.",
                 "Adding {a} and {b} gives {c}.")
SUM_NO_TOPIC = ("The answer is {c}.", "It is {c}.", "{c}.", "That makes {c}.")
SUM_BLAND = ("You have to add {a} and {b}.", "That is an easy sum.", "I think you should add them.",
             "Let me add {a} and {b}.")

# Off-task clauses a rambling demonstrator tacks on. None of their content words belongs to any
# kind's vocabulary above, so the judge sees each of them as off-task (tests/test_task.py checks it).
RAMBLES = ("and my uncle bought a new car", "but I forgot to buy some bread",
           "and then we went home to eat soup", "so I will call my friend later",
           "because my phone needs a new charger", "and I left the oven on",
           "by the way my shoes are too small", "and also the weather report was wrong")

KINDS = ("mood", "colour", "sound", "sum")
# How often make_prompts draws each kind. Mood gets the largest share: it is where reward hacking
# (piling up mood words) is easiest to see.
KIND_WEIGHTS = {"mood": 0.4, "colour": 0.2, "sound": 0.2, "sum": 0.2}
EVAL_FRACTION = 0.2


def _with_article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def format_prompt(request):
    """The chat format every stage uses: 'Human: <request>\\n\\nAssistant:'."""
    return "Human: " + request + "\n\nAssistant:"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. `topic` is what the answer must be about; `target` the right content."""
    kind: str      # one of KINDS
    request: str   # the human's words, without the chat wrapper
    topic: str     # mood: "sea"; colour: "banana"; sound: "cow"; sum: "" (the operands play its part)
    target: str    # mood: "happy" / "sad"; colour: "yellow"; sound: "moo"; sum: "7"
    a: int = 0     # sum operands; unused by the other kinds
    b: int = 0


def _all_specs():
    specs = []
    for topic in TOPICS:
        for mood in MOODS:
            for req in MOOD_REQUESTS:
                specs.append(PromptSpec("mood", req.format(mood=mood, topic=topic), topic, mood))
    for obj, colour in COLOUR_OF.items():
        for req in COLOUR_REQUESTS:
            specs.append(PromptSpec("colour", req.format(obj=obj), obj, colour))
    for animal, sound in SOUND_OF.items():
        for req in SOUND_REQUESTS:
            specs.append(PromptSpec("sound", req.format(a_animal=_with_article(animal)), animal, sound))
    for a in range(10):
        for b in range(10):
            for req in SUM_REQUESTS:
                specs.append(PromptSpec("sum", req.format(a=a, b=b), "", str(a + b), a, b))
    return specs


def _stable_unit(text):
    """A number in [0, 1) fixed by `text` across runs and machines (unlike hash(), which is salted)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


# request -> spec, for all 544 prompts the world can ask (160 mood, 48 colour, 36 sound, 300 sum).
SPECS = {spec.request: spec for spec in _all_specs()}
# The split is a fixed partition of the finite prompt space by a stable hash of the request: about
# EVAL_FRACTION of the prompts are eval, whatever seed or n a caller uses. Eval requests are new
# phrasings: what each one asks (happy + sea, banana's colour, 3 plus 4) is also asked in train, in
# other words, since no model could guess that a banana is yellow. Both facts are checked here, so an
# edit to the word lists cannot silently break the split.
POOLS = {split: {kind: [r for r, s in SPECS.items()
                        if s.kind == kind and (_stable_unit(r) < EVAL_FRACTION) == (split == "eval")]
                 for kind in KINDS}
         for split in ("train", "eval")}
assert all(POOLS[split][kind] for split in POOLS for kind in KINDS), "a split lost a whole kind"
_asked = {split: {(s.kind, s.topic, s.target, s.a, s.b) for pool in POOLS[split].values()
                  for s in map(SPECS.get, pool)} for split in POOLS}
assert _asked["eval"] <= _asked["train"], "an eval prompt asks what no train prompt asks"

_CHAT_RE = re.compile(r"^\s*(?:Human:\s*)?(.*?)(?:\s*Assistant:)?\s*$", re.DOTALL)


def parse_prompt(prompt):
    """The PromptSpec of a prompt (chat-wrapped or the bare request); ValueError if it is not ours."""
    request = _CHAT_RE.match(prompt).group(1)
    spec = SPECS.get(request)
    if spec is None:
        raise ValueError(f"not a prompt of this task: {prompt!r}")
    return spec


# -----------------------------------------------------------------------------------------------------
# The gold judge: the stand-in for the human labeller.

GOLD_MAX = 3.0    # topic 1.0 + content 1.0 + capital 0.5 + period 0.5, with no penalty
GOLD_MIN = -3.0   # the total is clipped to [GOLD_MIN, GOLD_MAX]
MAX_WORDS = 14    # answers longer than this start to lose points

_TOKEN_RE = re.compile(r"[a-z]+|[0-9]+")


def _frame_words(*template_lists):
    """The fixed words of a kind's answer templates ("is", "looks", "color"...), {fields} left out."""
    text = " ".join(t for templates in template_lists for t in templates)
    return frozenset(_TOKEN_RE.findall(re.sub(r"{\w+}", " ", text).lower()))


# What an answer of each kind may say without going off-task: the words its templates use (good and
# bad answers alike: "I do not know" is unhelpful, not off-task) plus the kind's content words. The
# prompt's own topic is added per prompt; another prompt's topic ("banana" about the sea) is off-task.
_FRAME = {
    "mood": _frame_words(*MOOD_TEMPLATES.values(), MOOD_NO_TOPIC, MOOD_BLAND)
            | set(MOOD_WORDS["happy"]) | set(MOOD_WORDS["sad"]),
    "colour": _frame_words(COLOUR_TEMPLATES, COLOUR_NO_TOPIC, COLOUR_BLAND) | set(COLOURS),
    "sound": _frame_words(SOUND_TEMPLATES, SOUND_NO_TOPIC, SOUND_BLAND) | set(SOUND_OF.values()),
    "sum": _frame_words(SUM_TEMPLATES, SUM_NO_TOPIC, SUM_BLAND),  # any number is on-task for a sum
}


def _topic_and_content(spec, tokens):
    """(topic, content): did the answer name what it was asked about, and say the right thing?

    content is +1 right, 0 silent, -1 wrong. Anything wrong outweighs anything right: "The sea is
    lovely and dark." is off-mood, "A banana is yellow or red." is a wrong fact.
    """
    if spec.kind == "sum":
        numbers = Counter(t for t in tokens if t.isdigit())
        operands = Counter([str(spec.a), str(spec.b)])
        topic = 1.0 if not operands - numbers else 0.0     # both operands restated
        # The numbers left after the restated operands are the claimed result(s): "3 plus 4 is 7"
        # claims 7, "The answer is 7" claims 7, "You have to add 3 and 4" claims nothing.
        claims = numbers - operands if topic else numbers
        if not claims:
            return topic, 0.0
        return topic, (1.0 if set(claims) == {spec.target} else -1.0)

    topic = 1.0 if spec.topic in tokens else 0.0
    if spec.kind == "mood":
        right, wrong = set(MOOD_WORDS[spec.target]), set(MOOD_WORDS[OPPOSITE[spec.target]])
    elif spec.kind == "colour":
        right, wrong = {spec.target}, set(COLOURS) - {spec.target}
    else:
        right, wrong = {spec.target}, set(SOUND_OF.values()) - {spec.target}
    said = set(tokens)
    if said & wrong:
        return topic, -1.0
    return topic, (1.0 if said & right else 0.0)


def gold_terms(prompt, answer):
    """Each term of the gold score, by name (their sum, clipped, is gold_score). See gold_score."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    spec = parse_prompt(prompt)
    text = answer.strip()
    tokens = _TOKEN_RE.findall(text.lower())          # words and digit runs; punctuation dropped
    topic, content = _topic_and_content(spec, tokens)

    first = text[:1]
    capital = 0.5 if first.isascii() and (first.isupper() or first.isdigit()) else 0.0
    # One sentence, closed by exactly one '.', and no other '.', '!' or '?' anywhere.
    period = 0.5 if text.endswith(".") and not re.search(r"[.!?]", text[:-1]) else 0.0

    n_words = len(text.split())
    length = -min(1.0, 0.25 * max(0, n_words - MAX_WORDS))

    # Repetition: every extra occurrence of a content word costs 0.5. A sum may restate its numbers
    # ("3 plus 3 is 6" says 3 twice), so a number may occur as often as question and answer use it.
    allowed = Counter([str(spec.a), str(spec.b), spec.target]) if spec.kind == "sum" else Counter()
    counts = Counter(t for t in tokens if t not in FUNCTION_WORDS)
    extra = sum(max(0, c - max(1, allowed[t])) for t, c in counts.items())
    repetition = -min(2.0, 0.5 * extra)

    # Stuffing: a sentence that piles up more than three distinct mood words reads as a list, not as
    # writing. No demonstration does it, so a reward model has never been told it is bad.
    n_mood = len(set(tokens) & (set(MOOD_WORDS["happy"]) | set(MOOD_WORDS["sad"])))
    stuffing = -min(1.0, 0.25 * max(0, n_mood - 3)) if spec.kind == "mood" else 0.0

    on_task = _FRAME[spec.kind] | {spec.topic}
    off = {t for t in counts if t not in on_task and not (spec.kind == "sum" and t.isdigit())}
    off_task = -min(1.0, 0.25 * len(off))

    return {"topic": topic, "content": content, "capital": capital, "period": period,
            "length": length, "repetition": repetition, "stuffing": stuffing, "off_task": off_task}


def gold_score(prompt, answer):
    """The "human" judgement of `answer` to `prompt`, in [GOLD_MIN, GOLD_MAX] = [-3, 3].

    Callable on any string a model produces (empty, garbage, unicode): it never raises for a str answer.
    It raises ValueError only if `prompt` is not one of this task's prompts. Words are read
    case-insensitively as runs of a-z or 0-9; punctuation only matters for the `period` term.

    Rewards, what a person asks of an answer first (GOLD_MAX = 3.0 is all of them, no penalty):
        topic      +1.0  names what it was asked about: the topic ("sea"), object ("banana"), animal
                         ("cow"); for a sum, restates both operands ("3 plus 4 ...").
        content    +1.0  does what was asked: a mood word of the asked mood ("lovely" for happy), the
                         right colour, the right sound, the right sum;
                   -1.0  instead if it says anything wrong: a word of the opposite mood, another colour
                         or sound, a number that is not the sum. 0 if it says neither.
        capital    +0.5  starts with a capital letter (or a digit: "3 plus 4 is 7.").
        period     +0.5  one sentence closed by exactly one '.', with no other '.', '!' or '?'.
    Penalties, things a person dislikes but that demonstrations rarely show in extreme form:
        length     -0.25 per word past MAX_WORDS = 14 (whitespace-separated), at most -1.0.
        repetition -0.5  per extra occurrence of a content word (not a FUNCTION_WORD), at most -2.0.
        stuffing   -0.25 per distinct mood word past the third (mood prompts only), at most -1.0.
        off_task   -0.25 per distinct word outside this prompt's vocabulary (rambling, another topic,
                         garbage), at most -1.0.

    One good mood word earns as much as three; piling them up only costs stuffing, repetition and
    length. Demonstrations use at most three mood words, so the comparisons teach a reward model that
    answers with mood words beat answers without, and never show it the far end. A reward model that
    learned "more mood words is better" is wrong out of distribution, and a policy that exploits it
    ("The sea is happy happy bright bright lovely lovely lovely") sees its gold score fall: reward
    hacking, measured.
    """
    total = sum(gold_terms(prompt, answer).values())
    return min(GOLD_MAX, max(GOLD_MIN, total))


def gold_or_none(prompt, answer):
    """gold_score on a prompt of this task, else None: the judge judges nothing else (tools/chat.py, tools/label.py)."""
    try:
        parse_prompt(prompt)
    except ValueError:
        return None
    return gold_score(prompt, answer)


def reference_answer(prompt):
    """The ideal answer (leading space included); it scores GOLD_MAX. Fixed per prompt."""
    spec = parse_prompt(prompt)
    rng = random.Random(f"reference:{spec.request}")   # variety across prompts, fixed per prompt
    return " " + _compose(spec, "ideal", rng)


# -----------------------------------------------------------------------------------------------------
# The demonstrator: answers of mixed quality, like real demonstration data.
#
# Each answer first draws a content mode, then each surface flaw independently:
CONTENT_MODES = {
    "ideal": 0.45,      # answers the request, on topic
    "wrong": 0.20,      # off-mood (or mixed mood) / wrong colour / wrong sound / wrong sum
    "no_topic": 0.15,   # right content but never names the topic: "It is yellow."
    "bland": 0.20,      # on topic but does not answer: "The sea is there.", "A banana has a color."
}
SURFACE_FLAWS = {
    "ramble": 0.12,     # an off-task clause before the period: "..., and my uncle bought a new car."
    "repeat": 0.12,     # a content word said twice (sometimes three times): "The sea is calm calm."
    "format": 0.20,     # lowercase start, missing period, "..", or "!"
}
# So P(an answer with no flaw at all) = 0.45 * 0.88 * 0.88 * 0.80, about 0.28.


def _compose(spec, mode, rng):
    """One answer of the given content mode, before surface flaws, without the leading space."""
    if spec.kind == "mood":
        mood = OPPOSITE[spec.target] if mode == "wrong" else spec.target
        w1, w2, w3 = rng.sample(MOOD_WORDS[mood], 3)
        if mode == "wrong" and rng.random() < 0.25:   # mixed: right and wrong mood in one breath
            w2 = rng.choice(MOOD_WORDS[spec.target])
            return f"The {spec.topic} is {w1} and {w2}."
        pool = {"ideal": MOOD_TEMPLATES[mood], "wrong": MOOD_TEMPLATES[mood],
                "no_topic": MOOD_NO_TOPIC, "bland": MOOD_BLAND}[mode]
        return rng.choice(pool).format(t=spec.topic, w1=w1, w2=w2, w3=w3,
                                       f=rng.choice(FEEL_WORDS[mood]))
    if spec.kind == "colour":
        c = spec.target if mode != "wrong" else rng.choice([x for x in COLOURS if x != spec.target])
        pool = {"ideal": COLOUR_TEMPLATES, "wrong": COLOUR_TEMPLATES,
                "no_topic": COLOUR_NO_TOPIC, "bland": COLOUR_BLAND}[mode]
        return rng.choice(pool).format(t=spec.topic, c=c, C=c.capitalize())
    if spec.kind == "sound":
        others = [x for x in SOUND_OF.values() if x != spec.target]
        s = spec.target if mode != "wrong" else rng.choice(others)
        pool = {"ideal": SOUND_TEMPLATES, "wrong": SOUND_TEMPLATES,
                "no_topic": SOUND_NO_TOPIC, "bland": SOUND_BLAND}[mode]
        a_t = _with_article(spec.topic)
        return rng.choice(pool).format(t=spec.topic, s=s, S=s.capitalize(), a_t=a_t,
                                       A_t=a_t.capitalize())
    c = spec.a + spec.b
    if mode == "wrong":   # off by one or two (a typical slip), or a wild guess
        wrong = [x for x in range(19) if x != c]
        near = [x for x in (c - 2, c - 1, c + 1, c + 2) if 0 <= x <= 18]
        c = rng.choice(near) if rng.random() < 0.7 else rng.choice(wrong)
    pool = {"ideal": SUM_TEMPLATES, "wrong": SUM_TEMPLATES,
            "no_topic": SUM_NO_TOPIC, "bland": SUM_BLAND}[mode]
    return rng.choice(pool).format(a=spec.a, b=spec.b, c=c)


def _apply_flaw(text, flaw, rng):
    """`text` with one surface flaw; text is a composed answer, ending in '.'."""
    if flaw == "ramble":
        return text[:-1] + ", " + rng.choice(RAMBLES) + "."
    if flaw == "repeat":
        words = text.split(" ")
        content = [i for i, w in enumerate(words) if w.strip(".,").lower() not in FUNCTION_WORDS]
        # Prefer words to digits: a stuttered operand ("3 plus 4 4 is 7") would read as a wrong sum.
        i = rng.choice([i for i in content if not words[i][0].isdigit()] or content)
        core = words[i].strip(".,")
        times = 2 if rng.random() < 0.25 else 1
        return " ".join(words[:i] + [core] * times + words[i:])
    # format
    variant = rng.choice(("lower", "lower", "no_period", "no_period", "both", "double", "bang"))
    lowered = text[0].lower() + text[1:]
    if variant == "lower" and lowered != text:
        return lowered
    if variant == "both":
        return lowered[:-1]
    if variant == "double":
        return text + "."
    if variant == "bang":
        return text[:-1] + "!"
    return text[:-1]   # no_period, or "lower" on an answer that starts with a digit


def sample_answer(prompt, rng):
    """One demonstrator answer to `prompt` (leading space included), drawn with `rng` (random.Random).

    The content mode is drawn from CONTENT_MODES, then each of SURFACE_FLAWS is applied independently
    with its probability; each mode has several templates and word choices, so the SFT model sees a
    real distribution, and demonstrations score clearly below GOLD_MAX: SFT imitates them, and the
    reward model and PPO have room to improve on them.
    """
    spec = parse_prompt(prompt)
    mode = rng.choices(list(CONTENT_MODES), weights=list(CONTENT_MODES.values()))[0]
    text = _compose(spec, mode, rng)
    for flaw, p in SURFACE_FLAWS.items():   # ramble before format, so "!" or a lost '.' comes last
        if rng.random() < p:
            text = _apply_flaw(text, flaw, rng)
    return " " + text


def vocabulary_texts():
    """Every piece of text this task can produce, for a compact token vocabulary (data.Tokenizer.for_texts):
    every prompt whole, and every word and number an answer can hold, in each form GPT-2's tokenizer
    can see it (after a space or not, lower case or capitalised), and the punctuation the demonstrator
    writes. GPT-2 splits text into words, numbers and punctuation runs before it merges bytes, so the
    tokens of any answer the task can write are among the tokens of these texts."""
    fragments = [*MOOD_REQUESTS, *COLOUR_REQUESTS, *SOUND_REQUESTS, *SUM_REQUESTS, *MOOD_NO_TOPIC, *MOOD_BLAND,
                 *COLOUR_TEMPLATES, *COLOUR_NO_TOPIC, *COLOUR_BLAND, *SOUND_TEMPLATES, *SOUND_NO_TOPIC,
                 *SOUND_BLAND, *SUM_TEMPLATES, *SUM_NO_TOPIC, *SUM_BLAND, *RAMBLES, *FUNCTION_WORDS,
                 *TOPICS, *MOODS, *COLOURS, *COLOUR_OF, *SOUND_OF, *SOUND_OF.values(), "an"]
    fragments += [t for templates in MOOD_TEMPLATES.values() for t in templates]
    fragments += [w for words in MOOD_WORDS.values() for w in words]
    words = {w.lower() for text in fragments for w in re.findall(r"[A-Za-z]+", re.sub(r"{\w+}", " ", text))}
    words |= {str(n) for n in range(19)}   # operands 0..9, sums and wrong sums 0..18
    forms = {form for w in words for form in (w, " " + w, w.capitalize(), " " + w.capitalize())}
    punctuation = {".", "..", "!", ",", "?", ":"}
    return sorted(format_prompt(request) for request in SPECS) + sorted(forms | punctuation)


# -----------------------------------------------------------------------------------------------------
# Datasets: prompts, demonstrations, simulated labellers.

def make_prompts(n, split="train", seed=0):
    """n chat prompts of `split` ("train" or "eval"), drawn with replacement.

    Each prompt draws its kind by KIND_WEIGHTS, then a request uniformly from that kind's pool in the
    split. Train and eval pools are disjoint (see POOLS), so eval prompts are never in train. The pools
    are finite (432 train and 112 eval prompts), so prompts repeat within a list, more so for
    large n: like real prompt sets, where the same question is asked many times.
    """
    if split not in POOLS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"prompts:{split}:{seed}")
    kinds = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS], k=n)
    return [format_prompt(rng.choice(POOLS[split][kind])) for kind in kinds]


def demonstrations(n, split="train", seed=0):
    """n SFT examples {"prompt", "response"}, the keys of the JSONL demonstration format.

    The prompts are make_prompts(n, split, seed): preferences() with the same seed uses the same
    prompts; pass another seed to give the reward model different prompts from SFT.
    """
    rng = random.Random(f"demonstrations:{split}:{seed}")
    return [{"prompt": p, "response": sample_answer(p, rng)} for p in make_prompts(n, split, seed)]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def noisy_ranking(scores, noise, rng):
    """Indices of `scores` ranked best-first by a noisy labeller (Plackett-Luce, temperature `noise`).

    Each place goes to one of the remaining answers with probability softmax(score / noise); with two
    answers this is exactly Bradley-Terry: P(a over b) = sigmoid((g_a - g_b) / noise). noise = 0 is a
    perfect labeller (sort by gold score; ties keep their random drawing order).
    """
    remaining = list(range(len(scores)))
    if noise == 0:
        return sorted(remaining, key=lambda i: -scores[i])
    order = []
    while remaining:
        top = max(scores[i] for i in remaining)          # subtract the max so exp cannot overflow
        weights = [math.exp((scores[i] - top) / noise) for i in remaining]
        order.append(remaining.pop(rng.choices(range(len(remaining)), weights=weights)[0]))
    return order


def preferences(n, split="train", seed=0, k=2, noise=1.0):
    """n comparisons by a simulated, noisy labeller, for reward-model training.

    For each prompt of make_prompts(n, split, seed), k distinct answers are drawn with sample_answer
    (a duplicate is redrawn), scored with gold_score, and ranked by noisy_ranking: Plackett-Luce with
    temperature `noise`, which for k = 2 is Bradley-Terry, P(a preferred over b) = sigmoid((g_a - g_b)
    / noise). noise = 0 always prefers the higher gold score; larger noise flips more close calls, as
    tired human labellers do. Returns
        k == 2: {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}   (the JSONL format;
                the scores are the gold scores, so label_agreement can audit the labels)
        k > 2:  {"prompt", "answers", "scores"}: the k answers best-first as the labeller ranked them,
                and their gold scores in the same order.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = random.Random(f"preferences:{split}:{seed}:{k}")
    rows = []
    for prompt in make_prompts(n, split, seed):
        answers = []
        for _ in range(100 * k):
            if len(answers) == k:
                break
            answer = sample_answer(prompt, rng)
            if answer not in answers:
                answers.append(answer)
        if len(answers) < k:
            raise RuntimeError(f"could not draw {k} distinct answers to {prompt!r}")
        scores = [gold_score(prompt, a) for a in answers]
        order = noisy_ranking(scores, noise, rng)
        if k == 2:
            best, worst = order
            rows.append({"prompt": prompt, "chosen": answers[best], "rejected": answers[worst],
                         "chosen_score": scores[best], "rejected_score": scores[worst]})
        else:
            rows.append({"prompt": prompt, "answers": [answers[i] for i in order],
                         "scores": [scores[i] for i in order]})
    return rows


def label_agreement(pairs):
    """Fraction of pairs whose chosen answer has the strictly higher gold score, ties left out.

    How often the (noisy) labels agree with the gold judge: the ceiling on a reward model's gold
    accuracy trained on them is about this high. Uses chosen_score / rejected_score when a pair has
    them, else scores with gold_score. NaN if every pair is a tie.
    """
    agree = total = 0
    for pair in pairs:
        if "chosen_score" in pair and "rejected_score" in pair:
            g_chosen, g_rejected = pair["chosen_score"], pair["rejected_score"]
        else:
            g_chosen = gold_score(pair["prompt"], pair["chosen"])
            g_rejected = gold_score(pair["prompt"], pair["rejected"])
        if g_chosen != g_rejected:
            total += 1
            agree += g_chosen > g_rejected
    return agree / total if total else float("nan")


# -----------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    best = {"topic": 1.0, "content": 1.0, "capital": 0.5, "period": 0.5}   # every other term: 0

    def show(prompt, answer, note=""):
        lost = ", ".join(f"{name} {value:+.2f}" for name, value in gold_terms(prompt, answer).items()
                         if value < best.get(name, 0.0))
        print(f"  {gold_score(prompt, answer):+5.2f} {answer!r:62} {note:9} {lost}")

    print(f"{len(SPECS)} prompts: " + ", ".join(
        f"{kind} {len(POOLS['train'][kind])} train / {len(POOLS['eval'][kind])} eval" for kind in KINDS))
    print(f"GOLD_MAX = {GOLD_MAX}; each line: gold, answer, mode, the terms that cost points\n")
    rng = random.Random(0)
    examples = ["Write a happy sentence about the sea.", "Tell me something sad about the garden.",
                "What color is a banana?", "What sound does an owl make?", "What is 3 plus 4?"]
    for request in examples:
        prompt = format_prompt(request)
        print(repr(prompt))
        show(prompt, reference_answer(prompt), "reference")
        spec = parse_prompt(prompt)
        for mode in CONTENT_MODES:
            show(prompt, " " + _compose(spec, mode, rng), mode)
        for flaw in SURFACE_FLAWS:
            show(prompt, " " + _apply_flaw(_compose(spec, "ideal", rng), flaw, rng), flaw)
        print()

    prompt = format_prompt("Write a happy sentence about the sea.")
    print("What a policy that hacks a mood-word-counting reward model writes (gold falls):")
    show(prompt, " The sea is happy bright lovely.")
    show(prompt, " The sea is happy, bright, lovely, warm, sweet, calm, glad and golden.")
    show(prompt, " The sea is happy happy bright bright lovely lovely lovely.")
    show(prompt, " The sea is happy happy bright bright lovely lovely lovely warm warm sweet sweet "
                 "calm calm glad glad")
    print()

    demos = demonstrations(4000)
    mean_gold = sum(gold_score(d["prompt"], d["response"]) for d in demos) / len(demos)
    print(f"mean gold of 4000 demonstrations: {mean_gold:+.2f}   (GOLD_MAX {GOLD_MAX:+.2f})")
    for noise in (0.0, 0.5, 1.0, 2.0):
        agreement = label_agreement(preferences(4000, noise=noise))
        print(f"label agreement with gold at noise={noise}: {agreement:.3f}")
    print("\na 4-way ranking (noise 1):")
    row = preferences(1, k=4, seed=1)[0]
    print(repr(row["prompt"]))
    for answer, score in zip(row["answers"], row["scores"]):
        print(f"  {score:+5.2f} {answer!r}")
