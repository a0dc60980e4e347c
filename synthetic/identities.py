"""A hard, seeded identity-resolution data set: records from many systems, with the truth.

Each person appears in several source systems (web sign-up, app, guest checkout, support
calls, loyalty card, in-store), each writing what it knows in its own format. The hard
parts are on purpose:
- typos in names, nicknames missing, names with and without accents;
- a second e-mail address (work or new) and a new phone number on some records;
- dates of birth as ISO, YYYYMMDD or DD/MM/YYYY, sometimes missing;
- households: members share last name, street, postcode and city; twins share their
  birth date too; a household tablet is logged into by several members.
Records carry raw values (mixed casing, spaces, phone formats): normalising them is part
of the task. The `person_id` column is the truth; nothing else reveals it.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import phonenumbers

from synthetic.events import (
    COUNTRIES,
    DOMAINS,
    EU_COUNTRIES,
    FIRST_NAMES,
    LAST_NAMES,
    _ascii,
    mobile_number,
)

COLUMNS = [
    "record_id",
    "person_id",
    "source",
    "first_name",
    "last_name",
    "dob",
    "email",
    "phone",
    "address_line1",
    "city",
    "postcode",
    "country",
    "user_id",
    "anonymous_id",
    "customer_id",
]
MORE_FIRST_NAMES = [
    "Aaron",
    "Abigail",
    "Adam",
    "Adrian",
    "Agnes",
    "Alba",
    "Alexander",
    "Alice",
    "Amir",
    "Ana",
    "Andrea",
    "Andrés",
    "Anja",
    "Anton",
    "Arne",
    "Astrid",
    "Axel",
    "Beatriz",
    "Bruno",
    "Camila",
    "Carla",
    "Carlos",
    "Caroline",
    "Cecilia",
    "Charlotte",
    "Chen",
    "Daniel",
    "David",
    "Diego",
    "Dmitri",
    "Eduardo",
    "Elena",
    "Elif",
    "Elisa",
    "Emil",
    "Emilia",
    "Enzo",
    "Erik",
    "Esther",
    "Eva",
    "Felix",
    "Filip",
    "Finn",
    "Florian",
    "Frida",
    "Gabriel",
    "Greta",
    "Hana",
    "Hannah",
    "Helena",
    "Henrik",
    "Ida",
    "Ines",
    "Irene",
    "Isaac",
    "Isabel",
    "Ivan",
    "Jakob",
    "Jana",
    "Jasper",
    "Javier",
    "Johanna",
    "Jorge",
    "Julia",
    "Julian",
    "Kai",
    "Karin",
    "Karl",
    "Katarina",
    "Laura",
    "Lars",
    "Lena",
    "Leon",
    "Lina",
    "Linnea",
    "Lorenzo",
    "Louise",
    "Lucas",
    "Magnus",
    "Malin",
    "Manuel",
    "Marie",
    "Marta",
    "Martin",
    "Mateus",
    "Matilda",
    "Max",
    "Mila",
    "Miguel",
    "Mohammed",
    "Nadia",
    "Niklas",
    "Nora",
    "Oliver",
    "Oscar",
    "Pedro",
    "Petra",
    "Pia",
    "Rafael",
    "Rebecca",
    "Ricardo",
    "Rosa",
    "Samuel",
    "Sara",
    "Sebastian",
    "Selma",
    "Simon",
    "Sofie",
    "Stella",
    "Tariq",
    "Teresa",
    "Theo",
    "Tim",
    "Tobias",
    "Valentina",
    "Vera",
    "Victor",
    "Viktor",
    "Wilma",
    "Yara",
    "Yusuf",
    "Zara",
]
_SURNAME_STEMS = [
    "Ab",
    "Al",
    "Bar",
    "Ber",
    "Bol",
    "Bran",
    "Brun",
    "Cas",
    "Cor",
    "Dal",
    "Dor",
    "Eck",
    "Fal",
    "Fer",
    "Gal",
    "Gor",
    "Hal",
    "Har",
    "Hof",
    "Kal",
    "Kor",
    "Lan",
    "Lind",
    "Mar",
    "Mor",
    "Nor",
    "Ost",
    "Pal",
    "Pet",
    "Rin",
    "Ros",
    "Sal",
    "Sand",
    "Sch",
    "Sol",
    "Stein",
    "Tor",
    "Val",
    "Vel",
    "Wal",
    "Wes",
    "Zan",
]
_SURNAME_ENDINGS = [
    "a",
    "ani",
    "berg",
    "ek",
    "er",
    "ez",
    "feld",
    "ford",
    "ic",
    "ini",
    "is",
    "mann",
    "ova",
    "ovic",
    "quist",
    "sen",
    "son",
    "ton",
    "ura",
    "zi",
]
# About 900 surnames in all, drawn with a long tail as real ones are: a first and last name
# pair is shared by a handful of people, not by a town.
SURNAMES = LAST_NAMES + [stem + end for stem in _SURNAME_STEMS for end in _SURNAME_ENDINGS]
GIVEN_NAMES = FIRST_NAMES + MORE_FIRST_NAMES
# Zipf-like with an offset: the commonest name is a few percent of people, most are rare.
_SURNAME_WEIGHTS = list(accumulate(1 / (rank + 10) for rank in range(len(SURNAMES))))
_GIVEN_WEIGHTS = list(accumulate(1 / (rank + 5) for rank in range(len(GIVEN_NAMES))))
STREETS = ["Main", "Oak", "Linden", "Park", "Mill", "Church", "High", "Station", "Elm", "Lake"]
WORDS = {"Street": ["Street", "St", "St.", "street"], "Road": ["Road", "Rd", "Rd."]}
SOURCES = ["web", "app", "guest_order", "support_call", "loyalty", "store"]


@dataclass
class _Person:
    key: str
    first: str
    last: str
    dob: str
    email: str
    phone: str
    street: str
    street_word: str
    city: str
    postcode: str
    country: str
    user_id: str
    customer_id: str
    devices: list[str] = field(default_factory=list)
    tablet: str | None = None


class _IdentityGenerator:
    def __init__(self, persons: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n_persons = persons

    def typo(self, text: str) -> str:
        letters = [i for i, c in enumerate(text) if c.isalpha()]
        if len(letters) < 4:
            return text
        i = self.rng.choice(letters[1:-1])
        move = self.rng.randrange(3)
        if move == 0:
            return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
        if move == 1:
            return text[:i] + text[i + 1 :]
        return text[:i] + self.rng.choice("aeiourstn") + text[i + 1 :]

    def phone(self, country: str) -> str:
        return mobile_number(country, (f"{self.rng.randrange(10**6):06d}" for _ in range(50)))

    def persons(self) -> list[_Person]:
        out: list[_Person] = []
        while len(out) < self.n_persons:
            size = min(self.rng.choice([1, 1, 1, 2, 2, 3, 4]), self.n_persons - len(out))
            country = self.rng.choice(["US"] * 5 + EU_COUNTRIES)
            last = self.surname()
            street = f"{self.rng.randint(1, 250)} {self.rng.choice(STREETS)}"
            word = self.rng.choice(["Street", "Road"])
            city = self.rng.choice(COUNTRIES[country][1])
            postcode = f"{self.rng.randint(10000, 99999)}"
            twins = size >= 2 and self.rng.random() < 0.2
            twin_dob = self.dob()
            names = self.given_names(size)
            members = []
            for member in range(size):
                index = len(out) + member
                first = names[member]
                person = _Person(
                    key=f"P{index:06d}",
                    first=first,
                    last=last,
                    dob=twin_dob if twins and member < 2 else self.dob(),
                    email=f"{_ascii(first)}.{_ascii(last)}{self.rng.randint(1, 999)}@{self.rng.choice(DOMAINS)}",
                    phone=self.phone(country),
                    street=street,
                    street_word=word,
                    city=city,
                    postcode=postcode,
                    country=country,
                    user_id=f"u_{self.rng.getrandbits(48):012x}",
                    customer_id=f"C{self.rng.randrange(10**8):08d}",
                    devices=[
                        f"anon-{self.rng.getrandbits(64):016x}"
                        for _ in range(self.rng.randint(1, 3))
                    ],
                )
                members.append(person)
            if size >= 2 and self.rng.random() < 0.3:
                tablet = f"anon-{self.rng.getrandbits(64):016x}"
                for member in members:
                    member.tablet = tablet
            out.extend(members)
        return out

    def surname(self) -> str:
        return self.rng.choices(SURNAMES, cum_weights=_SURNAME_WEIGHTS)[0]

    def given_names(self, count: int) -> list[str]:
        names: list[str] = []
        while len(names) < count:
            name = self.rng.choices(GIVEN_NAMES, cum_weights=_GIVEN_WEIGHTS)[0]
            if name not in names:  # siblings do not share a first name
                names.append(name)
        return names

    def dob(self) -> str:
        return f"{self.rng.randint(1940, 2006)}-{self.rng.randint(1, 12):02d}-{self.rng.randint(1, 28):02d}"

    def dob_written(self, dob: str) -> str | None:
        roll = self.rng.random()
        y, m, d = dob.split("-")
        if roll < 0.15:
            return None
        if roll < 0.35:
            return f"{d}/{m}/{y}"
        if roll < 0.5:
            return f"{y}{m}{d}"
        if roll < 0.53:  # day and month swapped by a clerk (only where it is still a date)
            return f"{y}-{d}-{m}" if int(d) <= 12 else dob
        return dob

    def name_written(self, name: str) -> str:
        roll = self.rng.random()
        if roll < 0.12:
            return self.typo(name)
        if roll < 0.2:
            return name.upper()
        if roll < 0.25:
            return _ascii(name).capitalize()
        return name

    def email_written(self, person: _Person) -> str:
        roll = self.rng.random()
        email = person.email
        if roll < 0.1:
            email = (
                f"{_ascii(person.first)}{self.rng.randint(1, 99)}@work-{_ascii(person.last)}.com"
            )
        elif roll < 0.14:
            local, domain = email.split("@")
            email = f"{self.typo(local)}@{domain}"
        return email.upper() if self.rng.random() < 0.1 else email

    def phone_written(self, person: _Person) -> str:
        number = person.phone if self.rng.random() < 0.85 else self.phone(person.country)
        parsed = phonenumbers.parse(number)
        fmt = self.rng.choice(
            [
                phonenumbers.PhoneNumberFormat.E164,
                phonenumbers.PhoneNumberFormat.INTERNATIONAL,
                phonenumbers.PhoneNumberFormat.NATIONAL,
            ]
        )
        return phonenumbers.format_number(parsed, fmt)

    def address_written(self, person: _Person) -> str:
        return f"{person.street} {self.rng.choice(WORDS[person.street_word])}"

    def record(self, person: _Person, source: str) -> dict[str, str]:
        rng = self.rng
        row = {c: "" for c in COLUMNS}
        row.update(person_id=person.key, source=source)

        def maybe(column: str, value: str | None, share: float) -> None:
            if value is not None and rng.random() < share:
                row[column] = value

        if source in ("web", "app"):
            # An account: its user id, the device, and the profile the person filled in.
            row["user_id"] = person.user_id
            row["anonymous_id"] = (
                person.tablet
                if person.tablet and rng.random() < 0.3
                else rng.choice(person.devices)
            )
            maybe("email", self.email_written(person), 1.0 if source == "web" else 0.5)
            row["first_name"] = self.name_written(person.first)
            row["last_name"] = self.name_written(person.last)
            maybe("dob", self.dob_written(person.dob), 0.4)
        elif source == "guest_order":
            row["anonymous_id"] = rng.choice(person.devices)
            maybe("email", self.email_written(person), 0.9)
            row["first_name"] = self.name_written(person.first)
            row["last_name"] = self.name_written(person.last)
            row["address_line1"] = self.address_written(person)
            row["city"] = person.city
            row["postcode"] = person.postcode
            row["country"] = person.country
            maybe("phone", self.phone_written(person), 0.5)
        elif source == "support_call":
            # An agent asks for the name and a second detail to find the customer.
            row["phone"] = self.phone_written(person)
            row["first_name"] = self.name_written(person.first)
            row["last_name"] = self.name_written(person.last)
            if rng.random() < 0.6:
                row["postcode"] = person.postcode
                maybe("dob", self.dob_written(person.dob), 0.5)
            else:
                row["dob"] = self.dob_written(person.dob) or person.dob
            row["country"] = person.country
        elif source == "loyalty":
            row["customer_id"] = person.customer_id
            row["first_name"] = self.name_written(person.first)
            row["last_name"] = self.name_written(person.last)
            maybe("dob", self.dob_written(person.dob), 0.9)
            maybe("email", self.email_written(person), 0.5)
            row["address_line1"] = self.address_written(person)
            row["postcode"] = person.postcode
            row["city"] = person.city
            row["country"] = person.country
        else:  # store: a till asks for the name and two more details
            row["first_name"] = self.name_written(person.first)
            row["last_name"] = self.name_written(person.last)
            details = {
                "dob": lambda: self.dob_written(person.dob) or person.dob,
                "phone": lambda: self.phone_written(person),
                "postcode": lambda: person.postcode,
                "email": lambda: self.email_written(person),
            }
            for column in rng.sample(sorted(details), 2):
                row[column] = details[column]()
            row["country"] = person.country
        return row

    def rows(self) -> Iterator[dict[str, str]]:
        staged: list[dict[str, str]] = []
        for person in self.persons():
            count = self.rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8])
            for _ in range(count):
                source = self.rng.choices(SOURCES, weights=[25, 15, 20, 15, 10, 15])[0]
                staged.append(self.record(person, source))
        self.rng.shuffle(staged)  # systems send in no particular order
        for index, row in enumerate(staged, start=1):
            row["record_id"] = f"rec{index:07d}"
            yield row


def identity_records(persons: int, seed: int) -> Iterator[dict[str, str]]:
    """Rows of COLUMNS for `persons` persons (each 1 to 8 records), shuffled; reproducible."""
    return _IdentityGenerator(persons, seed).rows()


def write_identity_records(
    out: Path, persons: int, seed: int, progress: Callable[[int], None] | None = None
) -> int:
    """Write the data set as CSV (truth in the person_id column); returns the row count.

    `progress`, if given, is called with the rows written so far every 10,000 rows and at the end.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in identity_records(persons, seed):
            writer.writerow(row)
            count += 1
            if progress is not None and count % 10_000 == 0:
                progress(count)
    if progress is not None:
        progress(count)
    return count
