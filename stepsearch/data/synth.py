"""A seeded synthetic multi-hop world: fictional entities, a Wikipedia-like corpus, and 2-4 hop questions.

Why fictional: a model cannot answer "Who founded the employer of the author of the novel The Tower of
Velmar?" from memory, so it must search, and the answer is checkable. The world has people, cities,
countries, organisations and works with made-up names from a small syllable inventory (so a tokenizer of ~2k
tokens covers it), one paragraph per entity stating its facts, and natural distractors: families share surnames,
organisations are named after people and cities, some works share a title (their passages are titled
"Title (film)", "Title (novel)").

Questions follow MuSiQue/2WikiMultiHopQA kinds: `compositional` (a chain of 2-4 relations), `inference`
(paternal grandfather = father of the father), `comparison` (which was founded / born / released earlier) and
`bridge_comparison` (whose father was born first: 4 hops). Every hop has a sub-question, its answer, reference
search queries made of the subject's name plus relation words that occur in its passage (so BM25 finds the
passage in its top 3), and the passage itself (the golden support doc). A world can keep only some hop counts
(`hops`, `data.synth_hops`): e.g. 2-hop questions alone for a quick world or a first curriculum stage.

Files (`write_world`, `stepsearch data synth`): `corpus.jsonl` ({"id", "contents": '"Title"\\ntext'}),
`train.jsonl`, `test.jsonl` in StepSearch's released format (see `stepsearch.data.loaders`), `world.json`
(parameters and counts). `load_or_create_world` reuses the files when the parameters match.

Supervised warm start: `gold_trajectory(record)` gives, per hop, the sub-question, a reference query, the support
passage and the hop's answer, plus the final answer; the trainer renders it with its prompt template as
`<search>query</search><information>passage</information>` turns ending in `<answer>final</answer>`.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
from bisect import bisect_left, bisect_right
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from stepsearch.data.records import QARecord, SupportDoc

GENERATOR_VERSION = 3
"""Bumped whenever the same seed would produce different files, so `load_or_create_world` regenerates."""

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "", "n", "r", "l", "s"]
_ONSET_CLASS = "[" + "".join(_ONSETS) + "]"
_VOWEL_CLASS = "[" + "".join(_VOWELS) + "]"
_CODA_CLASS = "[" + "".join(c for c in _CODAS if c) + "]"
NAME_PIECE_PATTERN = rf"(?:\AĠ?[A-Z]|(?!\A)\G){_ONSET_CLASS}?{_VOWEL_CLASS}+(?:{_CODA_CLASS}(?!{_VOWEL_CLASS}))?"
"""A regex over one byte-level word ("Ġ" = a leading space) that cuts a capitalised word into the syllables
names are made of ("ĠKipifu" -> "ĠKi", "pi", "fu"; "ĠFumil" -> "ĠFu", "mil") and leaves lower-case words whole.
A tokenizer that splits words with it (`train_tokenizer(word_piece_pattern=...)`) spells every name, seen or
not, from the same few hundred syllable tokens: copying a name the model has never seen is then copying
tokens it has seen thousands of times, and no name is so frequent that it becomes a token of its own."""
_PROFESSIONS = ["painter", "poet", "engineer", "doctor", "farmer", "singer", "teacher", "sailor", "judge",
                "merchant", "architect", "baker"]
_ORG_KINDS = ["company", "bank", "academy", "museum", "guild", "society", "school", "library"]
_WORK_NOUNS = ["Tower", "River", "Garden", "Winter", "Mirror", "Letter", "Voyage", "Harbor", "Crown", "Lantern",
               "Forest", "Bridge", "Storm", "Island", "Feather", "Valley"]
# kind -> (creator's role, creating verb, release verb)
_WORK_KINDS = {
    "novel": ("author", "wrote", "published"),
    "poem": ("author", "wrote", "published"),
    "play": ("author", "wrote", "published"),
    "film": ("director", "directed", "released"),
    "song": ("composer", "composed", "released"),
}

QUESTION_TYPE_WEIGHTS = {"compositional": 0.5, "inference": 0.15, "comparison": 0.2, "bridge_comparison": 0.15}
ALL_HOPS = (2, 3, 4)
"""The hop counts questions are drawn with; a world may keep a subset (`hops`: a quick world, a curriculum stage)."""


@dataclass(eq=False)
class Entity:
    """One fictional entity; `facts` maps a relation name to another Entity or to a literal (year, profession)."""

    doc_id: int
    etype: str  # person | city | country | org | work
    name: str
    title: str  # passage title (works sharing a name get a "(kind)" suffix)
    kind: str = ""  # profession / org kind / work kind
    facts: dict[str, Union["Entity", str]] = field(default_factory=dict)
    text: str = ""

    @property
    def ref(self) -> str:
        """How questions refer to the entity."""
        return f"the {self.kind} {self.name}" if self.etype == "work" else self.name

    def support_doc(self) -> SupportDoc:
        return SupportDoc(title=self.title, text=self.text)


@dataclass(frozen=True)
class Relation:
    """A fact type: how to ask about it (wh), how to nest it (np), how to search for it (queries)."""

    name: str
    wh: Callable[[str, Entity], str]
    queries: Callable[[Entity], list[str]]
    np: Callable[[str, Entity], str] | None = None  # None: the value is a literal, so it ends a chain

    def value(self, subject: Entity) -> Entity | str:
        return subject.facts[self.name]


def _work(e: Entity) -> tuple[str, str, str]:
    return _WORK_KINDS[e.kind]


RELATIONS: dict[str, list[Relation]] = {
    "person": [
        Relation("born_year", lambda x, e: f"When was {x} born?",
                 lambda e: [f"when was {e.name} born", f"{e.name} born year"]),
        Relation("birthplace", lambda x, e: f"Where was {x} born?",
                 lambda e: [f"where was {e.name} born", f"{e.name} born in city"],
                 lambda x, e: f"the birthplace of {x}"),
        Relation("employer", lambda x, e: f"Where did {x} work?",
                 lambda e: [f"where did {e.name} work", f"{e.name} worked at"],
                 lambda x, e: f"the employer of {x}"),
        Relation("father", lambda x, e: f"Who was the father of {x}?",
                 lambda e: [f"father of {e.name}", f"who was the father of {e.name}"],
                 lambda x, e: f"the father of {x}"),
        Relation("profession", lambda x, e: f"What was the profession of {x}?",
                 lambda e: [f"{e.name} profession", f"what was the profession of {e.name}"]),
    ],
    "org": [
        Relation("founded_year", lambda x, e: f"When was {x} founded?",
                 lambda e: [f"when was {e.name} founded", f"{e.name} founded year"]),
        Relation("founder", lambda x, e: f"Who founded {x}?",
                 lambda e: [f"who founded {e.name}", f"{e.name} founder"],
                 lambda x, e: f"the founder of {x}"),
        Relation("headquarters", lambda x, e: f"Where are the headquarters of {x}?",
                 lambda e: [f"where are the headquarters of {e.name}", f"{e.name} headquarters city"],
                 lambda x, e: f"the headquarters city of {x}"),
    ],
    "city": [
        Relation("founded_year", lambda x, e: f"When was {x} founded?",
                 lambda e: [f"when was {e.name} founded", f"{e.name} city founded year"]),
        Relation("country", lambda x, e: f"In which country is {x}?",
                 lambda e: [f"which country is {e.name} in", f"{e.name} city country"],
                 lambda x, e: f"the country of {x}"),
        Relation("mayor", lambda x, e: f"Who is the mayor of {x}?",
                 lambda e: [f"mayor of {e.name}", f"who is the mayor of {e.name}"],
                 lambda x, e: f"the mayor of {x}"),
    ],
    "country": [
        Relation("capital", lambda x, e: f"What is the capital of {x}?",
                 lambda e: [f"capital of {e.name}", f"{e.name} capital city"],
                 lambda x, e: f"the capital of {x}"),
        Relation("language", lambda x, e: f"What is the official language of {x}?",
                 lambda e: [f"official language of {e.name}", f"{e.name} language"]),
    ],
    "work": [
        Relation("year", lambda x, e: f"When was {x} {_work(e)[2]}?",
                 lambda e: [f"when was the {e.kind} {e.name} {_work(e)[2]}", f"{e.name} {e.kind} {_work(e)[2]} year"]),
        Relation("creator", lambda x, e: f"Who {_work(e)[1]} {x}?",
                 lambda e: [f"who {_work(e)[1]} the {e.kind} {e.name}", f"{e.name} {e.kind} {_work(e)[0]}"],
                 lambda x, e: f"the {_work(e)[0]} of {x}"),
    ],
}
_RELATION_BY_NAME = {(etype, r.name): r for etype, rels in RELATIONS.items() for r in rels}
_YEAR_RELATION = {"person": "born_year", "org": "founded_year", "city": "founded_year", "work": "year"}


@dataclass(frozen=True)
class Hop:
    """One sub-question of a question: what to ask, what to search, which passage answers it, and the answer."""

    sub_question: str
    answer: str
    queries: list[str]
    support: Entity


@dataclass(frozen=True)
class SynthQuestion:
    """A generated question: its text, answer (plus aliases), kind, and hops in search order."""

    question: str
    answer: str
    aliases: list[str]
    qtype: str
    hops: list[Hop]

    def to_row(self, qid: str) -> dict:
        """The StepSearch released-format row (plus `sub_questions` / `sub_answers`, which the loaders keep)."""
        return {
            "id": qid,
            "question": self.question,
            "final_answer": self.answer,
            "answer_aliases": self.aliases,
            "type": self.qtype,
            "hops": len(self.hops),
            "sub_questions": [h.sub_question for h in self.hops],
            "sub_answers": [h.answer for h in self.hops],
            "sub_searchs": [h.queries for h in self.hops],
            "sub_support_docs": [{"title": h.support.title, "paragraph_text": h.support.text} for h in self.hops],
            "data_source": "synth",
        }


class _Names:
    """Made-up capitalised words from a small syllable inventory, unique where asked.

    `taken` may be shared between worlds, so that two worlds built with it never name two entities alike.
    """

    def __init__(self, rng: random.Random, taken: set[str] | None = None) -> None:
        self.rng = rng
        self.taken: set[str] = set() if taken is None else taken

    def word(self, syllables: int) -> str:
        parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables)]
        return ("".join(parts) + self.rng.choice(_CODAS)).capitalize()

    def unique(self, make: Callable[[], str], attempts: int = 1000) -> str | None:
        """A name from `make` not used before; None after `attempts` collisions."""
        for _ in range(attempts):
            name = make()
            if name not in self.taken:
                self.taken.add(name)
                return name
        return None

    def must_unique(self, make: Callable[[], str]) -> str:
        name = self.unique(make)
        if name is None:
            raise RuntimeError("synthetic world: name space exhausted; lower the world size")
        return name


_MADE_UP_WORD = re.compile(rf"\b{_ONSET_CLASS.upper()}{_VOWEL_CLASS}+(?:{_ONSET_CLASS}{_VOWEL_CLASS}+)*"
                           rf"(?:sh|{_CODA_CLASS})?\b")
_ENGLISH_LOOKALIKES = frozenset(
    word for word in _WORK_NOUNS + [kind.capitalize() for kind in _ORG_KINDS] if _MADE_UP_WORD.fullmatch(word))
_SYLLABLE = re.compile(f"{_VOWEL_CLASS}+")


def made_up_words(text: str) -> set[str]:
    """The capitalised words of `text` shaped like the generator's names: people, places, organisations' and
    works' name words, countries and their languages."""
    return {word for word in _MADE_UP_WORD.findall(text) if word not in _ENGLISH_LOOKALIKES}


class FreshNames:
    """One consistent renaming of made-up words to fresh ones, applied to every text of one demonstration.

    A renamed demonstration is the same search problem with names no other demonstration uses: a model trained on
    many of them cannot lower its loss by remembering names, only by copying them from what it read. A fresh word
    has as many syllables as the word it replaces, a country and its language keep a shared stem ("Zovia",
    "Zovish" -> "Kemia", "Kemish"), and no fresh word is in `avoid` (pass the world's own names: a renamed
    demonstration then names nothing of the world, held-out entities included).
    """

    def __init__(self, rng: random.Random, avoid: set[str] | frozenset[str]) -> None:
        self.names = _Names(rng)
        self.avoid = avoid
        self.renamed: dict[str, str] = {}
        self.stems: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        return _MADE_UP_WORD.sub(lambda match: self._rename(match.group(0)), text)

    def _rename(self, word: str) -> str:
        if word in _ENGLISH_LOOKALIKES:
            return word
        if word not in self.renamed:
            suffix = next((s for s in ("ia", "ish") if word.endswith(s) and len(word) > len(s) + 1), None)
            if suffix is not None:
                stem = word[: -len(suffix)]
                if stem not in self.stems:
                    self.stems[stem] = self._fresh(lambda: self.names.word(2).rstrip("aeiou"), ("ia", "ish"))
                self.renamed[word] = self.stems[stem] + suffix
            else:
                syllables = len(_SYLLABLE.findall(word))
                self.renamed[word] = self._fresh(lambda: self.names.word(syllables), ("",))
        return self.renamed[word]

    def _fresh(self, make: Callable[[], str], suffixes: tuple[str, ...]) -> str:
        for _ in range(1000):
            stem = make()
            words = [stem + suffix for suffix in suffixes]
            if not any(w in self.avoid or w in self.names.taken or w in _ENGLISH_LOOKALIKES for w in words):
                self.names.taken.update(words)
                return stem
        raise RuntimeError("FreshNames: no unused name left; the world uses nearly every name of this length")


class World:
    """The entities and their passages. Build with `World.generate(seed, size)`."""

    def __init__(self, entities: list[Entity]) -> None:
        self.entities = entities
        self.by_type: dict[str, list[Entity]] = {t: [] for t in RELATIONS}
        for e in entities:
            self.by_type[e.etype].append(e)

    @classmethod
    def generate(cls, seed: int | str, num_people: int, *, taken_names: set[str] | None = None,
                 first_doc_id: int = 0) -> "World":
        """`num_people` sets the scale; cities, organisations, works and countries follow in fixed ratios.

        `taken_names` (updated in place) holds names no entity of this world may take, and `first_doc_id` offsets
        its passage ids: together they let a second world share a corpus with the first without sharing an entity.
        """
        rng = random.Random(seed)
        names = _Names(rng, taken_names)
        entities: list[Entity] = []

        def new(etype: str, name: str, kind: str = "") -> Entity:
            e = Entity(doc_id=first_doc_id + len(entities), etype=etype, name=name, title=name, kind=kind)
            entities.append(e)
            return e

        countries = [new("country", names.must_unique(lambda: names.word(2).rstrip("aeiou") + "ia"))
                     for _ in range(max(4, num_people // 60))]
        for country in countries:
            country.facts["language"] = country.name[:-2] + "ish"
        cities = [new("city", names.must_unique(lambda: names.word(rng.choice((2, 2, 3)))))
                  for _ in range(max(8, num_people // 8))]
        for city in cities:
            city.facts["country"] = rng.choice(countries)
            city.facts["founded_year"] = str(rng.randint(1100, 1800))
        for country in countries:
            own = [c for c in cities if c.facts["country"] is country]
            country.facts["capital"] = rng.choice(own) if own else rng.choice(cities)

        surnames = [names.word(rng.choice((2, 3))) for _ in range(max(10, num_people // 3))]
        first_names = [names.word(2) for _ in range(max(20, num_people // 6))]
        years = sorted(rng.randint(1700, 1960) for _ in range(num_people))
        people: list[Entity] = []
        for year in years:
            # A father born 20-45 years earlier gives families (shared surnames) and grandfather questions;
            # people are created in birth order, so everyone born before `year - 20` already exists.
            lo, hi = bisect_left(years, year - 45), bisect_right(years, year - 20)
            father = people[rng.randrange(lo, hi)] if hi > lo and rng.random() < 0.7 else None
            surname = father.name.split()[-1] if father else rng.choice(surnames)
            name = names.unique(lambda: f"{rng.choice(first_names)} {surname}", attempts=50)
            if name is None:  # a large family used up the first names: this person starts a new one
                father = None
                name = names.must_unique(lambda: f"{rng.choice(first_names)} {rng.choice(surnames)}")
            person = new("person", name, kind=rng.choice(_PROFESSIONS))
            person.facts.update(born_year=str(year), birthplace=rng.choice(cities), profession=person.kind)
            if father is not None:
                person.facts["father"] = father
            people.append(person)

        orgs: list[Entity] = []
        for _ in range(max(6, num_people // 5)):
            kind = rng.choice(_ORG_KINDS)
            # Named after a person's surname or a city half the time: distractors that share names.
            stem_source = rng.random()
            if stem_source < 0.25:
                stem = rng.choice(people).name.split()[-1]
            elif stem_source < 0.5:
                stem = rng.choice(cities).name
            else:
                stem = names.word(2)
            org = new("org", names.must_unique(lambda: f"{stem} {kind.capitalize()}" if rng.random() < 0.9
                                          else f"{names.word(2)} {kind.capitalize()}"), kind=kind)
            founder = rng.choice(people)
            org.facts.update(founder=founder, founded_year=str(int(founder.facts["born_year"]) + rng.randint(25, 60)),
                             headquarters=rng.choice(cities))
            orgs.append(org)
        for person in people:
            person.facts["employer"] = rng.choice(orgs)
        mayors = rng.sample(people, len(cities)) if len(people) >= len(cities) else [rng.choice(people) for _ in cities]
        for city, mayor in zip(cities, mayors):
            city.facts["mayor"] = mayor

        titles: list[str] = []
        works_by_title: dict[str, list[Entity]] = {}
        for _ in range(max(10, num_people // 2)):
            kind = rng.choice(list(_WORK_KINDS))
            if titles and rng.random() < 0.08:
                title = rng.choice(titles)  # a homonym of another kind: a distractor sharing the name
                if any(w.kind == kind for w in works_by_title[title]):
                    continue
            else:
                noun = rng.choice(_WORK_NOUNS)
                title = names.must_unique(lambda: f"The {noun} of {names.word(2)}" if rng.random() < 0.5
                                     else f"{names.word(2)} {noun}")
                titles.append(title)
            work = new("work", title, kind=kind)
            creator = rng.choice(people)
            work.facts.update(creator=creator, year=str(int(creator.facts["born_year"]) + rng.randint(20, 60)))
            works_by_title.setdefault(title, []).append(work)
        for same_title in works_by_title.values():
            if len(same_title) > 1:
                for work in same_title:
                    work.title = f"{work.name} ({work.kind})"

        for e in entities:
            e.text = _paragraph(e)
        return cls(entities)

    def corpus_rows(self) -> list[dict]:
        return [{"id": str(e.doc_id), "contents": f'"{e.title}"\n{e.text}'} for e in self.entities]


def _paragraph(e: Entity) -> str:
    f = e.facts
    n = e.name
    if e.etype == "person":
        text = (f"{n} was a {e.kind} by profession. {n} was born in the city of {f['birthplace'].name} in the year "
                f"{f['born_year']}. {n} worked at {f['employer'].name}.")
        if "father" in f:
            text += f" The father of {n} was {f['father'].name}."
        return text
    if e.etype == "org":
        return (f"{n} is a {e.kind} that was founded in the year {f['founded_year']}. The founder of {n} was "
                f"{f['founder'].name}. The headquarters of {n} are in the city of {f['headquarters'].name}.")
    if e.etype == "city":
        return (f"{n} is a city in the country of {f['country'].name}. {n} was founded in the year "
                f"{f['founded_year']}. The mayor of {n} is {f['mayor'].name}.")
    if e.etype == "country":
        return (f"{n} is a country whose capital city is {f['capital'].name}. The official language of {n} is "
                f"{f['language']}.")
    role, active, release = _WORK_KINDS[e.kind]
    return (f"{n} is a {e.kind} {release} in the year {f['year']}. The {role} of {n} was {f['creator'].name}, who "
            f"{active} the {e.kind}.")


def _answer_text(value: Entity | str) -> str:
    return value.name if isinstance(value, Entity) else value


def _hop(relation: Relation, subject: Entity) -> Hop:
    return Hop(relation.wh(subject.ref, subject), _answer_text(relation.value(subject)), relation.queries(subject),
               subject)


def _ref_alias(answer: Entity) -> list[str]:
    """A work named as the question names it ("the novel X") is a correct answer too."""
    return [answer.ref] if answer.etype == "work" else []


class QuestionGenerator:
    """Draws questions of the four kinds from a World; `draw()` returns None when a draw hits a dead end."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.starts = [e for e in world.entities if e.etype != "country"]
        self.with_father = [p for p in world.by_type["person"] if "father" in p.facts]
        self.with_grandfather = [p for p in self.with_father if "father" in p.facts["father"].facts]
        self.works_by_creator: dict[int, list[Entity]] = {}
        for work in world.by_type["work"]:
            self.works_by_creator.setdefault(work.facts["creator"].doc_id, []).append(work)
        self.orgs_by_founder: dict[int, list[Entity]] = {}
        for org in world.by_type["org"]:
            self.orgs_by_founder.setdefault(org.facts["founder"].doc_id, []).append(org)
        self.types = list(QUESTION_TYPE_WEIGHTS)
        self.cum_weights = list(itertools.accumulate(QUESTION_TYPE_WEIGHTS[t] for t in self.types))

    def draw(self) -> SynthQuestion | None:
        qtype = self.rng.choices(self.types, cum_weights=self.cum_weights)[0]
        return getattr(self, f"_{qtype}")()

    def _compositional(self) -> SynthQuestion | None:
        num_hops = self.rng.choice((2, 3, 4))
        subject = self.rng.choice(self.starts)
        chain: list[tuple[Relation, Entity]] = []
        visited = {subject.doc_id}
        for step in range(num_hops):
            last = step == num_hops - 1
            # Inner hops must lead to a new entity; the last hop may also ask for a literal (year, profession).
            options = [r for r in RELATIONS[subject.etype] if r.name in subject.facts and (
                (r.np is None and last) or (r.np is not None and subject.facts[r.name].doc_id not in visited))]
            if not options:
                return None
            relation = self.rng.choice(options)
            chain.append((relation, subject))
            value = relation.value(subject)
            if isinstance(value, Entity):
                visited.add(value.doc_id)
                subject = value
        phrase = chain[0][1].ref
        for relation, subj in chain[:-1]:
            phrase = relation.np(phrase, subj)
        final_relation, final_subject = chain[-1]
        answer = final_relation.value(final_subject)
        return SynthQuestion(final_relation.wh(phrase, final_subject), _answer_text(answer), [], "compositional",
                             [_hop(r, s) for r, s in chain])

    def _inference(self) -> SynthQuestion | None:
        if not self.with_grandfather:
            return None
        person = self.rng.choice(self.with_grandfather)
        father_rel = _RELATION_BY_NAME[("person", "father")]
        hops = [_hop(father_rel, person), _hop(father_rel, person.facts["father"])]
        phrase = person.ref
        # Sometimes the person is reached through a work or an organisation first: 3 hops.
        bridge = self.rng.random()
        if bridge < 0.4:
            sources = [(w, "creator") for w in self.works_by_creator.get(person.doc_id, ())]
            if bridge < 0.2:
                sources += [(o, "founder") for o in self.orgs_by_founder.get(person.doc_id, ())]
            if sources:
                source, rel_name = self.rng.choice(sources)
                relation = _RELATION_BY_NAME[(source.etype, rel_name)]
                hops.insert(0, _hop(relation, source))
                phrase = relation.np(source.ref, source)
        grandfather = person.facts["father"].facts["father"]
        return SynthQuestion(f"Who was the paternal grandfather of {phrase}?", grandfather.name, [], "inference", hops)

    def _pair(self, candidates: list[Entity], year_of: Callable[[Entity], str]) -> tuple[Entity, Entity] | None:
        if len(candidates) < 2:
            return None
        a, b = self.rng.sample(candidates, 2)
        if year_of(a) == year_of(b) or a.name == b.name:
            return None
        return a, b

    def _comparison(self) -> SynthQuestion | None:
        etype = self.rng.choice(("person", "org", "city", "work"))
        relation = _RELATION_BY_NAME[(etype, _YEAR_RELATION[etype])]
        pair = self._pair(self.world.by_type[etype], lambda e: relation.value(e))
        if pair is None:
            return None
        a, b = pair
        earlier = self.rng.random() < 0.5
        first = a if (int(relation.value(a)) < int(relation.value(b))) == earlier else b
        wording = {
            "person": ("Who was born first" if earlier else "Who was born later"),
            "org": ("Which was founded earlier" if earlier else "Which was founded later"),
            "city": ("Which city was founded earlier" if earlier else "Which city was founded later"),
            "work": ("Which came out earlier" if earlier else "Which came out later"),
        }[etype]
        return SynthQuestion(f"{wording}, {a.ref} or {b.ref}?", first.name, _ref_alias(first), "comparison",
                             [_hop(relation, a), _hop(relation, b)])

    def _bridge_comparison(self) -> SynthQuestion | None:
        etype = self.rng.choice(("person", "org", "work"))
        link_name = {"person": "father", "org": "founder", "work": "creator"}[etype]
        pool = self.with_father if etype == "person" else self.world.by_type[etype]
        link = _RELATION_BY_NAME[(etype, link_name)]
        born = _RELATION_BY_NAME[("person", "born_year")]
        pair = self._pair(pool, lambda e: born.value(link.value(e)))
        if pair is None:
            return None
        a, b = pair
        if link.value(a) is link.value(b):
            return None
        earlier = self.rng.random() < 0.5
        year_a, year_b = int(born.value(link.value(a))), int(born.value(link.value(b)))
        first = a if (year_a < year_b) == earlier else b
        when = "first" if earlier else "later"
        question = {
            "person": f"Whose father was born {when}, {a.ref} or {b.ref}?",
            "org": f"Which organisation has the founder who was born {when}, {a.ref} or {b.ref}?",
            "work": f"Which work has the creator who was born {when}, {a.ref} or {b.ref}?",
        }[etype]
        hops = [_hop(link, a), _hop(born, link.value(a)), _hop(link, b), _hop(born, link.value(b))]
        return SynthQuestion(question, first.name, _ref_alias(first), "bridge_comparison", hops)


def check_hops(hops: Collection[int]) -> tuple[int, ...]:
    """`hops` as a sorted tuple: a non-empty subset of ALL_HOPS, else ValueError."""
    if not hops or not set(hops) <= set(ALL_HOPS):
        raise ValueError(f"question hops must be a non-empty subset of {list(ALL_HOPS)}, got {list(hops)}")
    return tuple(sorted(set(hops)))


def generate_questions(world: World, rng: random.Random, count: int, exclude: set[str] | None = None,
                       hops: Collection[int] = ALL_HOPS) -> list[SynthQuestion]:
    """`count` questions with distinct texts (and none in `exclude`) and a hop count in `hops`; raises if the world
    is too small for it. Questions of other hop counts are drawn and discarded, so with every hop count allowed the
    questions are the same as without the filter."""
    allowed = check_hops(hops)
    generator = QuestionGenerator(world, rng)
    seen = set(exclude or ())
    out: list[SynthQuestion] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"synthetic world: only {len(out)} distinct questions of {count} asked; "
                               "increase the world size")
        question = generator.draw()
        if question is None or question.question in seen or len(question.hops) not in allowed:
            continue
        seen.add(question.question)
        out.append(question)
    return out


def world_size_for(num_questions: int) -> int:
    """People in a world for this many questions: enough that questions rarely repeat, small for tiny runs."""
    return max(60, num_questions // 3)


@dataclass(frozen=True)
class WorldFiles:
    """Paths of a written world (`warm_start` exists only when warm-start questions were asked for)."""

    root: Path
    corpus: Path
    train: Path
    test: Path
    meta: Path
    warm_start: Path


def _files(out_dir: str | os.PathLike) -> WorldFiles:
    root = Path(out_dir)
    return WorldFiles(root, root / "corpus.jsonl", root / "train.jsonl", root / "test.jsonl", root / "world.json",
                      root / "warm_start.jsonl")


def _tmp_path(path: Path) -> Path:
    # Per-process temporary names: several ranks may create the same (deterministic) world at once.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class SynthSplits:
    """A generated world and its question splits."""

    world: World  # every passage of the corpus (the warm-start region included)
    train: list[SynthQuestion]
    test: list[SynthQuestion]
    warm_start: list[SynthQuestion]  # about entities no train or test question touches


def build_world(seed: int, num_train: int, num_test: int) -> tuple[World, list[SynthQuestion], list[SynthQuestion]]:
    """The world and its train/test questions; test question texts never occur in train."""
    splits = build_splits(seed, num_train, num_test)
    return splits.world, splits.train, splits.test


def build_splits(seed: int, num_train: int, num_test: int, num_warm_start: int = 0,
                 hops: Collection[int] = ALL_HOPS) -> SynthSplits:
    """The world and its train/test questions (test texts never occur in train), plus warm-start questions, every
    one of them with a hop count in `hops`.

    Warm-start questions come from a second region of the world, generated with its own random stream and
    sharing no entity, name or fact with the first: a supervised warm start on them never sees a test question's
    entities, while its search results still come from the one corpus everything is retrieved from. The first
    region (and so the train and test questions) is the same whatever `num_warm_start` is.
    """
    taken: set[str] = set()
    main = World.generate(seed, world_size_for(num_train + num_test), taken_names=taken)
    questions = generate_questions(main, random.Random(f"questions-{seed}"), num_train + num_test, hops=hops)
    warm_questions: list[SynthQuestion] = []
    entities = list(main.entities)
    if num_warm_start > 0:
        # One person per warm-start question (three times the usual density of names): a name rarely recurs
        # across demonstrations, so a policy learns to copy names from its context rather than recall them.
        warm = World.generate(f"warm-start-{seed}", world_size_for(3 * num_warm_start), taken_names=taken,
                              first_doc_id=len(entities))
        warm_questions = generate_questions(warm, random.Random(f"warm-start-questions-{seed}"), num_warm_start,
                                            hops=hops)
        entities += warm.entities
    return SynthSplits(World(entities), questions[:num_train], questions[num_train:], warm_questions)


def write_world(out_dir: str | os.PathLike, seed: int, num_train: int, num_test: int,
                num_warm_start: int = 0, hops: Collection[int] = ALL_HOPS) -> WorldFiles:
    """Generate and write corpus/train/test (and warm_start) jsonl and world.json (written last: it marks the
    files complete)."""
    if num_train <= 0 or num_test <= 0 or num_warm_start < 0:
        raise ValueError(f"num_train and num_test must be positive and num_warm_start >= 0 "
                         f"(got {num_train}, {num_test}, {num_warm_start})")
    files = _files(out_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    splits = build_splits(seed, num_train, num_test, num_warm_start, hops)
    _write_jsonl_atomic(files.corpus, splits.world.corpus_rows())
    _write_jsonl_atomic(files.train, [q.to_row(f"synth{seed}-train-{i}") for i, q in enumerate(splits.train)])
    _write_jsonl_atomic(files.test, [q.to_row(f"synth{seed}-test-{i}") for i, q in enumerate(splits.test)])
    if num_warm_start:
        _write_jsonl_atomic(files.warm_start,
                            [q.to_row(f"synth{seed}-warm-{i}") for i, q in enumerate(splits.warm_start)])
    asked = splits.train + splits.test
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train, "num_test": num_test,
            "num_warm_start": num_warm_start, "question_hops": list(check_hops(hops)),
            "num_docs": len(splits.world.entities),
            "hops": {h: sum(len(q.hops) == h for q in asked) for h in (2, 3, 4)},
            "types": {t: sum(q.qtype == t for q in asked) for t in QUESTION_TYPE_WEIGHTS}}
    tmp = _tmp_path(files.meta)
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, files.meta)
    return files


def load_or_create_world(out_dir: str | os.PathLike, seed: int, num_train: int, num_test: int,
                         num_warm_start: int = 0, hops: Collection[int] = ALL_HOPS) -> WorldFiles:
    """The world's files under `out_dir`: reused when world.json records the same parameters, else (re)written.

    Safe to call from several processes at once (each writes its own temporary files, then renames them; the
    content is the same for the same parameters).
    """
    files = _files(out_dir)
    if files.meta.exists():
        try:
            meta = json.loads(files.meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        wanted = {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train": num_train, "num_test": num_test,
                  "num_warm_start": num_warm_start, "question_hops": list(check_hops(hops))}
        meta.setdefault("question_hops", list(ALL_HOPS))  # worlds written before hop filtering kept every count
        needed = [files.corpus, files.train, files.test] + ([files.warm_start] if num_warm_start else [])
        if all(meta.get(k) == v for k, v in wanted.items()) and all(p.exists() for p in needed):
            return files
    return write_world(out_dir, seed, num_train, num_test, num_warm_start, hops)


@dataclass(frozen=True)
class GoldStep:
    """One search round of a gold trajectory: the query to emit and the passage it retrieves."""

    sub_question: str
    query: str
    doc: SupportDoc
    answer: str  # the hop's intermediate answer; "" when the dataset does not give it


@dataclass(frozen=True)
class GoldTrajectory:
    steps: list[GoldStep]
    final_answer: str


def gold_trajectory(record: QARecord, rng: random.Random | None = None) -> GoldTrajectory:
    """Per hop the reference query (the first, or a random one with `rng`) and support doc, plus the answer.

    Needs one support doc and at least one search key per sub-question (synthetic and StepSearch-format
    records have them); raises ValueError naming the record otherwise.
    """
    if not record.search_keys or len(record.search_keys) != len(record.support_docs):
        raise ValueError(f"record {record.id!r}: a gold trajectory needs one support doc per sub-question "
                         f"({len(record.search_keys)} search-key lists, {len(record.support_docs)} docs)")
    sub_answers = record.metadata.get("sub_answers") or [""] * len(record.search_keys)
    steps = []
    for i, (keys, doc) in enumerate(zip(record.search_keys, record.support_docs)):
        if not keys:
            raise ValueError(f"record {record.id!r}: sub-question {i} has no reference query")
        query = rng.choice(keys) if rng is not None else keys[0]
        sub_question = record.sub_questions[i] if i < len(record.sub_questions) else ""
        steps.append(GoldStep(sub_question, query, doc, sub_answers[i] if i < len(sub_answers) else ""))
    return GoldTrajectory(steps, record.answers[0])
