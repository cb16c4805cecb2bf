"""Seeded RULER-style tasks, built locally (nothing is downloaded).

Each generator returns a :class:`RulerCase`: a context document of about
``length`` tokens and one or more questions (``turns``), each with the
answers that count. :func:`render` turns a case into token ids for a model,
with or without its chat template.

Task families (after RULER, arXiv 2404.06654, and SCBench's shared-context
multi-turn setting, arXiv 2412.10319):

=================  ==========================================================
``niah_single``    one "special magic number" in repetitive noise sentences
``niah_multikey``  four magic numbers of four keys in prose; one key is asked
``niah_multivalue`` four numbers of the same key in prose; all four asked
``niah_multiquery`` four keys in prose; two of them asked in one question
``vt``             variable tracking: a chain of 4 assignments in noise;
                   every variable holding the value is asked
``cwe``            common-word extraction: the 5 words repeated most often
                   in a numbered word list
``fwe``            frequent-word extraction: the 3 most frequent "coded"
                   words in a Zipf-distributed stream
``qa``             question answering over a haystack of short fact passages
``multiturn``      the ``qa`` haystack compressed once, then three questions
                   asked in later turns of the same cache
=================  ==========================================================

Seeds are split so that defaults can be chosen without touching the
reported numbers: ``split="dev"`` draws case ``i`` from seed ``i``, and
``split="heldout"`` from seed ``HELDOUT_BASE + i``. Method defaults are
chosen on dev seeds; tables in RESULTS.md use held-out seeds.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field

from .tasks import default_text, special_prefix

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa",
         "multiturn")
SPLITS = ("dev", "heldout")
HELDOUT_BASE = 1_000_000

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_WORDS = (
    "apple amber anchor arrow autumn badge bamboo banner barrel basket beacon berry blanket blossom border "
    "bottle bracket breeze bridge bucket butter button cabin cactus camera candle canyon carpet castle cedar "
    "chalk cherry chimney cider circle cliff clock cloud clover cobalt comet copper coral cotton crater "
    "crystal cushion dagger daisy desert diamond dolphin dragon drum eagle echo ember engine falcon feather "
    "fern fiddle flame forest fossil fountain galaxy garden garlic glacier globe granite gravel harbor hazel "
    "helmet honey horizon island ivory jacket jasmine jungle kettle kitten ladder lantern lemon lighthouse "
    "lily lizard magnet maple marble meadow melon mirror mitten monkey mosaic needle nickel oasis olive "
    "orbit orchid otter paddle panther parrot pebble pencil pepper piano pillow planet pocket pond poppy "
    "puzzle quartz rabbit radish raven ribbon river rocket saddle salmon satin scarf shadow shell silver "
    "sparrow spider spruce statue summit sunset tiger timber tomato tulip tunnel turtle velvet violet "
    "walnut whistle willow window winter wizard wolf yarn zebra"
).split()
_FIRST = ("Arlo Bea Cyrus Delia Emrys Fenna Gideon Hester Ilya Juno Kasimir Lorna Milo Nerys Orrin Petra "
          "Quill Rosalind Silas Tamsin Ulric Vesna Wren Xavi Yara Zeno").split()
_LAST = ("Ashdown Bellamy Corvin Dunmore Ellery Fairweather Greaves Holloway Ingram Jessup Kettering "
         "Lockhart Marlowe Northcott Oakes Pembrey Quarles Ravensworth Stroud Thackery Underhill Vance "
         "Whitlock Yardley").split()
_TOWNS = ("Kelmore Brannock Ostvale Tirrin Caldmere Westhollow Dunraith Mirefield Quenby Alderwick Sorrowby "
          "Fennick Harrowgate Lyndhurst Emberton Pellworth Greymarch Ashcombe Ravensholt Nettlebury").split()
_JOBS = ("baker carpenter astronomer beekeeper cartographer glassblower blacksmith librarian ferryman "
         "apothecary clockmaker weaver shipwright stonemason brewer falconer tailor potter").split()
_COLORS = "crimson teal amber violet olive indigo scarlet ochre azure maroon".split()
_PETS = "heron ferret tortoise parrot hedgehog goat raven lizard pony owl".split()
# (statement, question, answer prefix) about one person; {n} name, {v} value
_FACTS = (
    ("{n} was born in the town of {v}.", "In which town was {n} born?", "{n} was born in the town of", _TOWNS),
    ("{n} works as a {v}.", "What is the job of {n}?", "{n} works as a", _JOBS),
    ("The favourite colour of {n} is {v}.", "What is the favourite colour of {n}?",
     "The favourite colour of {n} is", _COLORS),
    ("{n} keeps a pet {v} at home.", "What kind of pet does {n} keep?", "{n} keeps a pet", _PETS),
)


@dataclass
class Turn:
    """One question: ``question`` (user text), ``prefix`` (the start of the
    answer, generated from), ``answers`` (strings that count) and
    ``max_new_tokens``."""

    question: str
    prefix: str
    answers: list[str]
    max_new_tokens: int
    #: regex of one answer-shaped item: generation stops once the text holds
    #: as many as there are answers (a list answer is complete), else at a line break
    item: str | None = None


@dataclass
class RulerCase:
    """A task instance: ``context`` (the document, about ``length`` tokens
    for the tokenizer it was built with) and its ``turns``."""

    task: str
    length: int
    seed: int
    split: str
    context: str
    turns: list[Turn]
    instruction: str = ""
    meta: dict = field(default_factory=dict)

    def score(self, turn: int, generated: str) -> float:
        """Fraction of turn ``turn``'s answers found in ``generated`` (whole
        words, case-insensitive)."""
        answers = self.turns[turn].answers
        return sum(_found(a, generated) for a in answers) / len(answers)

    def __repr__(self) -> str:
        qs = "; ".join(f"{t.question!r} -> {t.answers}" for t in self.turns)
        return f"RulerCase({self.task}, length={self.length}, seed={self.seed}, {len(self.context)} chars, {qs})"


def _found(answer: str, text: str) -> bool:
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, text.lower()) is not None


def case_seed(task: str, split: str, index: int) -> int:
    """The seed of case ``index`` of ``task`` in ``split`` (dev: ``index``,
    held-out: ``HELDOUT_BASE + index``), mixed with the task name so that
    tasks never share random draws."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: expected an int >= 0, got {index!r}")
    base = HELDOUT_BASE if split == "heldout" else 0
    return (base + index) * 1009 + zlib.crc32(task.encode()) % 1009


# ----------------------------------------------------------------- haystacks


class _Counter:
    """Token counts of text pieces (``tokenizer`` without special tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.memo.get(text)
        if n is None:
            n = len(self.tok(text, add_special_tokens=False)["input_ids"])
            self.memo[text] = n
        return n


def _fill(pieces, count, budget: int) -> list[str]:
    """The leading pieces whose total token count stays within ``budget``
    (at least one)."""
    out, used = [], 0
    for p in pieces:
        n = count(p)
        if out and used + n > budget:
            break
        out.append(p)
        used += n
    return out


def _noise_pieces(rnd):
    while True:
        yield _NOISE


def _prose_pieces(rnd):
    text = default_text()
    lines = [ln.strip() for ln in text.split("\n") if len(ln.strip()) > 20]
    i = rnd.randrange(len(lines))
    while True:
        yield lines[i % len(lines)] + " "
        i += 1


def _insert(pieces: list[str], needles: list[str], rnd) -> str:
    """Join ``pieces`` with each needle at a random depth (needle order kept)."""
    cuts = sorted(rnd.randrange(len(pieces) + 1) for _ in needles)
    out, last = [], 0
    for cut, needle in zip(cuts, needles):
        out.extend(pieces[last:cut])
        out.append(" " + needle + " ")
        last = cut
    out.extend(pieces[last:])
    return "".join(out).strip()


def _key(rnd, taken: set) -> str:
    while True:
        k = f"{rnd.choice(_WORDS)}-{rnd.choice(_WORDS)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rnd, taken: set) -> str:
    while True:
        v = str(rnd.randrange(1_000_000, 10_000_000))
        if v not in taken:
            taken.add(v)
            return v


_NIAH_NEEDLE = "One of the special magic numbers for {k} is: {v}."
_NUMBER_ITEM = r"(?<!\d)\d{7}(?=\D)"
_NIAH_INSTR = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.")


def _niah(task: str, rnd, count, length: int):
    keys_taken, vals_taken = set(), set()
    pieces_of = _noise_pieces if task == "niah_single" else _prose_pieces
    n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[task]
    n_vals = 4 if task == "niah_multivalue" else 1
    keys = [_key(rnd, keys_taken) for _ in range(n_keys)]
    needles, values = [], {}
    for k in keys:
        values[k] = [_number(rnd, vals_taken) for _ in range(n_vals)]
        needles += [_NIAH_NEEDLE.format(k=k, v=v) for v in values[k]]
    rnd.shuffle(needles)
    room = length - sum(count(" " + n + " ") for n in needles) - count(_NIAH_INSTR) - 2
    pieces = _fill(pieces_of(rnd), count, max(1, room))
    context = _insert(pieces, needles, rnd)
    if task == "niah_multivalue":
        k = keys[0]
        turn = Turn(f"What are all the special magic numbers for {k} mentioned in the provided text?",
                    f"The special magic numbers for {k} mentioned in the provided text are", values[k], 48,
                    _NUMBER_ITEM)
    elif task == "niah_multiquery":
        asked = rnd.sample(keys, 2)
        answers = [values[k][0] for k in asked]
        turn = Turn(f"What are all the special magic numbers for {asked[0]} and {asked[1]} mentioned in the "
                    "provided text?",
                    f"The special magic numbers for {asked[0]} and {asked[1]} mentioned in the provided text are",
                    answers, 28, _NUMBER_ITEM)
    else:
        k = rnd.choice(keys)
        turn = Turn(f"What is the special magic number for {k} mentioned in the provided text?",
                    f"The special magic number for {k} mentioned in the provided text is", values[k], 14)
    return _NIAH_INSTR, context, [turn]


def _vt(rnd, count, length: int):
    names: set = set()

    def var():
        while True:
            v = "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if v not in names:
                names.add(v)
                return v

    value = str(rnd.randrange(10000, 100000))
    chain = [var() for _ in range(5)]
    needles = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, 5)]
    instr = "Memorize and track the chain of variable assignment hidden in the following text."
    room = length - sum(count(" " + n + " ") for n in needles) - count(instr) - 2
    pieces = _fill(_noise_pieces(rnd), count, max(1, room))
    context = _insert(pieces, needles, rnd)  # order kept: each assignment after the one it reads
    turn = Turn(f"Find all variables that are assigned the value {value} in the text above.",
                f"According to the chain of variable assignment in the text above, 5 variables are assigned the "
                f"value {value}, they are:", chain, 32, r"(?<![A-Za-z])[A-Z]{5}(?=[^A-Za-z])")
    return instr, context, [turn]


def _cwe(rnd, count, length: int):
    words = rnd.sample(_WORDS, len(_WORDS))
    common, rare = words[:5], words[5:]
    instr = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often."
    # the common words appear 4x as often as any other word
    per_item = count(" 10. lantern") or 3
    items = max(30, (length - count(instr) - 4) // per_item)
    reps = max(2, items // (4 * 5 + len(rare) // 2 + 1))
    pool = [w for w in common for _ in range(4 * reps)]
    i = 0
    while len(pool) < items:
        pool.append(rare[i % len(rare)])
        i += 1
    pool = pool[:items]
    rnd.shuffle(pool)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(pool))
    while count(context) > length - count(instr) - 4 and len(pool) > 30:
        pool = pool[:-10]
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(pool))
    top = sorted(set(pool), key=lambda w: -pool.count(w))[:5]
    turn = Turn("What are the 5 most common words in the above list?",
                "Answer: The top 5 words that appear most often in the list are:", top, 24)
    return instr, context, [turn]


def _fwe(rnd, count, length: int):
    vocab = [f"{rnd.choice('bcdfghjklmnpqrstvwxz')}{rnd.choice('aeiou')}{rnd.choice('bcdfghjklmnpqrstvwxz')}"
             f"{rnd.choice('aeiou')}{rnd.choice('bcdfghjklmnpqrstvwxz')}" for _ in range(60)]
    vocab = list(dict.fromkeys(vocab))
    instr = "Read the following coded text and track the frequency of each coded word."
    per_word = count(" zamok") or 2
    n = max(30, (length - count(instr) - 4) // per_word)
    # Zipf weights with a clear gap after the third word
    weights = [1.0 / (r + 1) ** 1.2 for r in range(len(vocab))]
    stream = rnd.choices(vocab, weights=weights, k=n)
    for w in vocab[:3]:  # the three top words are more frequent than the rest by construction
        stream += [w] * max(1, n // 25)
    rnd.shuffle(stream)
    context = " ".join(stream)
    while count(context) > length - count(instr) - 4 and len(stream) > 30:
        stream = stream[:-10]
        context = " ".join(stream)
    freq = {w: stream.count(w) for w in set(stream)}
    top = sorted(freq, key=lambda w: (-freq[w], w))[:3]
    turn = Turn("What are the three most frequently appeared coded words in the above coded text?",
                "Answer: According to the coded text above, the three most frequently appeared words are:", top, 16)
    return instr, context, [turn]


def _people(rnd, n: int):
    names = [f"{a} {b}" for a in _FIRST for b in _LAST]
    chosen = rnd.sample(names, n)
    facts = []
    for name in chosen:
        stmt, q, prefix, pool = rnd.choice(_FACTS)
        v = rnd.choice(pool)
        facts.append((name, stmt.format(n=name, v=v), q.format(n=name), prefix.format(n=name), v))
    return facts


def _qa(rnd, count, length: int, questions: int):
    instr = "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    facts = _people(rnd, 120)
    docs, used = [], count(instr) + 4
    prose = _prose_pieces(rnd)
    for i, (_, stmt, *_rest) in enumerate(facts):
        # each document: one fact inside a line or two of prose, so facts are sparse
        doc = f"Document {i + 1}: {next(prose)}{stmt} {next(prose)}".strip()
        n = count(doc + "\n\n")
        if docs and used + n > length:
            break
        docs.append(doc)
        used += n
    asked = rnd.sample(range(len(docs)), min(questions, len(docs)))
    turns = [Turn(facts[i][2], facts[i][3], [facts[i][4]], 8) for i in asked]
    return instr, "\n\n".join(docs), turns


def make_case(task: str, length: int, tokenizer, *, split: str = "dev", index: int = 0) -> RulerCase:
    """Build case ``index`` of ``task`` in ``split`` with a context of about
    ``length`` tokens of ``tokenizer``."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; choose from {', '.join(TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise ValueError(f"length: expected an int >= 64 (tokens), got {length!r}")
    seed = case_seed(task, split, index)
    rnd = random.Random(seed)
    count = _Counter(tokenizer)
    if task.startswith("niah"):
        instr, context, turns = _niah(task, rnd, count, length)
    elif task == "vt":
        instr, context, turns = _vt(rnd, count, length)
    elif task == "cwe":
        instr, context, turns = _cwe(rnd, count, length)
    elif task == "fwe":
        instr, context, turns = _fwe(rnd, count, length)
    else:
        instr, context, turns = _qa(rnd, count, length, 3 if task == "multiturn" else 1)
    return RulerCase(task, length, seed, split, context, turns, instr)


# ----------------------------------------------------------------- rendering


@dataclass
class Rendered:
    """Token ids of a case for one tokenizer: ``chunks[0]`` is the prompt up
    to the first answer prefix, ``chunks[i]`` the text between answer
    ``i - 1`` and answer ``i`` (end of turn, next question, its prefix)."""

    chunks: list[list[int]]
    chat: bool
    stop_ids: list[int]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(case: RulerCase, tokenizer, *, chat: bool | None = None) -> Rendered:
    """Token ids of ``case`` for ``tokenizer``.

    ``chat=None`` uses the chat template when the tokenizer has one. Without
    one the prompt is plain text: instruction, context, question, answer
    prefix. With one, each question is a user turn (the first also holds the
    instruction and context) and the answer prefix starts the assistant turn;
    later turns are the template's text between an assistant answer and the
    next assistant turn, so they follow whatever the model generated.
    """
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise ValueError("chat: this tokenizer has no chat template; pass chat=False")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    first_user = f"{case.instruction}\n\n{case.context}\n\n{case.turns[0].question}"
    chunks = []
    if not chat:
        chunks.append(special_prefix(tokenizer) + enc(first_user + "\n\n" + case.turns[0].prefix))
        for t in case.turns[1:]:
            chunks.append(enc(f"\n\n{t.question}\n\n{t.prefix}"))
    else:
        def tmpl(msgs, gen):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        head = tmpl([{"role": "user", "content": first_user}], True)
        chunks.append(enc(head + case.turns[0].prefix))
        marker = "\u2063ANSWER\u2063"
        for t in case.turns[1:]:
            text = tmpl([{"role": "user", "content": "Q"}, {"role": "assistant", "content": marker},
                         {"role": "user", "content": t.question}], True)
            chunks.append(enc(text[text.index(marker) + len(marker):] + t.prefix))
    stop = [i for i in (getattr(tokenizer, "eos_token_id", None),) if i is not None]
    return Rendered(chunks, bool(chat), stop)


__all__ = ["TASKS", "SPLITS", "HELDOUT_BASE", "Turn", "RulerCase", "Rendered", "case_seed", "make_case",
           "render", "has_chat_template"]
