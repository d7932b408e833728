"""The embedded benchmark: a small, seeded, fictional ToolBench that trains on a laptop CPU.

StableToolBench (the paper's benchmark, Sec. 5.1) needs thousands of real RapidAPI tools, a
response cache of several GB and a GPT-4 judge. This file replaces it with a world anyone can
rebuild in a second: invented cities, artists, teams, books and companies (so outside knowledge
never helps), 26 deterministic APIs over them in 7 categories, and tasks in the three groups of
StableToolBench:

    G1  one API                                   "What is the weather like in Velmora?"
    G2  2-3 APIs of one category                   search_restaurants -> restaurant_menu
    G3  3-5 APIs across categories, chained        search_artist -> next_concert -> forecast(city)

Each task offers its relevant APIs plus distractors (5-10 functions), carries the facts its
answer must contain (reward.py's IsSolved rule checks them) and an expert trajectory (the SFT
warm start trains on it; tests replay it through the real server).

Version 2 (the task files say `"benchmark": "embedded v2"`). Three splits, disjoint in everything a
model could memorise: train (1,200 tasks), validation (120: every choice is made on it) and test (360),
each with entities of its own (names, and every generated id: restaurants, trains, artists, teams,
books, ticker symbols), no query of one split repeated in another, and no task whose answer facts can
be read off its query (reward.mentions, the rule IsSolved matches facts with). Version 1 (until commit
c5e41f3) drew restaurant and train ids from namespaces shared by the splits and had no validation split.

Regenerate the committed task files (deterministic; seed 0):

    python -m harness.world --out data/

Departures from StableToolBench:
1. Tool responses are small JSON objects (< 200 characters) so episodes stay short on a CPU.
2. Bad arguments fail like real APIs do, inside the response (`{"status": 404, "message": ...}`),
   not in the protocol's `error` field; the server's `error` field is kept for protocol errors.
3. Final answers are graded by facts (exact values), not by a judge; see reward.py.
"""
import argparse
import json
import os
import random

SEED = 0
SYLLABLES = ["ka", "lo", "mir", "ven", "tas", "ro", "bel", "dun", "sha", "qui", "zor", "fel",
             "nim", "ar", "eth", "ul", "dor", "pra", "vis", "gan", "mo", "tir", "lex", "sor"]
CONDITIONS = ["sunny", "rainy", "cloudy", "windy", "snowy", "foggy"]
CUISINES = ["noodle", "grill", "curry", "bakery", "seafood", "vegan"]
GENRES = ["jazz", "folk", "techno", "opera", "punk", "soul"]
STATUSES = ["on time", "delayed", "boarding", "cancelled"]
CLASSES = ["standard", "first"]
ADJ = ["Silent", "Crimson", "Hidden", "Golden", "Broken", "Distant", "Frozen", "Wild", "Hollow",
       "Bright", "Lost", "Iron", "Velvet", "Paper", "Last", "Quiet"]
NOUN = ["River", "Garden", "Tower", "Harbor", "Winter", "Mirror", "Lantern", "Orchard", "Crown",
        "Compass", "Meadow", "Engine", "Island", "Letter", "Forest", "Bridge"]
TEAM_SUFFIX, COMPANY_SUFFIX = ["Rovers", "United", "Falcons", "Tigers"], ["Labs", "Corp", "Works", "Systems"]
VOCAB = {"The", "League", *ADJ, *NOUN, *TEAM_SUFFIX, *COMPANY_SUFFIX}  # words names share; the rest are invented
VERSION = "embedded v2"
SPLIT_NAMES = ("train", "validation", "test")
# (kind, train, validation, test counts): each split's entities are drawn after the one before, never shared.
KINDS = [("city", 40, 12, 15), ("artist", 40, 12, 15), ("team", 30, 10, 12), ("person", 80, 24, 30),
         ("book", 40, 12, 15), ("company", 30, 10, 12), ("currency", 8, 4, 5), ("league", 4, 2, 3)]
# generated ids: each split draws from its own range, so no id (and no fact keyed by an id alone, as a
# train's status) is shared by two splits; within a split restaurant, artist, team and book ids are unique
ID_RANGES = {"R": [(10000, 59999), (60000, 69999), (70000, 99999)], "TR": [(100, 599), (600, 699), (700, 999)],
             "A": [(1000, 5999), (6000, 6999), (7000, 9999)], "T": [(1000, 5999), (6000, 6999), (7000, 9999)],
             "B": [(1000, 5999), (6000, 6999), (7000, 9999)], "BK": [(1000, 5999), (6000, 6999), (7000, 9999)]}


class ApiError(Exception):
    """A failure the API reports inside its response, like a real RapidAPI endpoint."""
    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def _rng(*key):
    return random.Random(":".join(str(k) for k in (SEED,) + key))  # str seeds hash stably


def _name(rng, parts):
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


class World:
    """All entities, split into train/test pools; every attribute is a pure function of the seed."""

    def __init__(self):
        rng, seen = _rng("names"), set()
        self.split = {}
        for kind, *counts in KINDS:
            names = []
            while len(names) < sum(counts):
                name = self._new_name(kind, rng)
                keys = ({name.lower()} | ({"$" + _symbol(name)} if kind == "company" else set())
                        | {"w:" + w.lower() for w in name.split() if w not in VOCAB})
                if not keys & seen:  # names, ticker symbols and invented words are unique, so that
                    # no name hides inside another ("Beldor" the city in "Beldor United" the team)
                    seen |= keys
                    names.append(name)
            ends = [sum(counts[:k + 1]) for k in range(len(counts))]
            self.split[kind] = {sp: names[a:b] for sp, a, b in zip(SPLIT_NAMES, [0] + ends, ends)}
        self.index = {kind: {n.lower(): (n, s) for s, names in d.items() for n in names}
                      for kind, d in self.split.items()}
        # generated ids -> their owner, and back; drawn per split from its range, redrawn when taken
        self.by_id, self.ids = {}, {}
        for k, split in enumerate(SPLIT_NAMES):
            owners = ([("restaurant", city, i) for city in self.split["city"][split] for i in range(3)]
                      + [(kind, n) for kind in ("artist", "team", "book") for n in self.split[kind][split]])
            for owner in owners:
                prefix = {"restaurant": "R", "artist": "A", "team": "T", "book": "B"}[owner[0]]
                lo, hi = ID_RANGES[prefix][k]
                r, i = _rng("id", *owner), None
                while i is None or i in self.by_id:
                    i = f"{prefix}{r.randrange(lo, hi + 1)}"
                self.by_id[i], self.ids[owner] = owner, i

    @staticmethod
    def _new_name(kind, rng):
        if kind == "person":
            return f"{_name(rng, 2)} {_name(rng, 2)}"
        if kind == "book":
            return f"The {rng.choice(ADJ)} {rng.choice(NOUN)}"
        if kind == "team":
            return f"{_name(rng, 2)} {rng.choice(TEAM_SUFFIX)}"
        if kind == "company":
            return f"{_name(rng, 2)} {rng.choice(COMPANY_SUFFIX)}"
        if kind == "currency":
            return "".join(rng.choice("BCDFGHJKLMNPRSTVWXZ") for _ in range(3))
        if kind == "league":
            return f"{_name(rng, 2)} League"
        return _name(rng, rng.choice([2, 3]))

    def _id(self, prefix, name):
        return self.ids[{"A": "artist", "T": "team", "B": "book"}[prefix], name]

    def _rest_id(self, city, i):
        return self.ids["restaurant", city, i]

    def lookup(self, kind, value):
        """Canonical name of an entity (case-insensitive), or a 404 like a real API."""
        hit = self.index[kind].get(str(value).strip().lower())
        if hit is None:
            raise ApiError(404, f"No {kind} named '{value}' was found.")
        return hit[0]

    def owner(self, kind, value):
        hit = self.by_id.get(str(value).strip().upper())
        if hit is None or hit[0] != kind:
            raise ApiError(404, f"Unknown {kind} id '{value}'.")
        return hit

    def split_of(self, kind, name):
        return self.index[kind][name.lower()][1]

    def pool(self, kind, of_kind, of_name):
        """The `kind` entities of the split that entity (of_kind, of_name) belongs to."""
        return self.split[kind][self.split_of(of_kind, of_name)]

    # ---- entity attributes: pure functions of (seed, name) ---------------------------------
    def home_city(self, kind, name):  # artists, teams, companies live in cities of their split
        return _rng("home", kind, name).choice(self.pool("city", kind, name))

    def restaurant(self, city, i):
        r = _rng("rest", city, i)
        return {"restaurant_id": self._rest_id(city, i), "name": f"{_name(r, 2)} {r.choice(['Kitchen', 'House', 'Table'])}",
                "cuisine": CUISINES[(i + len(city)) % len(CUISINES)], "rating": round(r.uniform(3, 5), 1)}

    def person(self, kind, name, role):  # coaches, ceos, authors' names come from the person pool
        return _rng("person", kind, name, role).choice(self.pool("person", kind, name))

    def id_range(self, prefix, city):
        """(low, high + 1) of the ids with `prefix` in the split of `city`."""
        lo, hi = ID_RANGES[prefix][SPLIT_NAMES.index(self.split_of("city", city))]
        return lo, hi + 1

    def trains(self, a, b):  # ids from the range of the cities' split: a train's status is keyed by its id alone
        r = _rng("train", a, b)
        return [{"train_id": f"TR{r.randrange(*self.id_range('TR', a))}", "depart": f"{r.randrange(6, 22):02d}:{r.choice(['00', '15', '30', '45'])}"}
                for _ in range(2)]


# ---- the APIs -------------------------------------------------------------------------------
# Each: (category, tool, api, description, required [(name, type)], optional [(name, type)], fn).
# fn(world, args) returns the response object or raises ApiError. Parameters are checked by
# call_api before fn runs, so fn may index args directly.
def _forecast(w, a):
    c = w.lookup("city", a["city"]); r = _rng("wx", c)
    return {"city": c, "condition": r.choice(CONDITIONS), "temp_c": r.randrange(-5, 35)}

def _air(w, a):
    c = w.lookup("city", a["city"]); aqi = _rng("aqi", c).randrange(10, 180)
    return {"city": c, "aqi": aqi, "level": "good" if aqi < 50 else "moderate" if aqi < 100 else "poor"}

def _sun(w, a):
    c = w.lookup("city", a["city"]); r = _rng("sun", c)
    return {"city": c, "sunrise": f"0{r.randrange(5, 8)}:{r.randrange(10, 59)}", "sunset": f"{r.randrange(17, 21)}:{r.randrange(10, 59)}"}

def _alerts(w, a):
    c = w.lookup("city", a["city"]); r = _rng("alert", c)
    return {"city": c, "alerts": r.sample(["flood", "heat", "storm", "frost"], r.randrange(0, 3))}

def _find_trains(w, a):
    o, d = w.lookup("city", a["origin"]), w.lookup("city", a["destination"])
    if o == d:
        raise ApiError(400, "Origin and destination must differ.")
    return {"origin": o, "destination": d, "trains": w.trains(o, d)}

def _train(tid):
    if not (str(tid).upper().startswith("TR") and str(tid)[2:].isdigit() and len(str(tid)) == 5):
        raise ApiError(404, f"Unknown train id '{tid}'.")
    return str(tid).upper()

def _train_status(w, a):
    t = _train(a["train_id"]); r = _rng("status", t)
    return {"train_id": t, "status": r.choice(STATUSES), "platform": r.randrange(1, 12)}

def _ticket(w, a):
    t, cls = _train(a["train_id"]), str(a.get("travel_class", "standard")).lower()
    if cls not in CLASSES:
        raise ApiError(400, f"travel_class must be one of {CLASSES}.")
    return {"train_id": t, "travel_class": cls, "price": _rng("price", t).randrange(12, 90) * (2 if cls == "first" else 1)}

def _city_info(w, a):
    c = w.lookup("city", a["city"]); r = _rng("info", c)
    return {"city": c, "population": r.randrange(20, 900) * 1000, "region": r.choice(["north", "south", "coast", "valley"])}

def _search_rest(w, a):
    c = w.lookup("city", a["city"]); cuisine = a.get("cuisine")
    found = [w.restaurant(c, i) for i in range(3)]
    found = [x for x in found if not cuisine or x["cuisine"] == str(cuisine).lower()]
    if not found:
        raise ApiError(404, f"No {cuisine} restaurants in {c}.")
    return {"city": c, "results": found[:2]}

def _menu(w, a):
    _, city, i = w.owner("restaurant", a["restaurant_id"]); r = _rng("menu", city, i)
    return {"restaurant_id": w._rest_id(city, i), "signature_dish": f"{r.choice(ADJ).lower()} {r.choice(['dumplings', 'stew', 'tart', 'skewers', 'soup'])}",
            "price": r.randrange(8, 40)}

def _hours(w, a):
    _, city, i = w.owner("restaurant", a["restaurant_id"]); r = _rng("hours", city, i)
    return {"restaurant_id": w._rest_id(city, i), "opens": f"{r.randrange(7, 12):02d}:00", "closes": f"{r.randrange(20, 24)}:00"}

def _book_table(w, a):
    _, city, i = w.owner("restaurant", a["restaurant_id"])
    people = a["people"]
    if isinstance(people, str) and people.strip().isdigit():
        people = int(people)
    if not isinstance(people, int) or isinstance(people, bool) or not 1 <= people <= 12:
        raise ApiError(422, "people must be an integer between 1 and 12.")
    return {"restaurant_id": w._rest_id(city, i), "people": people, "booking_code": f"BK{_rng('bk', city, i, people).randrange(*w.id_range('BK', city))}"}

def _symbol(name):
    return "".join(ch for ch in name.upper() if ch.isalpha())[:4]

def _company_by_symbol(w, sym):
    for split in SPLIT_NAMES:
        for c in w.split["company"][split]:
            if _symbol(c) == str(sym).strip().upper():
                return c
    raise ApiError(404, f"Unknown symbol '{sym}'.")

def _quote(w, a):
    c = _company_by_symbol(w, a["symbol"]); r = _rng("quote", c)
    return {"symbol": _symbol(c), "price": round(r.uniform(5, 400), 2), "change_pct": round(r.uniform(-5, 5), 1)}

def _profile(w, a):
    c = _company_by_symbol(w, a["symbol"])
    return {"symbol": _symbol(c), "name": c, "ceo": w.person("company", c, "ceo"), "hq_city": w.home_city("company", c)}

def _search_company(w, a):
    c = w.lookup("company", a["name"])
    return {"name": c, "symbol": _symbol(c)}

def _fx(w, a):
    b, t = w.lookup("currency", a["base"]), w.lookup("currency", a["target"])
    return {"base": b, "target": t, "rate": round(_rng("fx", b, t).uniform(0.1, 9), 3)}

def _team_info(w, a):
    t = w.lookup("team", a["team"])
    return {"team_id": w._id("T", t), "team": t, "city": w.home_city("team", t), "coach": w.person("team", t, "coach")}

def _last_match(w, a):
    _, t = w.owner("team", a["team_id"]); r = _rng("match", t)
    return {"team_id": w._id("T", t), "opponent": r.choice([x for x in w.pool("team", "team", t) if x != t]),
            "score": f"{r.randrange(0, 5)}-{r.randrange(0, 5)}"}

def _top_scorer(w, a):
    _, t = w.owner("team", a["team_id"])
    return {"team_id": w._id("T", t), "player": w.person("team", t, "scorer"), "goals": _rng("goals", t).randrange(3, 30)}

def _league(w, a):
    lg = w.lookup("league", a["league"]); r = _rng("league", lg)
    return {"league": lg, "leader": r.choice(w.pool("team", "league", lg)),
            "points": r.randrange(20, 80)}

def _search_books(w, a):
    b = w.lookup("book", a["title"]); r = _rng("book", b)
    return {"book_id": w._id("B", b), "title": b, "author": w.person("book", b, "author"), "year": r.randrange(1950, 2024)}

def _author(w, a):
    p = w.lookup("person", a["author"]); r = _rng("author", p)
    return {"author": p, "born_in": r.choice(w.pool("city", "person", p)),
            "genre": r.choice(["mystery", "poetry", "history", "fantasy"])}

def _availability(w, a):
    _, b = w.owner("book", a["book_id"]); c = w.lookup("city", a["city"])
    return {"book_id": w._id("B", b), "city": c, "copies": _rng("copies", b, c).randrange(0, 9)}

def _search_artist(w, a):
    n = w.lookup("artist", a["name"])
    return {"artist_id": w._id("A", n), "name": n, "genre": _rng("genre", n).choice(GENRES), "home_city": w.home_city("artist", n)}

def _tracks(w, a):
    _, n = w.owner("artist", a["artist_id"]); r = _rng("tracks", n)
    return {"artist_id": w._id("A", n), "tracks": [f"{r.choice(ADJ)} {r.choice(NOUN)}" for _ in range(2)]}

def _concert(w, a):
    _, n = w.owner("artist", a["artist_id"]); r = _rng("concert", n)
    return {"artist_id": w._id("A", n), "city": r.choice(w.pool("city", "artist", n)),
            "date": f"2026-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d}"}


S, I = "string", "integer"
APIS = [
    ("Weather", "SkyCast", "forecast", "Current weather of a city.", [("city", S)], [], _forecast),
    ("Weather", "SkyCast", "air_quality", "Air quality index of a city.", [("city", S)], [], _air),
    ("Weather", "SkyCast", "sun_times", "Sunrise and sunset of a city.", [("city", S)], [], _sun),
    ("Weather", "SkyCast", "weather_alerts", "Active weather alerts of a city.", [("city", S)], [], _alerts),
    ("Travel", "RailNet", "find_trains", "Trains between two cities.", [("origin", S), ("destination", S)], [], _find_trains),
    ("Travel", "RailNet", "train_status", "Status and platform of a train.", [("train_id", S)], [], _train_status),
    ("Travel", "RailNet", "ticket_price", "Ticket price of a train.", [("train_id", S)], [("travel_class", S)], _ticket),
    ("Travel", "RailNet", "city_info", "Population and region of a city.", [("city", S)], [], _city_info),
    ("Food", "DineSpot", "search_restaurants", "Restaurants in a city.", [("city", S)], [("cuisine", S)], _search_rest),
    ("Food", "DineSpot", "restaurant_menu", "Signature dish of a restaurant.", [("restaurant_id", S)], [], _menu),
    ("Food", "DineSpot", "opening_hours", "Opening hours of a restaurant.", [("restaurant_id", S)], [], _hours),
    ("Food", "DineSpot", "book_table", "Book a table at a restaurant.", [("restaurant_id", S), ("people", I)], [], _book_table),
    ("Finance", "MarketPulse", "stock_quote", "Stock price of a symbol.", [("symbol", S)], [], _quote),
    ("Finance", "MarketPulse", "company_profile", "CEO and headquarters of a company.", [("symbol", S)], [], _profile),
    ("Finance", "MarketPulse", "search_company", "Ticker symbol of a company.", [("name", S)], [], _search_company),
    ("Finance", "MarketPulse", "exchange_rate", "Exchange rate between currencies.", [("base", S), ("target", S)], [], _fx),
    ("Sports", "ScoreLine", "team_info", "Id, city and coach of a team.", [("team", S)], [], _team_info),
    ("Sports", "ScoreLine", "last_match", "Last match of a team.", [("team_id", S)], [], _last_match),
    ("Sports", "ScoreLine", "top_scorer", "Top scorer of a team.", [("team_id", S)], [], _top_scorer),
    ("Sports", "ScoreLine", "league_table", "Leader of a league.", [("league", S)], [], _league),
    ("Books", "ShelfFinder", "search_books", "Find a book by title.", [("title", S)], [], _search_books),
    ("Books", "ShelfFinder", "author_profile", "Birthplace and genre of an author.", [("author", S)], [], _author),
    ("Books", "ShelfFinder", "book_availability", "Copies of a book in a city library.", [("book_id", S), ("city", S)], [], _availability),
    ("Music", "TuneBase", "search_artist", "Id, genre and home city of an artist.", [("name", S)], [], _search_artist),
    ("Music", "TuneBase", "top_tracks", "Top tracks of an artist.", [("artist_id", S)], [], _tracks),
    ("Music", "TuneBase", "next_concert", "Next concert of an artist.", [("artist_id", S)], [], _concert),
]
API = {(tool.lower(), api): (cat, tool, api, desc, req, opt, fn) for cat, tool, api, desc, req, opt, fn in APIS}


def call_api(world, tool, api, args):
    """One API call -> a StableToolBench record {"error": "", "response": ...}, or None if no such API."""
    entry = API.get((str(tool).lower(), api))
    if entry is None:
        return None
    _, _, _, _, req, _, fn = entry
    missing = [p for p, _ in req if p not in args]
    if missing:
        return {"error": "", "response": {"status": 400, "message": f"Missing required parameter '{missing[0]}'."}}
    try:
        return {"error": "", "response": fn(world, args)}
    except ApiError as e:
        return {"error": "", "response": {"status": e.status, "message": e.message}}


def function_name(tool, api):
    from env import function_name as fname  # ToolBench's naming convention lives in env.py
    return fname(tool, api)


def function_schemas():
    """OpenAI-style schemas (as ToolBench builds them) of every API, keyed by function name."""
    out = {}
    for cat, tool, api, desc, req, opt, _ in APIS:
        props = {p: {"type": t} for p, t in req + opt}
        out[function_name(tool, api)] = {
            "name": function_name(tool, api), "description": desc,
            "parameters": {"type": "object", "properties": props, "required": [p for p, _ in req],
                           "optional": [p for p, _ in opt]},
            "category": cat, "tool": tool, "api": api}
    return out


# ---- tasks ----------------------------------------------------------------------------------
class _Expert:
    """Solves a task by calling the world, recording the expert trajectory and the answer facts."""

    def __init__(self, world):
        self.w, self.steps, self.facts = world, [], []

    def __call__(self, tool_api, **args):
        tool, api = tool_api.split(".")
        cat, tool, api, desc, *_ = API[(tool.lower(), api)]
        resp = call_api(self.w, tool, api, args)["response"]
        assert "message" not in resp, (tool_api, args, resp)  # an expert never errs
        self.steps.append({"thought": f"I need the {desc[:-1] if desc[:2].isupper() else desc[0].lower() + desc[1:-1]}.",
                           "name": function_name(tool, api), "arguments": args})
        return resp

    def fact(self, resp, *keys):
        for k in keys:
            self.facts.append((k, resp[k]))


def _g1(rng, w, split, e):
    c, c2 = rng.sample(w.split["city"][split], 2)
    tid = w.trains(c, c2)[0]["train_id"]
    rid = w.restaurant(c, rng.randrange(3))["restaurant_id"]
    comp, team, book = (rng.choice(w.split[k][split]) for k in ("company", "team", "book"))
    artist, person = rng.choice(w.split["artist"][split]), rng.choice(w.split["person"][split])
    kind = rng.randrange(19)
    if kind == 0: e.fact(e("SkyCast.forecast", city=c), "condition", "temp_c"); return f"What is the weather like in {c}?"
    if kind == 1: e.fact(e("SkyCast.air_quality", city=c), "aqi", "level"); return f"How clean is the air in {c}?"
    if kind == 2: e.fact(e("SkyCast.sun_times", city=c), "sunrise", "sunset"); return f"When does the sun rise and set in {c}?"
    if kind == 3: e.fact(e("RailNet.city_info", city=c), "population"); return f"How many people live in {c}?"
    if kind == 4:
        r = e("RailNet.find_trains", origin=c, destination=c2); e.facts += [("train_id", t["train_id"]) for t in r["trains"]]
        return f"Which trains run from {c} to {c2}?"
    if kind == 5: e.fact(e("RailNet.train_status", train_id=tid), "status", "platform"); return f"What is the status of train {tid}, and from which platform does it leave?"
    if kind == 6:
        cls = rng.choice(CLASSES); e.fact(e("RailNet.ticket_price", train_id=tid, travel_class=cls), "price")
        return f"How much is a {cls} ticket on train {tid}?"
    if kind == 7:
        cuisine = w.restaurant(c, rng.randrange(3))["cuisine"]
        e.fact(e("DineSpot.search_restaurants", city=c, cuisine=cuisine)["results"][0], "name"); return f"Find a {cuisine} restaurant in {c}."
    if kind == 8: e.fact(e("DineSpot.restaurant_menu", restaurant_id=rid), "signature_dish"); return f"What is the signature dish of restaurant {rid}?"
    if kind == 9: e.fact(e("DineSpot.opening_hours", restaurant_id=rid), "opens", "closes"); return f"When is restaurant {rid} open?"
    if kind == 10:
        n = rng.randrange(2, 9); e.fact(e("DineSpot.book_table", restaurant_id=rid, people=n), "booking_code")
        return f"Book a table for {n} people at restaurant {rid}."
    if kind == 11: e.fact(e("MarketPulse.stock_quote", symbol=_symbol(comp)), "price"); return f"What is {_symbol(comp)} trading at?"
    if kind == 12: e.fact(e("MarketPulse.company_profile", symbol=_symbol(comp)), "ceo"); return f"Who is the CEO of the company with ticker {_symbol(comp)}?"
    if kind == 13: e.fact(e("MarketPulse.search_company", name=comp), "symbol"); return f"What is the ticker symbol of {comp}?"
    if kind == 14:
        b, t = rng.sample(w.split["currency"][split], 2); e.fact(e("MarketPulse.exchange_rate", base=b, target=t), "rate")
        return f"How many {t} is one {b} worth?"
    if kind == 15: e.fact(e("ScoreLine.team_info", team=team), "coach"); return f"Who coaches {team}?"
    if kind == 16:
        lg = rng.choice(w.split["league"][split]); e.fact(e("ScoreLine.league_table", league=lg), "leader", "points")
        return f"Who leads the {lg}, with how many points?"
    if kind == 17: e.fact(e("ShelfFinder.search_books", title=book), "author"); return f"Who wrote {book}?"
    if rng.random() < 0.5: e.fact(e("ShelfFinder.author_profile", author=person), "born_in"); return f"Where was {person} born?"
    e.fact(e("TuneBase.search_artist", name=artist), "genre"); return f"What genre does {artist} play?"


def _g2(rng, w, split, e):
    c, c2 = rng.sample(w.split["city"][split], 2)
    comp, team, book = (rng.choice(w.split[k][split]) for k in ("company", "team", "book"))
    artist = rng.choice(w.split["artist"][split])
    kind = rng.randrange(12)
    if kind == 0:
        e.fact(e("SkyCast.forecast", city=c), "condition"); e.fact(e("SkyCast.air_quality", city=c), "aqi")
        return f"What is the weather and the air quality index in {c}?"
    if kind == 1:
        t = e("RailNet.find_trains", origin=c, destination=c2)["trains"][0]; e.fact(t, "train_id")
        if rng.random() < 0.5:
            e.fact(e("RailNet.train_status", train_id=t["train_id"]), "status", "platform")
            return f"Find a train from {c} to {c2} and tell me its status and platform."
        cls = rng.choice(CLASSES); e.fact(e("RailNet.ticket_price", train_id=t["train_id"], travel_class=cls), "price")
        return f"Find a train from {c} to {c2} and the price of a {cls} ticket."
    if kind in (2, 3):
        cuisine = w.restaurant(c, rng.randrange(3))["cuisine"]
        r = e("DineSpot.search_restaurants", city=c, cuisine=cuisine)["results"][0]; e.fact(r, "name")
        if kind == 2:
            e.fact(e("DineSpot.restaurant_menu", restaurant_id=r["restaurant_id"]), "signature_dish")
            if rng.random() < 0.5:
                return f"Find a {cuisine} restaurant in {c} and its signature dish."
            e.fact(e("DineSpot.opening_hours", restaurant_id=r["restaurant_id"]), "opens", "closes")
            return f"Find a {cuisine} restaurant in {c}, its signature dish and its opening hours."
        n = rng.randrange(2, 9); e.fact(e("DineSpot.book_table", restaurant_id=r["restaurant_id"], people=n), "booking_code")
        return f"Book a table for {n} people at a {cuisine} restaurant in {c}."
    if kind in (4, 5):
        sym = e("MarketPulse.search_company", name=comp)["symbol"]; e.facts.append(("symbol", sym))
        if kind == 4:
            e.fact(e("MarketPulse.stock_quote", symbol=sym), "price"); return f"What is the stock price of {comp}?"
        e.fact(e("MarketPulse.company_profile", symbol=sym), "ceo", "hq_city"); return f"Who runs {comp}, and where is it based?"
    if kind in (6, 7):
        tid = e("ScoreLine.team_info", team=team)["team_id"]
        if kind == 6 or rng.random() < 0.5:
            e.fact(e("ScoreLine.last_match", team_id=tid), "opponent", "score")
            if kind == 6:
                return f"Who did {team} play last, and what was the score?"
        e.fact(e("ScoreLine.top_scorer", team_id=tid), "player", "goals")
        return f"Who is the top scorer of {team}?" if len(e.steps) == 2 else f"Tell me {team}'s last match and top scorer."
    if kind in (8, 9):
        b = e("ShelfFinder.search_books", title=book)
        if kind == 8:
            e.fact(b, "author"); e.fact(e("ShelfFinder.author_profile", author=b["author"]), "born_in")
            return f"Who wrote {book}, and where was the author born?"
        e.fact(e("ShelfFinder.book_availability", book_id=b["book_id"], city=c), "copies")
        return f"How many copies of {book} does the library in {c} have?"
    aid = e("TuneBase.search_artist", name=artist)["artist_id"]
    if kind == 10 or rng.random() < 0.5:
        tr = e("TuneBase.top_tracks", artist_id=aid)["tracks"]; e.facts += [("track", tr[0])]
        if kind == 10:
            return f"What is the top track of {artist}?"
    e.fact(e("TuneBase.next_concert", artist_id=aid), "city", "date")
    return f"Where and when is {artist}'s next concert?" if len(e.steps) == 2 else f"Give me {artist}'s top track and next concert."


def _g3(rng, w, split, e):
    c = rng.choice(w.split["city"][split])
    comp, team, book = (rng.choice(w.split[k][split]) for k in ("company", "team", "book"))
    artist = rng.choice(w.split["artist"][split])
    kind = rng.randrange(7)
    if kind in (0, 1):
        aid = e("TuneBase.search_artist", name=artist)["artist_id"]
        con = e("TuneBase.next_concert", artist_id=aid); e.fact(con, "city", "date")
        if kind == 0:
            e.fact(e("SkyCast.forecast", city=con["city"]), "condition", "temp_c")
            return f"Where does {artist} play next, and what is the weather there?"
        if con["city"] == c:
            c = next(x for x in w.split["city"][split] if x != c)
        t = e("RailNet.find_trains", origin=c, destination=con["city"])["trains"][0]; e.fact(t, "train_id")
        if rng.random() < 0.5:
            return f"I live in {c}. When is {artist}'s next concert, and which train takes me there?"
        e.fact(e("RailNet.train_status", train_id=t["train_id"]), "platform")
        return f"I live in {c}. When is {artist}'s next concert, which train takes me there, and from which platform?"
    if kind == 2:
        sym = e("MarketPulse.search_company", name=comp)["symbol"]
        p = e("MarketPulse.company_profile", symbol=sym); e.fact(p, "ceo", "hq_city")
        e.fact(e("SkyCast.forecast", city=p["hq_city"]), "condition")
        return f"Who is the CEO of {comp}, and what is the weather at its headquarters?"
    if kind == 3:
        city = e("ScoreLine.team_info", team=team)["city"]; e.facts.append(("city", city))
        r = e("DineSpot.search_restaurants", city=city)["results"][0]; e.fact(r, "name")
        e.fact(e("DineSpot.restaurant_menu", restaurant_id=r["restaurant_id"]), "signature_dish")
        return f"I am visiting {team}'s home city. Suggest a restaurant there and its signature dish."
    if kind == 4:
        author = e("ShelfFinder.search_books", title=book)["author"]; e.facts.append(("author", author))
        born = e("ShelfFinder.author_profile", author=author)["born_in"]; e.facts.append(("born_in", born))
        e.fact(e("RailNet.city_info", city=born), "population")
        if rng.random() < 0.5:
            return f"Who wrote {book}, and how many people live in the author's birthplace?"
        e.fact(e("SkyCast.air_quality", city=born), "aqi")
        return f"Who wrote {book}? Tell me the population and air quality of the author's birthplace."
    if kind == 5:
        home = e("TuneBase.search_artist", name=artist)["home_city"]; e.facts.append(("home_city", home))
        r = e("DineSpot.search_restaurants", city=home)["results"][0]; e.fact(r, "name")
        n = rng.randrange(2, 9); e.fact(e("DineSpot.book_table", restaurant_id=r["restaurant_id"], people=n), "booking_code")
        return f"Book a table for {n} people at a restaurant in {artist}'s home city."
    info = e("ScoreLine.team_info", team=team)
    m = e("ScoreLine.last_match", team_id=info["team_id"]); e.fact(m, "opponent", "score")
    opp = e("ScoreLine.team_info", team=m["opponent"]); e.fact(opp, "city")
    e.fact(e("SkyCast.forecast", city=opp["city"]), "condition")
    return f"Who did {team} play last, and what is the weather in the opponent's city?"


def make_tasks(world, split, counts, first_id, seen=None):
    """Deterministic tasks of one split: {"G1": n1, ...} -> list of task dicts. seen: the queries of the
    splits made before (none is made again); a task whose answer facts its query already shows is redrawn."""
    from reward import mentions  # IsSolved's matching rule
    names = sorted(function_schemas())
    tasks, seen = [], set() if seen is None else seen
    for group, n in counts.items():
        rng, make, tries = _rng("tasks", split, group), {"G1": _g1, "G2": _g2, "G3": _g3}[group], 0
        while sum(t["group"] == group for t in tasks) < n:
            tries += 1
            assert tries < 50 * n, f"cannot make {n} distinct {group} tasks"
            e = _Expert(world)
            query = make(rng, world, split, e)
            if query in seen or any(mentions(query, str(v)) for _, v in e.facts):
                continue
            seen.add(query)
            relevant = list(dict.fromkeys(s["name"] for s in e.steps))
            n_funcs = rng.randrange(max(5, len(relevant) + 2), 11)
            distract = rng.sample([f for f in names if f not in relevant], n_funcs - len(relevant))
            offered = relevant + distract
            rng.shuffle(offered)
            answer = ", ".join(f"{k}: {v}" for k, v in e.facts)
            finish = {"thought": "I have all the facts.", "name": "Finish",
                      "arguments": {"return_type": "give_answer", "final_answer": answer}}
            tasks.append({"query_id": first_id + len(tasks), "query": query, "group": group,
                          "functions": offered, "relevant": relevant,
                          "answer": list(dict.fromkeys(str(v) for _, v in e.facts)), "expert": e.steps + [finish]})
    return tasks


SPLITS = {"train": ({"G1": 500, "G2": 350, "G3": 350}, 1), "validation": ({"G1": 40, "G2": 40, "G3": 40}, 50000),
          "test": ({"G1": 120, "G2": 120, "G3": 120}, 100000)}
FILES = {"train": "bench_train.json", "validation": "bench_val.json", "test": "bench_test.json"}


def write_benchmark(out_dir):
    """Write data/bench_{train,val,test}.json: the world's function schemas and one task per line."""
    world, schemas, seen = World(), function_schemas(), set()
    os.makedirs(out_dir, exist_ok=True)
    for split, (counts, first_id) in SPLITS.items():
        tasks = make_tasks(world, split, counts, first_id, seen)
        used = sorted({f for t in tasks for f in t["functions"]})
        path = os.path.join(out_dir, FILES[split])
        with open(path + ".tmp", "w") as f:
            f.write('{"format": "steptool-bench/1", "benchmark": "%s", "split": "%s",\n "functions": %s,\n "tasks": [\n'
                    % (VERSION, split, json.dumps({k: schemas[k] for k in used})))
            f.write(",\n".join(json.dumps(t) for t in tasks) + "\n]}\n")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(tasks)} tasks", {g: sum(t['group'] == g for t in tasks) for g in counts})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
    write_benchmark(ap.parse_args().out)
