"""Multi-task pretraining of one shared ViT: `python train.py --tasks clip,ssl,depth,ground`.

One step of MTV (Di, Xie, Zhai 2026) reads like this:

    batch  = views of B images (+ captions, pseudo depth, pseudo boxes)      data.make_views/collate
    out    = student(batch)      one pass per view, heads only for enabled tasks   mtv.MTV.forward
    target = teacher(batch)      EMA copy of the image tower, only with ssl        mtv.MTV.ssl_teacher
    loss   = sum_k weight[k] * loss_k(out, target, batch)                         losses.py
    AdamW step, then teacher <- EMA(student)

Any subset of the four tasks trains; the same file runs as one process (CPU or one GPU) or under
`torchrun` (NCCL on GPUs, gloo on CPUs). Everything the run needs to continue is in
OUT/checkpoint.pt, written atomically, so `--resume latest` after a crash (even SIGKILL) ends with
the same weights as a run that never stopped.
"""

import argparse
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from glob import glob

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import losses
import mtv

# -----------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    tasks: str = "clip,ssl,depth,ground"
    data: str = ""  # glob of labelled shards; empty = the toy world, generated and labelled once
    val_data: str = ""  # glob of shards for periodic validation losses; empty = none
    model: str = "tiny"
    steps: int = 200
    epochs: float = 0.0  # if > 0, overrides --steps: passes over the training set
    batch_size: int = 64  # per process; the global batch is batch_size * world size
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: float = 0.1  # fraction of the steps with linear lr warmup
    weight_decay: float = 0.04  # cosine-increased to weight_decay_end, as DINO
    weight_decay_end: float = 0.2
    grad_clip: float = 1.0
    loss_weights: str = ""  # e.g. "clip=1,ssl=0.5"; unnamed enabled tasks weigh 1
    balance: str = "none"  # none, or uncertainty: learnt task weights (Kendall, Gal & Cipolla 2018)
    pull_every: int = 0  # steps between measurements of each objective's gradient on the image tower; 0 = never
    teacher_momentum: float = 0.99  # EMA of the SSL teacher, cosine-increased to teacher_momentum_end
    teacher_momentum_end: float = 1.0  # DINO: 1; equal to teacher_momentum for a fixed momentum (SILC)
    teacher_temp: float = 0.07  # DINO: warmed up from 0.04; above ~0.07 training is unstable
    koleo: float = 0.0  # weight of the KoLeo spreading term on the student's global features
    centering: str = "mean"  # how the DINO/iBOT teacher avoids collapse: DINO's mean or DINOv2's sinkhorn
    freeze_last_layer: float = 0.01  # fraction of the steps with the SSL prototype layers frozen
    n_local: int = 4  # local crops per image for ssl (DINO multi-crop)
    local_size: int = 0  # pixels of a local crop; 0 = half the image size
    local_scale: str = "0.1,0.35"  # area range of the local crops, as a fraction of the image
    global_scale: str = "0.35,1.0"  # area range of the ssl global crops (DINO: 0.32-1; Gani et al.'s small-data ViTs: 0.7-1)
    mask_ratio: str = "0.1,0.5"  # iBOT: range of the masked share of a masked view's patches
    mask_min_block: int = 4  # iBOT: smallest mask block, in patches
    mask_prob: float = 1.0  # iBOT: share of images whose view is masked (iBOT, DINOv2: 0.5)
    mask_views: str = "last"  # iBOT masks both global views; "last" masks the second one only
    prototypes: int = 0  # DINO and iBOT prototypes K each; 0 = the preset's
    ssl_start: float = 0.0  # fraction of the steps before ssl joins (SigLIP 2: 0.8)
    ssl_views: str = "shared"  # shared: DINO's first global view is the caption view; separate: SigLIP 2
    caption_jitter: float = 0.4  # brightness/contrast/saturation jitter of the caption view (SLIP: 0)
    hue: float = 0.1  # DINO's hue jitter on the ssl-only views
    grayscale: float = 0.2  # DINO's grayscale probability on the ssl-only views
    image_size: int = 0  # 0 = the preset's resolution
    patch_size: int = 0  # 0 = the preset's patch size
    vit_init: str = "big_vision"  # initialisation of the image tower (mtv.ViTConfig.init)
    init_from: str = ""  # a checkpoint whose weights the run starts from (optimizer and schedules fresh)
    out: str = "runs/train"
    resume: str = ""  # "latest" = OUT/checkpoint.pt, or a path
    seed: int = 0
    workers: int = 1  # data-loading processes per training process
    shuffle_buffer: int = 2000
    log_every: int = 10
    ckpt_every: int = 50
    val_every: int = 0  # 0 = at checkpoints
    val_batches: int = 4
    toy_n: int = 8000  # toy-world scenes generated when --data is not given
    captions: str = "web"  # the toy world's caption style: web alt-text or full
    world: str = "toy"  # the toy world, or the shape-only world (a positive control for ssl)
    prepare_data: bool = False  # make (or find) the toy world's data, then exit
    weights_from: str = ""  # a run folder: print the --loss-weights that equalise its measured pulls, then exit
    device: str = ""  # "" = cuda if available, else cpu
    compile: bool = False
    precision: str = "auto"  # see mtv.autocast
    deterministic: bool = False


FLAG_HELP = {  # train.py --help, one entry per TrainConfig field
    "tasks": f"comma-separated subset of {','.join(mtv.ALL_TASKS)}",
    "data": "glob of training shards labelled by pseudolabel.py; empty: generate the toy world",
    "val_data": "glob of labelled validation shards; their losses are logged as val_*",
    "model": f"preset: {', '.join(mtv.PRESETS)}",
    "epochs": "train for this many passes over --data instead of --steps",
    "batch_size": "images per process and step",
    "loss_weights": "task=weight pairs, e.g. clip=1,ssl=0.5,depth=0.5; dino= and ibot= weigh the two terms "
                    "of ssl on their own (e.g. ibot=0 for DINO alone)",
    "balance": "how the objectives are weighed: none = --loss-weights as given; uncertainty = each task's weighted "
               "loss L is scaled by a learnt exp(-s)/2 plus s/2 (Kendall, Gal & Cipolla 2018, eq. 7, s = log sigma^2 "
               "from 0, no weight decay): a task with a larger loss gets a smaller weight; logged as weight_TASK",
    "pull_every": "steps between measurements of the pull: each objective's weighted gradient on the shared image "
                  "tower alone (patch embedding, positions, blocks, final norm; not the heads) as pull_TASK, and "
                  "the cosine between every two objectives' gradients as cos_A_B, in metrics.jsonl and losses.png. "
                  "A multiple of --log-every; each measurement costs one more backward pass per objective; under "
                  "torchrun it is rank 0's own gradient (not averaged over ranks); not measured while only one "
                  "objective is active; 0 = never",
    "teacher_momentum": "start of the EMA momentum schedule (cosine to --teacher-momentum-end); 0.996 in DINO for long runs, "
                        "lower for short ones so the teacher keeps up",
    "teacher_momentum_end": "end of the EMA momentum schedule: 1.0 as DINO (the teacher freezes at the end); "
                            "equal to --teacher-momentum for a fixed momentum, as SILC keeps it so that the "
                            "teacher goes on learning from the image-text loss",
    "teacher_temp": "final DINO/iBOT teacher temperature, warmed up from 0.04",
    "resume": "'latest' continues OUT/checkpoint.pt; or a checkpoint path",
    "toy_n": "number of toy-world training scenes made when --data is empty",
    "captions": "caption style of the toy world made when --data is empty: web (alt-text that leaves "
                "objects and attributes out, the default) or full (names every object's colour and shape)",
    "deterministic": "deterministic kernels (CPU: bit-identical resume)",
    "weights_from": "a run folder trained with --pull-every: print the static --loss-weights that give every "
                    "objective the same pull on the image tower (each weight times the geometric mean of the "
                    "pulls over its own mean pull, over the second half of the run's measurements), then exit",
    "prepare_data": "make (or find) the toy world's data under runs/toy-data/, print its folder and exit "
                    "(make ablate does this once, so that parallel runs do not race to write it)",
    "compile": "torch.compile the model (minutes of compilation first, then faster steps)",
    "precision": "auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = bf16 autocast on any device (on a "
                 "CPU: bf16 matmuls as on CUDA, slower); fp32 = no autocast. Weights, optimizer state and "
                 "losses stay fp32",
    "steps": "optimizer steps to train (one step = one batch per process)",
    "lr": "peak AdamW learning rate, reached after the warmup, then cosine to --min-lr",
    "min_lr": "learning rate at the last step",
    "warmup": "fraction of the steps (0..1) with a linear learning-rate warmup from 0",
    "weight_decay": "AdamW weight decay at step 0, cosine-increased to --weight-decay-end (DINO); biases, "
                    "norms, position tables and tokens are not decayed",
    "weight_decay_end": "weight decay at the last step",
    "grad_clip": "clip the global gradient norm to this value",
    "n_local": "DINO local crops per image, with ssl only",
    "local_size": "side of a local crop in pixels (a multiple of the patch size); 0 = half the image size. At 32 px "
                  "with 8-px patches half the image is 4 tokens; DINO's local crops are 36",
    "local_scale": "LO,HI: the area range the local crops are cut from, as a fraction of the image (DINO: 0.05,0.32)",
    "global_scale": "LO,HI: the area range of the global crops that ssl reads (DINO: 0.32,1; the ViTs of Gani et al. "
                    "2022 on 32-px images: 0.7,1); the caption view keeps 0.9,1",
    "mask_ratio": "LO,HI: iBOT's masked share of a masked view's patches is drawn from this range (iBOT: 0.1,0.5)",
    "mask_min_block": "smallest block of iBOT's block-wise mask, in patches (BEiT, iBOT: 4, of a 14x14 grid; on the "
                      "toy's 4x4 grid 4 patches hide a whole object: 1 lets the mask hide part of one)",
    "mask_prob": "probability that a view is masked at all (iBOT: 0.5; DINOv2's mask_sample_probability 0.5); an "
                 "unmasked view gives no iBOT target",
    "mask_views": "which ssl global views iBOT masks: last (the second view only) or both (iBOT)",
    "patch_size": "patch size of the image tower in pixels; 0 = the preset's (micro: 8; 4 at 32 px gives 64 tokens)",
    "world": "the toy world made when --data is empty: toy, or shapes (one white object before a fixed room, light "
             "and camera: scenes differ by shape, size, place and turn only; a positive control for ssl). With --data: "
             "which world the shards are of, recorded in the checkpoint so that evaluate.py renders its test "
             "scenes from it",
    "prototypes": "prototypes K of the DINO head and of the iBOT head each (the output width of their "
                  "softmax); 0 = the preset's (micro: 1024 and 512; DINO uses 65536 for ImageNet)",
    "ssl_start": "fraction of the steps (0..1) before the ssl losses join: until then no ssl loss and no "
                 "teacher update; at it the teacher is set to the student and the teacher's schedules "
                 "(momentum, temperature warmup, frozen prototypes) run over the remaining steps. "
                 "SigLIP 2 adds its self-distillation at 0.8. The loader still makes the ssl views before "
                 "it (the model skips them)",
    "ssl_views": "which global views ssl reads, with clip: shared = the caption view and one more (DINO's "
                 "two global views, the first also scored by SigLIP); separate = two views of their own, "
                 "the caption view serving only clip, depth and ground (SigLIP 2 keeps SigLIP on the clean "
                 "image and self-distils other views; one more global view per image)",
    "hue": "hue shift in +-HUE of the colour circle on the views only ssl reads (the global views after the "
           "caption view, and the local crops; DINO: 0.1); the view that a caption or grounding names describe "
           "never changes colour (without clip and ground every view is an ssl view)",
    "grayscale": "probability of grayscale on the views only ssl reads (DINO: 0.2)",
    "caption_jitter": "brightness/contrast/saturation jitter (factors in 1 +- this) of the view the caption "
                      "describes, with clip; the other views keep 0.4. SLIP gives its CLIP view none: 0",
    "image_size": "input resolution in pixels, a multiple of the patch size; 0 = the preset's",
    "vit_init": "initialisation of the image tower: big_vision = xavier-uniform dense layers (SigLIP); "
                "dino = truncated normal with std 0.02 for the dense layers and the position table (DINO, "
                "iBOT). At the micro and tiny widths xavier's std is 3-4x DINO's",
    "init_from": "a train.py checkpoint to start from: every tensor whose name and shape this model shares "
                 "(the image tower, and the text tower and heads of the tasks both runs train) is copied, the rest is "
                 "initialised from --seed; step, optimizer and schedules start afresh and the ssl teacher "
                 "starts as the student. Needs the same image tower (--model, --image-size); a checkpoint "
                 "to --resume from wins over it",
    "out": "run folder: checkpoint.pt, metrics.jsonl, losses.png, config.json",
    "seed": "seed of the model's initialisation and the augmentations (not of the toy data)",
    "workers": "data-loading processes per training process (0 = load in the training process)",
    "shuffle_buffer": "samples held in the shuffle buffer of the shard reader",
    "log_every": "steps between log lines and metrics.jsonl rows",
    "ckpt_every": "steps between checkpoints (and validation, unless --val-every)",
    "val_every": "steps between validation passes; 0 = at every checkpoint",
    "val_batches": "batches per validation pass",
    "device": "cpu, cuda or cuda:N; empty = cuda if available, else cpu",
    "koleo": "weight of DINOv2's KoLeo term on the student's global features, summed over the two "
             "global views as DINOv2 does; 0 = off",
    "centering": "how the DINO and iBOT teachers are kept from collapse: mean = minus a running mean "
                 "of their logits (DINO, iBOT); sinkhorn = Sinkhorn-Knopp, which gives every prototype "
                 "the same mass over the batch (DINOv2; iBOT's over the masked patches)",
    "freeze_last_layer": "fraction of the steps during which the DINO/iBOT prototype layers do not "
                         "move (DINO and DINOv2 freeze them for the first of 100 epochs: 0.01)",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    choices = {"precision": mtv.PRECISIONS, "captions": tuple(data.CAPTIONS), "ssl_views": ("shared", "separate"),
               "world": tuple(data.WORLDS), "mask_views": ("last", "both"),
               "centering": ("mean", "sinkhorn"), "vit_init": mtv.VIT_INITS, "balance": BALANCES}
    for f, default in asdict(TrainConfig()).items():
        name = "--" + f.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(name, action="store_true", help=FLAG_HELP.get(f))
        elif f in choices:
            p.add_argument(name, choices=choices[f], default=default, help=FLAG_HELP[f])
        else:
            p.add_argument(name, type=type(default), default=default, help=FLAG_HELP.get(f))
    return TrainConfig(**vars(p.parse_args(argv)))


def fail(msg):
    """A user mistake: one sentence on stderr, exit code 2, no traceback."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_tasks(spec):
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in mtv.ALL_TASKS]
    if bad or not tasks:
        fail(f"unknown task {(bad[0] if bad else spec)!r}; choose from {','.join(mtv.ALL_TASKS)}")
    return tuple(t for t in mtv.ALL_TASKS if t in tasks)  # canonical order


# The terms inside the ssl objective that --loss-weights can weigh on their own (DINOv2 weighs its
# DINO and iBOT terms separately; SigLIP 2 weighs its two SSL terms 1 and 0.25).
SSL_TERMS = ("dino", "ibot")


def parse_weights(spec, tasks):
    """--loss-weights -> {task or ssl term: weight}; unnamed ones weigh 1. The ssl terms scale
    inside the ssl objective, which its own weight then scales as a whole."""
    weights = {t: 1.0 for t in tasks} | ({t: 1.0 for t in SSL_TERMS} if "ssl" in tasks else {})
    names = mtv.ALL_TASKS + SSL_TERMS
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in names:
            fail(f"--loss-weights names unknown task or term {name!r}; choose from {','.join(names)}")
        if name not in weights:
            fail(f"--loss-weights gives a weight to {name!r}, which is not in --tasks {','.join(tasks)}"
                 + (" (dino and ibot are terms of ssl)" if name in SSL_TERMS else ""))
        try:
            weights[name] = float(value)
        except ValueError:
            fail(f"--loss-weights entry {item!r} is not task=number")
    return weights


BALANCES = ("none", "uncertainty")
# Adam moves a parameter by about lr per step: at the toy's lr 3e-4 Kendall's s = log sigma^2 could
# travel 0.45 in 1,500 steps (weights within a factor 1.6), far from its optimum log L. Its own
# larger step lets it reach that in about a hundred steps.
BALANCE_LR_SCALE = 100.0

# Names per image after pseudo-label filtering: sets the grounding loss's initial bias, -log(names in
# the global batch - 1). 2.5 was measured on the first toy world; the second keeps about 1.1 boxes per
# image, so the bias starts below the prior log-odds there (kept: the reproduced ladder ran with it).
NAMES_PER_IMAGE = 2.5

# Which pseudo-label member each task needs in a shard.
LABEL_OF = {"depth": "depth.png", "ground": "ground.json"}


def check_shards(pattern, tasks, flag):
    """Expand a shard glob and make sure the labels the tasks need are there, before any work."""
    shards = sorted(glob(pattern))
    if not shards:
        fail(f"{flag} {pattern!r} matches no files")
    need = [LABEL_OF[t] for t in tasks if t in LABEL_OF]
    for shard in shards:
        try:
            key, members = next(iter(data.iter_tar(shard)))
        except StopIteration:
            fail(f"shard {shard} is empty")
        except Exception as e:  # not a tar file, unreadable, ...
            fail(f"shard {shard} cannot be read as a tar file ({e})")
        for ext in need:
            if ext not in members:
                task = next(t for t, m in LABEL_OF.items() if m == ext)
                fail(f"--tasks {task} needs {ext} labels, but shard {shard} has none "
                     f"(sample {key}); run pseudolabel.py on it first")
    return shards


# -----------------------------------------------------------------------------------------------
# Distributed helpers: every collective is a no-op when the script runs as one process.


def setup_dist(device_flag):
    """Returns (rank, local_rank, world, device); initialises torch.distributed under torchrun."""
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, local_rank, world = 0, 0, 1
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, local_rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------------------------
# Per-step schedules: plain functions of the step, as in DINO.


def cosine(step, total, start, end):
    """Cosine from `start` at step 0 to `end` at step `total`."""
    t = min(step / max(total, 1), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def lr_at(step, cfg, total):
    warm = int(cfg.warmup * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cosine(step - warm, total - warm, cfg.lr, cfg.min_lr)


# -----------------------------------------------------------------------------------------------
# The toy world as default data


# The cache's name carries a digest of the code that makes it (the world in data.py, the simulated
# experts in pseudolabel.py), so toy data made by other code, say before the tagger or copied in
# with another checkout's runs/, is never reused: any change to either file makes it anew. The
# Makefile's TOYKEY is the same digest (`cat data.py pseudolabel.py | sha256sum`; a test ties them).
TOY_CODE = ("data.py", "pseudolabel.py")


def toy_code_key(here=None):
    h = hashlib.sha256()
    for name in TOY_CODE:
        with open(os.path.join(here or os.path.dirname(os.path.abspath(data.__file__)), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def toy_data_root(cfg, size):
    return os.path.join("runs", "toy-data",
                        f"{data.WORLDS[cfg.world]}-{cfg.captions}-n{cfg.toy_n}-px{size}-{toy_code_key()}")


def toy_data(cfg, size, rank):
    """Generate and pseudo-label the toy world once; later runs with the same settings and code
    reuse it. The scenes do not depend on --seed: seeds vary the model and the augmentations, not
    the data. OUT/made-by.json names the code key and commit that made it."""
    root, key = toy_data_root(cfg, size), toy_code_key()
    labelled, made_by = os.path.join(root, "labelled"), os.path.join(root, "made-by.json")
    if rank == 0 and os.path.exists(made_by):
        with open(made_by) as f:
            if json.load(f).get("code_key") != key:  # only if copied in by hand under this name
                fail(f"the toy data in {root} was made by other code than this checkout's; delete it")
    if rank == 0 and not os.path.exists(made_by):
        print0(f"generating the toy world in {root} (simulated experts label it)")
        data.main(["--out", os.path.join(root, "raw"), "--n", str(cfg.toy_n), "--val-n", "512",
                   "--size", str(size), "--seed", "0",
                   "--captions", cfg.captions, "--world", cfg.world])
        import pseudolabel  # only needed here; pseudolabel.py sits after train.py's inputs

        pseudolabel.main(["--shards", os.path.join(root, "raw", "*.tar"), "--out", labelled,
                          "--depth-expert", "simulated", "--ground-expert", "simulated"])
        with open(made_by + ".tmp", "w") as f:  # written last: its presence means the data is whole
            json.dump({"code_key": key, "code": list(TOY_CODE), **run_info()}, f, indent=2)
        os.replace(made_by + ".tmp", made_by)
    barrier()
    return os.path.join(labelled, "train-*.tar"), os.path.join(labelled, "val-*.tar")


# -----------------------------------------------------------------------------------------------
# Checkpoints: plain data only, written to a temp file then renamed, so a crash mid-write leaves
# the previous checkpoint intact.


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, flag="--resume"):
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{flag}: no checkpoint at {path}")
    except Exception as e:
        fail(f"{flag}: {path} is not a readable checkpoint ({mtv.load_error(e)})")
    if not isinstance(ck, dict) or not {"model", "model_config"} <= set(ck):
        fail(f"{flag}: {path} is not a train.py checkpoint (no model or model_config)")
    return ck


def run_info():
    """Git commit and library versions, for OUT/config.json."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        # uncommitted changes to tracked files: the commit alone does not say what ran
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) \
            if commit != "unknown" else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", None
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    for lib in ("torchvision", "transformers"):  # read from the metadata: importing transformers is slow
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"git_commit": commit, "git_dirty": dirty, "versions": versions}


# -----------------------------------------------------------------------------------------------
# Logs and plots


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # peak resident memory of this process; kilobytes on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reference_levels(model_cfg, global_batch):
    """What each logged curve is read against: the loss of a model that tells nothing apart
    (uniform), and the most a teacher's entropy can be (log K, uniform over K prototypes)."""
    h, B = model_cfg.heads, global_batch
    return {"clip": -math.log(1 / B) - (B - 1) * math.log(1 - 1 / B),  # every pair at probability 1/B
            "dino": math.log(h.dino_prototypes), "ibot": math.log(h.ibot_prototypes),
            "dino_teacher_entropy": math.log(h.dino_prototypes), "ibot_teacher_entropy": math.log(h.ibot_prototypes),
            "clip_gap": 0.0, "ground_gap": 0.0}


def smooth(values, weight=0.6):
    """Exponential moving average, light enough that a trend's turning points stay where they are."""
    out, m = [], None
    for v in values:
        m = v if m is None else weight * m + (1 - weight) * v
        out.append(m)
    return out


def plot_losses(metrics_path, png_path, refs=None, labels=None):
    """Top row: each logged loss, training (raw and lightly smoothed) and validation (dashed),
    with its uniform level. Bottom row: the learning signals: the positive-negative logit gap of
    clip and ground (0 = no signal), the teacher entropies against their maximum log K (at the
    maximum the teacher says nothing; far below it, collapse), and the lr schedule. metrics_path
    may be a list of runs' metrics.jsonl, drawn over each other (one colour each, named by labels):
    e.g. the same run in fp32 and bf16."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = refs or {}
    paths = [metrics_path] if isinstance(metrics_path, (str, os.PathLike)) else list(metrics_path)
    labels = labels or ([""] if len(paths) == 1 else [str(p) for p in paths])
    runs = []
    for path in paths:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        for r in rows:
            for t in ("clip", "ground"):
                if f"{t}_pos_logit" in r and f"{t}_neg_logit" in r:
                    r[f"{t}_gap"] = r[f"{t}_pos_logit"] - r[f"{t}_neg_logit"]
        runs.append(rows)
    logged = lambda k: any(k in r for rows in runs for r in rows)  # noqa: E731
    top = [k for k in ("loss", "clip", "dino", "ibot", "koleo", "depth", "ground") if logged(k)]
    bottom = [k for k in ("clip_gap", "ground_gap", "dino_teacher_entropy", "ibot_teacher_entropy", "lr") if logged(k)]
    if not top:
        return
    # --pull-every: each objective's gradient norm on the tower and the cosines, one panel each
    third = [k for k in ("pull", "cos") if any(q.startswith(k + "_") for rows in runs for r in rows for q in r)]
    cols = max(len(top), len(bottom), len(third))
    fig, axes = plt.subplots(2 + bool(third), cols, figsize=(3.2 * cols, 2.9 * (2 + bool(third))), squeeze=False)
    for i, keys in enumerate((top, bottom)):
        for ax, k in zip(axes[i], keys):
            for j, (rows, label) in enumerate(zip(runs, labels)):
                name = f"{label} " if label else ""
                points = [(r["step"], r[k]) for r in rows if k in r]
                if not points:
                    continue
                steps, values = zip(*points)
                noisy = len(values) >= 30 and k != "lr"  # smoothing sparse points would only lag
                if noisy:
                    ax.plot(steps, values, color=f"C{2 * j}", alpha=0.3, lw=1)
                ax.plot(steps, smooth(values) if noisy else values, color=f"C{2 * j}", label=f"{name}train")
                va = [(r["step"], r["val_" + k]) for r in rows if "val_" + k in r]
                if va:
                    ax.plot(*zip(*va), "--o", color=f"C{2 * j + 1}", ms=3, label=f"{name}val")
            if k in refs:
                what = "log K (maximum)" if k.endswith("entropy") else "no signal" if k.endswith("gap") else "uniform"
                ax.axhline(refs[k], ls=":", color="gray", label=f"{what} {refs[k]:.2f}")
            if len(runs) > 1 or k in refs or any("val_" + k in r for rows in runs for r in rows):
                ax.legend(fontsize=7)
            ax.set_title(k.replace("_", " "), fontsize=9)
            ax.set_xlabel("step")
        for ax in axes[i][len(keys):]:
            ax.axis("off")
    if third:
        plot_pull(axes[-1], third, runs, labels)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def plot_pull(axes, kinds, runs, labels):
    """losses.png's third row (--pull-every): each objective's gradient norm on the image tower
    (log scale), and the cosines of every two objectives' gradients (0: orthogonal; below: conflict)."""
    for ax, kind in zip(axes, kinds):
        names = sorted({q for rows in runs for r in rows for q in r if q.startswith(kind + "_")})
        for n, q in enumerate(names):
            for j, rows in enumerate(runs):
                points = [(r["step"], r[q]) for r in rows if q in r]
                ax.plot(*zip(*points), color=f"C{n}", ls=("-", "--", ":", "-.")[j % 4],
                        label=q[len(kind) + 1:] + (f" {labels[j]}" if len(runs) > 1 else ""))
        if kind == "pull":
            ax.set_yscale("log")
        else:
            ax.axhline(0, ls=":", color="gray")
        ax.legend(fontsize=6)
        ax.set_title("gradient norm on the image tower" if kind == "pull" else "cosine of tower gradients", fontsize=9)
        ax.set_xlabel("step")
    for ax in axes[len(kinds):]:
        ax.axis("off")


# -----------------------------------------------------------------------------------------------
# The multi-task step


class Objectives(torch.nn.Module):
    """The enabled losses, with the state they carry (DINO and iBOT teacher centres)."""

    def __init__(self, model, tasks, cfg, weights=None):
        super().__init__()
        self.tasks, self.cfg = tasks, cfg
        self.weights = weights or parse_weights("", tasks)  # every task and ssl term at 1
        # --balance uncertainty: one learnt s = log sigma^2 per task (Kendall et al. 2018), from 0
        self.log_vars = (torch.nn.ParameterDict({t: torch.nn.Parameter(torch.zeros(())) for t in tasks})
                         if getattr(cfg, "balance", "none") == "uncertainty" else None)
        if "ssl" in tasks:
            self.dino = losses.DINOLoss(model.cfg.heads.dino_prototypes, centering=cfg.centering)
            self.ibot = losses.IBOTLoss(model.cfg.heads.ibot_prototypes, centering=cfg.centering)

    def forward(self, out, target, batch, teacher_temp):
        """Returns (dict of per-task losses with gradients, dict of everything to log)."""
        parts, logs = {}, {}
        if "clip" in self.tasks:
            d = losses.siglip_loss(out["img"].float(), out["txt"].float(), out["logit_scale"].float(),
                                   out["logit_bias"].float())
            parts["clip"] = d["clip"]
            logs.update(d)
        if "ssl" in self.tasks and target is not None:  # no target before --ssl-start
            d = self.dino(out["dino_global"].float(), out.get("dino_local"),
                          target["dino_global"].float(), teacher_temp)
            d.update(self.ibot(out["ibot"].float(), target["ibot"].float(), mtv.ibot_masks(batch),
                               teacher_temp))
            parts["ssl"] = self.weights["dino"] * d["dino"] + self.weights["ibot"] * d["ibot"]
            if self.cfg.koleo > 0:  # DINOv2: spread the student's global features, summed over the 2 views
                d["koleo"] = sum(losses.koleo_loss(f.float()) for f in out["pooled"].chunk(2))
                parts["ssl"] = parts["ssl"] + self.cfg.koleo * d["koleo"]
            logs.update(d)
        if "depth" in self.tasks:
            d = losses.depth_loss(out["depth"].float(), batch["depth"], batch["depth_valid"])
            parts["depth"] = d["depth"]
            logs.update(d)
        if "ground" in self.tasks:
            d = losses.ground_loss(out["region"].float(), out["name"].float(), batch["name_id"],
                                   out["ground_logit_scale"].float(), out["ground_logit_bias"].float())
            parts["ground"] = d["ground"]
            logs.update(d)
        return parts, logs

    def weighted(self, parts):
        """The per-task terms of the total loss: w L with the --loss-weights w, and with --balance
        uncertainty exp(-s) w L / 2 + s / 2 (Kendall, Gal & Cipolla 2018, eq. 7, for a regression
        likelihood; s = log sigma^2 is learnt, its optimum for a fixed loss is s = log(w L)).
        Returns (terms, the effective weight of each task's loss)."""
        if self.log_vars is None:
            return {k: self.weights[k] * v for k, v in parts.items()}, {k: self.weights[k] for k in parts}
        terms, weight = {}, {}
        for k, v in parts.items():
            s = self.log_vars[k]
            terms[k] = 0.5 * torch.exp(-s) * self.weights[k] * v + 0.5 * s
            weight[k] = 0.5 * torch.exp(-s.detach()) * self.weights[k]  # a tensor: no host sync per step
        return terms, weight


def tower_params(model):
    """The shared image tower's own parameters: patch embedding, positions, blocks and final norm;
    not its attention-pool head (read by clip and ssl alone) nor iBOT's mask token."""
    return [p for n, p in model.vision.named_parameters()
            if p.requires_grad and not n.startswith("head.") and n != "mask_token"]


def pull(terms, params):
    """Each objective's gradient on the shared tower alone (autograd of its term of the loss, as
    weighted) -> {pull_TASK: its norm, cos_A_B: the cosine of two tasks' gradients}: which one
    dominates the shared weights and which ones conflict (negative cosine, as PCGrad measures it)."""
    grads = {}
    for k, v in terms.items():
        g = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        grads[k] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().float() for x, p in zip(g, params)])
    row = {f"pull_{k}": float(g.norm()) for k, g in grads.items()}
    names = list(grads)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            row[f"cos_{a}_{b}"] = float(F.cosine_similarity(grads[a], grads[b], dim=0))
    return row


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (DINO)."""
    s = dict(student.named_parameters())
    t_params = [p for _, p in teacher.named_parameters()]
    s_params = [s[n].detach() for n, _ in teacher.named_parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def param_groups(model, weight_decay):
    """No weight decay on biases, norms, embeddings and tokens (1-D or position tables), as ViTs do."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim < 2 or "pos_embed" in name or "token" in name or "probe" in name
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def make_loader(cfg, shards, tasks, model, aug, skip, seed, repeat=True, workers=None):
    ds = data.ShardDataset(
        shards,
        transform=partial(data.make_views, aug=aug, tasks=tasks),
        batch_size=cfg.batch_size,
        collate=partial(data.collate, tokenize=model.tokenize),
        shuffle_buffer=cfg.shuffle_buffer if repeat else 0,
        seed=seed,
        repeat=repeat,
        skip_batches=skip,
        require=tuple(LABEL_OF[t] for t in tasks if t in LABEL_OF),
    )
    w = cfg.workers if workers is None else workers
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=w,
                                       persistent_workers=w > 0, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def validate(model, teacher, objectives, loader, n_batches, device, autocast, teacher_temp):
    """Mean of each logged loss over the first n validation batches (eval mode, no updates)."""
    model.eval()
    objectives.eval()  # the teacher centres do not move in eval mode
    sums, n = {}, 0
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        batch = to_device(batch, device)
        with autocast:
            out = model(batch, ssl=teacher is not None)
            target = teacher(batch) if teacher is not None else None
        _, logs = objectives(out, target, batch, teacher_temp)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        n += 1
    model.train()
    objectives.train()
    return {"val_" + k: v / max(n, 1) for k, v in sums.items()}


def pick_threads(local_world):
    """Intra-op threads per process: OMP_NUM_THREADS when set, else the cores shared out among the
    local processes. Torch's default (every core in every process) oversubscribes as soon as two
    runs or ranks share a machine: two 2-thread runs on 2 cores ran ~20x slower than two 1-thread
    runs. Returns (threads, where the number came from)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(local_world, 1)), f"{cores} cores / {local_world} local process(es)"


def check_config(cfg):
    """Every user mistake in the flags, before any work. Returns (tasks, loss weights)."""
    tasks = parse_tasks(cfg.tasks)
    weights = parse_weights(cfg.loss_weights, tasks)
    if cfg.model not in mtv.PRESETS:
        fail(f"unknown --model {cfg.model!r}; choose from {', '.join(mtv.PRESETS)}")
    if cfg.precision not in mtv.PRECISIONS:
        fail(f"unknown --precision {cfg.precision!r}; choose from {', '.join(mtv.PRECISIONS)}")
    if cfg.prepare_data and cfg.data:
        fail("--prepare-data makes the toy world, which --data replaces; give one of them")
    for flag in ("steps", "batch_size", "log_every", "ckpt_every"):
        if getattr(cfg, flag) <= 0 and not (flag == "steps" and cfg.epochs > 0):
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(cfg, flag)}")
    for flag in ("teacher_momentum", "teacher_momentum_end"):
        if not 0 <= getattr(cfg, flag) <= 1:
            fail(f"--{flag.replace('_', '-')} is an EMA momentum in [0, 1], got {getattr(cfg, flag)}")
    if not 0 <= cfg.ssl_start < 1:
        fail(f"--ssl-start is a fraction of the steps in [0, 1), got {cfg.ssl_start}")
    if cfg.ssl_start > 0 and tasks == ("ssl",):
        fail("--ssl-start needs another task to train before ssl joins; with --tasks ssl alone leave it at 0")
    if cfg.ssl_views not in ("shared", "separate"):
        fail(f"--ssl-views is 'shared' or 'separate', got {cfg.ssl_views!r}")
    if cfg.prototypes < 0:
        fail(f"--prototypes must be positive (or 0 for the preset's), got {cfg.prototypes}")
    if not 0 <= cfg.freeze_last_layer < 1:
        fail(f"--freeze-last-layer is a fraction of the steps in [0, 1), got {cfg.freeze_last_layer}")
    if cfg.patch_size < 0:
        fail(f"--patch-size must be positive (or 0 for the preset's), got {cfg.patch_size}")
    patch = cfg.patch_size or mtv.PRESETS[cfg.model].vision.patch_size
    size = cfg.image_size or mtv.PRESETS[cfg.model].vision.image_size
    if cfg.image_size < 0 or size % patch:
        fail(f"--image-size {size} is not a positive multiple of the patch size {patch}; "
             f"try {max(patch, round(size / patch) * patch)}")
    if cfg.local_size and (cfg.local_size < 0 or cfg.local_size % patch):
        fail(f"--local-size {cfg.local_size} is not a positive multiple of the patch size {patch}")
    for flag in ("local_scale", "global_scale", "mask_ratio"):
        parse_range(cfg, flag)
    if cfg.mask_min_block < 1:
        fail(f"--mask-min-block is a number of patches, at least 1, got {cfg.mask_min_block}")
    if cfg.pull_every < 0 or (cfg.pull_every and cfg.pull_every % cfg.log_every):
        fail(f"--pull-every {cfg.pull_every} must be 0 or a multiple of --log-every {cfg.log_every}")
    if cfg.mask_views == "both" and tasks != ("ssl",) and not ("clip" in tasks and cfg.ssl_views == "separate"):
        fail("--mask-views both would mask the view that clip, depth and ground read (the first ssl view is the "
             "caption view); use it with --tasks ssl alone, or with clip and --ssl-views separate")
    if not 0 < cfg.mask_prob <= 1:
        fail(f"--mask-prob is a probability in (0, 1], got {cfg.mask_prob}")
    if cfg.resume and cfg.resume != "latest" and not os.path.isfile(cfg.resume):
        fail(f"--resume {cfg.resume!r} is neither 'latest' nor an existing checkpoint file")
    if cfg.init_from and not os.path.isfile(cfg.init_from):
        fail(f"--init-from {cfg.init_from!r} is not a checkpoint file")
    return tasks, weights


def parse_range(cfg, flag):
    """A LO,HI flag (a share in (0, 1]) -> (lo, hi); one sentence and exit 2 if it is not one."""
    text = getattr(cfg, flag)
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--{flag.replace('_', '-')} is LO,HI (two numbers), got {text!r}")
    if not 0 < lo <= hi <= 1:
        fail(f"--{flag.replace('_', '-')} {text} is not a range 0 < LO <= HI <= 1")
    return lo, hi


@dataclass
class Run:
    """Everything the loop needs, built by setup()."""
    cfg: TrainConfig
    tasks: tuple
    weights: dict
    rank: int
    world: int
    device: torch.device
    total: int
    model: torch.nn.Module
    teacher: torch.nn.Module
    objectives: torch.nn.Module
    optimizer: torch.optim.Optimizer
    student: torch.nn.Module
    autocast: object
    loader: object
    val_loader: object
    step: int
    ckpt_path: str
    metrics_path: str
    train_shards: list


def setup(cfg):
    tasks, weights = check_config(cfg)
    rank, _, world, device = setup_dist(cfg.device)
    threads, why = pick_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    print0(f"threads: {threads} per process ({why})")
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    model_cfg = model_config(cfg, world)
    size = model_cfg.vision.image_size

    if cfg.data:
        train_shards = check_shards(cfg.data, tasks, "--data")
        val_pattern = cfg.val_data
    else:
        train_glob, val_glob = toy_data(cfg, size, rank)
        if cfg.prepare_data:
            print0(f"toy data: {os.path.dirname(os.path.dirname(train_glob))}")
            if dist.is_initialized():
                dist.destroy_process_group()
            return None
        train_shards = check_shards(train_glob, tasks, "--data")
        val_pattern = cfg.val_data or val_glob
    val_shards = check_shards(val_pattern, tasks, "--val-data") if val_pattern else []

    total = cfg.steps
    if cfg.epochs > 0:
        total = max(1, math.ceil(cfg.epochs * data.count_samples(train_shards) / (cfg.batch_size * world)))

    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    print0("settings:\n" + "\n".join(f"  {k:<18} {v}" for k, v in sorted(asdict(cfg).items())))

    # -- model, teacher, losses, optimizer ------------------------------------------------------
    model = mtv.MTV.initialised(model_cfg, tasks, cfg.seed).to(device)  # re-seeded: data generation may draw
    resume_path = ckpt_path if cfg.resume == "latest" else cfg.resume
    if cfg.init_from and not (cfg.resume and os.path.exists(resume_path)):
        start_from(model, cfg.init_from)
    teacher = model.ssl_teacher().to(device) if "ssl" in tasks else None  # a copy of the student
    objectives = Objectives(model, tasks, cfg, weights).to(device)
    groups = param_groups(model, cfg.weight_decay)
    if objectives.log_vars is not None:  # Kendall et al.'s s, trained with the model, never decayed
        groups.append({"params": list(objectives.log_vars.parameters()), "weight_decay": 0.0, "decay": False,
                       "lr_scale": BALANCE_LR_SCALE})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999),
                                  **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    step = resume(cfg, resume_path, model, teacher, objectives, optimizer, train_shards)
    if rank == 0:  # after resume's checks: a refused --resume leaves the run's config.json as it was
        trim_log(metrics_path, step)
        settings = {**asdict(cfg), "tasks": list(tasks), "loss_weights": weights, "total_steps": total,
                    "world_size": world, "threads": threads, "train_shards": len(train_shards), **run_info()}
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(settings, f, indent=2)

    # Without clip and ssl nothing reads the attention-pool head, and before --ssl-start nothing
    # reads the ssl heads: DDP must then be told that some parameters get no gradient.
    unused = not {"clip", "ssl"} & set(tasks) or ("ssl" in tasks and cfg.ssl_start > 0)
    ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
           if world > 1 else model)
    student = torch.compile(ddp) if cfg.compile else ddp
    autocast = mtv.autocast(device, cfg.precision)

    aug = data.AugConfig(size=size, local_size=cfg.local_size or size // 2,
                         n_local=cfg.n_local if "ssl" in tasks else 0, caption_jitter=cfg.caption_jitter,
                         hue=cfg.hue, grayscale=cfg.grayscale, ssl_views=cfg.ssl_views,
                         global_scale=parse_range(cfg, "global_scale"), local_scale=parse_range(cfg, "local_scale"),
                         mask_ratio=parse_range(cfg, "mask_ratio"), mask_min_block=cfg.mask_min_block,
                         mask_prob=cfg.mask_prob, mask_views=cfg.mask_views, patch_size=model_cfg.vision.patch_size)
    loader = make_loader(cfg, train_shards, tasks, model, aug, skip=step, seed=cfg.seed)
    val_loader = (make_loader(cfg, val_shards, tasks, model, aug, skip=0, seed=cfg.seed + 1,
                              repeat=False, workers=0) if val_shards else None)
    return Run(cfg, tasks, weights, rank, world, device, total, model, teacher, objectives, optimizer, student,
               autocast, loader, val_loader, step, ckpt_path, metrics_path, train_shards)


def model_config(cfg, world):
    """The preset named by --model, with the flags that change it."""
    model_cfg = mtv.build_config(cfg.model)
    if cfg.image_size:
        model_cfg.vision.image_size = cfg.image_size
    if cfg.patch_size:
        model_cfg.vision.patch_size = cfg.patch_size
    model_cfg.vision.init = cfg.vit_init
    if cfg.prototypes:
        model_cfg.heads.dino_prototypes = model_cfg.heads.ibot_prototypes = cfg.prototypes
    # The sigmoid losses start at the prior log-odds of their global batch (see HeadConfig): B
    # captions per image for clip, about NAMES_PER_IMAGE * B names per name for ground.
    model_cfg.heads.clip_bias = -math.log(max(cfg.batch_size * world - 1, 1))
    model_cfg.heads.ground_bias = -math.log(max(NAMES_PER_IMAGE * cfg.batch_size * world - 1, 1))
    return model_cfg


def resume(cfg, path, model, teacher, objectives, optimizer, shards):
    """--resume: load everything a checkpoint holds, in place; returns the step to continue from (0 without one).
    A checkpoint trained on other shards (say toy data made anew by changed code) is refused."""
    if not (cfg.resume and os.path.exists(path)):
        if cfg.resume == "latest":
            print0(f"--resume latest: no checkpoint in {cfg.out} yet, starting "
                   + (f"from --init-from {cfg.init_from}" if cfg.init_from else "from scratch"))
        return 0
    ck = load_checkpoint(path)
    if (before := (ck.get("train_config") or {}).get("balance", "none")) != cfg.balance:
        fail(f"--resume: {path} was trained with --balance {before}, not {cfg.balance}; resume with the same "
             "--balance or use a fresh --out")
    if ck.get("model_config") != model.config_dict():
        fail(f"--resume: {path} was trained with another model or tasks "
             f"({ck.get('model_config', {}).get('tasks')}); use a fresh --out")
    if (before := ck.get("data", {}).get("shards")) is not None and before != shards:
        fail(f"--resume: {path} was trained on other data ({os.path.dirname(before[0]) if before else 'none'}); "
             "use a fresh --out")
    model.load_state_dict(ck["model"])
    if teacher is not None:
        teacher.load_state_dict(ck["teacher"])
    objectives.load_state_dict(ck["objectives"])
    optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"])
    print0(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def trim_log(metrics_path, step):
    """Drop the log lines written after the checkpoint we continue from (a crash leaves them)."""
    kept = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = list(f)
    with open(metrics_path, "w") as f:
        f.writelines(l for l in kept if json.loads(l)["step"] <= step)


def start_from(model, path):
    """--init-from: copy into model every tensor of checkpoint `path` whose name and shape it shares."""
    ck = load_checkpoint(path, flag="--init-from")
    theirs, ours = ck["model_config"]["config"]["vision"], model.config_dict()["config"]["vision"]
    if differ := sorted(k for k in ours if k != "init" and theirs.get(k) != ours[k]):
        fail(f"--init-from: {path} has another image tower ({', '.join(f'{k} {theirs.get(k)}' for k in differ)} "
             f"against {', '.join(str(ours[k]) for k in differ)}); use its --model and --image-size")
    state = model.state_dict()
    shared = {k: v for k, v in ck["model"].items() if k in state and state[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    print0(f"--init-from: {len(shared)} of {len(state)} tensors from {path} "
           f"(tasks {','.join(ck['model_config']['tasks'])}); the rest from --seed")


def checkpoint_state(r):
    return {"model": r.model.state_dict(), "model_config": r.model.config_dict(),
            "teacher": r.teacher.state_dict() if r.teacher is not None else None,
            "objectives": r.objectives.state_dict(), "optimizer": r.optimizer.state_dict(),
            "step": r.step, "rng": {"torch": torch.get_rng_state()},
            "data": {"batches_seen": r.step, "seed": r.cfg.seed, "shards": r.train_shards},
            "train_config": {**asdict(r.cfg), "tasks": list(r.tasks), "total_steps": r.total}}


def frozen_prototypes(model):
    """The DINO and iBOT prototype layers, which DINO and DINOv2 keep fixed during the first epoch
    (freeze_last_layer): while the projection MLP is still random, moving the prototypes as well
    makes the softmax targets collapse or swing."""
    return [p for n, p in model.named_parameters() if ".last_layer." in n and p.requires_grad]


def ssl_phase(r):
    """(first step of the ssl losses, number of steps they run for): --ssl-start F delays them to a
    fraction F of the run (SigLIP 2: 0.8), and the teacher's schedules then run over what is left."""
    start = min(round(r.cfg.ssl_start * r.total), r.total - 1) if r.cfg.ssl_start > 0 else 0  # ssl gets >= 1 step
    return start, max(r.total - start, 1)


def train_step(r, batch, lr, wd):
    """One optimizer step; returns (loss, per-task log values, gradient norm, teacher temperature)."""
    cfg = r.cfg
    for g in r.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd if g["decay"] else 0.0
    start, span = ssl_phase(r)
    ssl_on = r.teacher is not None and r.step >= start
    if ssl_on and r.step == start > 0:
        ema_update(r.teacher, r.model, 0.0)  # SigLIP 2: the teacher starts as a copy of the student
    with r.autocast:
        out = r.student(batch, ssl=ssl_on)
        target = r.teacher(batch) if ssl_on else None  # no target: Objectives leaves ssl out
    temp = losses.teacher_temp_schedule(max(r.step - start, 0), int(0.3 * span), 0.04, cfg.teacher_temp)
    parts, logs = r.objectives(out, target, batch, temp)
    terms, weight = r.objectives.weighted(parts)  # per task; ssl's terms are weighed inside
    loss = sum(terms.values())
    if r.objectives.log_vars is not None:
        logs.update({f"weight_{k}": w for k, w in weight.items()})
    measure = cfg.pull_every and (r.step + 1) % cfg.pull_every == 0 and len(terms) > 1
    if measure:  # before backward, which frees the graph
        logs.update(pull(terms, tower_params(r.model)))
    r.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if r.objectives.log_vars is not None and r.world > 1:  # the task weights live outside DDP: average them
        for p in r.objectives.log_vars.values():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= r.world
    if r.step < start + cfg.freeze_last_layer * span:  # DINO: the first epoch; here a fraction of the steps
        for p in frozen_prototypes(r.model):
            p.grad = None  # AdamW skips a parameter without a gradient: no update, no decay
    grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.grad_clip)  # the model's, not s
    r.optimizer.step()
    if ssl_on:
        ema_update(r.teacher, r.model, cosine(r.step - start, span, cfg.teacher_momentum, cfg.teacher_momentum_end))
    return loss, logs, grad_norm, temp


def train_loop(r):
    cfg = r.cfg
    nonfinite = torch.zeros((), dtype=torch.bool, device=r.device)  # checked at log steps, no sync per step
    bar = tqdm(total=r.total, initial=r.step, disable=r.rank != 0, desc="train", dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0
    it = iter(r.loader)
    while r.step < r.total:
        lr = lr_at(r.step, cfg, r.total)
        wd = cosine(r.step, r.total, cfg.weight_decay, cfg.weight_decay_end)
        loss, logs, grad_norm, temp = train_step(r, to_device(next(it), r.device), lr, wd)
        nonfinite |= ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        r.step += 1
        steps_since += 1
        bar.update(1)

        last = r.step == r.total
        if r.step % cfg.log_every == 0 or r.step % cfg.ckpt_every == 0 or last:
            if nonfinite.item():
                fail(f"the loss or its gradient became NaN/inf between step {r.step - steps_since} and "
                     f"{r.step}; the last good checkpoint ({r.ckpt_path}) is kept; lower --lr or check the data")
            if r.device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t_last) / steps_since
            row = {"step": r.step, "loss": loss.item(), "lr": lr, "wd": wd, "grad_norm": float(grad_norm),
                   "teacher_temp": temp, **{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()},
                   "ms_per_step": 1000 * dt, "img_per_s": cfg.batch_size * r.world / dt,
                   "mem_gb": memory_gb(r.device)}
            if r.val_loader is not None and (r.step % (cfg.val_every or cfg.ckpt_every) == 0 or last):
                teacher = r.teacher if r.step > ssl_phase(r)[0] else None  # ssl not started: no ssl losses
                row.update(validate(r.model, teacher, r.objectives, r.val_loader, cfg.val_batches, r.device,
                                    r.autocast, temp))
            if r.rank == 0:
                with open(r.metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                shown = " ".join(f"{k} {row[k]:.3f}" for k in ("loss", "clip", "dino", "ibot", "depth", "ground")
                                 if k in row)
                bar.write(f"step {r.step:>6}/{r.total} | {shown} | lr {lr:.2e} | {row['ms_per_step']:.0f} ms/step"
                          f" | {row['img_per_s']:.0f} img/s | mem {row['mem_gb']:.2f} GB")
            t_last, steps_since = time.perf_counter(), 0
        if r.rank == 0 and (r.step % cfg.ckpt_every == 0 or last):
            save_checkpoint(r.ckpt_path, checkpoint_state(r))
            plot_losses(r.metrics_path, os.path.join(cfg.out, "losses.png"),
                        reference_levels(r.model.cfg, cfg.batch_size * r.world))
    bar.close()
    del it


def teardown(r):
    """gloo can abort at interpreter exit while DDP, optimizer or loader workers are still alive:
    release them, then leave the process group together."""
    r.student = r.model = r.teacher = r.optimizer = r.loader = r.val_loader = None
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def weights_from(run):
    """--weights-from: the static weights that equalise the measured pulls (Chen et al.'s GradNorm
    target, equal gradient norms on the shared weights, taken once from a short run): w_k times
    the pulls' geometric mean over pull_k. Returns the --loss-weights string."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        fail(f"--weights-from {run}: no metrics.jsonl there; give a train.py run folder")
    with open(path) as f:
        rows = [r for r in map(json.loads, f) if any(k.startswith("pull_") for k in r)]
    if not rows:
        fail(f"--weights-from {run}: its metrics.jsonl has no pull_* measurements; train it with --pull-every")
    rows = rows[len(rows) // 2:]  # the second half: past the first steps' transients
    try:
        with open(os.path.join(run, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        fail(f"--weights-from {run}: no readable config.json there; give a train.py run folder")
    if config.get("balance", "none") != "none":
        fail(f"--weights-from {run}: its pulls carry the weights --balance {config['balance']} learnt; "
             "measure a run without --balance")
    weights = config["loss_weights"]
    tasks = [t for t in mtv.ALL_TASKS if all(f"pull_{t}" in r for r in rows)]  # measured throughout the half
    mean = {t: float(np.mean([r[f"pull_{t}"] for r in rows])) for t in tasks}
    centre = math.exp(np.mean([math.log(max(v, 1e-12)) for v in mean.values()]))
    new = {t: weights.get(t, 1.0) * centre / max(mean[t], 1e-12) for t in tasks}
    print("mean pull on the image tower over the last {} measurements: {}".format(
        len(rows), ", ".join(f"{t} {mean[t]:.3g}" for t in tasks)))
    spec = ",".join(f"{t}={new[t]:.3g}" for t in tasks)
    print(f"--loss-weights {spec}")
    return spec


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.weights_from:
        return weights_from(cfg.weights_from)
    r = setup(cfg)
    if r is None:  # --prepare-data: the toy data is made; nothing to train
        return
    try:
        train_loop(r)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; the checkpoint on disk is intact
        last = torch.load(r.ckpt_path, map_location="cpu", weights_only=True, mmap=True)["step"] \
            if os.path.exists(r.ckpt_path) else None
        print(f"\ntrain.py: interrupted at step {r.step}; " + (
            f"the last checkpoint is {r.ckpt_path} (step {last}); continue with --out {r.cfg.out} --resume latest"
            if last is not None else "no checkpoint was written yet"), file=sys.stderr)
        raise SystemExit(130)
    print0(f"done: {r.step} steps; checkpoint {r.ckpt_path}, logs {r.metrics_path}, "
           f"curves {os.path.join(r.cfg.out, 'losses.png')}")
    ckpt_path = r.ckpt_path
    teardown(r)
    return ckpt_path


if __name__ == "__main__":
    main()
