"""Text benchmark in the paper's regime: all-MiniLM-L6-v2 with zero-shot heads.

As CLIP classifies images with the text embeddings of class names, each task's head here is the
normalised, mean-pooled embedding of a short description of each class, computed once with the
BASE model and then frozen; the logits are TEMPERATURE * cosine(sentence, class). The eight
tasks and their data are those of data_text.py (WordNet and fortunes from Debian packages). Per
task the encoder's transformer layers are fine-tuned under its frozen head (word, position and
type embeddings frozen, as in the probe benchmark), so tasks differ only in the encoder's task
vector, and the base with the heads is weak: a large headroom with heavy interference, as in the
paper's 8-task ViT-B/32 setting.

The class descriptions were written once, before any score was seen, and were not tuned.
"""

from __future__ import annotations

from pathlib import Path

import data_text
import torch
import torch.nn.functional as F
from bench_text import TextBench, _load_model, _model_src
from common import CACHE, stable_hash
from safetensors.torch import load_file, save_file

TEMPERATURE = 20.0

# supersense -> what its members are; used for noun/verb definitions, examples and lemmas
NOUN = {
    "noun.act": "an action or activity that people do",
    "noun.animal": "an animal, a kind of creature",
    "noun.artifact": "a man-made object, tool, device or building",
    "noun.attribute": "a quality, property or characteristic of something",
    "noun.cognition": "a thought, an idea, knowledge or a mental process",
    "noun.communication": "communication, language, writing or a message",
    "noun.location": "a place, a region, a city or a location",
    "noun.person": "a person, a human being in some role",
    "noun.plant": "a plant, a tree, a flower or a herb",
    "noun.state": "a state or a condition, such as an illness",
    "noun.substance": "a substance, a material or a chemical compound",
}
VERB = {
    "verb.body": "grooming, dressing and functions of the body",
    "verb.change": "to change, grow, increase or become different",
    "verb.cognition": "to think, know, judge or learn",
    "verb.communication": "to speak, tell, write or communicate",
    "verb.competition": "to fight, compete, play or win",
    "verb.contact": "to touch, hit, cut or fasten things",
    "verb.creation": "to make, create, build or produce something",
    "verb.motion": "to move, walk, run or travel",
    "verb.perception": "to see, hear, feel, smell or perceive",
    "verb.possession": "to buy, sell, own, give or take",
    "verb.social": "social activity and relations between people",
    "verb.stative": "to be, have, exist or remain in a state",
}
DESCRIPTIONS = {
    "noun_def": NOUN,
    "noun_lemma": {k: f"a word for {v}" for k, v in NOUN.items()},
    "verb_def": VERB,
    "verb_ex": VERB,
    "pos_def": {
        "adj": "the definition of an adjective, describing a quality of something",
        "adv": "the definition of an adverb: in a certain manner or way",
        "noun": "the definition of a noun: a thing, a person or an idea",
        "verb": "the definition of a verb: to do an action",
    },
    "adj_kind": {
        "head": "a basic adjective with a direct opposite, like good and bad",
        "relational": "relating to or pertaining to a noun or a field of study",
        "satellite": "having a quality similar to another adjective, to some degree",
    },
    "fortune_topic": {
        "art": "a quote about art, painting, music and artists",
        "computers": "a joke about computers, programming and software",
        "definitions": "a humorous dictionary definition of a word",
        "men-women": "a quote about men, women, love and marriage",
        "politics": "a quote about politics, government and politicians",
        "science": "a quote about science, scientists and physics",
        "songs-poems": "the lines of a song or a poem",
        "work": "a quote about work, jobs, bosses and the office",
    },
    # written in the language itself, as a user would describe it to an English model
    "fortune_lang": {
        "de": "Das ist ein Text auf Deutsch.",
        "en": "This is a text in English.",
        "es": "Este es un texto en español.",
        "it": "Questo è un testo in italiano.",
    },
}

# a higher lr than the probe benchmark's, fixed before any fine-tune was scored (not tuned). Steps:
# 150 in the first runs (fine-tunes +21.4 points above base + heads, short of issue 17's 25);
# 400 since, fixed before any 400-step fine-tune was scored, the same schedule stretched (10%
# warm-up, then linear decay to 0). --ft-steps N runs another length in its own cache folder.
FULL = dict(
    tasks=list(data_text.TASKS),
    n_train=2400,
    n_val=300,
    n_test=1000,
    steps=400,
    batch=16,
    lr=2e-4,
    max_len=32,
    max_len_long=48,
)
QUICK = dict(
    tasks=data_text.QUICK_TASKS,
    n_train=800,
    n_val=100,
    n_test=300,
    steps=60,
    batch=16,
    lr=2e-4,
    max_len=48,
    max_len_long=48,
)


def bench_root(quick: bool, steps: int) -> Path:
    """The cache folder of one fine-tuning length (base, heads, fine-tunes, records, evaluations,
    report): keyed by the step count, so that runs of different lengths never share a file."""
    return CACHE / ("zeroshot_quick" if quick else "zeroshot") / f"steps{steps}"


class ZeroShotBench(TextBench):
    kind = "zeroshot"

    def __init__(self, quick: bool = False, log=print, cfg: dict | None = None, ft_steps: int | None = None):
        self.quick = quick
        cfg = dict(cfg or (QUICK if quick else FULL))
        if ft_steps is not None:
            cfg["steps"] = ft_steps
        self.cfg = dict(
            cfg,
            heads="zeroshot",
            temperature=TEMPERATURE,
            descriptions=stable_hash(DESCRIPTIONS),
        )
        self.log = log
        self.root = bench_root(quick, self.cfg["steps"])
        self.root.mkdir(parents=True, exist_ok=True)
        self.tasks = self.cfg["tasks"]
        self.data = data_text.load_tasks(
            self.tasks, self.cfg["n_train"], self.cfg["n_val"], self.cfg["n_test"], log=log
        )
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(_model_src())
        self._enc = {}
        self.base_dir = self.root / "base"
        self._prepare_base()
        self.model = _load_model(self.base_dir)
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.heads = self._fit_heads()

    def _pooled(self, model, ids, mask):
        # the sentence embedding of sentence-transformers: mean over tokens, then unit length
        return F.normalize(super()._pooled(model, ids, mask), dim=-1)

    def _fit_heads(self):
        """Zero-shot heads: TEMPERATURE * the base's embeddings of the class descriptions."""
        path = self.root / "heads.safetensors"
        if path.exists():
            sd = load_file(path)
            return {t: (sd[f"{t}.weight"], sd[f"{t}.bias"]) for t in self.tasks}
        heads = {t: class_head(self, self.model, t) for t in self.tasks}
        save_file(
            {f"{t}.{k}": v.contiguous() for t, (w, b) in heads.items() for k, v in (("weight", w), ("bias", b))},
            str(path),
        )
        return heads


@torch.no_grad()  # not inference_mode: a fine-tune in the same process backpropagates through W
def class_head(bench, model, task):
    """(W, b) with W[c] = TEMPERATURE * unit embedding of class c's description, b = 0."""
    texts = [DESCRIPTIONS[task][c] for c in bench.data[task]["classes"]]
    enc = bench.tok(texts, truncation=True, max_length=64)
    x, m = bench._batch(enc["input_ids"])
    W = TEMPERATURE * bench._pooled(model, x, m)
    return W.contiguous(), torch.zeros(len(texts))
