"""The semantic cache's second stage: cheap checks over the two texts before a semantic hit is served.

A cosine threshold alone cannot tell "open" from "close", "10 miles to km" from "10 km to miles", or
"shipped" from "not shipped": MiniLM scores those pairs 0.89 to 0.99, above many true paraphrases.
Each check below looks for one kind of difference that changes the answer; a candidate that fails
any is a miss. ``tureen cache calibrate`` measures what each buys on the labelled pairs.

- ``numbers``: the numbers (digits or number words) must be the same, in the same order;
- ``negation``: the same count of negations (not, n't, never, no, without...);
- ``entities``: the same names and identifiers (capitalised words inside a sentence, tokens with
  digits, quoted strings, e-mail addresses);
- ``antonyms``: no word of one text faces its opposite in the other (open/close, buy/sell...);
- ``order``: two shared words may not swap places across a direction word (X to Y vs Y to X);
- ``substitution``: the texts may not differ by one or two content words swapped for others while
  every other content word stays in place (Paris/London, lunch/dinner, by value/by key): a changed
  slot, not a rephrasing. Rephrasings that also add, drop or move words pass; a bare synonym swap
  ("shop" for "store") is refused, which costs a hit, never a wrong answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from difflib import SequenceMatcher

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+(?:[.,:]\d+)*")
_QUOTED = re.compile(r"\"([^\"]+)\"|'([^']{2,})'")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"thirty": 30, "forty": 40, "fifty": 50, "hundred": 100,
                                                       "thousand": 1000, "million": 10**6, "half": 0.5,
                                                       "dozen": 12, "once": 1, "twice": 2}
NEGATIONS = {"not", "no", "never", "none", "nothing", "nobody", "neither", "nor", "without", "cannot", "nowhere",
             "unable", "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't", "won't", "can't",
             "couldn't", "shouldn't", "wouldn't", "haven't", "hasn't", "hadn't", "mustn't"}
_ANTONYM_PAIRS = """open close | opens closes | opening closing | start stop | start end | begin end | first last |
buy sell | buying selling | add remove | enable disable | enabled disabled | on off | in out | up down |
increase decrease | raise lower | more less | most least | max min | maximum minimum | before after |
earlier later | early late | above below | over under | inside outside | import export | upload download |
send receive | sent received | push pull | win lose | accept reject | allow deny | allow block | include exclude |
hot cold | warm cool | high low | higher lower | fast slow | faster slower | cheap expensive | cheapest priciest |
cheaper pricier | north south | east west | left right | import export | lock unlock | encrypt decrypt |
encode decode | join leave | create delete | install uninstall | subscribe unsubscribe | connect disconnect |
login logout | arrive depart | arrival departure | morning evening | today tomorrow | yesterday tomorrow |
weekday weekend | monthly yearly | daily weekly | weekly monthly | annual monthly | input output | pass fail |
true false | yes no | positive negative | plus minus | odd even | male female | men women | boy girl |
he she | his her | him her | new old | newest oldest | young old | small large | big small | long short |
longer shorter | heavy light | wide narrow | add subtract | multiply divide | sum difference | sunrise sunset |
summer winter | spring autumn | spring fall | celsius fahrenheit | kilometers miles | kilograms pounds |
meters feet | liters gallons | dollars euros | iphone android | mac windows | windows linux | python java |
asleep awake | sleep wake | mother father | husband wife | brother sister | son daughter | cats dogs | cat dog |
coffee tea | refund charge | credit debit | deposit withdraw | borrow lend | lend borrow | rent buy | hire fire |
win loss | profit loss | gain loss | import export | inbound outbound | incoming outgoing | public private |
internal external | front back | top bottom | upper lower | forward backward | ascending descending |
permanent temporary | online offline | wired wireless | cancel confirm | cancel book | reset delete |
open closed | best worst | longest shortest | good bad | soft hard | right wrong | weekdays weekends |
change delete | upgrade downgrade | reset change | password username | email phone | store restaurant"""
ANTONYMS: dict[str, set[str]] = {}
for _pair in _ANTONYM_PAIRS.replace("\n", " ").split("|"):
    _a, _b = _pair.split()
    ANTONYMS.setdefault(_a, set()).add(_b)
    ANTONYMS.setdefault(_b, set()).add(_a)
DIRECTION = {"to", "into", "from", "than", "vs", "versus", "over", "before", "after", "per", "and", "or", "with"}
STOPWORDS = set("""a an the of for in on at by is are was were be been being am do does did to from and or i
me my we our you your it its this that these those what which who whom how why when where can could
would should will shall may might must please tell show give get have has had there here any some""".split())


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _numbers(text: str) -> list[str]:
    out = []
    for w in words(text):
        if w[0].isdigit():
            out.append(str(float(w.replace(",", ""))) if re.fullmatch(r"[\d,]+(\.\d+)?", w) else w)
        elif w in NUMBER_WORDS:
            out.append(str(float(NUMBER_WORDS[w])))
    return out


def numbers(a: str, b: str) -> bool:
    return _numbers(a) == _numbers(b)


def _negations(text: str) -> int:
    return sum(1 for w in words(text) if w in NEGATIONS or w.endswith("n't"))


def negation(a: str, b: str) -> bool:
    return _negations(a) == _negations(b)


def _entities(text: str) -> set[str]:
    found = {m.group(0).lower() for m in _EMAIL.finditer(text)}
    found |= {(m.group(1) or m.group(2)).lower() for m in _QUOTED.finditer(text)}
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        tokens = re.findall(r"[A-Za-z][\w-]*", sentence)
        for i, token in enumerate(tokens):
            lowered = token.lower()
            if any(c.isdigit() for c in token) or (i > 0 and token[0].isupper() and token != "I"
                                                   and lowered not in STOPWORDS and lowered not in NUMBER_WORDS):
                found.add(lowered)
    return found


def entities(a: str, b: str) -> bool:
    return _entities(a) == _entities(b)


def antonyms(a: str, b: str) -> bool:
    wa, wb = set(words(a)), set(words(b))
    for w in wa - wb:
        if ANTONYMS.get(w, set()) & (wb - wa):
            return False
    return True


def stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _content(text: str) -> list[str]:
    return [stem(w) for w in words(text) if w not in STOPWORDS and w not in DIRECTION]


def substitution(a: str, b: str) -> bool:
    """False for a minimal pair: the content words align except one or two swapped in place."""
    ca, cb = _content(a), _content(b)
    ops = [op for op in SequenceMatcher(a=ca, b=cb, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1 or ops[0][0] != "replace":
        return True
    _, i1, i2, j1, j2 = ops[0]
    return not (i2 - i1 <= 2 and j2 - j1 <= 2 and len(ca) > i2 - i1)


def order(a: str, b: str) -> bool:
    wa, wb = [stem(w) for w in words(a)], [stem(w) for w in words(b)]
    shared = [w for w in dict.fromkeys(wa) if w in wb and w not in STOPWORDS and w not in DIRECTION]
    pos_a, pos_b = {w: wa.index(w) for w in shared}, {w: wb.index(w) for w in shared}
    for i, x in enumerate(shared):
        for y in shared[i + 1:]:
            if (pos_a[x] < pos_a[y]) != (pos_b[x] < pos_b[y]) and _directed(wa, pos_a, x, y) \
                    and _directed(wb, pos_b, x, y):
                return False
    return True


def _directed(ws: list[str], pos: dict[str, int], x: str, y: str) -> bool:
    lo, hi = sorted((pos[x], pos[y]))
    return any(w in DIRECTION for w in ws[lo + 1:hi])


CHECKS: dict[str, Callable[[str, str], bool]] = {"numbers": numbers, "negation": negation, "entities": entities,
                                                  "antonyms": antonyms, "order": order, "substitution": substitution}


def verify(a: str, b: str, checks: dict[str, Callable[[str, str], bool]] = CHECKS) -> str | None:
    """The name of the first check that ``a`` and ``b`` fail, or None when all pass."""
    for name, check in checks.items():
        if not check(a, b):
            return name
    return None
