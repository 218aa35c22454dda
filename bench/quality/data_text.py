"""Text tasks built from Debian's wordnet-base and fortunes* packages.

Each .deb is fetched with `apt-get download` into the cache and unpacked with `dpkg-deb -x`
(nothing is installed). Eight classification tasks are derived; every task has balanced
classes and a fixed train/val/test split (seeded), with no text in two splits.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path

from common import CACHE, read_json, write_json

DEBS = ["wordnet-base", "fortunes", "fortunes-de", "fortunes-es", "fortunes-it"]

# WordNet lexicographer file numbers -> supersense names (lexnames(5WN)).
LEXNAMES = {
    "03": "noun.Tops",
    "04": "noun.act",
    "05": "noun.animal",
    "06": "noun.artifact",
    "07": "noun.attribute",
    "08": "noun.body",
    "09": "noun.cognition",
    "10": "noun.communication",
    "11": "noun.event",
    "12": "noun.feeling",
    "13": "noun.food",
    "14": "noun.group",
    "15": "noun.location",
    "16": "noun.motive",
    "17": "noun.object",
    "18": "noun.person",
    "19": "noun.phenomenon",
    "20": "noun.plant",
    "21": "noun.possession",
    "22": "noun.process",
    "23": "noun.quantity",
    "24": "noun.relation",
    "25": "noun.shape",
    "26": "noun.state",
    "27": "noun.substance",
    "28": "noun.time",
    "29": "verb.body",
    "30": "verb.change",
    "31": "verb.cognition",
    "32": "verb.communication",
    "33": "verb.competition",
    "34": "verb.consumption",
    "35": "verb.contact",
    "36": "verb.creation",
    "37": "verb.emotion",
    "38": "verb.motion",
    "39": "verb.perception",
    "40": "verb.possession",
    "41": "verb.social",
    "42": "verb.stative",
    "43": "verb.weather",
}

FORTUNE_TOPICS = ["computers", "science", "politics", "art", "work", "men-women", "songs-poems", "definitions"]

# name -> short description, in the order used everywhere (quick mode takes the first 3 of QUICK)
TASKS = {
    "noun_def": "noun supersense from the definition (10 classes)",
    "verb_def": "verb supersense from the definition (12)",
    "pos_def": "part of speech from the definition (4)",
    "verb_ex": "verb supersense from an example sentence (12)",
    "noun_lemma": "noun supersense from the lemmas alone (10)",
    "adj_kind": "adjective kind: head / satellite / relational (3)",
    "fortune_topic": "topic of an English fortune (8)",
    "fortune_lang": "language of a fortune: en/de/es/it (4)",
}
QUICK_TASKS = ["pos_def", "noun_def", "verb_def"]


def raw_dir() -> Path:
    return CACHE / "raw"


def fetch_debs(log=print) -> Path:
    """Download and unpack the Debian packages (once)."""
    debs = CACHE / "debs"
    raw = raw_dir()
    debs.mkdir(parents=True, exist_ok=True)
    for name in DEBS:
        target = raw / name
        if (target / ".ok").exists():
            continue
        have = list(debs.glob(f"{name}_*.deb"))
        if not have:
            log(f"apt-get download {name}")
            got = subprocess.run(
                ["apt-get", "download", name], cwd=debs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if got.returncode != 0:  # a fresh machine may have no package lists yet
                subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(
                    ["apt-get", "download", name],
                    cwd=debs,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            have = list(debs.glob(f"{name}_*.deb"))
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(have[0]), str(target)], check=True)
        (target / ".ok").write_text("ok\n")
    return raw


# ---------------------------------------------------------------- parsing


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def parse_wordnet(raw: Path) -> list[dict]:
    d = raw / "wordnet-base" / "usr" / "share" / "wordnet"
    out = []
    for pos in ["noun", "verb", "adj", "adv"]:
        with open(d / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset, lex, sstype = fields[0], fields[1], fields[2]
                nw = int(fields[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(nw)]
                gloss = gloss.strip()
                examples = [_clean(e) for e in re.findall(r'"([^"]+)"', gloss)]
                definition = _clean(gloss.split('"')[0].strip().rstrip(";").strip())
                out.append(
                    dict(
                        id=f"{pos}:{offset}",
                        pos=pos,
                        lex=lex,
                        sstype=sstype,
                        lemmas=lemmas,
                        definition=definition,
                        examples=examples,
                    )
                )
    return out


def read_fortune_file(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    items = []
    for chunk in re.split(r"^%\s*$", text, flags=re.M):
        t = _clean(chunk)
        if 20 <= len(t) <= 600:
            items.append(t)
    return items


def _fortune_files(pkgdir: Path) -> list[Path]:
    files = []
    for p in sorted(pkgdir.rglob("*")):
        if (
            p.is_file()
            and not p.is_symlink()
            and p.suffix not in (".dat", ".u8")
            and "/off/" not in str(p)
            and "ascii" not in p.name
            and "banner" not in p.name
            and "/doc/" not in str(p)
            and "/man/" not in str(p)
            and "/lintian/" not in str(p)
        ):
            files.append(p)
    return files


def parse_fortunes(raw: Path) -> dict:
    en_dir = raw / "fortunes" / "usr" / "share" / "games" / "fortunes"
    topics = {t: read_fortune_file(en_dir / t) for t in FORTUNE_TOPICS}
    langs = {}
    for lang, pkg in [("en", "fortunes"), ("de", "fortunes-de"), ("es", "fortunes-es"), ("it", "fortunes-it")]:
        seen, items = set(), []
        for p in _fortune_files(raw / pkg / "usr" / "share" / "games"):
            for t in read_fortune_file(p):
                if t not in seen:
                    seen.add(t)
                    items.append(t)
        langs[lang] = items
    return {"topics": topics, "langs": langs}


# ---------------------------------------------------------------- tasks


def _build_items(name: str, wn: list[dict], fo: dict) -> list[tuple[str, str, str]]:
    """(group, text, label) triples; items of one group always fall in the same split."""
    items = []
    if name == "noun_def":
        items = [(s["id"], s["definition"], LEXNAMES[s["lex"]]) for s in wn if s["pos"] == "noun"]
    elif name == "noun_lemma":
        items = [(s["id"], ", ".join(s["lemmas"]), LEXNAMES[s["lex"]]) for s in wn if s["pos"] == "noun"]
    elif name == "verb_def":
        items = [(s["id"], s["definition"], LEXNAMES[s["lex"]]) for s in wn if s["pos"] == "verb"]
    elif name == "verb_ex":
        items = [(s["id"], e, LEXNAMES[s["lex"]]) for s in wn if s["pos"] == "verb" for e in s["examples"]]
    elif name == "pos_def":
        items = [(s["id"], s["definition"], s["pos"]) for s in wn]
    elif name == "adj_kind":
        kind = {("00", "a"): "head", ("00", "s"): "satellite", ("01", "a"): "relational"}
        items = [
            (s["id"], s["definition"], kind[(s["lex"], s["sstype"])])
            for s in wn
            if s["pos"] == "adj" and (s["lex"], s["sstype"]) in kind
        ]
    elif name == "fortune_topic":
        items = [(f"{t}:{i}", x, t) for t, xs in fo["topics"].items() for i, x in enumerate(xs)]
    elif name == "fortune_lang":
        items = [(f"{lang}:{i}", x, lang) for lang, xs in fo["langs"].items() for i, x in enumerate(xs)]
    else:
        raise KeyError(name)
    return [(g, t, y) for g, t, y in items if len(t) >= 3]


N_CLASSES = {"noun_def": 10, "noun_lemma": 10, "verb_def": 12, "verb_ex": 12}


def build_task(name: str, wn, fo, n_train: int, n_val: int, n_test: int, seed: int = 1234) -> dict:
    items = _build_items(name, wn, fo)
    # a text seen with two labels is ambiguous: drop it; duplicates collapse to one group
    labels_of = defaultdict(set)
    for _, t, y in items:
        labels_of[t.lower()].add(y)
    first_group = {}
    clean = []
    for g, t, y in items:
        k = t.lower()
        if len(labels_of[k]) > 1:
            continue
        g = first_group.setdefault(k, g)
        clean.append((g, t, y))
    by_class = defaultdict(lambda: defaultdict(list))
    for g, t, y in clean:
        if t not in by_class[y][g]:
            by_class[y][g].append(t)
    classes = sorted(by_class, key=lambda c: -sum(len(v) for v in by_class[c].values()))
    if name in N_CLASSES:
        classes = classes[: N_CLASSES[name]]
    classes = sorted(classes)
    C = len(classes)
    per = {"test": -(-n_test // C), "val": -(-n_val // C), "train": n_train // C}
    rng = random.Random(f"{seed}:{name}")
    splits = {"train": [], "val": [], "test": []}
    short = []
    for ci, c in enumerate(classes):
        groups = sorted(by_class[c])
        rng.shuffle(groups)
        pos = 0
        for split in ["test", "val", "train"]:
            taken = 0
            while taken < per[split] and pos < len(groups):
                g = groups[pos]
                pos += 1
                t = rng.choice(by_class[c][g])  # one text per group (synset / fortune)
                splits[split].append((t, ci))
                taken += 1
            if taken < per[split]:
                short.append((c, split, taken))
    for s in splits.values():
        rng.shuffle(s)
    # keep test/val exactly balanced-size: trim to the requested totals
    splits["test"] = splits["test"][:n_test]
    splits["val"] = splits["val"][:n_val]
    return {
        "name": name,
        "description": TASKS[name],
        "classes": classes,
        "splits": {k: {"text": [t for t, _ in v], "label": [y for _, y in v]} for k, v in splits.items()},
        "short": short,
    }


def load_tasks(names: list[str], n_train: int, n_val: int, n_test: int, log=print) -> dict:
    key = f"text_tasks_{n_train}_{n_val}_{n_test}.json"
    path = CACHE / "data" / key
    cached = read_json(path, {})
    if all(n in cached for n in names):
        return {n: cached[n] for n in names}
    raw = fetch_debs(log)
    wn = parse_wordnet(raw)
    fo = parse_fortunes(raw)
    for n in TASKS:
        if n not in cached:
            cached[n] = build_task(n, wn, fo, n_train, n_val, n_test)
            sp = cached[n]["splits"]
            log(
                f"task {n}: {len(cached[n]['classes'])} classes, train/val/test = "
                f"{len(sp['train']['label'])}/{len(sp['val']['label'])}/{len(sp['test']['label'])}"
                + (f" (short: {cached[n]['short']})" if cached[n]["short"] else "")
            )
    write_json(path, cached)
    return {n: cached[n] for n in names}


if __name__ == "__main__":
    ts = load_tasks(list(TASKS), 2400, 300, 1000)
    for n, t in ts.items():
        print(n, t["classes"])
        for i in range(3):
            print("   ", t["splits"]["train"]["label"][i], t["splits"]["train"]["text"][i][:120])
