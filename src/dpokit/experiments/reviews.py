"""A generated corpus of movie-review-like English text (no copied text) and review prefixes.

The corpus stands in for IMDb in the controlled-sentiment experiment of the DPO paper (§6.1):
:func:`generate_reviews` draws reviews from a seeded probabilistic grammar (invented film titles,
actor and director names built from name parts, sentences about acting, plot, direction, music,
pacing, comparisons, recommendations, hedges and "but" contrasts), with positive, negative and
neutral/mixed reviews in a chosen proportion. Sentiment is carried by words that VADER scores
(great, wonderful, boring, awful, ...), so a VADER judge can label model continuations.

:func:`review_prefixes` gives short prompts (2-8 tokens) whose text does not itself decide the
sentiment: every review starts with an *opening* drawn from one shared pool of sentiment-neutral
openings ("I watched <title>", "The film", "This movie is", "Last night I saw <title> ..."), with
the same distribution whatever the review's sentiment, and a prefix never extends past that opening.

:func:`base_model_path` returns the directory of the small causal LM shipped with the package
(``dpokit/assets/base``), pretrained on this corpus by ``scripts/build_base_model.py``.
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Any, Callable

__all__ = ["generate_reviews", "review_prefixes", "base_model_path", "SENTIMENTS"]

SENTIMENTS = ("positive", "negative", "neutral")


def base_model_path() -> str:
    """Filesystem path of the shipped base model directory (``dpokit/assets/base``)."""
    return str(resources.files("dpokit") / "assets" / "base")


# ----------------------------------------------------------------------------------------------
# Vocabulary. Lists named *_NEU hold words VADER gives no score (checked by tests/experiments/test_reviews.py),
# so titles, names, openings and plot summaries are sentiment-neutral.

_FIRST_NAMES = (
    "Anna Ben Clara Daniel Elena Frank Greta Henry Iris Jack Julia Karl Laura Leo Maria Martin "
    "Nora Oscar Paula Peter Rosa Sam Sofia Thomas Vera Victor Walter Alice Hugo Ruth Simon Ella "
    "Felix Hannah Ivan Lena Marco Nina Owen Tessa"
).split()
_SURNAME_HEADS = (
    "Hal Mor Ket Bran Vel Dor Ash Carr Wil Thorn Lind Mar Pell Rook Stan Hart Fen Gar Hol Brad "
    "Cal Dun Els Farn Gold Kin Lang Mel Norr Ost Pem Quin Red Sel Tal Ward"
).split()
_SURNAME_TAILS = "ley ton wick field more by son ford well ridge man ham dale stone worth er ing".split()

_TITLE_ADJ_NEU = (
    "Silent Last Golden Hidden Distant Crimson Winter Midnight Northern Long Quiet Second "
    "Summer Autumn Secret Eastern Endless Paper Iron Glass Silver Narrow Little Final Burning "
    "Open Blue Red Far Western Frozen Yellow Seventh"
).split()
_TITLE_NOUN_NEU = (
    "Harbor River Kingdom Letter Garden Road Station Island Mountain Bridge Window Valley Tower "
    "Train Summer Shore Forest City Hotel Voyage House Lighthouse Orchard Desert Ocean Mirror "
    "Clock Circus Village Highway Border Season Signal Compass Canyon Frontier Archive Lantern"
).split()
_TITLE_PLACE_NEU = "Paris Berlin Vienna Lisbon Cairo Tokyo Boston Chicago Memphis Oslo Havana Dublin Prague".split()

_GENRES_NEU = (  # (singular, plural)
    ("drama", "dramas"), ("mystery", "mysteries"), ("western", "westerns"), ("musical", "musicals"),
    ("documentary", "documentaries"), ("science fiction film", "science fiction films"),
    ("family film", "family films"), ("animated film", "animated films"), ("period piece", "period pieces"),
    ("road movie", "road movies"), ("detective story", "detective stories"), ("sports film", "sports films"),
    ("spy film", "spy films"), ("biopic", "biopics"), ("heist film", "heist films"),
    ("costume drama", "costume dramas"), ("courtroom drama", "courtroom dramas"),
)
_ROLES_NEU = (
    "the father", "the mother", "the young detective", "the old captain", "the teacher", "the mayor",
    "the farmer", "the pilot", "the journalist", "the doctor", "the older sister", "the landlord",
    "the professor", "the sheriff", "the musician", "the painter", "the nurse", "the lawyer",
    "the chef", "the boxer", "the student", "the shop owner", "the driver", "the scientist",
)
_JOBS_NEU = (
    "teacher", "farmer", "pilot", "journalist", "doctor", "painter", "nurse", "lawyer", "chef",
    "student", "scientist", "musician", "taxi driver", "shop owner", "sailor", "photographer",
    "librarian", "mechanic", "architect", "detective", "engineer", "baker",
)
_PLOTS_NEU = (
    "returns to her home town", "travels across the country", "moves to a new city",
    "searches for an old classmate", "opens a small restaurant", "joins a traveling circus",
    "inherits an old house", "takes a job at a lighthouse", "tries to find a famous painting",
    "plans a trip to the coast", "runs for mayor", "starts a band", "goes back to school",
    "follows a radio signal", "sails to a distant island", "writes a letter to his father",
    "meets a stranger on a train", "looks into the history of her family", "builds a boat",
    "trains for a big race", "tries to keep the family farm", "crosses the desert",
)
_ASPECTS_NEU = (
    "acting", "plot", "script", "story", "dialogue", "direction", "music", "score", "soundtrack",
    "camera work", "cinematography", "editing", "pacing", "ending", "opening scene", "cast",
    "lead performance", "costumes", "set design", "photography", "screenplay", "visual effects",
    "final act", "characters", "sound design", "lighting",
)
_PLACES_NEU = tuple(_TITLE_PLACE_NEU) + ("Scotland", "Canada", "Morocco", "Iceland", "Texas", "Sicily", "Norway")
_COMPANIONS_NEU = (
    "my wife", "my husband", "my sister", "my brother", "my parents", "a colleague", "two neighbors",
    "my son", "my daughter", "my roommate", "my girlfriend", "my boyfriend", "my dad", "my mom",
)
_TIMES_NEU = (
    "last night", "on Sunday", "this weekend", "yesterday", "on a quiet evening", "on a long flight",
    "at the cinema", "at home", "on Friday", "last week", "with the family", "after work",
)

# Sentiment-bearing vocabulary (all scored by VADER in the intended direction).
_POS_ADJ = (
    "great wonderful brilliant superb excellent beautiful amazing fantastic charming delightful "
    "lovely terrific outstanding funny stunning gorgeous enjoyable clever impressive perfect "
    "magnificent engaging fun smart sweet warm exciting fresh inspiring heartwarming"
).split()
_NEG_ADJ = (
    "boring awful dull terrible horrible bad poor weak stupid dreadful lame disappointing "
    "annoying painful ugly ridiculous lousy pathetic messy clumsy confusing tiresome dumb "
    "unpleasant depressing frustrating miserable useless"
).split()
_NEU_ADJ = "average ordinary predictable simple standard uneven modest routine familiar conventional plain".split()
_POS_INTENS = ("", "", "", "very ", "really ", "truly ", "absolutely ", "simply ", "so ", "incredibly ")
_ATTR_INTENS = ("", "", "", "very ", "really ", "truly ", "absolutely ", "incredibly ", "quite ")  # before a noun
_POS_NOUN = ("masterpiece", "gem", "treat", "joy", "triumph", "delight", "pleasure", "winner")
_NEG_NOUN = ("mess", "disaster", "failure", "waste of time", "disappointment", "bore", "letdown")
_POS_VERB = ("loved", "enjoyed", "adored", "liked", "admired", "appreciated")
_NEG_VERB = ("hated", "disliked", "could not stand", "regretted watching", "was bored by")
_POS_PACE = ("tight and exciting", "perfect", "brisk and fun", "just right", "smooth and engaging")
_NEG_PACE = ("painfully slow", "a mess", "dull and sluggish", "awful", "tiresome and uneven")
_POS_FEEL = ("smiling", "happy", "inspired", "moved", "excited", "grateful")
_NEG_FEEL = ("bored", "annoyed", "sleepy", "angry", "frustrated", "disappointed")


# ----------------------------------------------------------------------------------------------
class _Grammar:
    """One review generator bound to one random stream."""

    def __init__(self, rng: random.Random):
        self.r = rng

    # -- slot fillers ------------------------------------------------------------------------
    def c(self, seq):
        return self.r.choice(seq)

    def surname(self) -> str:
        return self.c(_SURNAME_HEADS) + self.c(_SURNAME_TAILS)

    def person(self) -> str:
        return f"{self.c(_FIRST_NAMES)} {self.surname()}"

    def title(self) -> str:
        k = self.r.random()
        if k < 0.45:
            return f"The {self.c(_TITLE_ADJ_NEU)} {self.c(_TITLE_NOUN_NEU)}"
        if k < 0.6:
            return f"{self.c(_TITLE_NOUN_NEU)} of {self.c(_TITLE_PLACE_NEU)}"
        if k < 0.72:
            return f"{self.c(_TITLE_ADJ_NEU)} {self.c(_TITLE_NOUN_NEU)}"
        if k < 0.84:
            return f"The {self.c(_TITLE_NOUN_NEU)} at {self.c(_TITLE_ADJ_NEU)} {self.c(_TITLE_NOUN_NEU)}"
        if k < 0.92:
            return f"{self.c(_FIRST_NAMES)}'s {self.c(_TITLE_NOUN_NEU)}"
        return f"{self.c(_TITLE_PLACE_NEU)} {self.c(_TITLE_NOUN_NEU)}"

    def aspect_is(self) -> str:
        """"the <aspect> is" / "the <aspects> are"."""
        a = self.c(_ASPECTS_NEU)
        return f"the {a} {'are' if a.endswith('s') else 'is'}"

    def genre(self, plural: bool = False) -> str:
        g = self.c(_GENRES_NEU)
        return g[1] if plural else g[0]

    def adj(self, s: str, attributive: bool = False) -> str:
        """An adjective of sentiment ``s``, maybe intensified (``attributive``: placed before a noun)."""
        if s == "neutral":
            return self.c(_NEU_ADJ)
        intens = self.c(_ATTR_INTENS if attributive else _POS_INTENS)
        return intens + self.c(_POS_ADJ if s == "positive" else _NEG_ADJ)

    @staticmethod
    def a(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    # -- opening: (neutral opening, sentiment-bearing rest of first sentence) -----------------
    def opening(self, s: str) -> tuple[str, str]:
        t = self.title()
        k = self.r.randrange(12)
        g = self.genre()
        if s == "neutral":  # mixed verdicts for the neutral class
            verdict = self.c((
                f"it was {self.adj('neutral')}",
                f"it was {self.adj('positive')} in parts but {self.adj('negative')} in others",
                "I have mixed feelings about it",
                f"it was {self.c(_NEG_ADJ)} at first but {self.c(_POS_ADJ)} by the end",
                f"it was {self.c(_POS_ADJ)} at first but {self.c(_NEG_ADJ)} by the end",
                f"it is {self.a(self.c(_NEU_ADJ))} {g}",
            ))
        elif s == "positive":
            verdict = self.c((
                f"it was {self.adj(s)}", f"I {self.c(_POS_VERB)} it", f"it is {self.a(self.adj(s, True))} {g}",
                f"it was a {self.c(_POS_NOUN)}", f"it left me {self.c(_POS_FEEL)}",
                f"it was {self.adj(s)} from start to finish",
            ))
        else:
            verdict = self.c((
                f"it was {self.adj(s)}", f"I {self.c(_NEG_VERB)} it", f"it is {self.a(self.adj(s, True))} {g}",
                f"it was a {self.c(_NEG_NOUN)}", f"it left me {self.c(_NEG_FEEL)}",
                f"it was {self.adj(s)} from start to finish",
            ))
        if k == 0:
            return f"I watched {t} {self.c(_TIMES_NEU)}", f" and {verdict}."
        if k == 1:
            return "The film", f" is {self.a(self.adj(s, True))} {g} about {self.a(self.c(_JOBS_NEU))} who {self.c(_PLOTS_NEU)}."
        if k == 2:
            return "This movie is", f" {self.adj(s)}" + self.c((".", f", and {verdict}.", " from start to finish."))
        if k == 3:
            return f"Last night I saw {t}", f" and {verdict}."
        if k == 4:
            return f"{t} is", f" {self.a(self.adj(s, True))} {g}" + self.c((".", f" about {self.a(self.c(_JOBS_NEU))} who {self.c(_PLOTS_NEU)}."))
        if k == 5:
            return f"I went to see {t} with {self.c(_COMPANIONS_NEU)}", f" and {verdict}."
        if k == 6:
            return f"So I finally watched {t}", f", and {verdict}."
        if k == 7:
            return f"The new film from director {self.person()}", f" is {self.adj(s)}."
        if k == 8:
            return "I have to say that this film", " is " + self.adj(s) + "."
        if k == 9:
            return f"This is the second film by {self.person()}", f", and {verdict}."
        if k == 10:
            return "So, this movie", f" was {self.adj(s)}."
        return f"My review of {t}:", f" {verdict[0].upper()}{verdict[1:]}."

    # -- body sentences ----------------------------------------------------------------------
    def body(self, s: str) -> str:
        if s == "neutral":
            s2 = self.c(("neutral", "neutral", "mixed", "mixed", "positive", "negative"))
            if s2 == "mixed":
                return self.contrast(self.c(("positive", "negative")))
            if s2 != "neutral":
                return self.body(s2)
            return self.c((
                lambda: f"{self.aspect_is().capitalize()} {self.adj('neutral')}.",
                lambda: f"The film runs about {self.c(('ninety', 'one hundred', 'two hundred', 'eighty'))} minutes.",
                lambda: f"It was filmed in {self.c(_PLACES_NEU)}.",
                lambda: f"{self.person()} plays {self.c(_ROLES_NEU)}.",
                lambda: f"The story follows {self.person()}, {self.a(self.c(_JOBS_NEU))} who {self.c(_PLOTS_NEU)}.",
                lambda: f"It is {self.a(self.adj('neutral', True))} {self.genre()} with {self.a(self.adj('neutral', True))} {self.c(_ASPECTS_NEU)}.",
                lambda: f"The director is {self.person()}.",
                lambda: "Some parts work and some do not.",
                lambda: "It is not great, but it is not terrible either.",
                lambda: f"The music is by {self.person()}.",
            ))()
        pos = s == "positive"
        adj = lambda attributive=False: self.adj(s, attributive)  # noqa: E731
        asp = lambda: self.c(_ASPECTS_NEU)  # noqa: E731
        opts: list[Callable[[], str]] = [
            lambda: f"{self.aspect_is().capitalize()} {adj()}.",
            lambda: f"{self.aspect_is().capitalize()} {adj()} and {self.aspect_is()} {adj()}.",
            lambda: f"{self.person()} gives {self.a(adj(True))} performance as {self.c(_ROLES_NEU)}.",
            lambda: f"The acting is {adj()}, especially {self.person()} as {self.c(_ROLES_NEU)}.",
            lambda: f"I {self.c(_POS_VERB if pos else _NEG_VERB)} the {asp()}.",
            lambda: f"Director {self.person()} does {self.a(adj(True))} job with the {asp()}.",
            lambda: f"The music by {self.person()} is {adj()}.",
            lambda: f"The pacing is {self.c(_POS_PACE if pos else _NEG_PACE)}.",
            lambda: f"It is one of the {'best' if pos else 'worst'} {self.genre(True)} I have seen in years.",
            lambda: f"It is even {'better' if pos else 'worse'} than {self.title()}.",
            lambda: f"The story follows {self.person()}, {self.a(self.c(_JOBS_NEU))} who {self.c(_PLOTS_NEU)}, and it is {adj()}.",
            lambda: f"What {self.a(adj(True))} film!",
            lambda: f"The {asp()} left me {self.c(_POS_FEEL if pos else _NEG_FEEL)}.",
            lambda: self.contrast(s),
            lambda: self.recommend(s),
        ]
        return self.c(opts)()

    def contrast(self, s: str) -> str:
        """A hedge followed by "but": the clause after "but" carries sentiment ``s``."""
        other = "negative" if s == "positive" else "positive"
        a1, a2 = self.aspect_is(), self.aspect_is()
        return self.c((
            lambda: f"{a1.capitalize()} {self.adj(other)}, but {a2} {self.adj(s)}.",
            lambda: f"{a1.capitalize()} a little {self.c(_NEU_ADJ)} at times, but {a2} {self.adj(s)}.",
            lambda: f"I expected {self.a(self.c(_NEU_ADJ))} {self.genre()}, but it was {self.adj(s)}.",
            lambda: f"It starts slowly, but {a2} {self.adj(s)}.",
        ))()

    def recommend(self, s: str) -> str:
        if s == "positive":
            return self.c((
                "I highly recommend it.", "I strongly recommend it.", "Highly recommended.",
                "You should definitely see it.", f"A must see for fans of {self.genre(True)}.",
                "I would happily watch it again.", "Ten out of ten.", "I will watch it again soon.",
                f"Take {self.c(_COMPANIONS_NEU)} to see it, you will love it.",
            ))
        return self.c((
            "I do not recommend it.", "Avoid it.", "Save your money.", "What a waste of time.",
            "I would never watch it again.", "Two out of ten.", f"Skip it, even if you are a fan of {self.genre(True)}.",
            "I want those two hours back.",
        ))

    def closing(self, s: str) -> str:
        if s == "neutral":
            return self.c((
                f"Overall it is {self.a(self.adj('neutral', True))} film.", "Watch it if you have nothing else to do.",
                f"It is {self.a(self.c(_NEU_ADJ))} {self.genre()}, nothing more.",
                "Some will enjoy it and some will not.", "Five out of ten.",
            ))
        if self.r.random() < 0.6:
            return self.recommend(s)
        return f"Overall, {self.a(self.adj(s, True))} film."

    def review(self, s: str) -> tuple[str, str]:
        """Return (opening, full review text)."""
        op, rest = self.opening(s)
        n = self.r.randint(2, 5)
        sents = [op + rest]
        for _ in range(n - 2):
            sents.append(self.body(s))
        sents.append(self.closing(s))
        return op, " ".join(sents)


def _generate(n: int, seed: int, mix: tuple[float, float, float]) -> list[tuple[str, str, str]]:
    """(sentiment, opening, text) triples; the first k of n are the same for every n >= k."""
    mix = tuple(float(m) for m in mix)
    if len(mix) != 3 or any(m < 0 for m in mix) or sum(mix) <= 0:
        raise ValueError(f"sentiment_mix must be three non-negative shares, got {mix!r}")
    rng = random.Random(seed)
    g = _Grammar(rng)
    out = []
    for _ in range(n):
        s = rng.choices(SENTIMENTS, weights=mix)[0]
        op, text = g.review(s)
        out.append((s, op, text))
    return out


def generate_reviews(n: int, seed: int, sentiment_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)) -> list[str]:
    """``n`` movie-review-like texts (2-5 sentences each), deterministic given ``seed``.

    ``sentiment_mix`` gives the (positive, negative, neutral/mixed) shares; each review's class is
    drawn independently with these weights.
    """
    return [text for _, _, text in _generate(n, seed, sentiment_mix)]


def generate_labeled_reviews(n: int, seed: int, sentiment_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)) -> list[tuple[str, str]]:
    """Like :func:`generate_reviews` but returns ``(sentiment, text)`` pairs."""
    return [(s, text) for s, _, text in _generate(n, seed, sentiment_mix)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            enc = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:  # an encode() without that keyword
            enc = tokenizer.encode(text)
        return list(getattr(enc, "ids", enc))  # a raw ``tokenizers.Tokenizer`` returns an Encoding
    raise TypeError("tokenizer must have an encode() method")


def review_prefixes(n: int, seed: int, tokenizer: Any, min_tokens: int = 2, max_tokens: int = 8) -> list[str]:
    """``n`` review prefixes of ``min_tokens``..``max_tokens`` tokens that do not decide the sentiment.

    How: fresh reviews are generated from ``seed`` (any sentiment). Each starts with an *opening*
    from a shared pool of sentiment-neutral openings ("I watched <title> last night", "The film",
    "This movie is", "Last night I saw <title>", ...), whose distribution is the same for every
    sentiment class. The prefix is the opening cut after a whole word: among the cut points whose
    text encodes to ``min_tokens..max_tokens`` tokens (``add_special_tokens=False``) one is drawn
    at random. Because cuts fall on word boundaries, the prefix equals the decoded first k tokens
    of the review for byte-level BPE tokenizers, and re-encoding it gives exactly k tokens.
    Openings with no such cut point are skipped.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed * 7919 + 17)
    out: list[str] = []
    batch_seed = seed
    while len(out) < n:
        for _, op, _text in _generate(64, batch_seed, (1.0, 1.0, 0.5)):
            words = op.split(" ")
            cands = []
            for j in range(1, len(words) + 1):
                p = " ".join(words[:j])
                k = len(_encode(tokenizer, p))
                if min_tokens <= k <= max_tokens:
                    cands.append(p)
                elif k > max_tokens:
                    break
            if cands:
                out.append(rng.choice(cands))
                if len(out) == n:
                    break
        batch_seed += 1_000_003
    return out
