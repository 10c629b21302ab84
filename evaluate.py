"""Judge a frozen encoder the way the MTV paper does: `python evaluate.py runs/x/checkpoint.pt`.

The paper (Di, Xie, Zhai 2026, Figure 1 and Table 5) scores the image tower on ImageNet zero-shot,
COCO retrieval, linear probing, ADE20K segmentation, NAVI/SPair correspondence, NYUv2 depth
probing and zero-shot relative depth. The toy world has exact truth for each of these, so every
protocol has a toy twin; at the default 2,000 scenes a `micro` model at 32 px is scored in about a
minute on one CPU core (65 s for an ssl model). The same code runs on real data.

    python evaluate.py CHECKPOINT [--data GLOB] [--n N] [--init] [--out DIR] [--device DEV]
    python evaluate.py CHECKPOINT --imagenet DIR --coco DIR --spair DIR --navi DIR --nyu DIR --ade DIR --kitti DIR
    python evaluate.py --compare RUN_DIR ... [--against first|previous|last] [--out DIR]

CHECKPOINT is a train.py checkpoint.pt, or a directory with a
SigLIP-format model (config.json + weights, e.g. the released MTV weights), converted by
mtv.MTV.from_siglip. Protocols that need a part the model lacks (text tower, depth head,
grounding head) are skipped with one line saying so. --init scores the same model at
initialisation instead (same config and seed, no step taken) into <run>/eval-init: the untrained
baseline every trained number is read against. Everything reads frozen features, extracted once
per image set; probes are deterministic.

Every number comes with a standard error (1,000 bootstrap resamples of the test scenes or
queries; the probes are fitted once), its chance level and its ceiling at the evaluated
resolution, measured where an oracle exists. Chance is what a model without the image gets: a
random pick, the majority class, or for the dense probes the same probe on the patch position
alone (in the toy world a patch's place in the image predicts much of its depth). The toy dense
probes therefore see each patch's position beside its features, so they score what the features
add to it, and report that gain over the position-only probe with a paired standard error (both
probes resampled on the same scenes). Ceilings are the same protocol on perfect features (the
truth per patch), so they show what the patch grid itself allows. "ml" probes read the four
blocks a DPT head taps (mtv.dpt_layers, through the final LayerNorm) side by side instead of the
last layer alone.

Toy world (val shards with truth members gt_depth/gt/gt_seg via --data, else --n scenes rendered
in memory with a seed training never uses); the first 2/3 of the scenes train the probes, the
last 1/3 test them; zero-shot, retrieval, correspondence and grounding use every scene:
  zs_color_acc, zs_shape_acc   colour / shape of the object of single-object scenes from   ImageNet zero-shot
                               prompts "a photo of a red cube." (one label per image)
  zs_present_acc               the best prompt names an object present, 2-4-object scenes
  ret_{i2t,t2i}_r{1,5}         image <-> caption recall@k                                  COCO retrieval
  lin_count_acc, lin_shape_acc logistic regression on the pooled embedding: object count,  linear probing
                               shape of the largest object
  obj_{shape,color}_acc        logistic regression on each object's patch tokens averaged  linear probing
                               under its true mask (weights: its visible pixels' share per patch)
  obj_{shape,color}_ml_acc     the same on the four DPT taps                               linear probing
  depth_probe_{rmse,absrel}    ridge on patch tokens + patch position -> log depth,        NYUv2 depth probe
                               upsampled; all pixels
  depth_probe_obj_{rmse,absrel}  the same, scored on object pixels only
  depth_probe_ml_{rmse,absrel}, depth_probe_ml_obj_{rmse,absrel}                           NYUv2 depth probe
                               the same two on the four DPT taps + patch position
  seg_miou, seg_obj_miou       linear on patch tokens + patch position: sky/room/object    ADE20K
                               shape; mIoU over all 6 classes / over the 4 object shapes
  seg_ml_miou, seg_ml_obj_miou the same on the four DPT taps + patch position              ADE20K
  corr_recall                  patch nearest neighbours across a known crop+flip; right    NAVI / SPair
                               within max(0.1 x image side, one patch side)
  zsdepth_{absrel,delta1}      depth head, scale-shift aligned in inverse depth            KITTI/NYU zero-shot
  ground_acc, ground_name_acc  name -> its box among the image's boxes; box -> name        grounding

Real data (any subset of --imagenet --coco --spair --navi --nyu --ade --kitti; only those run, add
--data to also run the toy world), each folder read in the layout it is distributed in by a
reader in data.py (one line and exit 2 when it is not), scored by the references' protocols:
in_{zs,lin,knn}_acc, coco_{i2t,t2i}_r{1,5,10}, spair_pck, navi_recall_{1,2,5}cm, nyu_probe[_ml]_rmse,
nyu_zsdepth_{absrel,delta1}, ade_miou, kitti_zsdepth_{absrel,delta1}. The layouts are in --help;
README "Real benchmarks" tables each protocol's source and what differs from it.

Outputs: OUT/results.json (tasks, seed, init, flat metrics with se, chance, ceiling and n, which
are lower-is-better, skipped protocols) and OUT/results.md; OUT defaults to <checkpoint
dir>/eval (eval-init with --init). --compare reads RUN_DIR/eval/results.json (and
RUN_DIR/eval-init/results.json where present) of several train.py runs, groups runs with the
same tasks (seeds) and writes the paper's Figure 1 layout to OUT/compare.md (and .json) and OUT/radar.png:
mean +- std over seeds, chance and ceiling rows, the untrained row first, and each row's
difference from the first trained row (--against previous: from the row before it, a ladder's
steps; --against last: from the largest row, a leave-one-out) and from the untrained one, in
units of their pooled seed std and paired by seed (bold beyond 2).
"""

import argparse
import copy
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps
from tqdm import tqdm

import data
import mtv

BATCH = 64  # images per forward pass while extracting features
# The autocast of the frozen model's forward passes (mtv.autocast), set once by main from
# --precision; the probes, metrics and their fits always run in fp32 or fp64 on the features.
PRECISION = "fp32"
TOY_SEED = 987_654  # the in-memory toy val set; train.py's toy worlds use the run seed (0, 1, ...)
TOY_N = 2000  # scenes: the standard error of a 25 %-chance accuracy on the 667 probe-test scenes is ~0.017
CORR_SEED = 1  # the crops and flips that make the second view for correspondence
TOY_TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.")  # the toy captions' own words
RIDGE_LAMBDA = 1e-2  # on standardised features, relative to the per-sample Gram matrix
LOGREG_WD = 1e-3  # L2 on the weights of the logistic-regression probes
LBFGS_STEPS = 100  # full-batch L-BFGS iterations, from zeros: the probes are deterministic
KNN_K, KNN_T = 20, 0.07  # DINO's weighted k-NN classifier
TOY_CAP = 20.0  # world units: the toy floor runs to the horizon, objects stand 3-8.5 units away
PCK = 0.1  # correspondence is right within 10 % of the image side (PCK@0.1, as SPair) ...
# ... or within one patch side where that is more: patch features can only name a patch, and a
# true match lies up to half a patch diagonal from the nearest patch centre (at 32 px with 8-px
# patches PCK@0.1 alone caps a perfect matcher at 0.56).
N_BOOT, BOOT_SEED = 1000, 0  # bootstrap resamples for every standard error, and their fixed seed
LOWER_IS_BETTER = ("_rmse", "_absrel")  # metric-name endings where smaller is better
STANDS_FOR = {  # metric-name prefix -> the paper's benchmark the protocol stands in for
    "zs_": "ImageNet zero-shot", "ret_": "COCO retrieval", "lin_": "linear probing", "obj_": "linear probing",
    "depth_probe_": "NYUv2 depth probe", "seg_": "ADE20K segmentation",
    "corr_": "NAVI / SPair correspondence", "zsdepth_": "zero-shot depth (KITTI / NYU)",
    "ground_": "grounding", "in_": "ImageNet", "coco_": "COCO", "nyu_": "NYUv2", "ade_": "ADE20K",
    "spair_": "SPair-71k", "navi_": "NAVI", "kitti_": "KITTI", "patch_": "a diagnosis (neither direction is better)"}
KEY_METRICS = (  # Figure 1's columns, in its order, then the rest of ours
    "zs_color_acc", "zs_shape_acc", "zs_present_acc", "in_zs_acc", "ret_i2t_r1", "ret_i2t_r5", "coco_i2t_r1",
    "seg_miou", "seg_obj_miou", "seg_ml_miou", "seg_ml_obj_miou", "ade_miou", "corr_recall", "spair_pck", "navi_recall_2cm", "depth_probe_rmse",
    "depth_probe_obj_rmse", "depth_probe_ml_rmse", "depth_probe_ml_obj_rmse", "nyu_probe_rmse", "nyu_probe_ml_rmse",
    "zsdepth_absrel", "kitti_zsdepth_absrel",
    "ground_acc", "lin_shape_acc", "lin_count_acc", "obj_shape_acc", "obj_color_acc", "obj_shape_ml_acc",
    "obj_color_ml_acc", "obj_shape_knn_acc", "obj_shape_ml_knn_acc")


def fail(msg):
    """A user mistake: one sentence on stderr, exit code 2, no traceback."""
    print(f"evaluate.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def lower_is_better(name):
    return name.endswith(LOWER_IS_BETTER)


# -----------------------------------------------------------------------------------------------
# Metrics. Every metric is a function of totals summed over test items (scenes, queries): each
# item contributes a row of `parts`, a reducer turns the column sums into the number. That one
# shape gives every metric its bootstrap standard error (resample the rows) at no extra pass.


def ratio(t):
    """Reducer: first total over the second (accuracy, recall, mean relative error, ...)."""
    return t[..., 0] / t[..., 1]


def rmse_of(t):
    """Reducer of depth_parts: root of squared error over pixel count."""
    return (t[..., 0] / t[..., 2]).sqrt()


def absrel_of(t):
    """Reducer of depth_parts (and zero_shot_depth's parts): relative error over pixel count."""
    return t[..., 1] / t[..., 2]


def class_mean(t):
    """Reducer: parts (n, 2C) [hits per class | count per class] -> mean over the classes that have
    any count of hits / count (SPair: PCK per class, then the mean over classes)."""
    C = t.shape[-1] // 2
    return torch.where(t[..., C:] > 0, t[..., :C] / t[..., C:].clamp(min=1e-12), torch.nan).nanmean(-1)


def miou_of(t, classes=None):
    """Reducer of seg_parts: mean over classes (all, or those listed) of intersection / union over
    the whole set (as ADE20K); classes absent from both prediction and truth do not count."""
    C = t.shape[-1] // 2
    if classes is not None:
        t = torch.cat([t[..., list(classes)], t[..., [C + c for c in classes]]], -1)
    return class_mean(t)


def estimate(parts, reduce=ratio, n_boot=N_BOOT, seed=BOOT_SEED):
    """(value, standard error, n) of reduce(column sums of parts (n, k)). The error is the std of
    the metric over n_boot resamples of the rows with replacement, with a fixed seed so that the
    same parts always give the same error. It measures the test set's sampling noise, not the
    noise of fitting the probe or of training (that is what seeds are for)."""
    parts = parts.double()
    n = len(parts)
    value = reduce(parts.sum(0))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, n, dtype=torch.float64))  # how often each row is drawn
    boot = reduce(counts @ parts)
    boot = boot[torch.isfinite(boot)]
    return float(value), float(boot.std()) if len(boot) > 1 else 0.0, n


def paired_gain(parts, base, reduce=ratio, lower=False):
    """(gain, standard error) of a metric over a baseline scored on the same test items: parts and
    base (n, k) hold the same items' rows in the same order. gain = value - baseline, or baseline -
    value where lower is better, so positive is better. Each resample draws the same items for
    both (their rows side by side in one row), so what the two share, such as the scenes that are
    hard for both, cancels: the se is that of the difference, well below the two ses combined
    when their errors go together."""
    k = parts.shape[1]
    model, baseline = lambda t: reduce(t[..., :k]), lambda t: reduce(t[..., k:])
    better = (lambda t: baseline(t) - model(t)) if lower else (lambda t: model(t) - baseline(t))
    gain, se, _ = estimate(torch.cat([parts.double(), base.double()], 1), better)
    return gain, se


def hits(correct):
    """(n,) bool -> parts of an accuracy: (hit, 1) per item."""
    return torch.stack([correct.double(), torch.ones(len(correct), dtype=torch.float64)], 1)


def recall_hits(sim, positive, k):
    """sim (Q, G) query-gallery similarities, positive (Q, G) bool -> (Q,) whether a right answer
    is among the query's k most similar gallery items (COCO: 5 captions per image are right)."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Q, k)
    return positive.gather(1, top).any(1)


def recall_chance(positive, k):
    """Expected recall@k of a random ranking: a query with m right answers among G items misses
    them all with probability prod_j (G - m - j) / (G - j), j < k."""
    G = positive.shape[1]
    m = positive.sum(1, keepdim=True).double()
    j = torch.arange(min(k, G), dtype=torch.float64)
    return (1 - ((G - m - j).clamp(min=0) / (G - j)).prod(1)).mean().item()


def seg_parts(pred, target, n_classes):
    """Per image (n, 2C): each class's intersection, then its union, of pred and target (n, H, W);
    target -1 is ignored."""
    n = len(pred)
    keep = target >= 0
    img = torch.arange(n)[:, None, None].expand_as(target)[keep] * n_classes
    p, t = pred[keep].long(), target[keep].long()
    count = lambda idx: torch.bincount(idx, minlength=n * n_classes).view(n, n_classes).double()
    inter = count(img[p == t] + t[p == t])
    return torch.cat([inter, count(img + p) + count(img + t) - inter], 1)


def depth_parts(pred, D, cap, where=None):
    """Per image (n, 3): squared error, relative error and pixel count of metric depth pred against
    true depth D (n, H, W) over valid pixels (finite, > 0; and where, if given); D capped at cap."""
    keep = torch.isfinite(D) & (D > 0)
    if where is not None:
        keep &= where
    true = torch.where(keep, D.clamp(max=cap), 1.0)
    err = torch.where(keep, pred - true, 0.0).double()
    return torch.stack([err.square().sum((1, 2)), (err.abs() / true).sum((1, 2)), keep.sum((1, 2)).double()], 1)


def align_scale_shift(pred, target):
    """s * pred + t with (s, t) the least-squares fit to target, s >= 0: relative depth (MiDaS, Depth
    Anything) is only defined up to a positive scale and a shift, so it is aligned before scoring;
    an upside-down prediction gets s = 0 (the best non-negative scale) and scores as a flat map."""
    p, y = pred.double(), target.double()
    pc = p - p.mean()
    s = ((pc * (y - y.mean())).sum() / (pc * pc).sum().clamp(min=1e-12)).clamp(min=0)
    return (s * pc + y.mean()).to(pred.dtype)


# -----------------------------------------------------------------------------------------------
# Probes: fitted on cached frozen features, closed-form or full-batch L-BFGS from zeros, so the
# same features always give the same score. Features are standardised with training statistics.


def standardiser(X):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    return lambda Z: (Z - mu) / sd


def fit_ridge(X, Y, lam=RIDGE_LAMBDA):
    """Closed-form ridge regression X (n, D) -> Y (n, K); returns the predictor."""
    norm, y_mu = standardiser(X), Y.mean(0)
    Z = norm(X).double()
    W = torch.linalg.solve(Z.T @ Z / len(Z) + lam * torch.eye(Z.shape[1], dtype=Z.dtype),
                           Z.T @ (Y - y_mu).double() / len(Z))  # (D, K)
    return lambda X: (norm(X).double() @ W).float() + y_mu


def fit_logreg(X, Y, n_classes, wd=LOGREG_WD, steps=LBFGS_STEPS):
    """Multinomial logistic regression X (n, D) -> logits (n, C). Y: (n,) labels or (n, C) soft
    targets (the segmentation probe's class fractions per patch); returns the predictor."""
    norm = standardiser(X)
    Z = norm(X)
    Y = F.one_hot(Y, n_classes).float() if Y.dim() == 1 else Y
    W = torch.zeros(Z.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(Y * F.log_softmax(Z @ W + b, 1)).sum(1).mean() + wd * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
    return lambda X: norm(X) @ W + b


def linear_probe(Xtr, ytr, Xte, n_classes):
    """Predicted classes of logistic regression on frozen global embeddings (the paper's linear
    probing), fitted on (Xtr, ytr)."""
    return fit_logreg(Xtr, ytr, n_classes)(Xte).argmax(1)


def knn_probe(Xtr, ytr, Xte, n_classes, k=KNN_K, T=KNN_T):
    """Predicted classes of DINO's k-NN classifier: the k most cosine-similar training images
    vote with weight exp(sim / T)."""
    Xtr = F.normalize(Xtr, dim=1)
    preds = []
    for q in F.normalize(Xte, dim=1).split(1024):  # bounded memory on big validation sets
        s, i = (q @ Xtr.T).topk(min(k, len(Xtr)), dim=1)  # (q, k)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, ytr[i], (s / T).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def majority_chance(ytr, yte):
    """Accuracy of always answering the training set's most common class: a classifier's floor."""
    return (yte == torch.bincount(ytr).argmax()).float().mean().item()


def patch_log_depth(D, grid, cap):
    """(n, h, w) mean log depth of each patch's valid pixels (capped at cap) and (n, h, w) the
    valid share of each patch: the depth probe's regression target."""
    valid = torch.isfinite(D) & (D > 0)
    logd = torch.where(valid, D.clamp(max=cap).log(), 0.0)[:, None]  # (n, 1, H, W)
    frac = F.adaptive_avg_pool2d(valid[:, None].float(), grid)[:, 0]
    return F.adaptive_avg_pool2d(logd, grid)[:, 0] / frac.clamp(min=1e-6), frac


def depth_probe(Ptr, Dtr, Pte, Dte, cap):
    """Metric depth from frozen patch tokens, as DINOv2's linear NYUv2 protocol: every patch token
    (P: (n, h, w, W)) regresses the mean log depth of its pixels (ridge), the grid of predictions is
    upsampled bilinearly to the pixels of D (n, H, W). Invalid pixels (sky = inf, missing = 0) are
    left out of the targets; depth is capped at cap. Returns the predicted depth (n_te, H, W),
    scored by depth_parts."""
    h, w = Ptr.shape[1:3]
    y, frac = patch_log_depth(Dtr, (h, w), cap)
    keep = frac.flatten() > 0
    probe = fit_ridge(Ptr.flatten(0, 2)[keep], y.flatten()[keep, None])
    pred = rearrange(probe(Pte.flatten(0, 2)), "(n h w) 1 -> n 1 h w", h=h, w=w)
    return F.interpolate(pred, size=Dte.shape[1:], mode="bilinear")[:, 0].exp().clamp(max=cap)


def patch_class_fractions(L, grid, n_classes):
    """L (n, H, W) class per pixel (-1 ignored) -> (n*h*w, C) share of each class among the labelled
    pixels of each patch, and whether the patch has any; by bincount, never a one-hot image."""
    n, H, W = L.shape
    h, w = grid
    cell = (torch.arange(H) * h // H)[:, None] * w + torch.arange(W) * w // W  # (H, W) patch index
    idx = (torch.arange(n)[:, None, None] * h * w + cell) * n_classes + L  # (n, H, W)
    counts = torch.bincount(idx[L >= 0], minlength=n * h * w * n_classes).view(-1, n_classes).float()
    total = counts.sum(1)
    return counts / total.clamp(min=1)[:, None], total > 0


def seg_probe(Ptr, Ltr, Pte, Lte, n_classes):
    """A linear classifier on frozen patch tokens P (n, h, w, W), as DINOv2's linear ADE20K
    protocol: trained on each patch's class fractions, its logits upsampled bilinearly to the
    pixels of L (n, H, W); L = -1 is ignored. Returns the predicted classes (n_te, H, W)."""
    h, w = Ptr.shape[1:3]
    target, keep = patch_class_fractions(Ltr, (h, w), n_classes)
    probe = fit_logreg(Ptr.flatten(0, 2)[keep], target[keep], n_classes)
    preds = []
    for P in Pte.split(16):  # (16, C, H, W) logits at a time: ADE20K has 150 classes
        logits = rearrange(probe(P.flatten(0, 2)), "(n h w) c -> n c h w", h=h, w=w)
        preds.append(F.interpolate(logits, size=Lte.shape[1:], mode="bilinear").argmax(1))
    return torch.cat(preds)


def position_features(n, h, w):
    """(n, h, w, h*w) one-hot patch positions: a probe on these sees where a patch is and nothing of
    the image, so it scores what the camera alone predicts (the dense probes' chance level)."""
    return torch.eye(h * w).view(1, h, w, h * w).expand(n, -1, -1, -1)


def zero_shot_depth(pred_inv, D, cap, space="depth", per_image=False):
    """Per image (n, 3) parts [delta1 hits, relative error, pixel count] of relative inverse depth
    pred_inv (n, H, W) against true depth D, after a per-image least-squares scale and shift in
    inverse-depth space (the MiDaS / Depth Anything zero-shot protocol); invalid pixels are
    skipped, depth capped at cap. space "depth" scores the aligned map converted back to depth (as
    MiDaS); "disparity" scores it as disparity against 1 / depth (Depth Anything: "we evaluate in
    the disparity space, without converting it back", LiheYoung/Depth-Anything#174). per_image:
    each image's rates (count 1), so reducing averages over images instead of pooling pixels.
    Reduce with absrel_of or delta1_of."""
    rows = []
    for p, d in zip(pred_inv, D):
        keep = torch.isfinite(d) & (d > 0)
        true = d[keep].clamp(max=cap).double()
        aligned = align_scale_shift(p[keep].double(), 1 / true).clamp(min=1 / cap)
        pred, true = (1 / aligned, true) if space == "depth" else (aligned, 1 / true)
        row = torch.stack([(torch.maximum(pred / true, true / pred) < 1.25).sum().double(),
                           ((pred - true).abs() / true).sum(), torch.tensor(float(keep.sum()), dtype=torch.float64)])
        rows.append(row / row[2].clamp(min=1) if per_image else row)
    return torch.stack(rows)


def delta1_of(t):
    """Reducer of zero_shot_depth's parts: share of pixels within a factor 1.25 of the truth."""
    return t[..., 0] / t[..., 2]


# -----------------------------------------------------------------------------------------------
# Models and frozen features


def load_checkpoint(path, init=False, tower="student"):
    """(model, seed): a train.py checkpoint, or a SigLIP-format directory (config.json + weights),
    converted with only the vision-language task: it has no trained depth or grounding head. With
    init, the checkpoint's model as train.py built it before its first step (same config, seed).
    With tower="teacher" and a checkpoint that holds an ssl teacher, model.probe_vision is the
    teacher's image tower: extract() reads the image-only features from it, as DINO, iBOT and
    DINOv2 evaluate their EMA teacher (at init the teacher is the student: nothing to load)."""
    if os.path.isdir(path):
        if os.path.isfile(run_ckpt := os.path.join(path, "checkpoint.pt")):
            fail(f"{path} is a train.py run folder; give its checkpoint: {run_ckpt}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            fail(f"{path} is a directory without config.json; give a train.py checkpoint.pt or a "
                 "SigLIP model directory")
        if init:
            fail("--init needs a train.py checkpoint (it holds the seed the run started from)")
        try:
            return mtv.MTV.from_siglip(path), None
        except Exception as e:  # transformers raises many kinds on a directory that is no SigLIP model
            fail(f"{path} does not load as a SigLIP model ({type(e).__name__}: {e})")
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist; give a train.py checkpoint.pt or a SigLIP model directory")
    try:
        model = mtv.load_model(path)
    except Exception as e:  # torch.load raises many kinds on a file that is no checkpoint
        fail(f"cannot load {path} as an mtv checkpoint ({type(e).__name__}: {e})")
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no second copy in memory
    seed = (ckpt.get("train_config") or {}).get("seed")
    if init:
        if seed is None:
            fail(f"--init: {path} does not record the seed its run started from")
        if start := (ckpt.get("train_config") or {}).get("init_from"):
            fail(f"--init: {path} started from the weights of {start} (--init-from), not from its seed; "
                 "evaluate that checkpoint for the model it started from")
        model = mtv.MTV.initialised(model.cfg, model.tasks, seed)
    elif tower == "teacher" and ckpt.get("teacher") is not None:
        teacher = copy.deepcopy(model.vision)
        teacher.load_state_dict({k[len("vision."):]: v for k, v in ckpt["teacher"].items() if k.startswith("vision.")})
        model.probe_vision = teacher
    return model, seed


def trained_on(path):
    """The toy world a train.py checkpoint was trained on ("toy" for anything else)."""
    if not os.path.isfile(path):
        return "toy"
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return (ckpt.get("train_config") or {}).get("world", "toy")


def eval_folder(init, tower):
    """Where a run's results land by default: eval/, eval-teacher/ (--tower teacher), eval-init/."""
    return "eval-init" if init else "eval-teacher" if tower == "teacher" else "eval"


def tower_of(model):
    """Which image tower the image-only probes read: "teacher" or "student"."""
    return "teacher" if getattr(model, "probe_vision", None) is not None else "student"


def to_input(images, device):
    """uint8 images (B, H, W, 3) -> (B, 3, H, W) in -1..1: SigLIP's rescale with mean = std = 0.5."""
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


@torch.no_grad()
def extract(model, items, want, device, desc, load=None):
    """One frozen pass over items (uint8 images, or paths that load reads), kept on the CPU:
    "pooled" (n, W) global embedding, "patch" (n, h, w, W) final patch tokens, "taps" (n, h, w, 4W)
    the four blocks a DPT head reads (mtv.dpt_layers) through the final LayerNorm, side by side (as
    MTV.depth_taps; any model, with a depth head or without), "img" (n, D) normalised image
    embedding, "depth" (n, H, W) the depth head's relative inverse depth."""
    out = {k: [] for k in want}
    # With a teacher tower (load_checkpoint's tower="teacher") the image-only features come from it;
    # "img" and "depth" stay the student's: its text tower and depth head were trained with it.
    probe = getattr(model, "probe_vision", None)
    passes = [(model.vision, [k for k in want if probe is None or k in ("img", "depth")])]
    passes += [(probe, [k for k in want if k not in ("img", "depth")])] if probe is not None else []
    grid = lambda t, x: rearrange(t, "b (h w) d -> b h w d", h=x.shape[-2] // model.cfg.vision.patch_size)
    for i in tqdm(range(0, len(items), BATCH), desc=desc, leave=False, disable=desc is None):
        x = to_input([load(it) if load else it for it in items[i:i + BATCH]], device)
        for tower, keys in passes:
            if not keys:
                continue
            # the DPT head reads the same four blocks as "taps": one pass of the tower serves both
            taps = mtv.dpt_layers(model.cfg.vision) if {"taps", "depth"} & set(keys) else ()
            with mtv.autocast(device, PRECISION):
                vis = tower(x, layers=taps, pool=bool({"pooled", "img"} & set(keys)))
                tapped = [tower.norm(t) for t in vis["layers"]]  # = MTV.depth_taps, by this tower's norm
                got = {"patch": lambda: grid(vis["patch"], x), "taps": lambda: grid(torch.cat(tapped, -1), x),
                       "pooled": lambda: vis["pooled"], "img": lambda: F.normalize(vis["pooled"], dim=-1),  # = encode_image
                       "depth": lambda: model.depth_head(tapped, model._grid(x), x.shape[-2:])}  # = predict_depth
                for k in keys:
                    out[k].append(got[k]().float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def embed_text(model, texts, device):
    """(n, D) normalised text embeddings of captions or prompts (the caption context), 256 per pass."""
    with mtv.autocast(device, PRECISION):
        return torch.cat([model.encode_text(model.tokenize(list(texts[i:i + 256])).to(device)).float().cpu()
                          for i in range(0, len(texts), 256)])


@torch.no_grad()
def embed_names(model, names, device):
    """(n, D) normalised text embeddings of entity names, tokenized exactly as training tokenizes
    them (data.tokenize_names: the tokenizer's name_length positions, not the caption context)."""
    with mtv.autocast(device, PRECISION):
        return model.encode_text(data.tokenize_names(model.tokenize, names).to(device)).float().cpu()


def embed_classes(model, names, device, templates):
    """(C, D): each class is the mean of its prompts' embeddings, renormalised (CLIP's ensembling)."""
    e = embed_text(model, [t.format(n) for n in names for t in templates], device)
    return F.normalize(e.view(len(names), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def embed_boxes(model, images, boxes, device):
    """Region embeddings of every image's boxes: images uint8, boxes list of (M_i, 4) in 0..1 ->
    list of (M_i, D). Batches are padded with whole-image boxes that are then dropped."""
    out = []
    for i in tqdm(range(0, len(images), BATCH), desc="regions", leave=False):
        chunk = boxes[i:i + BATCH]
        padded = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(len(chunk), max(map(len, chunk)), 1)  # (B, M, 4)
        for j, b in enumerate(chunk):
            padded[j, :len(b)] = b
        with mtv.autocast(device, PRECISION):
            emb = model.embed_regions(to_input(images[i:i + BATCH], device), padded.to(device)).float().cpu()
        out += [e[:len(b)] for e, b in zip(emb, chunk)]
    return out


# -----------------------------------------------------------------------------------------------
# Protocols that read the toy world's exact truth (geometry, boxes)


def second_view(image, rng):
    """The image seen again after a known crop (50-90 % of the side), rescale and maybe a mirror.
    NAVI and SPair pair two photos of one object whose matches were annotated by hand; here the
    warp is known, so every pixel's true match is too. Returns (view, (x0, y0, side, flipped))."""
    S = image.shape[0]
    c = int(rng.uniform(0.5, 0.9) * S)
    x0, y0 = (int(v) for v in rng.integers(0, S - c + 1, size=2))
    flip = bool(rng.random() < 0.5)
    view = np.asarray(Image.fromarray(image[y0:y0 + c, x0:x0 + c]).resize((S, S), Image.BICUBIC))
    return np.ascontiguousarray(view[:, ::-1] if flip else view), (x0, y0, c, flip)


def corr_threshold(size, patch):
    """Pixels within which a match counts: PCK@0.1 of the image side, or one patch side if more."""
    return max(PCK * size, patch)


def match_geometry(warps, seg, size, grid):
    """Where each patch centre of view B came from in view A. Returns centres (N, 2) of the patch
    grid in pixels (x, y), true (n, N, 2) the source points in A, and on_object (n, N): whether
    that point shows an object in A (seg (n, S, S) instance ids; only those are scored)."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = (torch.stack([cols, rows], -1).flatten(0, 1) + 0.5) * size / w  # (N, 2)
    true = torch.stack([torch.stack([x0 + (size - centres[:, 0] if flip else centres[:, 0]) * c / size,
                                     y0 + centres[:, 1] * c / size], -1)
                        for x0, y0, c, flip in warps])  # (n, N, 2)
    on_object = seg[torch.arange(len(warps))[:, None], true[..., 1].long(), true[..., 0].long()] >= 2
    return centres, true, on_object


def correspondence(Pa, Pb, warps, seg, size, patch):
    """Every patch of view B that shows an object finds its nearest neighbour (cosine) among view
    A's patches (Pa, Pb: (n, h, w, W)) as SPair's keypoints do (nearest_patch, from B's patch
    centres); it is right if that patch's centre lies within
    corr_threshold pixels of the point the B patch's centre came from. Returns per image (n, 2)
    parts [right, scored] for the model, for chance (a uniformly random patch of A: the share of
    A's centres within the threshold) and for the ceiling (the A patch nearest the true point,
    what perfect patch features pick), as a dict."""
    centres, true, on_object = match_geometry(warps, seg, size, Pa.shape[1:3])
    thr = corr_threshold(size, patch)
    picked = torch.stack([nearest_patch(b, a, centres / size) for a, b in zip(Pa, Pb)])  # (n, N) A patch per B patch
    dist = (true[:, :, None] - centres).norm(dim=-1)  # (n, N, N): B patch -> every A centre
    right = {"model": dist.gather(2, picked[..., None])[..., 0] <= thr,
             "chance": (dist <= thr).double().mean(2), "ceiling": dist.min(2).values <= thr}
    scored = on_object.double()
    return {k: torch.stack([(v.double() * scored).sum(1), scored.sum(1)], 1) for k, v in right.items()}


def nearest_patch(Fa, Fb, points):
    """Probe3D's correspondence on one pair: the source features at each source point (bilinear on
    the L2-normalised grid) are compared by cosine with every target patch. Fa, Fb (h, w, W) patch
    features of the two square images, points (K, 2) x, y in 0..1 of the image side -> (K,) the
    row-major index of the best target patch. The toy twin and SPair both match this way."""
    grid = (points.float() * 2 - 1)[None, None]  # (1, 1, K, 2) in -1..1, patch centres at (i + 0.5) / w
    src = F.grid_sample(F.normalize(Fa.float(), dim=-1).permute(2, 0, 1)[None], grid, mode="bilinear",
                        align_corners=False, padding_mode="border")[0, :, 0].T  # (K, W)
    return (src @ F.normalize(Fb.float(), dim=-1).flatten(0, 1).T).argmax(1)


def keypoint_transfer(Fa, Fb, points):
    """SPair's keypoint transfer: nearest_patch's best target patch, its centre as the predicted
    point -> (K, 2) in 0..1. Probe3D samples with align_corners=True and predicts the patch's
    corner (index / w), a shift of up to one patch; here both use patch centres, so an image
    matched with itself puts every point at a patch centre back in place."""
    h, w = Fb.shape[:2]
    best = nearest_patch(Fa, Fb, points)
    return torch.stack([best % w, best // w], 1).double().add(0.5) / torch.tensor([w, h], dtype=torch.float64)


def pck_parts(pred, truth, scale, n_classes, cls, h, w):
    """SPair's PCK@0.1 of one pair as class parts (2C,): a transferred point is right within
    PCK x scale of the truth (scale: the target box's longer side over the padded image side, so
    the threshold is 10 % of the box). Returns the model's, chance's (a uniformly random target
    patch) and the ceiling's (the patch centre nearest the truth: perfect features) parts."""
    centres = torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                         indexing="xy"), -1).reshape(-1, 2).double()  # (h*w, 2) x, y
    to_all = (truth[:, None] - centres[None]).norm(dim=-1) / scale  # (K, h*w)
    right = {"model": ((pred - truth).norm(dim=-1) / scale < PCK).double(),
             "chance": (to_all < PCK).double().mean(1), "ceiling": (to_all.min(1).values < PCK).double()}
    out = {}
    for k, v in right.items():
        row = torch.zeros(2 * n_classes, dtype=torch.float64)
        row[cls], row[n_classes + cls] = v.sum(), len(v)
        out[k] = row
    return out


def grounding(regions, names, vocab_emb, vocab):
    """regions: per image (M_i, D) embeddings of its true boxes; names: per image the boxes' names;
    vocab_emb (V, D) text embeddings of vocab, every name in the set. Entity -> region: each name
    picks one of its image's boxes (counted where the image holds a box of another name, else any
    pick is right); region -> name: each box picks one name of the whole vocabulary. Returns per
    image (n, 2) parts [right, counted] of "acc", "name_acc" and "acc_chance" (a random box)."""
    index = {n: i for i, n in enumerate(vocab)}
    out = {"acc": [], "name_acc": [], "acc_chance": []}
    for R, nm in zip(regions, names):
        ids = torch.tensor([index[n] for n in nm])  # (M,)
        pick = (vocab_emb[ids] @ R.T).argmax(1)  # (M,) the box each name chooses
        counted = (ids[None] != ids[:, None]).any(1)
        out["acc"].append([float((ids[pick] == ids)[counted].sum()), float(counted.sum())])
        out["acc_chance"].append([float(counted.sum()) / len(ids), float(counted.sum())])
        out["name_acc"].append([float(((R @ vocab_emb.T).argmax(1) == ids).sum()), float(len(ids))])
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def zero_shot(img, class_emb, scenes):
    """The toy twin of one-label ImageNet zero-shot. img (n, D) image embeddings, class_emb (32, D)
    prompt embeddings of every "colour shape" name (data.SHAPES-major, as toy_names). Single-object
    scenes score the colour and the shape of the best prompt (ceiling 1); scenes with 2-4 objects
    count the best prompt right when it names any object present (ceiling 1). Returns parts
    (hits) per metric and each metric's chance."""
    pred = (img @ class_emb.T).argmax(1)
    present = [{data.SHAPES.index(o["shape"]) * len(data.COLORS) + data.COLORS.index(o["color"])
                for o in s["objects"]} for s in scenes]
    single = torch.tensor([len(p) == 1 for p in present])
    truth = torch.tensor([min(p) for p in present])  # the single object's name (any one elsewhere)
    ok = torch.tensor([int(k) in p for k, p in zip(pred, present)])
    C = len(data.COLORS)
    parts = {"zs_color_acc": hits((pred % C == truth % C)[single]),
             "zs_shape_acc": hits((pred // C == truth // C)[single]),
             "zs_present_acc": hits(ok[~single])}
    many = [len(p) for p, s in zip(present, single) if not s]  # none in the shapes world
    chance = {"zs_color_acc": 1 / C, "zs_shape_acc": 1 / len(data.SHAPES),
              "zs_present_acc": sum(many) / len(many) / len(class_emb) if many else None}
    return parts, chance


def toy_names():
    """Every entity name of the toy world, shape-major: "red cube", "orange cube", ..."""
    return [f"{c} {s}" for s in data.SHAPES for c in data.COLORS]


# -----------------------------------------------------------------------------------------------
# The toy-world suite


def render_toy(n, size, world="toy"):
    """The default val set: n scenes of a stream no training run draws from, at the model's size, of
    the world the model was trained on (data.WORLDS)."""
    return [data.render_scene(TOY_SEED, i, size, world=world)
            for i in tqdm(range(n), desc="render toy scenes", leave=False)]


def load_toy_shards(pattern, n, size):
    """The first n scenes of toy shards (data.py writes the truth as gt_depth.npy, gt.json,
    gt_seg.png), as render_scene dicts; other sizes are resized (nearest for depth and ids)."""
    shards = sorted(glob.glob(pattern))
    if not shards:
        fail(f"--data {pattern!r} matches no files; give a glob of toy val shards, e.g. 'toy/val-*.tar'")
    scenes = []
    for shard in shards:
        for key, members in data.iter_tar(shard):
            try:
                s = data.decode_sample(key, members)
            except data.BadSample as e:
                fail(f"--data: sample {key} of {shard} is unusable ({e})")
            if not {"gt_depth", "gt", "gt_seg"} <= set(s):
                fail(f"--data: sample {key} of {shard} lacks the truth members gt_depth.npy, gt.json, "
                     "gt_seg.png; evaluate on toy shards written by data.py")
            image, depth, seg = s["image"], s["gt_depth"], s["gt_seg"]
            if image.shape[0] != size or image.shape[1] != size:
                image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
                depth = resize_nearest(depth, size).numpy()
                seg = resize_nearest(seg, size).numpy().astype(np.uint8)
            scenes.append({"image": image, "depth": depth, "seg": seg, "objects": s["gt"]["objects"],
                           "caption": s["caption"], "count": s["gt"]["count"]})
            if len(scenes) == n:
                return scenes
    if len(scenes) < 6:
        fail(f"--data {pattern!r} holds {len(scenes)} scenes; the probes need at least 6")
    return scenes


class Scores:
    """Metrics as they are measured: value, standard error, item count, chance and ceiling; and for
    the probes read against a baseline on the same test items, the gain over it with its own se."""

    def __init__(self):
        self.rows = {}

    def add(self, name, parts, reduce=ratio, chance=None, ceiling=None, paired=False):
        """paired: chance holds the parts of a baseline on the same test items, row for row (the
        position-only probe), so the row also gets its gain over it (paired_gain); else None."""
        if len(parts) == 0:  # no test item of its kind (a tiny --n: e.g. no single-object scene)
            return
        value, se, n = estimate(parts, reduce)
        as_float = lambda v: None if v is None else float(v if not torch.is_tensor(v) else reduce(v.sum(0)))
        gain, gain_se = paired_gain(parts, chance, reduce, lower_is_better(name)) if paired else (None, None)
        self.rows[name] = {"value": value, "se": se, "n": n, "chance": as_float(chance),
                           "ceiling": as_float(ceiling), "gain": gain, "gain_se": gain_se}


# The dense and object probes read two sets of patch features: (metric-name infix, extract key).
# The last layer alone, as the paper's probes; and the four DPT taps side by side, because a
# model's depth or layout may live in the middle blocks that a dense head reads, not in the last.
LAYERS = (("", "patch"), ("ml_", "taps"))


def probe_split(n):
    """The first 2/3 of the scenes train the probes, the rest test them."""
    return 2 * n // 3


def stacked(scenes, key):
    """(n, S, S) tensor of one per-pixel truth of every scene: "depth" (sky = inf) or "seg" (ids)."""
    return torch.from_numpy(np.stack([s[key] for s in scenes]))


def toy_suite(model, scenes, device, skip):
    """Every toy-world protocol on scenes (render_scene dicts at the model's input size) -> Scores.
    One frozen pass extracts what every protocol reads (the second views of correspondence and
    the grounding boxes need passes of their own)."""
    has_text = hasattr(model, "text")  # built for clip or ground
    want = ("pooled", "patch", "taps") + ("img",) * has_text + ("depth",) * ("depth" in model.tasks)
    a = extract(model, [s["image"] for s in scenes], want, device, "toy features")
    layers = {infix: a[key] for infix, key in LAYERS}
    m = Scores()
    if has_text:
        toy_text(m, model, a["img"], scenes, device)
    else:
        skip("zero-shot classification and retrieval: the model has no text tower")
    toy_global_probes(m, a["pooled"], scenes)
    toy_object_probes(m, layers, scenes)
    toy_dense_probes(m, layers, scenes)
    toy_correspondence(m, model, a["patch"], scenes, device)
    toy_token_spread(m, a["patch"])
    if "depth" in model.tasks:
        toy_zero_shot_depth(m, a["depth"], scenes)
    else:
        skip("zero-shot depth: the model has no depth head")
    if "ground" in model.tasks:
        toy_grounding(m, model, scenes, device)
    else:
        skip("grounding: the model has no grounding head")
    return m


def toy_text(m, model, img, scenes, device):
    """[<-> ImageNet zero-shot] the prompt "a photo of a red cube." that fits the image best, and
    [<-> COCO retrieval] each scene's caption among all captions and back; img (n, D) the
    normalised image embeddings."""
    names = toy_names()
    parts, chance = zero_shot(img, embed_classes(model, names, device, TOY_TEMPLATES), scenes)
    for k, p in parts.items():
        m.add(k, p, chance=chance[k], ceiling=1.0)
    # The toy world repeats some captions word for word, and a repeat counts as the right one.
    captions = [s["caption"] for s in scenes]
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = cid[:, None] == cid[None]  # (n, n)
    sim = img @ embed_text(model, captions, device).T  # (images, captions)
    for way, scores in (("i2t", sim), ("t2i", sim.T)):
        for k in (1, 5):
            m.add(f"ret_{way}_r{k}", hits(recall_hits(scores, same, k)), chance=recall_chance(same, k), ceiling=1.0)


def toy_global_probes(m, pooled, scenes):
    """[<-> linear probing] how many objects, and the largest one's shape, from the global
    embedding pooled (n, W)."""
    tr = probe_split(len(scenes))
    largest = [max(s["objects"], key=lambda o: o["area"]) for s in scenes]
    shape = torch.tensor([data.SHAPES.index(o["shape"]) for o in largest])
    count = torch.tensor([s["count"] for s in scenes])
    for key, y in (("lin_count_acc", count), ("lin_shape_acc", shape)):
        pred = linear_probe(pooled[:tr], y[:tr], pooled[tr:], int(y.max()) + 1)
        m.add(key, hits(pred == y[tr:]), chance=majority_chance(y[:tr], y[tr:]), ceiling=1.0)


def object_tokens(P, seg):
    """Each visible object's own feature: the mean of the patch tokens P (n, h, w, W) weighted by
    the share of the object's visible pixels (seg (n, H, W) == 2 + i for object i) in each patch;
    the image is a whole number of patches, so a patch's share of the object is its fraction of
    object pixels over the sum of those fractions. Returns the features (m, W) and the image and
    object index (m,) of every object with a visible pixel, image-major; hidden objects are left
    out (no pixel to pool)."""
    n, h, w, _ = P.shape
    K = int(seg.max()) + 1
    frac = patch_class_fractions(seg.long(), (h, w), K)[0].view(n, h * w, K)[..., 2:]  # (n, hw, objects)
    total = frac.sum(1)  # (n, objects): 0 for an object with no visible pixel (or none at that index)
    weights = frac / total.clamp(min=1e-12)[:, None]  # each object's weights sum to 1 over the patches
    pooled = torch.bmm(weights.transpose(1, 2), P.flatten(1, 2).float())  # (n, objects, W)
    img, obj = (total > 0).nonzero(as_tuple=True)
    return pooled[img, obj], img, obj


def toy_object_probes(m, layers, scenes):
    """[<-> linear probing] each object's shape and colour by logistic regression on its own
    tokens (object_tokens), from each feature set of layers {infix: (n, h, w, W)}: whether the
    patch tokens say what is where, which the pooled embedding's probes (lin_*) cannot tell. The
    shape is also read by DINO's weighted k-NN (obj_shape_*knn_acc), which needs no linear
    boundary: a linear probe of the untrained model already reads shape near the world's own
    linear read-out of the true silhouette (tests/test_world.py).
    Trained on the objects of the probe-training scenes; scored per test scene (its objects share
    a camera and a light, so the scene is the item the bootstrap resamples)."""
    tr, seg = probe_split(len(scenes)), stacked(scenes, "seg")
    for infix, P in layers.items():
        X, img, obj = object_tokens(P, seg)
        objects = [scenes[i]["objects"][j] for i, j in zip(img.tolist(), obj.tolist())]
        train, test = img < tr, img >= tr
        for attr, values in (("shape", data.SHAPES), ("color", data.COLORS)):
            y = torch.tensor([values.index(o[attr]) for o in objects])
            probes = {"": linear_probe} | ({"knn_": knn_probe} if attr == "shape" else {})
            for kind, probe in probes.items():
                right = hits(probe(X[train], y[train], X[test], len(values)) == y[test])  # per object
                per_scene = torch.zeros(len(scenes) - tr, 2, dtype=torch.float64).index_add_(0, img[test] - tr, right)
                m.add(f"obj_{attr}_{infix}{kind}acc", per_scene, chance=majority_chance(y[train], y[test]), ceiling=1.0)


def with_position(P, tr):
    """(n, h, w, W' + h*w): patch features P (n, h, w, W) beside each patch's position one-hot, the
    input of the toy world's dense probes. In the toy world a patch's position alone predicts much
    of its depth, so a probe on the features alone mostly measures how much of the position
    embedding survives to the last layer; with the position given, it scores what the features
    add, read against the probe on the position alone. Feature columns constant over the
    training scenes carry nothing and are dropped, so that features with nothing beyond position
    give exactly the position-only probe (gain 0, not rounding noise)."""
    varies = (P[:tr] != P[:1, :1, :1]).flatten(0, 2).any(0)  # (W,)
    return torch.cat([P[..., varies], position_features(*P.shape[:3])], -1)


def toy_dense_probes(m, layers, scenes):
    """[<-> NYUv2 depth probe] metric depth (capped at TOY_CAP, the sky left out) and [<-> ADE20K]
    semantic classes per pixel (sky, the room, each object's shape; mIoU over all classes and over
    the four object shapes: the scene, not the camera), from each feature set of layers
    {infix: (n, h, w, W)} beside the patch position (with_position). Chance: the same probes on the
    position alone, and each row's gain over them with a paired se; ceiling: on each patch's truth
    (mean log depth, class fractions), what the patch grid and the bilinear upsampling allow."""
    n, tr = len(scenes), probe_split(len(scenes))
    depth, seg = stacked(scenes, "depth"), stacked(scenes, "seg").long()
    C = 2 + len(data.SHAPES)
    lut = [torch.tensor([0, 1] + [2 + data.SHAPES.index(o["shape"]) for o in s["objects"]]) for s in scenes]
    labels = torch.stack([t[g] for t, g in zip(lut, seg)])  # (n, S, S)
    h, w = next(iter(layers.values())).shape[1:3]
    logd, frac = patch_log_depth(depth, (h, w), TOY_CAP)
    Dte, Lte, obj = depth[tr:], labels[tr:], seg[tr:] >= 2

    def score(X_depth, X_seg):
        """Parts of the depth probe (all pixels, object pixels) and of the segmentation probe."""
        d = depth_probe(X_depth[:tr], depth[:tr], X_depth[tr:], Dte, TOY_CAP)
        s = seg_probe(X_seg[:tr], labels[:tr], X_seg[tr:], Lte, C)
        return {"": depth_parts(d, Dte, TOY_CAP), "obj_": depth_parts(d, Dte, TOY_CAP, obj),
                "seg": seg_parts(s, Lte, C)}

    pos = position_features(n, h, w)
    chance = score(pos, pos)
    ceiling = score(torch.where(frac > 0, logd, math.log(TOY_CAP))[..., None],  # all-sky patches: far
                    patch_class_fractions(labels, (h, w), C)[0].view(n, h, w, C))
    got = {}
    for infix, P in layers.items():
        X = with_position(P, tr)
        got[infix] = score(X, X)
    for infix in got:
        for sub in ("", "obj_"):
            for metric, reduce in (("rmse", rmse_of), ("absrel", absrel_of)):
                m.add(f"depth_probe_{infix}{sub}{metric}", got[infix][sub], reduce, chance=chance[sub],
                      ceiling=ceiling[sub], paired=True)
    for infix in got:
        for sub, classes in (("", None), ("obj_", range(2, C))):
            reduce = lambda t, classes=classes: miou_of(t, classes)
            m.add(f"seg_{infix}{sub}miou", got[infix]["seg"], reduce, chance=chance["seg"],
                  ceiling=ceiling["seg"], paired=True)


def toy_correspondence(m, model, P, scenes, device):
    """[<-> NAVI / SPair] dense matches between each scene (patch tokens P) and a known crop + flip
    of it."""
    S, patch = model.cfg.vision.image_size, model.cfg.vision.patch_size
    views, warps = zip(*(second_view(s["image"], np.random.default_rng([CORR_SEED, i])) for i, s in enumerate(scenes)))
    b = extract(model, list(views), ("patch",), device, "toy second views")
    c = correspondence(P, b["patch"], warps, stacked(scenes, "seg").long(), S, patch)
    m.add("corr_recall", c["model"], chance=c["chance"], ceiling=c["ceiling"])


def toy_token_spread(m, P):
    """A diagnosis, not a score: the share of the final patch tokens' variance (n, h, w, W) that
    is shared by all patches of an image (between-image over total sum of squares). Near 1, every
    patch mostly says what the whole image is, and an object's tokens have little of their own
    for the object probes to read."""
    X = P.flatten(1, 2).double()  # (n, N, W)
    centred = X - X.mean((0, 1))
    between = centred.mean(1).pow(2).sum(1) * X.shape[1]  # (n,) each image's share of the between SS
    m.add("patch_image_share", torch.stack([between, centred.pow(2).sum((1, 2))], 1))


def toy_zero_shot_depth(m, pred, scenes):
    """[<-> KITTI / NYU zero-shot depth] the depth head's output pred (n, S, S), aligned per image.
    Chance: the mean inverse-depth map of the set for every image (where things usually are);
    ceiling: the true inverse depth."""
    depth = stacked(scenes, "depth")
    inv = 1 / depth.clamp(max=TOY_CAP)  # as scored: depth capped, the sky (never scored) at the cap
    prior = inv.mean(0, keepdim=True).expand_as(inv)
    z = {k: zero_shot_depth(v, depth, TOY_CAP) for k, v in (("model", pred), ("chance", prior), ("ceiling", inv))}
    for key, reduce in (("zsdepth_absrel", absrel_of), ("zsdepth_delta1", delta1_of)):
        m.add(key, z["model"], reduce, chance=z["chance"], ceiling=z["ceiling"])


def toy_grounding(m, model, scenes, device):
    """Grounding: region embeddings of the true boxes against the entity names' text embeddings,
    names tokenized as in training."""
    names = toy_names()
    boxes = [torch.tensor([o["box"] for o in s["objects"]], dtype=torch.float32) for s in scenes]
    box_names = [[o["name"] for o in s["objects"]] for s in scenes]
    regions = embed_boxes(model, [s["image"] for s in scenes], boxes, device)
    g = grounding(regions, box_names, embed_names(model, names, device), names)
    m.add("ground_acc", g["acc"], chance=g["acc_chance"], ceiling=1.0)
    m.add("ground_name_acc", g["name_acc"], chance=1 / len(names), ceiling=1.0)


# -----------------------------------------------------------------------------------------------
# Real benchmarks, read in their distributed layouts by data.py's readers (see the module docstring)


def resize_nearest(label, size):
    """(H, W) class map or depth map -> (size, size) float tensor, nearest neighbour (no mixing)."""
    t = torch.from_numpy(np.asarray(label, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0]


def clip_imagenet_metadata():
    """(CLIP's curated names of the 1,000 ImageNet classes in class-index order, its 80 prompt
    templates + the bare name): the prompts open_clip and CLIP_benchmark score ImageNet zero-shot
    with (big_vision adds the bare name). The class names alone move a CLIP B/16 by ~4 points
    against WordNet lemmas (openai/CLIP#246). open_clip ships both lists."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    except ImportError:
        fail("--imagenet needs open_clip_torch for CLIP's ImageNet class names and 80 prompt templates: "
             "pip install -e '.[experts]'")
    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + ["{}"]
    return list(IMAGENET_CLASSNAMES), templates


def imagenet_class_names(root, folders, names_file=None):
    """Names for ImageNet class folders, in order; never a WordNet id. From --class-names ('FOLDER
    name, synonym, ...' per line, as LOC_synset_mapping.txt), else for WordNet-id folders CLIP's
    curated names (ILSVRC2012 orders its 1,000 classes by sorted WordNet id), else the folder names
    with _ as spaces."""
    if names_file:
        if not os.path.isfile(names_file):
            fail(f"--class-names {names_file} does not exist")
        mapping = data.read_synset_mapping(names_file)
        if missing := [c for c in folders if c not in mapping]:
            fail(f"--class-names {names_file} has no name for class folder {missing[0]} ({len(missing)} missing)")
        return [mapping[c].replace("_", " ") for c in folders]
    if not any(data.WNID.fullmatch(c) for c in folders):
        return [c.replace("_", " ") for c in folders]
    names, _ = clip_imagenet_metadata()  # fails in one line without open_clip (and so without timm)
    from timm.data import ImageNetInfo  # open_clip depends on timm: its list of the 1,000 ids in order
    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    if unknown := [c for c in folders if c not in index]:
        fail(f"--imagenet {root}: class folder {unknown[0]} is not one of ILSVRC2012's 1,000 classes; "
             "give --class-names FILE ('FOLDER name' per line)")
    return [names[index[c]] for c in folders]


def imagenet_suite(model, root, device, skip, opts, listing=None):
    """[ImageNet] zero-shot on val/ with CLIP's class names and 80 templates (lower-cased for a
    SigLIP tokenizer, as its captions were); with train/ also logistic regression and k-NN."""
    classes, sets = listing or data.read_imagenet(root)
    S, m = model.cfg.vision.image_size, Scores()
    feats, labels = {}, {}
    for split, items in sets.items():
        want = ("pooled", "img") if split == "val" and hasattr(model, "text") else ("pooled",)
        feats[split] = extract(model, [f for f, _ in items], want, device, f"imagenet {split}",
                               lambda f: data.load_image(f, S))
        labels[split] = torch.tensor([k for _, k in items])
    yva = labels["val"]
    if hasattr(model, "text"):
        names = imagenet_class_names(root, classes, opts.class_names)
        templates = clip_imagenet_metadata()[1]
        if model.cfg.text.tokenizer not in ("byte", "words"):  # a SigLIP SentencePiece tokenizer: lower-cased text
            names, templates = [n.lower() for n in names], [t.lower() for t in templates]
        text = embed_classes(model, names, device, templates)
        m.add("in_zs_acc", hits((feats["val"]["img"] @ text.T).argmax(1) == yva), chance=1 / len(classes),
              ceiling=1.0)
    else:
        skip("ImageNet zero-shot: the model has no text tower")
    if "train" in feats:
        tr, va, ytr = feats["train"]["pooled"], feats["val"]["pooled"], labels["train"]
        chance = majority_chance(ytr, yva)
        m.add("in_lin_acc", hits(linear_probe(tr, ytr, va, len(classes)) == yva), chance=chance, ceiling=1.0)
        m.add("in_knn_acc", hits(knn_probe(tr, ytr, va, len(classes)) == yva), chance=chance, ceiling=1.0)
    else:
        skip("ImageNet linear and k-NN probes: no train/ folder")
    return m


def coco_suite(model, root, device, skip, opts, listing=None):
    """[COCO retrieval] Karpathy's 5k test images against all their captions (5 or more each), both
    ways, recall at 1, 5, 10 (as open_clip and CLIP_benchmark score it)."""
    m = Scores()
    if not hasattr(model, "text"):
        skip("COCO retrieval: the model has no text tower")
        return m
    files, captions, owner = listing or data.read_coco_karpathy(root)
    S = model.cfg.vision.image_size
    img = extract(model, files, ("img",), device, "coco images", lambda f: data.load_image(f, S))["img"]
    sim = img @ embed_text(model, captions, device).T  # (images, captions)
    right = torch.arange(len(files))[:, None] == torch.tensor(owner)[None]  # (images, captions)
    for way, scores, r in (("i2t", sim, right), ("t2i", sim.T, right.T)):
        for k in (1, 5, 10):
            m.add(f"coco_{way}_r{k}", hits(recall_hits(scores, r, k)), chance=recall_chance(r, k), ceiling=1.0)
    return m


def spair_suite(model, root, device, skip, opts, listing=None):
    """[SPair-71k] Probe3D's protocol on the test pairs: each image padded to a square (white, bottom
    and right) and resized to the model's input, final-layer patch features, every source keypoint
    transferred to the target by nearest neighbour (keypoint_transfer), PCK@0.1 of the target
    box's longer side, per class, then the mean over classes."""
    pairs = listing or data.read_spair(root)
    S, m = model.cfg.vision.image_size, Scores()
    files = sorted({p[k] for p in pairs for k in ("src", "trg")})
    load = lambda f: np.asarray(Image.fromarray(data.pad_square(data.load_image(f))).resize((S, S), Image.BICUBIC))
    P = extract(model, files, ("patch",), device, "spair images", load)["patch"]
    row, classes = {f: i for i, f in enumerate(files)}, sorted({p["category"] for p in pairs})
    parts = {"model": [], "chance": [], "ceiling": []}
    for p in pairs:
        src, trg = torch.from_numpy(p["src_kps"]) / p["src_side"], torch.from_numpy(p["trg_kps"]) / p["trg_side"]
        x0, y0, x1, y1 = p["trg_box"]
        pred = keypoint_transfer(P[row[p["src"]]], P[row[p["trg"]]], src)
        got = pck_parts(pred, trg, max(x1 - x0, y1 - y0) / p["trg_side"], len(classes),
                        classes.index(p["category"]), *P.shape[1:3])
        for k, v in got.items():
            parts[k].append(v)
    parts = {k: torch.stack(v) for k, v in parts.items()}
    m.add("spair_pck", parts["model"], class_mean, chance=parts["chance"], ceiling=parts["ceiling"])
    return m



NAVI_SIDE = 512  # Probe3D's frame: the shorter side resized to 512 (nearest), centre-cropped square
NAVI_GRID = 128  # matching grid: a quarter of the frame (Probe3D's scale_factor 0.25)
NAVI_MATCHES = 1000  # the most distinctive matches kept per pair (Probe3D's num_corr)
NAVI_CM = (1, 2, 5)  # recall thresholds, centimetres


def navi_view(photo, size):
    """One NAVI photo as Probe3D prepares it: shorter side to NAVI_SIDE and centre crop (nearest),
    NAVI's 16-bit depth decoded to metres, every pixel lifted to its camera-frame point (the
    principal point at the centre), then the object's square box (Probe3D's bbox_crop: the longer
    side of the box of pixels with depth, centred, shifted into the frame where it would leave it).
    -> (uint8 (size, size, 3) image for the model, (NAVI_GRID, NAVI_GRID, 3) points in metres, z = 0
    where there is no depth)."""
    with Image.open(photo["image"]) as im:  # upright as the annotations are (Probe3D's resize script transposes too)
        rgb = torch.from_numpy(np.array(ImageOps.exif_transpose(im).convert("RGB")))
    raw = torch.from_numpy(data.read_png(photo["depth"]).astype(np.float32))
    if raw.shape != rgb.shape[:2]:
        raise data.BenchmarkError(f"--navi: {photo['depth']} is {tuple(raw.shape)}, its photo {tuple(rgb.shape[:2])}")
    h, w = rgb.shape[:2]
    short = (NAVI_SIDE, int(NAVI_SIDE * w / h)) if h <= w else (int(NAVI_SIDE * h / w), NAVI_SIDE)  # torchvision's Resize
    frame = lambda t: centre_square(F.interpolate(t.permute(2, 0, 1)[None].float(), size=short, mode="nearest")[0].permute(1, 2, 0))
    rgb, raw = frame(rgb), frame(raw[..., None])[..., 0]
    depth = torch.where(raw > 0, 655.35 / raw.clamp(min=1), 0)  # Probe3D's read_depth: 65535 * 10 / value mm
    if not (depth > 0).any():
        raise data.BenchmarkError(f"--navi: {photo['depth']} has no depth inside the centre crop")
    f = photo["focal"] * NAVI_SIDE / min(photo["size"])
    v, u = torch.meshgrid(torch.arange(NAVI_SIDE) + 0.5, torch.arange(NAVI_SIDE) + 0.5, indexing="ij")
    xyz = torch.stack([(u - NAVI_SIDE / 2) * depth / f, (v - NAVI_SIDE / 2) * depth / f, depth], -1)
    ys, xs = torch.nonzero(depth > 0, as_tuple=True)
    low, high = torch.stack([ys.min(), xs.min()]), torch.stack([ys.max(), xs.max()])
    side = int((high - low).max())
    start = low - (side - (high - low)) // 2
    if (start < 0).any() or (start + side > NAVI_SIDE).any():
        start = (low - (side - (high - low))).clamp(min=0)
    (t, l) = start.tolist()
    box = lambda a: a[t:t + side, l:l + side].permute(2, 0, 1)[None].float()
    image = np.asarray(Image.fromarray(rgb[t:t + side, l:l + side].byte().numpy()).resize((size, size), Image.BICUBIC))
    return image, F.interpolate(box(xyz), size=(NAVI_GRID, NAVI_GRID), mode="nearest")[0].permute(1, 2, 0)


def navi_matches(Fa, Fb, pa, pb, n=NAVI_MATCHES, chunk=2048, device="cpu"):
    """Probe3D's NAVI matching of one pair: patch features (h, w, W) upsampled bicubic to the point
    grid, the pixels with depth of each photo (pa, pb: (G, G, 3) points) kept, each point of a
    matched to its nearest neighbour in b by cosine distance, ranked by Lowe's ratio test (1 -
    d1 / d2) and the n most distinctive kept -> (a's points (m, 3), their matches' points (m, 3));
    none where b has fewer than two points (no ratio to take)."""
    grid = lambda Fx, p: F.normalize(F.interpolate(Fx.permute(2, 0, 1)[None].float().to(device), size=p.shape[:2],
                                                   mode="bicubic")[0].permute(1, 2, 0)[p[..., 2].to(device) > 0], dim=-1)
    fa, fb = grid(Fa, pa), grid(Fb, pb)
    if len(fa) == 0 or len(fb) < 2:
        return pa.new_zeros(0, 3), pb.new_zeros(0, 3)
    best, weight = [], []
    for i in range(0, len(fa), chunk):
        d, j = (1 - fa[i:i + chunk] @ fb.T).topk(2, dim=1, largest=False)  # cosine distances
        d = d.clamp(min=1e-9)
        best.append(j[:, 0])
        weight.append(1 - d[:, 0] / d[:, 1])
    keep = torch.cat(weight).topk(min(n, len(fa))).indices
    return pa[pa[..., 2] > 0][keep.cpu()], pb[pb[..., 2] > 0][torch.cat(best)[keep].cpu()]


def relative_pose(a, b):
    """(4, 4) object-to-camera poses of two photos -> the (4, 4) map from camera a's frame to b's."""
    return torch.from_numpy(b @ np.linalg.inv(a)).float()


def navi_parts(moved, matched, pb, chunk=2048):
    """Recall parts of one pair at NAVI_CM: moved (m, 3) the matched points of photo a in camera b's
    frame, matched (m, 3) the points of b they were matched to, pb b's point grid. Rows (3, 2) of
    [right, counted] for the model; chance (a uniformly random point of b) and ceiling (b's point
    nearest the truth: perfect features), over the same matched points of a."""
    cm = torch.tensor(NAVI_CM, dtype=torch.float64) / 100
    if len(moved) == 0:  # no match (a photo without points): the pair counts nothing
        return {k: torch.zeros(len(cm), 2, dtype=torch.float64) for k in ("model", "chance", "ceiling")}
    err = (moved - matched).norm(dim=1).double()
    points = pb[pb[..., 2] > 0]
    near = torch.cat([torch.cdist(moved[i:i + chunk], points) for i in range(0, len(moved), chunk)])  # (m, P)
    right = {"model": (err[:, None] < cm).sum(0),
             "chance": torch.stack([(near < c).sum(1).double() / len(points) for c in cm.tolist()], 1).sum(0),
             "ceiling": (near.min(1).values[:, None].double() < cm).sum(0)}
    return {k: torch.stack([v.double(), torch.full_like(cm, len(err))], 1) for k, v in right.items()}


def navi_suite(model, root, device, skip, opts, listing=None):
    """[NAVI] Probe3D's correspondence protocol on the wild-set pairs (data.read_navi): each photo
    cropped to its object (navi_view), final-layer patch features, the 1,000 most distinctive
    ratio-test matches per pair (navi_matches); a match is right if the 3-D point of the first photo,
    moved into the second camera by the known poses, lies within 1, 2 or 5 cm of the matched
    point: recall over all pairs' matches, at each threshold."""
    pairs = listing or data.read_navi(root)
    S, m = model.cfg.vision.image_size, Scores()
    photos = sorted({p["image"]: p for pair in pairs for p in pair}.values(), key=lambda p: p["image"])
    row = {p["image"]: i for i, p in enumerate(photos)}
    views = [navi_view(p, S) for p in tqdm(photos, desc="navi photos", leave=False)]
    P = extract(model, [v[0] for v in views], ("patch",), device, "navi images")["patch"]
    parts = {"model": [], "chance": [], "ceiling": []}
    for a, b in pairs:
        (ia, ib), pb = (row[a["image"]], row[b["image"]]), views[row[b["image"]]][1]
        found, matched = navi_matches(P[ia], P[ib], views[ia][1], pb, device=device)
        pose = relative_pose(a["pose"], b["pose"])
        for k, v in navi_parts(found @ pose[:3, :3].T + pose[:3, 3], matched, pb).items():
            parts[k].append(v)
    for i, cm in enumerate(NAVI_CM):
        got = {k: torch.stack(v)[:, i] for k, v in parts.items()}
        m.add(f"navi_recall_{cm}cm", got["model"], chance=got["chance"], ceiling=got["ceiling"])
    return m

# The real dense benchmarks train linear heads by mini-batch (DINOv2's linear ADE20K and NYUv2
# heads, Probe3D's depth probe): the closed-form toy probes would hold every training token at once
# (ADE20K: 20k images x 196 tokens x 768 = 12 GB). Features are recomputed for every batch, so
# memory does not grow with the dataset; heads start from zeros, batches follow a fixed seed.
PROBE_EPOCHS, PROBE_BATCH, PROBE_LR, PROBE_WD = 10, 16, 1e-3, 1e-4
NYU_CAP_IGNORE = 10.0  # metres: deeper pixels are left out (the references), not clamped
EIGEN_CROP = (45, 471, 41, 601)  # rows, cols of the 480 x 640 NYUv2 frame that Eigen et al. score


def dense_features(model, images, device, kinds):
    """{kind: (B, h, w, C)} of uint8 images at the input size: "patch" (last layer), "taps" (the
    four DPT taps side by side, Probe3D's multi-layer probe), "position" (one-hot patch position:
    the chance head)."""
    f = extract(model, list(images), tuple(k for k in kinds if k != "position"), device, None)
    if "position" in kinds:
        g = model.cfg.vision.image_size // model.cfg.vision.patch_size
        f["position"] = position_features(len(images), g, g)
    return f


def head_logits(head, P, size):
    """A per-patch linear head's outputs (B, h, w, C) -> (B, out, *size), upsampled bilinearly."""
    return F.interpolate(head(P).permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)


def fit_dense_heads(model, n, load, kinds, out_dim, loss, device, desc):
    """One linear head per feature kind, trained together by AdamW for PROBE_EPOCHS passes over n
    training items. load(i) -> (uint8 image at the input size, target at the input size);
    loss(logits (B, out_dim, S, S), targets) -> scalar. Returns {kind: head}."""
    g = torch.Generator().manual_seed(0)
    heads, opt = None, None
    for _ in tqdm(range(PROBE_EPOCHS), desc=desc, leave=False):
        for idx in torch.randperm(n, generator=g).split(PROBE_BATCH):
            images, targets = zip(*(load(int(i)) for i in idx))
            feats, y = dense_features(model, images, device, kinds), torch.stack(targets)
            if heads is None:
                heads = {k: torch.nn.Linear(f.shape[-1], out_dim) for k, f in feats.items()}
                for h in heads.values():
                    torch.nn.init.zeros_(h.weight), torch.nn.init.zeros_(h.bias)
                opt = torch.optim.AdamW([p for h in heads.values() for p in h.parameters()], lr=PROBE_LR,
                                        weight_decay=PROBE_WD)
            total = sum(loss(head_logits(heads[k], f, y.shape[-2:]), y) for k, f in feats.items())
            opt.zero_grad()
            total.backward()
            opt.step()
    return {k: h.requires_grad_(False) for k, h in heads.items()}


def centre_square(a):
    """The centre square of an (H, W, ...) array: Probe3D's 480 x 480 crop of NYUv2's 480 x 640."""
    h, w = a.shape[:2]
    top, left = round((h - min(h, w)) / 2), round((w - min(h, w)) / 2)  # torchvision's CenterCrop rounds
    return a[top:top + min(h, w), left:left + min(h, w)]


def eigen_mask(h, w):
    """(h, w) bool: inside Eigen's crop of the NYUv2 frame (the whole frame if it is not 480 x 640)."""
    m = torch.zeros(h, w, dtype=torch.bool)
    if (h, w) == (480, 640):
        r0, r1, c0, c1 = EIGEN_CROP
        m[r0:r1, c0:c1] = True
    else:
        m[:] = True
    return m


def nyu_scored(D, frame):
    """Which pixels of depth maps D (n, H, W) in metres count: measured (> 0), at most 10 m (deeper
    is left out, as the references do, not clamped to 10) and inside frame (zero-shot: Eigen's crop
    of the whole frame; the probes: True, all of Probe3D's centre square)."""
    return (D > 0) & (D <= NYU_CAP_IGNORE) & frame


def per_image_rmse(pred, D, keep):
    """Parts (n, 2) [RMSE of image i over its kept pixels, 1]: reduced by ratio, the mean of the
    per-image RMSEs (Probe3D, DINOv2), not the RMSE of all pixels pooled. Images without a kept
    pixel are left out."""
    sse = torch.where(keep, (pred.double() - D.double()).square(), 0.0).sum((1, 2))
    count = keep.sum((1, 2)).double()
    has = count > 0
    return torch.stack([(sse[has] / count[has]).sqrt(), torch.ones(int(has.sum()), dtype=torch.float64)], 1)


def nyu_suite(model, root, device, skip, opts, listing=None):
    """[NYUv2] Eigen's 654 test images. Probes (Probe3D): linear depth heads on the last layer and
    on the four DPT taps, trained by mini-batch on the 795 official training images to log depth;
    Probe3D's 480 x 480 centre crop resized to the input, predictions upsampled to the crop and
    scored on all of it (Probe3D's nyu_crop=False: no Eigen crop inside the square) where 0 < depth
    <= 10 m (deeper ignored, not clamped), RMSE per image, then the mean over images. Chance: the
    same head on the patch position alone. Zero-shot (a depth head), as BTS's eval_with_pngs.py and
    Depth Anything score it: the whole 480 x 640 frame resized to the square input, the inverse
    depth upsampled back to the frame, aligned per image, scored within Eigen's crop."""
    sets, S, m = listing or data.read_nyu_eigen(root), model.cfg.vision.image_size, Scores()

    def load(pair, size=S):
        image, depth = (centre_square(a) for a in (data.load_image(pair[0]), data.read_depth_png(pair[1])))
        x = np.asarray(Image.fromarray(image).resize((S, S), Image.BICUBIC))
        d = torch.from_numpy(np.ascontiguousarray(depth))
        return x, d if size is None else resize_nearest(d, size)

    def log_target(i):
        x, d = load(sets["train"][i])
        return x, torch.where((d > 0) & (d <= NYU_CAP_IGNORE), d.log(), torch.nan)

    def l1_on_valid(logits, y):
        keep = torch.isfinite(y)
        return (logits[:, 0] - torch.nan_to_num(y)).abs()[keep].mean() if keep.any() else logits.sum() * 0

    kinds = ("patch", "taps", "position")
    heads = fit_dense_heads(model, len(sets["train"]), log_target, kinds, 1, l1_on_valid, device, "nyu depth heads")
    parts = {k: [] for k in kinds + ("zero_shot",)}
    with_head = "depth" in model.tasks
    for i in tqdm(range(0, len(sets["test"]), PROBE_BATCH), desc="nyu test", leave=False):
        chunk = [load(p, size=None) for p in sets["test"][i:i + PROBE_BATCH]]
        images, D = [x for x, _ in chunk], torch.stack([d for _, d in chunk])  # (B, 480, 480) metres
        keep = nyu_scored(D, True)  # the whole centre square
        feats = dense_features(model, images, device, kinds)
        for k in kinds:
            pred = head_logits(heads[k], feats[k], D.shape[1:])[:, 0].exp()
            parts[k].append(per_image_rmse(pred, D, keep))
        if with_head:
            frames = sets["test"][i:i + PROBE_BATCH]
            D = torch.stack([torch.from_numpy(data.read_depth_png(p[1])) for p in frames])  # (B, 480, 640)
            keep = nyu_scored(D, eigen_mask(*D.shape[1:]))
            inv = F.interpolate(extract(model, [data.load_image(p[0], S) for p in frames], ("depth",), device,
                                        None)["depth"][:, None], size=D.shape[1:], mode="bilinear",
                                align_corners=False)[:, 0]
            parts["zero_shot"].append(zero_shot_depth(inv, torch.where(keep, D, 0.0), NYU_CAP_IGNORE,
                                                       opts.zs_depth_space, per_image=True))
    parts = {k: torch.cat(v) for k, v in parts.items() if v}
    m.add("nyu_probe_rmse", parts["patch"], chance=parts["position"], paired=True)
    m.add("nyu_probe_ml_rmse", parts["taps"], chance=parts["position"], paired=True)
    if with_head:
        m.add("nyu_zsdepth_absrel", parts["zero_shot"], absrel_of, ceiling=0.0)
        m.add("nyu_zsdepth_delta1", parts["zero_shot"], delta1_of, ceiling=1.0)
    else:
        skip("NYUv2 zero-shot depth: the model has no depth head")
    return m


KITTI_CAP = 80.0  # metres: Eigen's KITTI range (deeper ignored)
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # rows, cols of the frame (Garg et al.)


def kitti_suite(model, root, device, skip, opts, listing=None):
    """[KITTI] zero-shot relative depth on Eigen's test split with the annotated depth: each image
    resized to the square input, the depth head's inverse depth upsampled to the frame, aligned
    per image by scale and shift in disparity, scored within Garg's crop where 0 < depth <= 80 m,
    AbsRel and delta1 per image, then averaged (Depth Anything's protocol, in disparity by default;
    --zs-depth-space depth converts back first)."""
    m = Scores()
    if "depth" not in model.tasks:
        skip("KITTI zero-shot depth: the model has no depth head")
        return m
    pairs, S, parts = listing or data.read_kitti_eigen(root), model.cfg.vision.image_size, []
    for image_path, depth_path in tqdm(pairs, desc="kitti", leave=False):
        D = torch.from_numpy(data.read_depth_png(depth_path, scale=256.0))[None]  # (1, H, W)
        H, W = D.shape[1:]
        r0, r1, c0, c1 = GARG_CROP
        frame = torch.zeros(H, W, dtype=torch.bool)
        frame[int(r0 * H):int(r1 * H), int(c0 * W):int(c1 * W)] = True
        inv = extract(model, [data.load_image(image_path, S)], ("depth",), device, None)["depth"]
        inv = F.interpolate(inv[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        keep = (D > 0) & (D <= KITTI_CAP) & frame
        parts.append(zero_shot_depth(inv, torch.where(keep, D, 0.0), KITTI_CAP, opts.zs_depth_space, per_image=True))
    z = torch.cat(parts)
    m.add("kitti_zsdepth_absrel", z, absrel_of, ceiling=0.0)
    m.add("kitti_zsdepth_delta1", z, delta1_of, ceiling=1.0)
    return m


ADE_CLASSES = 150


def ade_suite(model, root, device, skip, opts, listing=None):
    """[ADE20K] DINOv2's linear protocol on the official split: a linear head on final-layer patch
    tokens trained by mini-batch AdamW on the training images (150 classes, label 0 ignored),
    logits upsampled to each validation label map's own resolution, mIoU over the 150 classes on
    the whole validation set. Images are resized to the square input (DINOv2: 512-px sliding
    windows). Chance: the same head on the patch position alone."""
    sets, S, m = listing or data.read_ade(root), model.cfg.vision.image_size, Scores()

    def load(pair, size=S):
        label = torch.from_numpy(data.read_png(pair[1]).astype(np.int64)) - 1  # 0 "other" -> -1, ignored
        return data.load_image(pair[0], S), label if size is None else resize_nearest(label, size).long()

    kinds = ("patch", "position")
    ce = lambda logits, y: F.cross_entropy(logits, y, ignore_index=-1) if (y >= 0).any() else logits.sum() * 0
    heads = fit_dense_heads(model, len(sets["train"]), lambda i: load(sets["train"][i]), kinds, ADE_CLASSES, ce,
                            device, "ade head")
    parts = {k: [] for k in kinds}
    for i in tqdm(range(0, len(sets["val"]), PROBE_BATCH), desc="ade val", leave=False):
        chunk = [load(p, size=None) for p in sets["val"][i:i + PROBE_BATCH]]
        feats = dense_features(model, [x for x, _ in chunk], device, kinds)
        for k in kinds:
            for j, (_, label) in enumerate(chunk):  # label maps differ in size: one image at a time
                pred = head_logits(heads[k], feats[k][j:j + 1], label.shape).argmax(1)
                parts[k].append(seg_parts(pred, label[None], ADE_CLASSES))
    parts = {k: torch.cat(v) for k, v in parts.items()}
    m.add("ade_miou", parts["patch"], miou_of, chance=parts["position"], paired=True)
    return m


SUITES = {"imagenet": imagenet_suite, "coco": coco_suite, "ade": ade_suite, "nyu": nyu_suite,
          "spair": spair_suite, "navi": navi_suite, "kitti": kitti_suite}
# Each suite's reader, run for every benchmark asked for before any work (a suite given its
# reader's listing does not read again): a bad folder or file ends evaluate.py in one line at once,
# not after another benchmark's heads have trained. A benchmark the model will skip (--kitti
# without a depth head, --coco without a text tower) is read and checked too: it was asked for.
READERS = {"imagenet": data.read_imagenet, "coco": data.read_coco_karpathy, "ade": data.read_ade,
           "nyu": data.read_nyu_eigen, "spair": data.read_spair, "navi": data.read_navi,
           "kitti": data.read_kitti_eigen}


# -----------------------------------------------------------------------------------------------
# Results, and the comparison of runs in Figure 1's layout


def arrow(name):
    return "" if name.startswith("patch_") else "↓" if lower_is_better(name) else "↑"


def stands_for(name):
    return next(v for k, v in STANDS_FOR.items() if name.startswith(k))


def fmt(v):
    return "–" if v is None else f"{v:.3f}"


def write_results(out, results):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    what = "the untrained model (--init)" if results["init"] else results["checkpoint"]
    lines = [f"# Evaluation of {what}", "",
             f"tasks: {','.join(results['tasks'])} · seed: {results['seed']} · data: {results['data']} · "
             f"{results['seconds']:.0f} s", "",
             "value ± standard error (bootstrap over the n test items); chance: without the image (random, "
             "majority class, or the probe on patch positions alone); ceiling: perfect features at this "
             "resolution; – where none is defined. gain: how much better than the position-only probe "
             "(the probes that also see the patch position), ± its paired bootstrap se.", "",
             "| metric | value ± se | n | chance | ceiling | gain ± se | stands for |",
             "|---|---|---|---|---|---|---|"]
    gain = lambda k: f"{results['gain'][k]:+.3f} ± {results['gain_se'][k]:.3f}" if k in results["gain"] else ""
    lines += [f"| {k} {arrow(k)} | {v:.3f} ± {results['se'][k]:.3f} | {results['n'][k]} | "
              f"{fmt(results['chance'][k])} | {fmt(results['ceiling'][k])} | {gain(k)} | {stands_for(k)} |"
              for k, v in results["metrics"].items()]
    lines += [""] + [f"skipped: {s}" for s in results["skipped"]]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def radar_radius(values, chance, ceiling):
    """0 at chance, 1 at the ceiling, whichever way is better; clipped just beyond both ends."""
    return np.clip((values - chance) / (ceiling - chance), 0, 1.05)


def radar(rows, names, refs, path):
    """One polygon per row, each axis drawn from its chance level (centre) to its ceiling (rim), so
    that a polygon's size means the same on every axis and for one run alone; values beyond either
    end are drawn at it. Lower-is-better axes need no flip: their chance lies above their ceiling."""
    names = [k for k in names if refs[k]["chance"] is not None and refs[k]["ceiling"] is not None
             and refs[k]["chance"] != refs[k]["ceiling"]]
    if not names:
        return False
    lo = np.array([refs[k]["chance"] for k in names])
    hi = np.array([refs[k]["ceiling"] for k in names])
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    fig, ax = plt.subplots(figsize=(7, 7), subplot_kw={"polar": True})
    for label, stats in rows:
        means = np.array([stats[k]["mean"] if k in stats else np.nan for k in names])
        radius = radar_radius(means, lo, hi)
        line, = ax.plot(np.append(angles, angles[0]), np.append(radius, radius[0]), marker="o", label=label)
        ax.fill(angles, np.nan_to_num(radius), alpha=0.08, color=line.get_color())
    ax.set_xticks(angles, [f"{k} {arrow(k)}\n{a:.3g} → {b:.3g}" for k, a, b in zip(names, lo, hi)], fontsize=7)
    ax.tick_params(axis="x", pad=14)  # keep the labels off the outermost polygon
    ax.set_ylim(0, 1.1)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels([])
    ax.set_title("each axis: chance (centre) → ceiling (rim)", fontsize=9, pad=24)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)  # below the axis labels
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def read_results(path):
    with open(path) as f:
        r = json.load(f)
    for key in ("se", "chance", "ceiling", "gain", "gain_se"):  # results written before these existed
        r.setdefault(key, {})
    return r


def row_stats(results, names):
    """Per metric over a row's runs (seeds): mean, sample std (None for one seed), mean bootstrap
    se, and spread = the std, or the se where there is one seed only."""
    out = {}
    for k in names:
        runs = [r for r in results if k in r["metrics"]]
        if not runs:
            continue
        v = [r["metrics"][k] for r in runs]
        se = [r["se"].get(k) for r in runs if r["se"].get(k) is not None]
        std = float(np.std(v, ddof=1)) if len(v) > 1 else None
        se = float(np.mean(se)) if se else None
        out[k] = {"mean": float(np.mean(v)), "std": std, "se": se, "spread": std if std is not None else se,
                  "seeds": len(v), "values": [float(x) for x in v],
                  "by_seed": {str(r["seed"]): float(r["metrics"][k]) for r in runs}}
    return out


def difference(a, b):
    """Row a minus row b, and that in units of their pooled spread sqrt((s_a^2 + s_b^2) / 2)."""
    delta = a["mean"] - b["mean"]
    if a["spread"] is None or b["spread"] is None:
        return delta, None
    pooled = math.sqrt((a["spread"] ** 2 + b["spread"] ** 2) / 2)
    return delta, (delta / pooled if pooled > 0 else None)


def paired(a, b):
    """Row a against row b on the seeds both have (each seed's runs score the same test scenes):
    (mean, sample std, n) of the per-seed differences a - b, or None below 2 shared seeds. The
    paired rule: a difference is called when |mean| > 2 std of the differences, the 2-sigma rule
    on the differences themselves, so that what a seed shares across rows (its init, its data
    order, the scenes it finds hard) cancels instead of widening both rows' spread."""
    seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
    if len(seeds) < 2:
        return None
    d = np.array([a["by_seed"][s] - b["by_seed"][s] for s in seeds])
    return float(d.mean()), float(d.std(ddof=1)), len(seeds)


def pooled_cell(a, b):
    """A difference-table cell: Δ and Δ/σ (difference), bold beyond 2σ."""
    delta, z = difference(a, b)
    text = f"{delta:+.3f}" + (f" ({z:+.1f}σ)" if z is not None else "")
    return f"**{text}**" if z is not None and abs(z) > 2 else text


def paired_cell(a, b):
    """A paired-table cell: mean ± std of the per-seed differences and their ratio (paired), bold
    where |mean| > 2 std; – below two shared seeds."""
    pd = paired(a, b)
    if pd is None:
        return "–"
    text = f"{pd[0]:+.3f} ± {pd[1]:.3f}" + (f" ({pd[0] / pd[1]:+.1f})" if pd[1] > 0 else "")
    return f"**{text}**" if abs(pd[0]) > 2 * pd[1] else text


DIFFERENCE_TABLES = (  # (title, cell) of the tables compare() prints against each reference row
    ("Difference from {} (Δ, and Δ in units of the pooled seed std σ; bold where |Δ| > 2σ; a row with "
     "one seed uses its bootstrap se as its spread):", pooled_cell),
    ("Paired difference from {} on the seeds both rows have (mean ± std of the per-seed differences, "
     "then mean/std; bold where |mean| > 2 std):", paired_cell))


def run_group(run_dir, tasks):
    """The row a run belongs to: its tasks, and where its folder is named NAME-seedN (as make ablate
    and sweeps name them), NAME, so that runs of one task set under different recipes are rows of
    their own while the seeds of one recipe are one row."""
    name = os.path.basename(os.path.normpath(run_dir))
    stem = re.fullmatch(r"(.+)-seed\d+", name)
    tasks = tuple(t for t in mtv.ALL_TASKS if t in tasks)
    return tasks, stem.group(1) if stem else "+".join(tasks)  # a run without -seedN: a row of its tasks


AGAINST = {"first": "every row from the first trained row (the smallest task set: VL in Figure 1's order)",
           "previous": "each trained row from the one before it in the table (a ladder's steps when each row "
                       "adds one task: clip, + ssl, + ground, + depth)",
           "last": "every row from the table's last trained row (the largest task set: all four, for a leave-one-out)"}


def difference_pairs(stats, against):
    """(title, [(shown label, label, row stats, reference stats)]) of compare()'s difference tables:
    the trained rows against the reference AGAINST names, then every row against the untrained one."""
    trained = [s for s in stats if not s[0].startswith("init")]

    def from_one(ref_label, ref):
        return f"**{ref_label}**", [(label, label, st, ref) for label, st in stats if label != ref_label]

    if against == "previous":
        steps = [(f"{label} (from {trained[i - 1][0]})", label, st, trained[i - 1][1])
                 for i, (label, st) in enumerate(trained) if i]
        out = [("the row before it", steps)] if steps else []
    else:
        out = [from_one(*trained[0 if against == "first" else -1])] if trained else []
    return out + [from_one(*s) for s in stats if s[0].startswith("init")]


def compare(run_dirs, out, tower="student", against="first"):
    """Rows = task sets, or recipes of a task set (run_group: runs of one row are its seeds),
    columns = key metrics: the paper's Figure 1 layout, as Markdown and a radar. The untrained model (eval-init of any run; one per
    seed) is the first row, chance and ceiling rows frame the table, and more tables give every
    row's difference (pooled and paired) from the reference AGAINST names and from the untrained one."""
    groups, inits = {}, {}
    for d in run_dirs:
        path = next((p for p in (os.path.join(d, eval_folder(False, tower), "results.json"),
                                 os.path.join(d, "results.json"))
                     if os.path.isfile(p)), None)
        if path is None:
            fail(f"{d} has no {eval_folder(False, tower)}/results.json; evaluate it first: "
                 f"python evaluate.py {d}/checkpoint.pt" + (" --tower teacher" if tower == "teacher" else ""))
        r = read_results(path)
        groups.setdefault(run_group(d, r["tasks"]), []).append(r)
        if os.path.isfile(init_path := os.path.join(d, "eval-init", "results.json")):
            ri = read_results(init_path)  # one untrained model per seed: the one scored on most metrics
            other = inits.get(ri["seed"], ri)
            known = [k for k in ("world", "vision") if k in other and k in ri]  # older results lack them
            if any(other[k] != ri[k] for k in known):
                fail(f"--compare: the untrained models of seed {ri['seed']} differ (another world or image tower, "
                     f"{d}); compare runs of one world and one architecture at a time")
            if ri["seed"] not in inits or len(ri["metrics"]) > len(inits[ri["seed"]]["metrics"]):
                inits[ri["seed"]] = ri
    for (ts, name), results in groups.items():
        if len(seeds := [r["seed"] for r in results]) != len(set(seeds)):
            fail(f"--compare: row {'+'.join(ts)} [{name}] has two runs of one seed ({sorted(seeds)}); "
                 "name the runs NAME-seedN so that each recipe is a row of its own")
    order = sorted(groups, key=lambda g: (len(g[0]), [mtv.ALL_TASKS.index(t) for t in g[0]], g[1]))  # VL, + SSL, ...
    everything = [r for g in groups.values() for r in g] + list(inits.values())
    if len(precisions := {r.get("precision", "fp32") for r in everything}) > 1:  # older results: fp32
        print(f"note: these evaluations ran in different precisions ({', '.join(sorted(precisions))}); bf16 "
              "and fp32 features differ slightly, so small differences between such rows may come from it",
              file=sys.stderr)
    names = [k for k in KEY_METRICS if any(k in r["metrics"] for r in everything)]
    refs = {k: {ref: (float(np.mean(v)) if (v := [r[ref][k] for r in everything
                                                  if r[ref].get(k) is not None]) else None)
                for ref in ("chance", "ceiling")} for k in names}
    rows = [("init (untrained)", sorted(inits.values(), key=lambda r: str(r["seed"])))] if inits else []
    rows += [("+".join(ts) + (f" [{name}]" if name != "+".join(ts) else ""), groups[(ts, name)])
             for ts, name in order]  # run_group names every row; a row named by its tasks needs no tag
    stats = [(label, row_stats(results, names)) for label, results in rows]

    def cell(s):
        if s is None:
            return "–"
        return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["std"] is not None else \
            f"{s['mean']:.3f} (se {s['se']:.3f})" if s["se"] is not None else f"{s['mean']:.3f}"

    head = ["| tasks | seeds | " + " | ".join(f"{k} {arrow(k)}" for k in names) + " |",
            "|---|---|" + "---|" * len(names)]
    lines = head + [f"| *{ref}* | – | " + " | ".join(fmt(refs[k][ref]) for k in names) + " |"
                    for ref in ("chance", "ceiling")]
    seeds = {label: ",".join(str(r["seed"]) for r in results) for label, results in rows}
    for label, st in stats:
        lines.append(f"| {label} | {seeds[label]} | " + " | ".join(cell(st.get(k)) for k in names) + " |")
    for ref_title, pairs in difference_pairs(stats, against):
        for title, cell_of in DIFFERENCE_TABLES:
            lines += ["", title.format(ref_title), ""] + head
            lines += [f"| {shown} | {seeds[label]} | " + " | ".join(
                cell_of(st[k], ref[k]) if k in st and k in ref else "–" for k in names) + " |"
                for shown, label, st, ref in pairs]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "compare.json"), "w") as f:  # the same table for programs (notebook 03)
        json.dump({"metrics": {k: {"better": arrow(k), **refs[k]} for k in names},
                   "rows": [{"label": label, "seeds": [r["seed"] for r in results], "stats": st}
                            for (label, results), (_, st) in zip(rows, stats)]}, f, indent=1)
    drew = radar(stats, names, refs, os.path.join(out, "radar.png"))
    print("\n".join(lines))
    print(f"wrote {os.path.join(out, 'compare.md')}, compare.json" + (" and radar.png" if drew else ""))
    return {label: {k: (s["mean"], s["spread"]) for k, s in st.items()} for label, st in stats}


# -----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="train.py checkpoint.pt, or a SigLIP model directory")
    p.add_argument("--data", help="glob of toy-world val shards with truth members (gt_depth, gt, gt_seg); "
                                  "default: render --n scenes in memory")
    p.add_argument("--n", type=int, default=TOY_N, help=f"toy scenes, the first 2/3 train the probes "
                                                        f"(default {TOY_N}; of --data the first N)")
    p.add_argument("--init", action="store_true",
                   help="score the checkpoint's model at initialisation (same config and seed, no step) "
                        "instead of its weights; default output <checkpoint dir>/eval-init")
    p.add_argument("--out", help="output folder; default <checkpoint dir>/eval (eval-teacher with --tower "
                                 "teacher, eval-init with --init), with --compare the runs' common parent")
    p.add_argument("--tower", choices=("student", "teacher"), default="student",
                   help="the image tower the image-only probes read: student, or the EMA teacher of ssl where the "
                        "checkpoint has one (DINO, iBOT and DINOv2 score their teacher); zero-shot, retrieval, "
                        "depth and grounding read the student, whose text tower and heads were trained with it. "
                        "With --compare: read each run's eval-teacher/ results (default: student)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=mtv.PRECISIONS, default="auto",
                   help="the frozen model's forward passes: auto = bf16 autocast on CUDA (as open_clip "
                        "evaluates), fp32 on CPU; bf16 or fp32 on any device. Probes and metrics run in fp32 "
                        "on the features either way (default: auto)")
    for name, layout in (("imagenet", "DIR/val/WNID/*.JPEG (+ DIR/train/WNID/ for the probes)"),
                         ("coco", "DIR/dataset_coco.json (Karpathy's splits) + DIR/val2014/*.jpg"),
                         ("spair", "DIR/PairAnnotation/test/*.json + DIR/JPEGImages/CLASS/*.jpg (SPair-71k)"),
                         ("navi", "DIR/OBJECT/wild_set/{images/*.jpg,depth/*.png,annotations.json} (NAVI v1)"),
                         ("nyu", "DIR/official_splits/{train,test}/SCENE/rgb_N.jpg + sync_depth_N.png (BTS)"),
                         ("ade", "DIR/{images,annotations}/{training,validation}/ (ADEChallengeData2016)"),
                         ("kitti", "DIR/kitti_eigen_test_files_with_gt.txt (Depth Anything, ZoeDepth) or "
                                   "DIR/eigen_test_files_with_gt.txt (BTS), the raw drives DATE/DRIVE/ under "
                                   "DIR/raw/, DIR/raw_data/ or DIR, the annotated depth under "
                                   "DIR/data_depth_annotated/ or DIR/data_depth_annotated_zoedepth/ (with or "
                                   "without KITTI's train/ and val/)")):
        p.add_argument(f"--{name}", metavar="DIR", help=f"real data laid out as {layout} (default: not run)")
    p.add_argument("--class-names", metavar="FILE",
                   help="ImageNet class names, 'FOLDER name, synonym, ...' per line as LOC_synset_mapping.txt "
                        "(default: CLIP's curated names for WordNet-id folders, else the folder names)")
    p.add_argument("--zs-depth-space", choices=("disparity", "depth"), default="disparity",
                   help="where --nyu and --kitti score zero-shot relative depth after the per-image alignment: "
                        "disparity (Depth Anything) or depth (MiDaS: the aligned disparity inverted first); the "
                        "toy twin scores depth (default: disparity)")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="aggregate evaluated train.py runs instead")
    p.add_argument("--against", choices=tuple(AGAINST), default="first",
                   help="with --compare, the difference tables give " + "; ".join(
                       f"{k}: {v}" for k, v in AGAINST.items()) + " (default first); all also from the untrained row")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        if args.checkpoint:
            fail("give either a CHECKPOINT to evaluate or --compare RUN_DIR ..., not both")
        return compare(args.compare, args.out or os.path.commonpath([os.path.abspath(d) for d in args.compare]),
                       args.tower, args.against)
    if not args.checkpoint:
        fail("give a CHECKPOINT to evaluate, or --compare RUN_DIR ...")
    if args.against != "first":
        fail("--against chooses the reference row of --compare's tables; give it with --compare RUN_DIR ...")
    if args.n < 6:
        fail(f"--n {args.n} is too small; the probes need at least 6 scenes (4 to train, 2 to test)")
    global PRECISION
    saved, PRECISION = PRECISION, args.precision
    try:
        return evaluate_checkpoint(args)
    finally:
        PRECISION = saved  # a later call in this process (a notebook, a test) gets the module's default


def evaluate_checkpoint(args):
    start = time.time()
    model, seed = load_checkpoint(args.checkpoint, init=args.init, tower=args.tower)
    if args.tower == "teacher" and not args.init and tower_of(model) == "student":
        print(f"note: {args.checkpoint} has no ssl teacher; its student is scored (results say tower: student)",
              file=sys.stderr)
    world = trained_on(args.checkpoint)
    device = torch.device(args.device)
    model = model.to(device).eval()
    S = model.cfg.vision.image_size
    print(f"model: {args.checkpoint}{' at initialisation' if args.init else ''} · tasks {','.join(model.tasks)} · "
          f"{S} px · device {device}")
    real = {k: getattr(args, k) for k in SUITES if getattr(args, k)}
    scores, skipped, used = Scores(), [], []  # skipped protocols are listed with the results
    try:
        listings = {name: READERS[name](folder) for name, folder in real.items()}
    except data.BenchmarkError as e:  # a folder not in its reader's layout, a file that does not decode
        fail(str(e))
    if args.data or not real:  # the toy world unless only real benchmarks were asked for
        scenes = load_toy_shards(args.data, args.n, S) if args.data else render_toy(args.n, S, world)
        used.append(f"{len(scenes)} toy scenes " + (f"from {args.data}" if args.data else
                                                    f"({world} world, seed {TOY_SEED})"))
        scores.rows.update(toy_suite(model, scenes, device, skipped.append).rows)
    for name, folder in real.items():
        try:
            scores.rows.update(SUITES[name](model, folder, device, skipped.append, args, listings[name]).rows)
        except data.BenchmarkError as e:  # a folder not in the layout its reader expects
            fail(str(e))
        used.append(f"{name} {folder}")
    ckpt = args.checkpoint
    ckpt_dir = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    rows = scores.rows
    rounded = lambda v: None if v is None else round(v, 6)
    results = {"checkpoint": args.checkpoint, "init": args.init, "tasks": list(model.tasks), "seed": seed,
               "tower": tower_of(model), "world": world, "vision": asdict(model.cfg.vision),
               "data": "; ".join(used), "metrics": {k: round(r["value"], 6) for k, r in rows.items()},
               "se": {k: round(r["se"], 6) for k, r in rows.items()}, "n": {k: r["n"] for k, r in rows.items()},
               "chance": {k: rounded(r["chance"]) for k, r in rows.items()},
               "ceiling": {k: rounded(r["ceiling"]) for k, r in rows.items()},
               "gain": {k: rounded(r["gain"]) for k, r in rows.items() if r["gain"] is not None},
               "gain_se": {k: rounded(r["gain_se"]) for k, r in rows.items() if r["gain"] is not None},
               "lower_is_better": [k for k in rows if lower_is_better(k)],
               "precision": "bf16" if isinstance(mtv.autocast(device, PRECISION), torch.autocast) else "fp32",
               "skipped": skipped, "seconds": time.time() - start}
    write_results(args.out or os.path.join(ckpt_dir, eval_folder(args.init, args.tower)), results)
    return results


if __name__ == "__main__":
    main()
