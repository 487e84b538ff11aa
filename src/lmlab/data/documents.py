"""A generated encyclopedia of an invented world, and multi-hop questions about it.

For agents that search and look things up (ReAct, ``lmlab.prompting.agent``) without a
download and without facts a model could have memorised: short articles about invented
people, cities, countries and rivers, with a few distractor articles (ships and schools
named after people, so a search for a name finds more than one page). The same seed gives
the same world on every machine; seed 0 is the bundled collection.

Every question needs at least two hops, because no article states its answer next to the
question's subject:

    "In which country was the inventor of the brass loom born?"
      1. search the brass loom      -> the article on the person who made it
      2. look up where they were born (a later sentence of that article: the city)
      3. search that city           -> its first sentence names the country

A person's article also names the city where they *worked*, a different one: a model that
takes the first city it reads gets the wrong country.

    >>> world = build_world(seed=0)
    >>> len(world.documents) >= 100 and len(multihop_questions(seed=0)) >= 100
    True
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

SYLLABLES = [
    "ar", "bel", "cor", "dan", "el", "fen", "gal", "hal", "is", "jor", "kal", "lun", "mar",
    "nor", "ol", "per", "quin", "ros", "sel", "tam", "ul", "ven", "wil", "yar", "zan", "bre",
    "dor", "eth", "fal", "gro", "kes", "lor", "mir", "nev", "ost", "pra", "rin", "sav", "tor",
]  # fmt: skip
CITY_ENDINGS = ["mora", "ford", "holm", "vik", "dale", "bury", "stad", "wick", "port", "gard"]
COUNTRY_ENDINGS = ["ia", "land", "ar", "ovia", "eth", "istan"]
MATERIALS = ["brass", "glass", "copper", "paper", "steam", "silver", "clockwork", "iron",
             "rubber", "cedar", "wax", "linen"]  # fmt: skip
OBJECTS = ["loom", "kettle", "compass", "telescope", "lantern", "printing press", "pump",
           "bicycle", "harp", "barometer", "sextant", "typewriter", "windmill", "camera"]  # fmt: skip
PROFESSIONS = {  # profession -> (what they made, how the article says it)
    "inventor": ("invented", "the {material} {object}"),
    "painter": ("painted", "the {material} {object} mural"),
    "composer": ("composed", "the {material} {object} sonata"),
    "architect": ("designed", "the {material} {object} hall"),
}
FEATURES = ["old harbour", "cathedral", "university", "spring market", "stone bridge",
            "textile mills", "observatory", "botanical garden", "opera house", "salt mines"]  # fmt: skip
CURRENCY_WORDS = ["crown", "mark", "florin", "thaler", "ducat", "real", "shilling", "guilder"]


@dataclass(frozen=True)
class Document:
    title: str
    text: str
    kind: str
    """person, city, country, river or distractor."""


@dataclass
class World:
    """The facts (for questions and gold trajectories) and the articles that state them."""

    people: list[dict] = field(default_factory=list)
    cities: dict[str, dict] = field(default_factory=dict)
    countries: dict[str, dict] = field(default_factory=dict)
    rivers: dict[str, dict] = field(default_factory=dict)
    documents: list[Document] = field(default_factory=list)


def _namer(rng: random.Random):
    """Unique capitalised invented names: two or three syllables plus an ending."""
    used: set[str] = set()

    def name(endings: list[str] | None = None, syllables: int = 2) -> str:
        while True:
            word = "".join(rng.choice(SYLLABLES) for _ in range(syllables))
            word = (word + rng.choice(endings) if endings else word).capitalize()
            if word not in used and 4 <= len(word) <= 12:
                used.add(word)
                return word

    return name


def build_world(seed: int = 0, n_countries: int = 8, cities_per_country: int = 3,
                n_rivers: int = 8, n_people: int = 48) -> World:  # fmt: skip
    """The invented world of ``seed`` with its documents (sorted by title)."""
    rng = random.Random(seed)
    name = _namer(rng)
    world = World()
    currencies = rng.sample(CURRENCY_WORDS, len(CURRENCY_WORDS))
    for i in range(n_countries):
        country = name(COUNTRY_ENDINGS)
        world.countries[country] = {
            "name": country,
            "currency": f"{name()} {currencies[i % len(currencies)]}".lower(),
            "language": name(["ish", "ese", "ic"]),
            "cities": [],
        }
    for country in world.countries.values():
        for _ in range(cities_per_country):
            city = name(CITY_ENDINGS, syllables=1)
            world.cities[city] = {
                "name": city,
                "country": country["name"],
                "river": None,
                "founded": rng.randint(900, 1700),
                "population": rng.randint(12, 900) * 1000,
                "feature": rng.choice(FEATURES),
            }
            country["cities"].append(city)
        country["capital"] = rng.choice(country["cities"])
    city_names = list(world.cities)
    free = rng.sample(city_names, len(city_names))
    for _ in range(n_rivers):
        river = f"{name()} River"
        through = [free.pop() for _ in range(rng.randint(2, 3)) if free]
        for city in through:
            world.cities[city]["river"] = river
        source = world.cities[through[0]]["country"]
        world.rivers[river] = {"name": river, "through": through, "source": source,
                               "length": rng.randint(80, 1400)}  # fmt: skip
    works = rng.sample([(m, o) for m in MATERIALS for o in OBJECTS], n_people)
    surnames = [name() for _ in range(n_people * 2 // 3)]  # shared surnames: distractors
    for i in range(n_people):
        profession = rng.choice(list(PROFESSIONS))
        verb, pattern = PROFESSIONS[profession]
        born, worked = rng.sample(city_names, 2)
        year = rng.randint(1700, 1900)
        world.people.append({
            "name": f"{name(syllables=rng.choice([2, 3]))} {surnames[i % len(surnames)]}",
            "profession": profession,
            "verb": verb,
            "work": pattern.format(material=works[i][0], object=works[i][1]),
            "born": born,
            "worked": worked,
            "year": year,
            "died": year + rng.randint(35, 90),
            "he": rng.choice(["He", "She"]),
        })  # fmt: skip
    world.documents = sorted(_documents(world, rng), key=lambda d: d.title)
    return world


def _documents(world: World, rng: random.Random) -> list[Document]:
    docs = []
    for p in world.people:
        surname, he = p["name"].split()[-1], p["he"]
        docs.append(Document(p["name"], " ".join([
            f"{p['name']} was {_a(p['profession'])} who {p['verb']} {p['work']}.",
            f"{surname} was born in {p['born']} in {p['year']}.",
            f"{he} later lived and worked in {p['worked']}, where {he.lower()} is remembered "
            f"by a street name.",
            f"{he} died in {p['died']}.",
        ]), "person"))  # fmt: skip
    for c in world.cities.values():
        river = (f"It lies on the {c['river']}." if c["river"]
                 else "No large river passes through it.")  # fmt: skip
        capital = world.countries[c["country"]]["capital"] == c["name"]
        docs.append(Document(c["name"], " ".join([
            f"{c['name']} is a {'capital ' if capital else ''}city in {c['country']}.",
            river,
            f"It was founded in {c['founded']} and has about {c['population']:,} inhabitants.",
            f"The city is known for its {c['feature']}.",
        ]), "city"))  # fmt: skip
    for k in world.countries.values():
        docs.append(Document(k["name"], " ".join([
            f"{k['name']} is a country with {len(k['cities'])} large cities.",
            f"Its capital is {k['capital']}.",
            f"The currency of {k['name']} is the {k['currency']}.",
            f"Most of its people speak {k['language']}.",
        ]), "country"))  # fmt: skip
    for r in world.rivers.values():
        through = ", ".join(r["through"][:-1]) + f" and {r['through'][-1]}"
        docs.append(Document(r["name"], " ".join([
            f"The {r['name']} is a river about {r['length']} kilometres long.",
            f"It rises in {r['source']} and flows through {through}.",
        ]), "river"))  # fmt: skip
    for p in rng.sample(world.people, len(world.people) // 4):  # named after people
        city = rng.choice(list(world.cities))
        if rng.random() < 0.5:
            title, text = (
                f"{p['name']} (ship)",
                (
                    f"The {p['name']} was a steamship built in {city}. "
                    f"It was named after the {p['profession']} and sank in a storm."
                ),
            )
        else:
            title, text = (
                f"{p['name']} School",
                (
                    f"The {p['name']} School is a school in {city}. "
                    f"It teaches music and drawing and was named after the {p['profession']}."
                ),
            )
        docs.append(Document(title, text, "distractor"))
    return docs


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# ----------------------------------------------------------------------------- questions


def _questions(world: World) -> list[dict]:
    """Every question the world supports, each with its answer, accepted aliases, kind and
    the gold actions (tool, argument) that answer it."""
    out = []
    for p in world.people:
        born = world.cities[p["born"]]
        country = world.countries[born["country"]]
        find = [("search", p["work"]), ("lookup", "born")]
        out.append({
            "question": f"In which country was the {p['profession']} who {p['verb']} {p['work']} born?",
            "answer": country["name"],
            "kind": "birth_country",
            "actions": [*find, ("search", born["name"]), ("finish", country["name"])],
        })  # fmt: skip
        out.append({
            "question": f"What is the capital of the country where {p['name']} was born?",
            "answer": country["capital"],
            "kind": "birth_capital",
            "actions": [("search", p["name"]), ("lookup", "born"), ("search", born["name"]),
                        ("search", country["name"]), ("lookup", "capital"),
                        ("finish", country["capital"])],
        })  # fmt: skip
        if born["river"]:
            river = born["river"]
            out.append({
                "question": f"On which river lies the city where {p['name']} was born?",
                "answer": river,
                "aliases": [river.removesuffix(" River")],
                "kind": "birth_river",
                "actions": [("search", p["name"]), ("lookup", "born"),
                            ("search", born["name"]), ("lookup", "river"), ("finish", river)],
            })  # fmt: skip
        worked = world.cities[p["worked"]]
        out.append({
            "question": f"What is the currency of the country where {p['name']} worked?",
            "answer": world.countries[worked["country"]]["currency"],
            "kind": "work_currency",
            "actions": [("search", p["name"]), ("lookup", "worked"), ("search", worked["name"]),
                        ("search", worked["country"]), ("lookup", "currency"),
                        ("finish", world.countries[worked["country"]]["currency"])],
        })  # fmt: skip
    return out


def multihop_questions(n: int | None = None, seed: int = 0) -> list[dict]:
    """Questions about the world of ``seed`` (shuffled, seeded), each a dict: question,
    answer, aliases (other accepted answers), kind, actions (a gold trajectory). The first
    two people's questions are left out: ``example_questions`` uses them in prompts."""
    world = build_world(seed)
    reserved = {p["name"] for p in world.people[:2]}
    reserved |= {p["work"] for p in world.people[:2]}
    items = [q for q in _questions(world) if not any(r in q["question"] for r in reserved)]
    random.Random(seed).shuffle(items)
    return [{"aliases": [], **q} for q in items[:n]]


def example_questions(seed: int = 0) -> list[dict]:
    """Two questions about the first two people (never in ``multihop_questions``), for
    few-shot example trajectories: one by a thing they made, one by their name."""
    world = build_world(seed)
    first, second = world.people[:2]
    asked = _questions(World(people=[first, second], cities=world.cities,
                             countries=world.countries, rivers=world.rivers))  # fmt: skip
    by_kind = {(q["kind"], q["question"]): q for q in asked}
    one = next(q for (k, t), q in by_kind.items() if k == "birth_country" and first["work"] in t)
    two = next(q for (k, t), q in by_kind.items() if k == "work_currency" and second["name"] in t)
    return [{"aliases": [], **one}, {"aliases": [], **two}]


def documents(seed: int = 0) -> list[Document]:
    """The articles of the world of ``seed`` (seed 0: the bundled collection)."""
    return build_world(seed).documents


ENCYCLOPEDIA_WORLDS = 60
"""Worlds (seeds 0..59) whose articles make the bundled ``encyclopedia`` corpus."""


@functools.lru_cache(maxsize=2)
def encyclopedia_text(worlds: int = ENCYCLOPEDIA_WORLDS) -> str:
    """The articles of the worlds of seeds 0..worlds-1 as one text: one sentence per line,
    a blank line between articles (``load_corpus("encyclopedia")``: 6,000 articles, about
    1 MB). A corpus of documents, unlike Tiny Shakespeare's one stream of plays: for
    BERT's next-sentence prediction, whose random second segment comes from another
    document (``lmlab pretrain --data encyclopedia --nsp_pairs sentences``). The last
    tenth (``split_text``) is the articles of other worlds: other names, other facts.

        >>> encyclopedia_text(1).split("\\n\\n")[0].splitlines()[:2]
        ['Arfalven Yarost was an inventor who invented the brass barometer.', 'Yarost was born in Norgard in 1710.']
    """
    articles = []
    for seed in range(worlds):
        for doc in build_world(seed).documents:
            articles.append("\n".join(_SENTENCE_END.split(doc.text)))
    return "\n\n".join(articles) + "\n"


_SENTENCE_END = re.compile(r"(?<=\.) ")
