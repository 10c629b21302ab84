"""Expert pseudo-labels for image-caption shards: `python pseudolabel.py --shards GLOB --out DIR ...`.

MTV's dense objectives learn from labels nobody drew: Depth Anything V2 gives relative depth and
OWLv2 gives boxes for the entities of each image. The paper takes those entity names from an image
tagger (RAM++), so grounding names what the caption leaves out. The toy world does the same with a
simulated tagger (`--tagger simulated`, the default there: the names of the objects present, from
the scene truth, with a real tagger's misses, confusions and hallucinations); on real data, where
no tagger is run, the names are the caption's noun phrases (a small chunker) or the entries of a
`--vocab` file the caption mentions (`--tagger caption`). For every shard in GLOB this writes
DIR/<same file name> holding every original member plus

    KEY.depth.png    16-bit PNG of relative inverse depth (larger = nearer), 0 = no label
    KEY.ground.json  {"entities": [{"name", "box": [x0, y0, x1, y1] in 0..1, "score"}], "expert",
                      "tagger": "simulated" | "caption" | "vocab" (where the names came from)}

An expert is a hub name or a local folder loaded with transformers, `simulated` (the toy world:
labels made from the scene truth with the failure modes of real experts, scaled by --noise), or
`none`:

    python pseudolabel.py --shards 'toy/*.tar' --out labelled \
        --depth-expert simulated --ground-expert simulated
    torchrun --nproc_per_node=8 pseudolabel.py --shards 'cc3m/*.tar' --out labelled \
        --depth-expert depth-anything/Depth-Anything-V2-Small-hf \
        --ground-expert google/owlv2-base-patch16-ensemble

Under torchrun, rank r labels shards[r::world]. Each shard is written under a temporary name and
renamed when complete, so a crash never leaves a partial shard and a rerun skips finished ones.
Per-shard statistics (DIR/.stats/SHARD.json) are merged into DIR/summary.json at the end; on the
toy world the summary also scores the labels against the truth, before and after filtering, and
the tags (precision and recall of the names the tagger gave).
"""

import argparse
import difflib
import itertools
import json
import math
import os
import re
import sys
import tarfile
import time
import zlib
from dataclasses import asdict, dataclass
from glob import escape as glob_escape
from glob import glob
from importlib.util import find_spec

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_convert, box_iou
from tqdm import tqdm

import data
import mtv

# -----------------------------------------------------------------------------------------------
# Settings


@dataclass
class LabelConfig:
    shards: str
    out: str
    depth_expert: str
    ground_expert: str
    device: str = ""  # "" = cuda when available, else cpu
    precision: str = "auto"  # real experts only; see mtv.autocast
    batch_size: int = 32  # images per expert forward pass
    noise: float = 1.0  # simulated experts only: 0 = perfect labels, 1 = moderate, 2 = poor
    score_threshold: float = 0.3  # boxes scoring below are dropped
    nms_iou: float = 0.5  # class-wise NMS: a box overlapping a better box of its name more is dropped
    max_boxes: int = 20  # per image, best scores first
    min_box_size: float = 0.02  # boxes narrower or lower than this fraction of the image are dropped
    vocab: str = ""  # file with one entity name per line, replacing the caption noun phrases
    tagger: str = "auto"  # where entity names come from: auto, caption (chunker or vocab), simulated
    seed: int = 0  # simulated experts only


def fail(msg):
    """A user mistake: one sentence on stderr, exit code 2, no traceback."""
    print(f"pseudolabel.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# -----------------------------------------------------------------------------------------------
# Entities: which names OWLv2 is asked to find in an image.
#
# The paper asks an image tagger (RAM++) for them. The toy world uses SimulatedTagger (below, with
# the simulated experts: names from the scene truth, spoilt as a tagger spoils them); on real data
# (--tagger caption, the real path) a small rule-based noun-phrase chunker takes them from the
# caption instead, or a --vocab file's entries the caption mentions. The caption is
# lowercased and cut at punctuation, digits and every boundary word: articles, determiners,
# numbers, pronouns, prepositions and spatial relations, conjunctions, common verbs, and words in
# -ing (participles: "a dog playing"; the few -ing nouns are kept). Each run of words left between
# two cuts is a phrase "adjective* noun": its last word is the head noun, made singular so "two red
# cubes" and "a red cube" ask for the same thing, and at most MAX_WORDS words are kept. A run ending
# in a bare adjective ("the cube is red") or in a word for the picture itself ("a photo of") is no
# entity. A phrase that ends another ("green sphere" after "small green sphere") names the same
# thing again and is dropped; caption order is kept.

BOUNDARY = set("""
a an the this that these those some any each every all both another other such
one two three four five six seven eight nine ten several many few lots lot no none
i you he she it we they me him us them its his her their our your my there here what which who
of on in at to from by for with without into onto over under above below behind beside besides
near next between among around against along across through beyond toward towards inside outside
top bottom front back left right middle center centre side up down out off away far close
and or but nor while as than then also very just
is are was were be been being am has have had do does did can could will would may might should
sit sits sat stand stands stood lie lies lay rest rests hold holds held show shows shown
look looks seen appear appears placed
""".split())
ING_NOUNS = set("""building ceiling painting clothing drawing wedding evening morning thing string
swing spring railing icing pudding dumpling""".split())
ADJECTIVES = set("""
small large big tiny huge little tall short long wide narrow dark light bright shiny matte
red orange yellow green cyan blue purple pink brown black white gray grey
""".split()) | set(data.COLORS) | set(data.SIZES)
PICTURE = set("photo photograph picture image scene view close-up closeup shot object background".split())
MAX_WORDS = 4


def singular(word):
    """A crude English singular for the head noun (cubes -> cube, boxes -> box, berries -> berry)."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def is_boundary(word):
    return word in BOUNDARY or (word.endswith("ing") and len(word) > 4 and word not in ING_NOUNS)


def extract_entities(caption, vocab=None):
    """Candidate entity names of a caption; with a vocabulary, the entries the caption mentions."""
    text = re.sub(r"'s\b", "", caption.lower())
    if vocab is not None:
        return [v for v in vocab if re.search(rf"\b{re.escape(v)}(s|es)?\b", text)]
    phrases = []
    for clause in re.split(r"[^a-z\s-]+", text):  # punctuation and digits end a phrase
        run = []
        for word in re.findall(r"[a-z]+(?:-[a-z]+)*", clause) + [""]:  # "" flushes the last run
            if word and not is_boundary(word):
                run.append(word)
                continue
            if run and run[-1] not in ADJECTIVES:
                head = singular(run[-1])
                if head not in PICTURE:
                    phrases.append(" ".join(run[-MAX_WORDS:-1] + [head]))
            run = []
    phrases = list(dict.fromkeys(phrases))
    return [p for p in phrases if not any(q != p and q.endswith(" " + p) for q in phrases)]


def read_vocab(path):
    try:
        with open(path) as f:
            lines = [line.strip().lower() for line in f]
    except OSError:
        fail(f"--vocab {path!r} is not a readable file")
    vocab = list(dict.fromkeys(v for v in lines if v and not v.startswith("#")))
    if not vocab:
        fail(f"--vocab {path!r} holds no entity names (one per line)")
    return vocab


class CaptionTagger:
    """The real path's tagger: the caption's noun phrases, or the --vocab entries it mentions."""

    needs = None

    def __init__(self, vocab=None):
        self.vocab = vocab
        self.name = "caption" if vocab is None else "vocab"

    def __call__(self, samples):
        return [extract_entities(s["caption"], self.vocab) for s in samples]


# -----------------------------------------------------------------------------------------------
# Boxes. A detection set is {"boxes": (M, 4) xyxy in 0..1 of the image, "scores": (M,), "names"}.


def unpad_boxes(boxes, height, width):
    """(M, 4) xyxy boxes relative to OWLv2's padded square -> relative to the image itself.

    OWLv2's processor pads every image at the bottom and right to a square of side max(H, W)
    before resizing, so its boxes are fractions of that side: scale x by side / W and y by
    side / H, and clip away whatever lies in the padding.
    """
    side = max(height, width)
    scale = boxes.new_tensor([side / width, side / height, side / width, side / height])
    return (boxes * scale).clamp(0, 1)


def filter_boxes(det, cfg):
    """Score threshold, minimum size, class-wise NMS, then the max_boxes best.

    The paper names noisy pseudo-labels as its main limitation; these are the standard cleaning
    steps, each a flag, and the summary shows label quality with and without them.
    """
    boxes, scores = (det["boxes"] * 1e4).round() / 1e4, det["scores"]  # the precision ground.json stores
    wh = boxes[:, 2:] - boxes[:, :2]  # (M, 2)
    ok = (scores >= cfg.score_threshold) & (wh > 0).all(1) & (wh >= cfg.min_box_size).all(1)
    idx = ok.nonzero()[:, 0]
    names = [det["names"][i] for i in idx]
    ids = {n: i for i, n in enumerate(dict.fromkeys(names))}
    name_ids = torch.tensor([ids[n] for n in names], dtype=torch.long)
    # batched_nms suppresses only within a name ("red cube" may overlap "table"), best score first.
    order = batched_nms(boxes[idx], scores[idx], name_ids, cfg.nms_iou)[: cfg.max_boxes]
    keep = idx[order]
    return {"boxes": boxes[keep], "scores": scores[keep], "names": [det["names"][i] for i in keep]}


def true_positives(det, truth, iou=0.5):
    """Predictions matching a true box at IoU >= 0.5 under a right name, greedily in score order
    (each true box matched once, as in COCO evaluation at a single threshold)."""
    if not det["names"] or not truth["names"]:
        return 0
    right = torch.tensor([[p in names for names in truth["names"]] for p in det["names"]])  # (M, G)
    overlap = torch.where(right, box_iou(det["boxes"], truth["boxes"]), 0.0)  # (M, G)
    taken = torch.zeros(len(truth["names"]), dtype=torch.bool)
    order = det["scores"].argsort(descending=True)
    for i in order[(overlap[order] >= iou).any(1)]:  # only predictions that can match at all
        j = overlap[i].masked_fill(taken, 0.0).argmax()
        if overlap[i, j] >= iou and not taken[j]:
            taken[j] = True
    return int(taken.sum())


def truth_boxes(gt):
    """The toy world's true boxes (visible part of each object); "names" holds each object's right
    names: "red cube", and with its size, "small red cube", as captions say both."""
    boxes = torch.tensor([o["box"] for o in gt["objects"]], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "names": [{o["name"], f"{o['size']} {o['name']}"} for o in gt["objects"]]}


# -----------------------------------------------------------------------------------------------
# Depth quality against the truth.


def depth_quality(inv, valid, gt_depth):
    """(AbsRel, delta1) of a relative inverse-depth map, or None when too few pixels are scored.

    Relative depth is defined only up to scale and shift, so as in MiDaS a least-squares scale and
    shift are fitted per image in inverse-depth space; the aligned map is then compared with the
    true inverse depth 1 / z, in that space. The sky (z = inf, true inverse depth 0) is left out.
    """
    m = valid & np.isfinite(gt_depth)
    if m.sum() < 2:
        return None
    truth, pred = 1.0 / gt_depth[m].astype(np.float64), inv[m].astype(np.float64)
    (s, t), *_ = np.linalg.lstsq(np.stack([pred, np.ones_like(pred)], 1), truth, rcond=None)
    aligned = np.maximum(s * pred + t, 1e-9)
    absrel = np.mean(np.abs(aligned - truth) / truth)
    delta1 = np.mean(np.maximum(aligned / truth, truth / aligned) < 1.25)
    return float(absrel), float(delta1)


# -----------------------------------------------------------------------------------------------
# Real experts through transformers. A depth expert maps a list of decoded samples to inverse-depth
# maps (H, W); a grounding expert maps samples and their entity names to raw detection sets.


class DepthAnythingExpert:
    """Depth Anything V2 (any transformers depth model): relative inverse depth, larger = nearer."""

    needs = None  # the truth a simulated expert derives its labels from; real experts need none

    def __init__(self, name, device, precision="auto"):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.name, self.device, self.precision = name, device, precision
        self.processor = AutoImageProcessor.from_pretrained(name)
        self.model = AutoModelForDepthEstimation.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def __call__(self, samples):
        out = [None] * len(samples)
        # The processor keeps the aspect ratio, so only images of one size stack into a batch.
        by_size = {}
        for i, s in enumerate(samples):
            by_size.setdefault(s["image"].shape[:2], []).append(i)
        for (h, w), idx in by_size.items():
            x = self.processor(images=[samples[i]["image"] for i in idx], return_tensors="pt")
            with mtv.autocast(self.device, self.precision):
                pred = self.model(pixel_values=x["pixel_values"].to(self.device)).predicted_depth  # (b, h', w')
            # Back to the image's own resolution: the label never claims more detail than the image.
            pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bilinear")[:, 0]  # (b, H, W)
            for i, d in zip(idx, pred.clamp(min=0).cpu().numpy()):
                out[i] = d
        return out


class OWLv2Expert:
    """OWLv2 open-vocabulary detection: every patch predicts one box, scored against each query."""

    needs = None

    def __init__(self, name, device, precision="auto"):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.name, self.device, self.precision = name, device, precision
        self.processor = Owlv2Processor.from_pretrained(name)
        self.model = Owlv2ForObjectDetection.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def __call__(self, samples, queries):
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "names": []}
        if not any(queries):
            return [empty] * len(samples)
        # The processor pads every image's query list to the longest with " "; those columns are
        # sliced off below (OWLv2's own query mask keeps them, as " " still has a start token).
        x = self.processor(images=[s["image"] for s in samples], text=[q or [" "] for q in queries],
                           return_tensors="pt", truncation=True).to(self.device)
        with mtv.autocast(self.device, self.precision):
            out = self.model(**x)
        logits = out.logits.float().cpu()  # (B, P, Q): P patch boxes, Q queries
        boxes = box_convert(out.pred_boxes.float().cpu(), "cxcywh", "xyxy")  # (B, P, 4) of the padded square
        dets = []
        for b, (s, q) in enumerate(zip(samples, queries)):
            if not q:
                dets.append(empty)
                continue
            # As OWL-ViT: each patch box keeps its best query and that query's probability.
            score, which = logits[b, :, : len(q)].sigmoid().max(-1)  # (P,), (P,)
            h, w = s["image"].shape[:2]
            dets.append({"boxes": unpad_boxes(boxes[b], h, w), "scores": score,
                         "names": [q[i] for i in which.tolist()]})
        return dets


# -----------------------------------------------------------------------------------------------
# Simulated experts: the toy world's truth, spoilt the way real experts spoil it. Everything is
# drawn from a generator seeded by (seed, key), so labels do not depend on batching, rank or reruns.


def key_rng(seed, key, stream):
    return np.random.default_rng([seed, zlib.crc32(key.encode()), stream])


def blur(x, sigma):
    """Separable Gaussian blur of an (H, W) array, edges repeated."""
    r = math.ceil(3 * sigma)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = x.shape
    p = np.pad(x, r, mode="edge")  # (H + 2r, W + 2r)
    p = sum(wt * p[i:i + h] for i, wt in enumerate(k))  # (H, W + 2r): blurred down the columns
    return sum(wt * p[:, i:i + w] for i, wt in enumerate(k))  # (H, W): and along the rows


class SimulatedDepth:
    """Depth Anything V2's failure modes on the truth: unknown scale and shift, blurred edges, noise.

    The sky gets inverse depth ~0 (plus the shift), still valid, as a real relative-depth model
    predicts it. At noise 0 the map is exact up to scale and shift.
    """

    name, needs = "simulated", "gt_depth"
    BLUR_PX = 1.0  # Gaussian sigma at noise 1: object boundaries smear as in DA-V2 at low resolution
    NOISE = 0.02  # per-pixel noise std at noise 1, as a fraction of the map's std

    def __init__(self, noise, seed):
        self.noise, self.seed = noise, seed

    def __call__(self, samples):
        return [self.one(s["gt_depth"], key_rng(self.seed, s["key"], 0)) for s in samples]

    def one(self, depth, rng):
        inv = np.where(np.isfinite(depth), 1.0 / depth, 0.0)  # (H, W) true inverse depth, sky 0
        inv = rng.uniform(0.5, 2.0) * inv + rng.uniform(0.0, 0.2) * inv.max()
        if self.noise > 0:
            inv = blur(inv, self.BLUR_PX * self.noise)
            inv = inv + rng.normal(0.0, self.NOISE * self.noise * inv.std(), inv.shape)
        return np.maximum(inv, 0.0).astype(np.float32)


class SimulatedGround:
    """OWLv2's failure modes on the true boxes, rates at noise 1 below (scaled by --noise).

    Like OWLv2 it only finds what it is asked for: objects whose name is not among the queries are
    missed. True objects are missed at random, boxes jitter, names get a wrong colour or shape,
    duplicates appear at lower scores (what NMS is for), and false positives appear at low scores
    (what the threshold is for).
    """

    name, needs = "simulated", "gt"
    MISS, JITTER, CONFUSE, DUPLICATE, FALSE = 0.1, 0.05, 0.1, 0.3, 1.0  # rates at noise 1

    def __init__(self, noise, seed):
        self.noise, self.seed = noise, seed

    def __call__(self, samples, queries):
        return [self.one(s["gt"], q, key_rng(self.seed, s["key"], 1)) for s, q in zip(samples, queries)]

    def one(self, gt, queries, rng):
        n = self.noise
        boxes, scores, names = [], [], []
        for o in gt["objects"]:
            # The query naming this object ("red cube" or "small red cube"), reported as OWLv2 does.
            asked = [q for q in queries if q in (o["name"], f"{o['size']} {o['name']}")]
            if not asked or rng.random() < self.MISS * n:
                continue
            box = np.asarray(o["box"], dtype=np.float64)
            size = np.tile(box[2:] - box[:2], 2)  # (4,) box width, height, width, height
            name = asked[0] if rng.random() >= self.CONFUSE * n else self.confuse(asked[0], o, rng)
            score = 1.0 - 0.4 * n * rng.random()  # confident, less so with more noise
            boxes.append(box + rng.normal(0.0, self.JITTER * n, 4) * size)
            scores.append(score)
            names.append(name)
            if rng.random() < self.DUPLICATE * n:
                boxes.append(box + rng.normal(0.0, 3 * self.JITTER * n, 4) * size)
                scores.append(score * rng.uniform(0.3, 0.9))
                names.append(name)
        for _ in range(rng.poisson(self.FALSE * n) if queries else 0):
            x0, y0, w, h = rng.uniform(0.0, 0.8, 2).tolist() + rng.uniform(0.05, 0.4, 2).tolist()
            boxes.append([x0, y0, x0 + w, y0 + h])
            scores.append(rng.uniform(0.0, 0.4))
            names.append(queries[rng.integers(len(queries))])
        b = np.clip(np.array(boxes, dtype=np.float32).reshape(-1, 4), 0, 1)  # (M, 4)
        b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], 1)
        return {"boxes": torch.from_numpy(b), "scores": torch.tensor(scores, dtype=torch.float32), "names": names}

    @staticmethod
    def confuse(name, o, rng):
        """The same phrase with a wrong colour or a wrong shape."""
        key, choices = ("color", data.COLORS) if rng.random() < 0.5 else ("shape", data.SHAPES)
        wrong = rng.choice([c for c in choices if c != o[key]])
        return " ".join(wrong if w == o[key] else w for w in name.split())


class SimulatedTagger:
    """RAM++'s failure modes on the scene truth: the tags of an image, rates at noise 1 below.

    A tag is an object name, "colour shape". Each object present is tagged with its name, missed
    with probability MISS, or tagged with a wrong colour or shape with probability CONFUSE (as
    SimulatedGround confuses names); then a Poisson(FALSE) number of names of toy objects that
    are not present are added. The rates at noise 1 are guesses at a good tagger on clean,
    uncluttered images, not measurements: MISS 0.15 stands for its ~85 % recall (small, occluded
    or unusual objects go unnamed), CONFUSE 0.1 for fine-grained attribute errors (a colour or a
    shape word wrong), FALSE 0.2 for about one hallucinated tag every five images (a thing often
    seen with what is there). Tags are sorted by name, so their order is fixed and, as a tagger's
    output, says nothing about which object a tag came from; no name appears twice.
    """

    name, needs = "simulated", "gt"
    MISS, CONFUSE, FALSE = 0.15, 0.1, 0.2  # rates at noise 1
    NAMES = tuple(f"{c} {s}" for c in data.COLORS for s in data.SHAPES)  # every toy object name

    def __init__(self, noise, seed):
        self.noise, self.seed = noise, seed

    def __call__(self, samples):
        return [self.one(s["gt"], key_rng(self.seed, s["key"], 2)) for s in samples]

    def one(self, gt, rng):
        n = self.noise
        tags = set()
        for o in gt["objects"]:
            if rng.random() < self.MISS * n:
                continue
            tags.add(o["name"] if rng.random() >= self.CONFUSE * n else SimulatedGround.confuse(o["name"], o, rng))
        present = {o["name"] for o in gt["objects"]}
        absent = [name for name in self.NAMES if name not in present and name not in tags]
        k = min(rng.poisson(self.FALSE * n), len(absent))
        tags.update(absent[i] for i in rng.choice(len(absent), k, replace=False))
        return sorted(tags)


def load_expert(kind, name, cfg, device):
    """`none` -> None, `simulated` -> a simulated expert, anything else -> a transformers model."""
    if name == "none":
        return None
    if name == "simulated":
        return (SimulatedDepth if kind == "depth" else SimulatedGround)(cfg.noise, cfg.seed)
    if find_spec("transformers") is None:
        fail(f"--{kind}-expert {name!r} needs transformers, which is not installed "
             f"(pip install 'mtv[experts]'), or use 'simulated' or 'none'")
    local = os.path.isdir(name)
    if not local and name.startswith((".", "/", "~")):
        fail(f"--{kind}-expert {name!r}: no such model folder; experts are a hub name, a model folder, "
             f"'simulated' or 'none'")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return (DepthAnythingExpert if kind == "depth" else OWLv2Expert)(name, device, cfg.precision)
    except (OSError, ValueError) as e:  # what transformers raises for a missing or unfit model
        reason = re.split(r"(?<=\.)\s", str(e).strip() + "\n")[0].splitlines()[0] or type(e).__name__
        what = "depth" if kind == "depth" else "grounding"
        fail(f"--{kind}-expert {name!r} could not be loaded as a {'local' if local else 'hub'} {what} model "
             f"({reason}); experts are a hub name, a model folder, 'simulated' or 'none'")


# -----------------------------------------------------------------------------------------------
# Labelling one shard. Statistics are plain nested sums, so shards, ranks and resumed runs merge
# by adding them up.

BINS = 10  # score and depth histograms over 0..1


def new_counts():
    return {
        "images": 0, "bad": 0, "seconds": 0.0,
        "depth": {"maps": 0, "valid_fraction": 0.0, "raw_min": 0.0, "raw_max": 0.0, "hist": [0] * BINS},
        "boxes": {"images": 0, "raw": 0, "kept": 0, "hist_raw": [0] * BINS, "hist_kept": [0] * BINS},
        # Tags are scored on the box images (same count, same true objects): "tags" given,
        # "tags_right" of them naming an object present, "objects_tagged" true objects named by a tag.
        "truth": {"depth_maps": 0, "absrel": 0.0, "delta1": 0.0,
                  "box_images": 0, "true": 0, "pred_raw": 0, "pred_kept": 0, "tp_raw": 0, "tp_kept": 0,
                  "tags": 0, "tags_right": 0, "objects_tagged": 0},
    }


def add(a, b):
    if isinstance(a, dict):  # a statistic that b (an older statistics file) lacks counts as zero
        return {k: add(a[k], b[k]) if k in b else a[k] for k in a}
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b)]
    return a + b


def histogram(values):
    return np.histogram(np.asarray(values, dtype=np.float64), bins=BINS, range=(0.0, 1.0))[0].tolist()


def label_batch(batch, experts, cfg, counts):
    """Run the experts on a batch of (members, sample) and yield the labelled (key, members).

    experts: {"depth", "ground", "tagger"}, each None or callable; the tagger (simulated, or the
    caption's noun phrases) gives the names the grounding expert is asked to find.
    """
    samples = [s for _, s in batch]
    depths = experts["depth"](samples) if experts["depth"] else [None] * len(samples)
    queries = experts["tagger"](samples) if experts["ground"] else [None] * len(samples)
    dets = experts["ground"](samples, queries) if experts["ground"] else [None] * len(samples)
    for (members, s), inv, det, tags in zip(batch, depths, dets, queries):
        out = dict(members)
        if inv is not None:
            out["depth.png"] = png = data.encode_depth_png(inv)
            # Statistics and quality of the label as stored (normalised and quantised), not as computed.
            stored, valid = data.decode_depth_png(png)
            d = counts["depth"]
            d["maps"] += 1
            d["valid_fraction"] += float(valid.mean())
            d["raw_min"] += float(inv.min())
            d["raw_max"] += float(inv.max())
            d["hist"] = add(d["hist"], histogram(stored[valid]))
            q = depth_quality(stored, valid, s["gt_depth"]) if "gt_depth" in s else None
            if q is not None:
                t = counts["truth"]
                t["depth_maps"] += 1
                t["absrel"] += q[0]
                t["delta1"] += q[1]
        if det is not None:
            kept = filter_boxes(det, cfg)
            entities = [{"name": n, "box": [round(v, 4) for v in b.tolist()], "score": round(float(p), 4)}
                        for n, b, p in zip(kept["names"], kept["boxes"], kept["scores"])]
            out["ground.json"] = json.dumps({"entities": entities, "expert": experts["ground"].name,
                                             "tagger": experts["tagger"].name}).encode()
            b = counts["boxes"]
            b["images"] += 1
            b["raw"] += len(det["names"])
            b["kept"] += len(kept["names"])
            b["hist_raw"] = add(b["hist_raw"], histogram(det["scores"]))
            b["hist_kept"] = add(b["hist_kept"], histogram(kept["scores"]))
            if "gt" in s:
                truth, t = truth_boxes(s["gt"]), counts["truth"]
                t["box_images"] += 1
                t["true"] += len(truth["names"])
                t["pred_raw"] += len(det["names"])
                t["pred_kept"] += len(kept["names"])
                t["tp_raw"] += true_positives(det, truth)
                t["tp_kept"] += true_positives(kept, truth)
                t["tags"] += len(tags)
                t["tags_right"] += sum(any(tag in names for names in truth["names"]) for tag in tags)
                t["objects_tagged"] += sum(any(tag in names for tag in tags) for names in truth["names"])
        counts["images"] += 1
        yield s["key"], out


def chunks(items, n):
    items = iter(items)
    while batch := list(itertools.islice(items, n)):
        yield batch


def label_shard(src, dst, experts, cfg, progress):
    """Label every good sample of shard `src` into `dst` (atomically); return the shard's counts."""
    counts, start = new_counts(), time.time()

    def good_samples():
        for key, members in data.iter_tar(src):
            try:
                sample = data.decode_sample(key, members)
                for kind, expert in experts.items():
                    if expert is not None and expert.needs and expert.needs not in sample:
                        raise data.BadSample(f"no {expert.needs} truth for the simulated {kind} expert")
            except data.BadSample as e:
                tqdm.write(f"warning: skipping bad sample {key} in {src}: {e}", file=sys.stderr)
                counts["bad"] += 1
                progress(1)
                continue
            yield members, sample

    def labelled():
        for batch in chunks(good_samples(), cfg.batch_size):
            yield from label_batch(batch, experts, cfg, counts)
            progress(len(batch))

    data.write_shard(dst, labelled())
    counts["seconds"] = time.time() - start
    return counts


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------
# Summary: rebuilt from every shard's statistics file, so it covers all ranks and resumed runs.


def summarise(stats_files):
    total, experts = new_counts(), {"depth": set(), "ground": set(), "tagger": set()}
    for path in stats_files:
        with open(path) as f:
            st = json.load(f)
        total = add(total, st["counts"])
        for kind, name in st["experts"].items():
            experts.setdefault(kind, set()).add(name)
    d, b, t = total["depth"], total["boxes"], total["truth"]
    ratio = lambda x, y: x / y if y else None  # noqa: E731
    summary = {
        "shards": len(stats_files), "images": total["images"], "bad_samples": total["bad"],
        "experts": {k: sorted(v) for k, v in experts.items()},
        "seconds_per_image": ratio(total["seconds"], total["images"]),
        "depth": {"maps": d["maps"], "valid_fraction": ratio(d["valid_fraction"], d["maps"]),
                  "raw_min_mean": ratio(d["raw_min"], d["maps"]), "raw_max_mean": ratio(d["raw_max"], d["maps"]),
                  "histogram_of_stored_values": d["hist"]},
        "boxes": {"images": b["images"],
                  "per_image": {"before_filtering": ratio(b["raw"], b["images"]),
                                "after_filtering": ratio(b["kept"], b["images"])},
                  "score_histogram": {"before_filtering": b["hist_raw"], "after_filtering": b["hist_kept"]}},
        "histogram_bins": np.linspace(0, 1, BINS + 1).round(2).tolist(),
    }
    quality = {}
    if t["depth_maps"]:
        quality["depth"] = {"images": t["depth_maps"], "absrel": t["absrel"] / t["depth_maps"],
                            "delta1": t["delta1"] / t["depth_maps"],
                            "space": "inverse depth, per-image least-squares scale and shift, sky excluded"}
    if t["box_images"]:
        quality["boxes"] = {"images": t["box_images"], "true_boxes": t["true"], "iou": 0.5, **{
            when: {"precision": ratio(t[f"tp_{k}"], t[f"pred_{k}"]), "recall": ratio(t[f"tp_{k}"], t["true"]),
                   "per_image": t[f"pred_{k}"] / t["box_images"]}
            for when, k in (("before_filtering", "raw"), ("after_filtering", "kept"))}}
        # The names the grounding expert was asked for, against the objects present: a tag is right
        # when it names one ("red cube" or "small red cube"), an object is found when a tag names it.
        quality["tags"] = {"images": t["box_images"], "true_objects": t["true"], "tagger": sorted(experts["tagger"]),
                           "per_image": t["tags"] / t["box_images"], "precision": ratio(t["tags_right"], t["tags"]),
                           "recall": ratio(t["objects_tagged"], t["true"])}
    if quality:
        summary["label_quality"] = quality
    return summary


def print_summary(s):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    e = s["experts"]
    tagger = f", tagger={','.join(e['tagger'])}" if e.get("tagger") else ""
    print(f"labelled {s['images']} images in {s['shards']} shards ({s['bad_samples']} bad samples skipped), "
          f"{fmt(s['seconds_per_image'])} s per image per process; experts: depth={','.join(e['depth']) or 'none'}, "
          f"ground={','.join(e['ground']) or 'none'}{tagger}")
    q = s.get("label_quality", {})
    if "tags" in q:
        g = q["tags"]
        print(f"tag quality vs truth ({g['images']} images, tagger {','.join(g['tagger']) or '-'}): "
              f"{fmt(g['per_image'])} tags per image, precision {fmt(g['precision'])}, recall {fmt(g['recall'])}")
    if "boxes" in q:
        b, a = q["boxes"]["before_filtering"], q["boxes"]["after_filtering"]
        print(f"box quality vs truth ({q['boxes']['images']} images)   before filtering   after filtering")
        for label, key in (("boxes per image", "per_image"), ("precision @ IoU 0.5", "precision"),
                           ("recall @ IoU 0.5", "recall")):
            print(f"  {label:<34}{fmt(b[key]):>12}{fmt(a[key]):>18}")
    if "depth" in q:
        print(f"depth quality vs truth ({q['depth']['images']} images, {q['depth']['space']}): "
              f"AbsRel {fmt(q['depth']['absrel'])}, delta1 {fmt(q['depth']['delta1'])}")


# -----------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        fail(message)


HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as the Hugging Face hub names models


def check_expert_name(flag, name):
    """Before any download is tried: an expert is 'simulated', 'none', a model folder or a hub
    owner/name. A typo fails at once with the closest valid word, not after minutes of hub retries."""
    if name in ("simulated", "none") or os.path.isdir(name) or HUB_NAME.fullmatch(name):
        return
    if name.startswith((".", "/", "~")):
        fail(f"{flag} {name!r}: no such model folder; experts are a hub name, a model folder, 'simulated' or 'none'")
    close = difflib.get_close_matches(name, ["simulated", "none"], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    fail(f"{flag} {name!r} is neither 'simulated', 'none', an existing model folder nor a hub name "
         f"owner/name; {hint}e.g. depth-anything/Depth-Anything-V2-Small-hf")


TAGGERS = ("auto", "caption", "simulated")


def parse_args(argv):
    d = LabelConfig("", "", "", "")
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, help="glob of input webdataset tar shards (quote it)")
    p.add_argument("--out", required=True, help="output folder: labelled shards with the same names, summary.json")
    expert = "hub name or local folder (transformers), 'simulated' (toy world, from its truth) or 'none'"
    p.add_argument("--depth-expert", required=True, help=f"depth expert: {expert}")
    p.add_argument("--ground-expert", required=True, help=f"grounding expert: {expert}")
    p.add_argument("--device", choices=["cuda", "cpu"], default=d.device or None,
                   help="None = cuda when available (under torchrun: the rank's local GPU)")
    p.add_argument("--precision", choices=mtv.PRECISIONS, default=d.precision,
                   help="real experts: auto = bf16 autocast on CUDA (as experts are usually run: half the "
                        "memory, tensor cores), fp32 on CPU; bf16 or fp32 on any device")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per expert forward pass")
    p.add_argument("--noise", type=float, default=d.noise,
                   help="simulated experts' label noise: 0 = perfect, 1 = moderate, 2 = poor (the rates at 1 are guesses, not measurements of real experts)")
    p.add_argument("--score-threshold", type=float, default=d.score_threshold,
                   help="drop boxes scoring below (OWLv2's scores are probabilities; 0.1-0.3 is usual)")
    p.add_argument("--nms-iou", type=float, default=d.nms_iou,
                   help="class-wise NMS: drop a box overlapping a better box of the same name above this IoU")
    p.add_argument("--max-boxes", type=int, default=d.max_boxes, help="keep at most this many boxes per image")
    p.add_argument("--min-box-size", type=float, default=d.min_box_size,
                   help="drop boxes narrower or lower than this fraction of the image side")
    p.add_argument("--vocab", default=d.vocab, help="file of entity names, one per line, replacing caption noun phrases")
    p.add_argument("--tagger", choices=TAGGERS, default=d.tagger,
                   help="where the names the grounding expert is asked to find come from: simulated = a simulated "
                        "image tagger (the paper's RAM++) naming the toy world's objects from its truth (gt.json), "
                        "with misses, confusions and hallucinations scaled by --noise; caption = the caption's noun "
                        "phrases, or the --vocab entries it mentions (the real path); auto = simulated with "
                        "--ground-expert simulated and no --vocab, else caption")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the simulated experts")
    cfg = LabelConfig(**{k: ("" if v is None else v) for k, v in vars(p.parse_args(argv)).items()})
    for flag, ok, valid in (("--batch-size", cfg.batch_size >= 1, "at least 1"),
                            ("--noise", cfg.noise >= 0, "0 or more"),
                            ("--score-threshold", 0 <= cfg.score_threshold <= 1, "in 0..1"),
                            ("--nms-iou", 0 < cfg.nms_iou <= 1, "in (0, 1]"),
                            ("--max-boxes", cfg.max_boxes >= 1, "at least 1"),
                            ("--min-box-size", 0 <= cfg.min_box_size < 1, "in [0, 1)")):
        if not ok:
            fail(f"{flag} {getattr(cfg, flag[2:].replace('-', '_'))} is invalid; it must be {valid}")
    for flag, name in (("--depth-expert", cfg.depth_expert), ("--ground-expert", cfg.ground_expert)):
        check_expert_name(flag, name)
    if cfg.depth_expert == "none" and cfg.ground_expert == "none":
        fail("--depth-expert and --ground-expert are both 'none', so there is nothing to label")
    if cfg.tagger == "simulated" and cfg.vocab:
        fail("--tagger simulated takes its names from the scene truth and --vocab from the caption; "
             "give one of them (--tagger caption uses --vocab)")
    return cfg


def resolve_tagger(cfg):
    """'simulated' or 'caption': what --tagger auto means for these experts."""
    if cfg.tagger != "auto":
        return cfg.tagger
    return "simulated" if cfg.ground_expert == "simulated" and not cfg.vocab else "caption"


def has_member(path, ext):
    """Whether shard `path` holds a member `KEY.ext`, from its tar headers (stops at the first)."""
    try:
        with tarfile.open(path) as tar:
            return any(m.isfile() and data._split_name(m.name)[1] == ext for m in tar)
    except (OSError, tarfile.TarError):
        return True  # an unreadable shard is left to the labelling, which reports its samples


def setup_ranks(device_flag):
    """(rank, world, device). Under torchrun a gloo group serves only the final barrier; called from
    a program that already runs distributed (train.py labels the toy world on rank 0 alone), this
    call works as a single process."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA device is available")
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
        local = int(os.environ.get("LOCAL_RANK", 0))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu")
    return 0, 1, torch.device("cuda") if cuda else torch.device("cpu")


def main(argv=None):
    cfg = parse_args(argv)
    shards = sorted(glob(cfg.shards))
    if not shards:
        fail(f"--shards {cfg.shards!r} matches no files")
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) < len(names):
        fail(f"--shards {cfg.shards!r} matches two files of the same name, which would share one output")
    out_dir = os.path.abspath(cfg.out)
    if any(os.path.dirname(os.path.abspath(s)) == out_dir for s in shards):
        fail(f"--out {cfg.out!r} is the shards' own folder; the labelled shards need another one")
    vocab = read_vocab(cfg.vocab) if cfg.vocab else None
    tagger = resolve_tagger(cfg)
    if tagger == "simulated" and cfg.ground_expert != "none":
        lacking = next((s for s in shards if not has_member(s, "gt.json")), None)
        if lacking is not None:
            who, fix = (("--tagger simulated names", "--tagger caption") if cfg.tagger == "simulated" else
                        ("--ground-expert simulated and its tagger (--tagger auto) name", "real experts"))
            fail(f"{who} the objects of the toy world's truth, which {lacking} lacks (no gt.json member); "
                 f"on real shards use {fix}")
    inside = dist.is_initialized()  # called from a distributed program, not launched by torchrun
    rank, world, device = setup_ranks(cfg.device)
    cfg.device = str(device)
    own_group = dist.is_initialized() and not inside
    experts = {kind: load_expert(kind, name, cfg, device)
               for kind, name in (("depth", cfg.depth_expert), ("ground", cfg.ground_expert))}
    if experts["ground"] is not None:  # the tagger names what the grounding expert looks for
        experts["tagger"] = SimulatedTagger(cfg.noise, cfg.seed) if tagger == "simulated" else CaptionTagger(vocab)
    else:
        experts["tagger"] = None
    expert_names = {k: e.name for k, e in experts.items() if e is not None}

    stats_dir = os.path.join(out_dir, ".stats")
    os.makedirs(stats_dir, exist_ok=True)
    stats_of = lambda s: os.path.join(stats_dir, os.path.basename(s) + ".json")  # noqa: E731
    # A shard is done when both it and its statistics exist (a crash between the two redoes it).
    todo = [s for s in shards[rank::world]
            if not (os.path.exists(os.path.join(out_dir, os.path.basename(s))) and os.path.exists(stats_of(s)))]
    if rank == 0:
        for k, v in sorted(asdict(cfg).items()):
            print(f"  {k} = {v}")
        print(f"{len(shards)} shards over {world} process(es); this one labels {len(todo)} "
              f"({len(shards[rank::world]) - len(todo)} already done), experts {expert_names}")
    bar = tqdm(total=data.count_samples(todo) if todo else 0, unit="img", disable=rank != 0, desc="pseudolabel")
    for src in todo:
        dst = os.path.join(out_dir, os.path.basename(src))
        for stale in glob(glob_escape(dst) + ".tmp*"):  # left by a run killed while writing this shard
            os.remove(stale)
        counts = label_shard(src, dst, experts, cfg, bar.update)
        write_json(stats_of(src), {"shard": os.path.basename(src), "experts": expert_names, "counts": counts})
    bar.close()

    summary = None
    if own_group:
        dist.barrier()  # every rank's statistics are on disk before rank 0 merges them
    if rank == 0:
        summary = summarise(sorted(glob(os.path.join(stats_dir, "*.json"))))
        write_json(os.path.join(out_dir, "summary.json"), summary)
        print_summary(summary)
    if own_group:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
