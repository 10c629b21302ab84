"""Judge a frozen encoder the way the MTV paper does: `python evaluate.py runs/x/checkpoint.pt`.

The paper (Di, Xie, Zhai 2026, Figure 1 and Table 5) scores the image tower on ImageNet zero-shot,
COCO retrieval, linear probing, ADE20K segmentation, NAVI/SPair correspondence, NYUv2 depth
probing and zero-shot relative depth. The toy world has exact truth for each of these, so every
protocol has a toy twin, all of them together a minute or two on a CPU; the same code runs on real data.

    python evaluate.py CHECKPOINT [--data GLOB] [--n N] [--out DIR] [--device DEV]
    python evaluate.py CHECKPOINT --imagenet DIR --coco DIR --nyu DIR --ade DIR
    python evaluate.py --compare RUN_DIR ... [--out DIR]

CHECKPOINT is a train.py checkpoint.pt, or a directory with a SigLIP-format model (config.json +
weights, e.g. the released MTV weights), converted by mtv.MTV.from_siglip. Protocols that need a
part the model lacks (text tower, depth head, grounding head) are skipped with one line saying so.
Everything reads frozen features, extracted once per image set; probes are deterministic.

Toy world (val shards with truth members gt_depth/gt/gt_seg via --data, else --n scenes rendered
in memory with a seed training never uses), first 2/3 of the scenes train the probes:
  zs_shape_acc, zs_color_acc     shape / colour of the largest object from prompts   ImageNet zero-shot
  ret_{i2t,t2i}_r{1,5}           image <-> caption recall@k                          COCO retrieval
  lin_count_acc, lin_shape_acc   logistic regression on the pooled embedding          linear probing
  depth_probe_{rmse,absrel}      ridge on patch tokens -> log depth, upsampled         NYUv2 depth probe
  seg_miou                       linear on patch tokens: sky/ground/object shape       ADE20K
  corr_recall                    patch nearest neighbours across a known crop+flip     NAVI / SPair
  zsdepth_{absrel,delta1}        depth head, scale-shift aligned in inverse depth      KITTI/NYU zero-shot
  ground_acc, ground_name_acc    name -> its box among the image's boxes; box -> name  grounding

Real data (any subset; only those run, add --data to also run the toy world):
  --imagenet DIR  DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg (also .png/.jpeg); class names
                  are the folder names with _ as spaces -> in_zs_acc, in_lin_acc, in_knn_acc
  --coco DIR      DIR/captions.json = {"images": [{"id", "file_name"}], "annotations":
                  [{"image_id", "caption"}]} (COCO captions format), images at DIR/file_name
                  -> coco_{i2t,t2i}_r{1,5}
  --nyu DIR       DIR/NAME.jpg|png with DIR/NAME_depth.png (16-bit, millimetres, 0 = missing) or
                  DIR/NAME_depth.npy (float metres); first 2/3 by name train the probe; depth
                  capped at 10 m -> nyu_probe_{rmse,absrel}, nyu_zsdepth_{absrel,delta1}
  --ade DIR       DIR/images/NAME.jpg with DIR/annotations/NAME.png (8-bit class index, 0 =
                  unlabelled, as ADE20K); first 2/3 by name train the probe -> ade_miou
Images are resized to the model's square input (as SiglipImageProcessor); dense labels are
resized to the same grid (nearest) and scored there.

Outputs: OUT/results.json (tasks, seed, flat metrics, which are lower-is-better, skipped
protocols) and OUT/results.md; OUT defaults to <checkpoint dir>/eval. --compare reads
RUN_DIR/eval/results.json of several train.py runs, groups runs with the same tasks (seeds) and
writes the paper's Figure 1 layout, mean +- std over seeds, to OUT/compare.md and OUT/radar.png.
"""

import argparse
import glob
import json
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from tqdm import tqdm

import data
import mtv

BATCH = 64  # images per forward pass while extracting features
TOY_SEED = 987_654  # the in-memory toy val set; train.py's toy worlds use the run seed (0, 1, ...)
TOY_N = 600
CORR_SEED = 1  # the crops and flips that make the second view for correspondence
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.")  # CLIP-style prompt ensemble
RIDGE_LAMBDA = 1e-2  # on standardised features, relative to the per-sample Gram matrix
LOGREG_WD = 1e-3  # L2 on the weights of the logistic-regression probes
LBFGS_STEPS = 100  # full-batch L-BFGS iterations, from zeros: the probes are deterministic
KNN_K, KNN_T = 20, 0.07  # DINO's weighted k-NN classifier
TOY_CAP = 20.0  # world units: the toy floor runs to the horizon, objects stand 3-8.5 units away
NYU_CAP = 10.0  # metres, the usual NYUv2 evaluation cap
PCK = 0.1  # correspondence is right within 10 % of the image side (PCK@0.1, as SPair)
LOWER_IS_BETTER = ("_rmse", "_absrel")  # metric-name endings where smaller is better
STANDS_FOR = {  # metric-name prefix -> the paper's benchmark the protocol stands in for
    "zs_": "ImageNet zero-shot", "ret_": "COCO retrieval", "lin_": "linear probing",
    "depth_probe_": "NYUv2 depth probe", "seg_": "ADE20K segmentation",
    "corr_": "NAVI / SPair correspondence", "zsdepth_": "zero-shot depth (KITTI / NYU)",
    "ground_": "grounding", "in_": "ImageNet", "coco_": "COCO", "nyu_": "NYUv2", "ade_": "ADE20K"}
KEY_METRICS = (  # Figure 1's columns, in its order, then the rest of ours
    "zs_shape_acc", "in_zs_acc", "ret_i2t_r1", "coco_i2t_r1", "seg_miou", "ade_miou", "corr_recall",
    "depth_probe_rmse", "nyu_probe_rmse", "zsdepth_absrel", "ground_acc", "lin_shape_acc")


def fail(msg):
    """A user mistake: one sentence on stderr, exit code 2, no traceback."""
    print(f"evaluate.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def lower_is_better(name):
    return name.endswith(LOWER_IS_BETTER)


# -----------------------------------------------------------------------------------------------
# Metrics: small pure functions on tensors, each returning a float.


def accuracy(pred, target):
    return (pred == target).float().mean().item()


def recall_at_k(sim, positive, k):
    """sim (Q, G) query-gallery similarities, positive (Q, G) bool. Fraction of queries with a
    right answer among their k most similar gallery items (COCO: 5 captions per image are right)."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (Q, k)
    return positive.gather(1, top).any(1).float().mean().item()


def miou(pred, target, n_classes):
    """Mean over classes of intersection / union, accumulated over all pixels of the set (as
    ADE20K); target -1 is ignored; classes absent from both prediction and truth do not count."""
    keep = target >= 0
    p, t = pred[keep].long(), target[keep].long()
    inter = torch.bincount(t[p == t], minlength=n_classes)
    union = torch.bincount(p, minlength=n_classes) + torch.bincount(t, minlength=n_classes) - inter
    return (inter[union > 0] / union[union > 0]).mean().item()


def rmse(pred, target):
    return (pred - target).square().mean().sqrt().item()


def absrel(pred, target):
    return ((pred - target).abs() / target).mean().item()


def delta1(pred, target):
    """Fraction of pixels with max(pred/true, true/pred) < 1.25."""
    return (torch.maximum(pred / target, target / pred) < 1.25).float().mean().item()


def align_scale_shift(pred, target):
    """s * pred + t with (s, t) the least-squares fit to target, s >= 0: relative depth (MiDaS, Depth
    Anything) is only defined up to a positive scale and a shift, so it is aligned before scoring;
    an upside-down prediction gets s = 0 (the best non-negative scale) and scores as a flat map."""
    p, y = pred.double(), target.double()
    pc = p - p.mean()
    s = ((pc * (y - y.mean())).sum() / (pc * pc).sum().clamp(min=1e-12)).clamp(min=0)
    return (s * pc + y.mean()).to(pred.dtype)


def correspondence_recall(pred_xy, true_xy, threshold):
    """Fraction of points whose predicted match lies within threshold pixels of the true one."""
    return ((pred_xy - true_xy).norm(dim=-1) <= threshold).float().mean().item()


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


def linear_probe(Xtr, ytr, Xte, yte, n_classes):
    """Accuracy of logistic regression on frozen global embeddings (the paper's linear probing)."""
    return accuracy(fit_logreg(Xtr, ytr, n_classes)(Xte).argmax(1), yte)


def knn_probe(Xtr, ytr, Xte, yte, n_classes, k=KNN_K, T=KNN_T):
    """Accuracy of DINO's k-NN classifier: the k most cosine-similar training images vote with
    weight exp(sim / T)."""
    Xtr = F.normalize(Xtr, dim=1)
    preds = []
    for q in F.normalize(Xte, dim=1).split(1024):  # bounded memory on big validation sets
        s, i = (q @ Xtr.T).topk(min(k, len(Xtr)), dim=1)  # (q, k)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, ytr[i], (s / T).exp())
        preds.append(votes.argmax(1))
    return accuracy(torch.cat(preds), yte)


def depth_probe(Ptr, Dtr, Pte, Dte, cap):
    """Metric depth from frozen patch tokens, as DINOv2's linear NYUv2 protocol: every patch token
    (P: (n, h, w, W)) regresses the mean log depth of its pixels (ridge), the grid of predictions is
    upsampled bilinearly to the pixels of D (n, H, W). Invalid pixels (sky = inf, missing = 0) are
    left out of targets and scores; depth is capped at cap. Returns {"rmse", "absrel"}."""
    h, w = Ptr.shape[1:3]
    valid = torch.isfinite(Dtr) & (Dtr > 0)
    logd = torch.where(valid, Dtr.clamp(max=cap).log(), 0.0)[:, None]  # (n, 1, H, W)
    frac = F.adaptive_avg_pool2d(valid[:, None].float(), (h, w)).flatten()  # valid share per patch
    y = F.adaptive_avg_pool2d(logd, (h, w)).flatten() / frac.clamp(min=1e-6)
    probe = fit_ridge(Ptr.flatten(0, 2)[frac > 0], y[frac > 0, None])
    pred = rearrange(probe(Pte.flatten(0, 2)), "(n h w) 1 -> n 1 h w", h=h, w=w)
    pred = F.interpolate(pred, size=Dte.shape[1:], mode="bilinear")[:, 0].exp().clamp(max=cap)
    keep = torch.isfinite(Dte) & (Dte > 0)
    true = Dte.clamp(max=cap)
    return {"rmse": rmse(pred[keep], true[keep]), "absrel": absrel(pred[keep], true[keep])}


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
    """mIoU of a linear classifier on frozen patch tokens P (n, h, w, W), as DINOv2's linear ADE20K
    protocol: trained on each patch's class fractions, its logits upsampled bilinearly to the
    pixels of L (n, H, W); L = -1 is ignored."""
    h, w = Ptr.shape[1:3]
    target, keep = patch_class_fractions(Ltr, (h, w), n_classes)
    probe = fit_logreg(Ptr.flatten(0, 2)[keep], target[keep], n_classes)
    preds = []
    for P in Pte.split(16):  # (16, C, H, W) logits at a time: ADE20K has 150 classes
        logits = rearrange(probe(P.flatten(0, 2)), "(n h w) c -> n c h w", h=h, w=w)
        preds.append(F.interpolate(logits, size=Lte.shape[1:], mode="bilinear").argmax(1))
    return miou(torch.cat(preds), Lte, n_classes)


def zero_shot_depth(pred_inv, D, cap):
    """AbsRel and delta1 of relative inverse depth pred_inv (n, H, W) against true depth D, after a
    per-image least-squares scale and shift in inverse-depth space (the MiDaS / Depth Anything
    zero-shot protocol); invalid pixels are skipped, depth capped at cap."""
    preds, trues = [], []
    for p, d in zip(pred_inv, D):
        keep = torch.isfinite(d) & (d > 0)
        true = d[keep].clamp(max=cap)
        inv = align_scale_shift(p[keep].float(), 1 / true)
        preds.append(1 / inv.clamp(min=1 / cap))
        trues.append(true)
    pred, true = torch.cat(preds), torch.cat(trues)
    return {"absrel": absrel(pred, true), "delta1": delta1(pred, true)}


# -----------------------------------------------------------------------------------------------
# Models and frozen features


def load_checkpoint(path):
    """(model, seed): a train.py checkpoint, or a SigLIP-format directory (config.json + weights),
    converted with only the vision-language task: it has no trained depth or grounding head."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            fail(f"{path} is a directory without config.json; give a train.py checkpoint.pt or a "
                 "SigLIP model directory")
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
    return model, (ckpt.get("train_config") or {}).get("seed")


def to_input(images, device):
    """uint8 images (B, H, W, 3) -> (B, 3, H, W) in -1..1: SigLIP's rescale with mean = std = 0.5."""
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


@torch.no_grad()
def extract(model, items, want, device, desc, load=None):
    """One frozen pass over items (uint8 images, or paths that load reads), kept on the CPU:
    "pooled" (n, W) global embedding, "patch" (n, h, w, W) final patch tokens, "img" (n, D)
    normalised image embedding, "depth" (n, H, W) the depth head's relative inverse depth."""
    out = {k: [] for k in want}
    for i in tqdm(range(0, len(items), BATCH), desc=desc, leave=False):
        x = to_input([load(it) if load else it for it in items[i:i + BATCH]], device)
        if {"pooled", "patch", "img"} & set(want):
            vis = model.vision(x)
            h = x.shape[-2] // model.cfg.vision.patch_size
            got = {"pooled": vis["pooled"], "img": F.normalize(vis["pooled"], dim=-1),  # = encode_image(x)
                   "patch": rearrange(vis["patch"], "b (h w) d -> b h w d", h=h)}
            for k in set(want) & set(got):
                out[k].append(got[k].float().cpu())
        if "depth" in want:
            out["depth"].append(model.predict_depth(x).float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def embed_text(model, texts, device):
    """(n, D) normalised text embeddings, 256 texts per pass."""
    return torch.cat([model.encode_text(model.tokenize(list(texts[i:i + 256])).to(device)).float().cpu()
                      for i in range(0, len(texts), 256)])


def embed_classes(model, names, device):
    """(C, D): each class is the mean of its prompts' embeddings, renormalised (CLIP's ensembling)."""
    e = embed_text(model, [t.format(n) for n in names for t in TEMPLATES], device)
    return F.normalize(e.view(len(names), len(TEMPLATES), -1).mean(1), dim=-1)


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


def correspondence(Pa, Pb, warps, seg, size):
    """Every patch of view B that shows an object finds its nearest neighbour (cosine) among view
    A's patches (Pa, Pb: (n, h, w, W)); it is right if that patch's centre lies within PCK * size
    pixels of the point the B patch's centre came from (seg (n, S, S) instance map of view A)."""
    n, h, w, _ = Pa.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = (torch.stack([cols, rows], -1).flatten(0, 1) + 0.5) * size / w  # (N, 2) x, y in pixels
    sim = F.normalize(Pb.flatten(1, 2), dim=-1) @ F.normalize(Pa.flatten(1, 2), dim=-1).transpose(1, 2)
    pred = centres[sim.argmax(2)]  # (n, N, 2): where in A each B patch is matched
    true = torch.stack([torch.stack([x0 + (size - centres[:, 0] if flip else centres[:, 0]) * c / size,
                                     y0 + centres[:, 1] * c / size], -1)
                        for x0, y0, c, flip in warps])  # (n, N, 2)
    on_object = seg[torch.arange(n)[:, None], true[..., 1].long(), true[..., 0].long()] >= 2
    return correspondence_recall(pred[on_object], true[on_object], PCK * size)


def grounding(regions, names, vocab_emb, vocab):
    """regions: per image (M_i, D) embeddings of its true boxes; names: per image the boxes' names;
    vocab_emb (V, D) text embeddings of vocab, every name in the set. Entity -> region: each name
    picks one of its image's boxes (counted where the image holds a box of another name, else any
    pick is right); region -> name: each box picks one name of the whole vocabulary."""
    index = {n: i for i, n in enumerate(vocab)}
    entity, region = [], []
    for R, nm in zip(regions, names):
        ids = torch.tensor([index[n] for n in nm])  # (M,)
        pick = (vocab_emb[ids] @ R.T).argmax(1)  # (M,) the box each name chooses
        entity.append((ids[pick] == ids)[(ids[None] != ids[:, None]).any(1)])
        region.append((R @ vocab_emb.T).argmax(1) == ids)
    return {"acc": torch.cat(entity).float().mean().item(), "name_acc": torch.cat(region).float().mean().item()}


# -----------------------------------------------------------------------------------------------
# The toy-world suite


def render_toy(n, size):
    """The default val set: n scenes of a stream no training run draws from, at the model's size."""
    return [data.render_scene(TOY_SEED, i, size) for i in tqdm(range(n), desc="render toy scenes", leave=False)]


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


def toy_suite(model, scenes, device, skip):
    """Every toy-world protocol on scenes (render_scene dicts at the model's input size)."""
    S, n = model.cfg.vision.image_size, len(scenes)
    tr = 2 * n // 3  # the first 2/3 of the scenes train the probes, the rest test them
    images = [s["image"] for s in scenes]
    depth = torch.from_numpy(np.stack([s["depth"] for s in scenes]))  # (n, S, S), sky = inf
    seg = torch.from_numpy(np.stack([s["seg"] for s in scenes])).long()  # (n, S, S) instance ids
    largest = [max(s["objects"], key=lambda o: o["area"]) for s in scenes]
    shape = torch.tensor([data.SHAPES.index(o["shape"]) for o in largest])
    color = torch.tensor([data.COLORS.index(o["color"]) for o in largest])
    count = torch.tensor([s["count"] for s in scenes])
    names = [f"{c} {s}" for s in data.SHAPES for c in data.COLORS]  # every entity name: "red cube", ...
    has_text = hasattr(model, "text")  # built for clip or ground
    want = ("pooled", "patch") + ("img",) * has_text + ("depth",) * ("depth" in model.tasks)
    a = extract(model, images, want, device, "toy features")
    m = {}

    # [<-> ImageNet zero-shot] the prompt "a photo of a red cube." that fits the image best names
    # the shape and colour of its largest object.
    if has_text:
        pred = (a["img"] @ embed_classes(model, names, device).T).argmax(1)
        m["zs_shape_acc"] = accuracy(pred // len(data.COLORS), shape)
        m["zs_color_acc"] = accuracy(pred % len(data.COLORS), color)
        # [<-> COCO retrieval] each scene's caption among all captions and back; the toy world
        # repeats some captions word for word, and a repeat counts as the right one.
        captions = [s["caption"] for s in scenes]
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions])
        same = cid[:, None] == cid[None]  # (n, n)
        sim = a["img"] @ embed_text(model, captions, device).T  # (images, captions)
        for way, scores in (("i2t", sim), ("t2i", sim.T)):
            for k in (1, 5):
                m[f"ret_{way}_r{k}"] = recall_at_k(scores, same, k)
    else:
        skip("zero-shot classification and retrieval: the model has no text tower")

    # [<-> linear probing] how many objects, and the largest one's shape, from the global embedding.
    X = a["pooled"]
    m["lin_count_acc"] = linear_probe(X[:tr], count[:tr], X[tr:], count[tr:], int(count.max()) + 1)
    m["lin_shape_acc"] = linear_probe(X[:tr], shape[:tr], X[tr:], shape[tr:], len(data.SHAPES))

    # [<-> NYUv2 depth probe] metric depth from patch tokens; capped at TOY_CAP, the sky left out.
    P = a["patch"]
    d = depth_probe(P[:tr], depth[:tr], P[tr:], depth[tr:], TOY_CAP)
    m["depth_probe_rmse"], m["depth_probe_absrel"] = d["rmse"], d["absrel"]

    # [<-> ADE20K] semantic classes per pixel: sky, floor, and each object's shape.
    lut = [torch.tensor([0, 1] + [2 + data.SHAPES.index(o["shape"]) for o in s["objects"]]) for s in scenes]
    labels = torch.stack([t[g] for t, g in zip(lut, seg)])  # (n, S, S)
    m["seg_miou"] = seg_probe(P[:tr], labels[:tr], P[tr:], labels[tr:], 2 + len(data.SHAPES))

    # [<-> NAVI / SPair] dense matches between each scene and a known crop + flip of it.
    views, warps = zip(*(second_view(im, np.random.default_rng([CORR_SEED, i])) for i, im in enumerate(images)))
    b = extract(model, list(views), ("patch",), device, "toy second views")
    m["corr_recall"] = correspondence(P, b["patch"], warps, seg, S)

    # [<-> KITTI / NYU zero-shot depth] the depth head's output, aligned per image.
    if "depth" in model.tasks:
        z = zero_shot_depth(a["depth"], depth, TOY_CAP)
        m["zsdepth_absrel"], m["zsdepth_delta1"] = z["absrel"], z["delta1"]
    else:
        skip("zero-shot depth: the model has no depth head")

    # Grounding: region embeddings of the true boxes against the entity names' text embeddings.
    if "ground" in model.tasks:
        boxes = [torch.tensor([o["box"] for o in s["objects"]], dtype=torch.float32) for s in scenes]
        box_names = [[o["name"] for o in s["objects"]] for s in scenes]
        regions = embed_boxes(model, images, boxes, device)
        g = grounding(regions, box_names, embed_text(model, names, device), names)
        m["ground_acc"], m["ground_name_acc"] = g["acc"], g["name_acc"]
    else:
        skip("grounding: the model has no grounding head")
    return m


# -----------------------------------------------------------------------------------------------
# Real benchmarks in their usual layouts (see the module docstring), through the same protocols


IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def image_files(folder):
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTS))


def load_image(path, size):
    """Any image file -> uint8 (size, size, 3) RGB, resized bicubic to the square input as SigLIP's
    image processor does (no crop)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))


def resize_nearest(label, size):
    """(H, W) class map or depth map -> (size, size) float tensor, nearest neighbour (no mixing)."""
    t = torch.from_numpy(np.asarray(label, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0]


def need_dir(path, flag):
    if not os.path.isdir(path):
        fail(f"{flag} {path} is not a directory; see --help for the layout it expects")


def imagenet_suite(model, root, device, skip):
    """[<-> ImageNet] zero-shot from folder names, logistic regression and k-NN from train to val."""
    for split in ("train", "val"):
        need_dir(os.path.join(root, split), "--imagenet")
    classes = sorted(e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir())
    S, m = model.cfg.vision.image_size, {}
    feats, labels = {}, {}
    for split in ("train", "val"):
        items = [(f, k) for k, c in enumerate(classes) for f in image_files(os.path.join(root, split, c))]
        if not items:
            fail(f"--imagenet {root}: no images in {split}/CLASS/ folders")
        want = ("pooled", "img") if split == "val" and hasattr(model, "text") else ("pooled",)
        feats[split] = extract(model, [f for f, _ in items], want, device, f"imagenet {split}",
                               lambda f: load_image(f, S))
        labels[split] = torch.tensor([k for _, k in items])
    tr, va = feats["train"]["pooled"], feats["val"]["pooled"]
    m["in_lin_acc"] = linear_probe(tr, labels["train"], va, labels["val"], len(classes))
    m["in_knn_acc"] = knn_probe(tr, labels["train"], va, labels["val"], len(classes))
    if hasattr(model, "text"):
        text = embed_classes(model, [c.replace("_", " ") for c in classes], device)
        m["in_zs_acc"] = accuracy((feats["val"]["img"] @ text.T).argmax(1), labels["val"])
    else:
        skip("ImageNet zero-shot: the model has no text tower")
    return m


def coco_suite(model, root, device, skip):
    """[<-> COCO retrieval] every image against every caption (5 per image in COCO), both ways."""
    if not hasattr(model, "text"):
        skip("COCO retrieval: the model has no text tower")
        return {}
    path = os.path.join(root, "captions.json")
    try:
        with open(path) as f:
            spec = json.load(f)
        files = [os.path.join(root, im["file_name"]) for im in spec["images"]]
        row = {im["id"]: i for i, im in enumerate(spec["images"])}
        owner = torch.tensor([row[a["image_id"]] for a in spec["annotations"]])
        captions = [a["caption"] for a in spec["annotations"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"--coco {root}: {path} is not a COCO captions file with images and annotations ({e!r})")
    if missing := [f for f in files if not os.path.isfile(f)]:
        fail(f"--coco {root}: image {missing[0]} listed in captions.json does not exist")
    S = model.cfg.vision.image_size
    img = extract(model, files, ("img",), device, "coco images", lambda f: load_image(f, S))["img"]
    sim = img @ embed_text(model, captions, device).T  # (images, captions)
    right = torch.arange(len(files))[:, None] == owner[None]  # (images, captions)
    return {f"coco_{way}_r{k}": recall_at_k(scores, r, k)
            for way, scores, r in (("i2t", sim, right), ("t2i", sim.T, right.T)) for k in (1, 5)}


def pairs(files, suffixes, flag):
    """For each image, the first existing partner file stem + suffix (labels, depth)."""
    out = []
    for f in files:
        stem = os.path.splitext(f)[0]
        found = [stem + s for s in suffixes if os.path.isfile(stem + s)]
        if not found:
            fail(f"{flag}: {f} has no partner {os.path.basename(stem)}{' or '.join(suffixes)}")
        out.append(found[0])
    return out


def read_labels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def read_depth(path):
    """Metres: a 16-bit PNG in millimetres (NYUv2 toolbox export) or a float .npy; 0 = missing."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    with Image.open(path) as im:
        return np.asarray(im).astype(np.float32) / 1000


def nyu_suite(model, root, device, skip):
    """[<-> NYUv2] the linear depth probe (first 2/3 by name train) and zero-shot relative depth."""
    need_dir(root, "--nyu")
    files = [f for f in image_files(root) if not os.path.splitext(f)[0].endswith("_depth")]
    if len(files) < 3:
        fail(f"--nyu {root}: needs at least 3 image/depth pairs, found {len(files)}")
    S, tr = model.cfg.vision.image_size, 2 * len(files) // 3
    truth = pairs(files, ("_depth.png", "_depth.npy"), "--nyu")
    depth = torch.stack([resize_nearest(read_depth(p), S) for p in truth])  # (n, S, S) metres, 0 = missing
    want = ("patch",) + ("depth",) * ("depth" in model.tasks)
    f = extract(model, files, want, device, "nyu images", lambda p: load_image(p, S))
    d = depth_probe(f["patch"][:tr], depth[:tr], f["patch"][tr:], depth[tr:], NYU_CAP)
    m = {"nyu_probe_rmse": d["rmse"], "nyu_probe_absrel": d["absrel"]}
    if "depth" in model.tasks:
        z = zero_shot_depth(f["depth"], depth, NYU_CAP)
        m["nyu_zsdepth_absrel"], m["nyu_zsdepth_delta1"] = z["absrel"], z["delta1"]
    else:
        skip("NYUv2 zero-shot depth: the model has no depth head")
    return m


def ade_suite(model, root, device, skip):
    """[<-> ADE20K] the linear segmentation probe (first 2/3 by name train); label 0 is ignored."""
    need_dir(os.path.join(root, "images"), "--ade")
    files = image_files(os.path.join(root, "images"))
    if len(files) < 3:
        fail(f"--ade {root}: needs at least 3 images in images/, found {len(files)}")
    S, tr = model.cfg.vision.image_size, 2 * len(files) // 3
    ann = [os.path.join(root, "annotations", os.path.splitext(os.path.basename(f))[0] + ".png") for f in files]
    if missing := [a for a in ann if not os.path.isfile(a)]:
        fail(f"--ade {root}: annotation {missing[0]} is missing")
    labels = torch.stack([resize_nearest(read_labels(a), S) for a in ann]).long() - 1  # 0 "other" -> -1
    if labels.max() < 0:
        fail(f"--ade {root}: every annotation pixel is 0 (unlabelled)")
    P = extract(model, files, ("patch",), device, "ade images", lambda p: load_image(p, S))["patch"]
    return {"ade_miou": seg_probe(P[:tr], labels[:tr], P[tr:], labels[tr:], int(labels.max()) + 1)}


SUITES = {"imagenet": imagenet_suite, "coco": coco_suite, "nyu": nyu_suite, "ade": ade_suite}


# -----------------------------------------------------------------------------------------------
# Results, and the comparison of runs in Figure 1's layout


def arrow(name):
    return "↓" if lower_is_better(name) else "↑"


def stands_for(name):
    return next(v for k, v in STANDS_FOR.items() if name.startswith(k))


def write_results(out, results):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"tasks: {','.join(results['tasks'])} · seed: {results['seed']} · data: {results['data']} · "
             f"{results['seconds']:.0f} s", "", "| metric | value | stands for |", "|---|---|---|"]
    lines += [f"| {k} {arrow(k)} | {v:.3f} | {stands_for(k)} |" for k, v in results["metrics"].items()]
    lines += [""] + [f"skipped: {s}" for s in results["skipped"]]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def radar(rows, names, path):
    """One polygon per task set. Each axis has its own scale, as the paper's Figure 1: the worst row
    at 0.2, the best at 1 (lower-is-better axes flipped), one row alone at 1; labels give the range."""
    means = np.array([[stats[k][0] for k in names] for _, stats in rows])  # (rows, metrics)
    lo, hi = means.min(0), means.max(0)
    r = 0.2 + 0.8 * (means - lo) / np.where(hi > lo, hi - lo, 1)
    r = np.where(hi > lo, np.where([lower_is_better(k) for k in names], 1.2 - r, r), 1.0)
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    fig, ax = plt.subplots(figsize=(7, 7), subplot_kw={"polar": True})
    for (label, _), radius in zip(rows, r):
        line, = ax.plot(np.append(angles, angles[0]), np.append(radius, radius[0]), marker="o", label=label)
        ax.fill(angles, radius, alpha=0.1, color=line.get_color())
    ax.set_xticks(angles, [f"{k} {arrow(k)}\n{a:.3g}" + (f"–{b:.3g}" if b > a else "")
                           for k, a, b in zip(names, lo, hi)], fontsize=8)
    ax.tick_params(axis="x", pad=14)  # keep the labels off the outermost polygon
    ax.set_ylim(0, 1.1)
    ax.set_yticklabels([])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)  # below the axis labels
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def compare(run_dirs, out):
    """Rows = task sets (runs with the same tasks are seeds), columns = key metrics, mean ± std over
    seeds (population std, 0 for one seed): the paper's Figure 1 layout, as Markdown and a radar."""
    groups = {}
    for d in run_dirs:
        path = next((p for p in (os.path.join(d, "eval", "results.json"), os.path.join(d, "results.json"))
                     if os.path.isfile(p)), None)
        if path is None:
            fail(f"{d} has no eval/results.json; evaluate it first: python evaluate.py {d}/checkpoint.pt")
        with open(path) as f:
            r = json.load(f)
        groups.setdefault(tuple(t for t in mtv.ALL_TASKS if t in r["tasks"]), []).append(r)
    order = sorted(groups, key=lambda ts: (len(ts), [mtv.ALL_TASKS.index(t) for t in ts]))  # VL, + SSL, ...
    names = [k for k in KEY_METRICS if any(k in r["metrics"] for g in groups.values() for r in g)]
    rows = []
    for ts in order:
        stats = {k: (float(np.mean(v)), float(np.std(v))) for k in names
                 if (v := [r["metrics"][k] for r in groups[ts] if k in r["metrics"]])}
        rows.append(("+".join(ts), stats))
    lines = ["| tasks | seeds | " + " | ".join(f"{k} {arrow(k)}" for k in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for (label, stats), ts in zip(rows, order):
        seeds = ",".join(str(r["seed"]) for r in groups[ts])
        cells = [f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" if k in stats else "–" for k in names]
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    shared = [k for k in names if all(k in stats for _, stats in rows)]  # a radar axis needs every row
    radar(rows, shared, os.path.join(out, "radar.png"))
    print("\n".join(lines))
    print(f"wrote {os.path.join(out, 'compare.md')} and {os.path.join(out, 'radar.png')}")
    return {label: stats for label, stats in rows}


# -----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="train.py checkpoint.pt, or a SigLIP model directory")
    p.add_argument("--data", help="glob of toy-world val shards with truth members (gt_depth, gt, gt_seg); "
                                  "default: render --n scenes in memory")
    p.add_argument("--n", type=int, default=TOY_N, help=f"toy scenes (default {TOY_N}; of --data the first N)")
    p.add_argument("--out", help="output folder; default <checkpoint dir>/eval, with --compare the runs' "
                                 "common parent")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if available, else cpu")
    for name, layout in (("imagenet", "DIR/{train,val}/CLASS/*.jpg"), ("coco", "DIR/captions.json + images"),
                         ("nyu", "DIR/NAME.jpg + DIR/NAME_depth.png|npy"),
                         ("ade", "DIR/images/NAME.jpg + DIR/annotations/NAME.png")):
        p.add_argument(f"--{name}", metavar="DIR", help=f"real data laid out as {layout}")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="aggregate evaluated train.py runs instead")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        if args.checkpoint:
            fail("give either a CHECKPOINT to evaluate or --compare RUN_DIR ..., not both")
        return compare(args.compare, args.out or os.path.commonpath([os.path.abspath(d) for d in args.compare]))
    if not args.checkpoint:
        fail("give a CHECKPOINT to evaluate, or --compare RUN_DIR ...")
    if args.n < 6:
        fail(f"--n {args.n} is too small; the probes need at least 6 scenes (4 to train, 2 to test)")
    start = time.time()
    model, seed = load_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    model = model.to(device).eval()
    S = model.cfg.vision.image_size
    print(f"model: {args.checkpoint} · tasks {','.join(model.tasks)} · {S} px · device {device}")
    real = {k: getattr(args, k) for k in SUITES if getattr(args, k)}
    metrics, skipped, used = {}, [], []  # skipped protocols are listed with the results
    if args.data or not real:  # the toy world unless only real benchmarks were asked for
        scenes = load_toy_shards(args.data, args.n, S) if args.data else render_toy(args.n, S)
        used.append(f"{len(scenes)} toy scenes " + (f"from {args.data}" if args.data else f"(seed {TOY_SEED})"))
        metrics.update(toy_suite(model, scenes, device, skipped.append))
    for name, folder in real.items():
        metrics.update(SUITES[name](model, folder, device, skipped.append))
        used.append(f"{name} {folder}")
    ckpt = args.checkpoint
    ckpt_dir = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    metrics = {k: round(v, 6) for k, v in metrics.items()}
    results = {"checkpoint": args.checkpoint, "tasks": list(model.tasks), "seed": seed, "data": "; ".join(used),
               "metrics": metrics, "lower_is_better": [k for k in metrics if lower_is_better(k)],
               "skipped": skipped, "seconds": time.time() - start}
    write_results(args.out or os.path.join(ckpt_dir, "eval"), results)
    return results


if __name__ == "__main__":
    main()
