"""evaluate.py: metrics on hand-computed cases, standard errors, chance and ceiling, probes on
features that do / do not hold the answer, --compare aggregation, the real-data layouts, and the
whole CLI on a tiny random model."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as E
import mtv


def value(parts, reduce=E.ratio):
    return E.estimate(parts, reduce)[0]


# -- metrics ------------------------------------------------------------------------------------


def test_accuracy_and_recall_at_k():
    assert value(E.hits(torch.tensor([0, 1, 2, 2]) == torch.tensor([0, 1, 1, 2]))) == 0.75
    sim = torch.tensor([[0.9, 0.1, 0.0],    # query 0: right (0) ranked 1st
                        [0.8, 0.5, 0.7],    # query 1: right (1) ranked 3rd
                        [0.1, 0.9, 0.3]])   # query 2: right (2) ranked 2nd
    right = torch.eye(3, dtype=torch.bool)
    assert value(E.hits(E.recall_hits(sim, right, 1))) == pytest.approx(1 / 3)
    assert value(E.hits(E.recall_hits(sim, right, 2))) == pytest.approx(2 / 3)
    assert value(E.hits(E.recall_hits(sim, right, 5))) == 1.0  # k beyond the gallery = all of it
    assert E.recall_chance(right, 1) == pytest.approx(1 / 3) and E.recall_chance(right, 2) == pytest.approx(2 / 3)
    right[1, 0] = True  # a second right answer (COCO: 5 captions per image)
    assert value(E.hits(E.recall_hits(sim, right, 1))) == pytest.approx(2 / 3)
    # a random ranking of 10 items, 2 right: recall@3 = 1 - (8 * 7 * 6) / (10 * 9 * 8)
    two = torch.zeros(1, 10, dtype=torch.bool)
    two[0, :2] = True
    assert E.recall_chance(two, 3) == pytest.approx(1 - 336 / 720)


def test_standard_errors():
    """The bootstrap se of an accuracy is the binomial one, sqrt(p (1 - p) / n), is fixed by its seed,
    and shrinks as 1 / sqrt(n); a constant metric has none."""
    g = torch.Generator().manual_seed(0)
    for n in (400, 1600):
        correct = torch.rand(n, generator=g) < 0.25
        p, se, count = E.estimate(E.hits(correct))
        assert count == n and se == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.1)
        assert E.estimate(E.hits(correct)) == (p, se, n)
    assert E.estimate(E.hits(torch.ones(50, dtype=torch.bool)))[1] == 0.0


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, -1, 2]])[None]  # one image (1, 2, 3)
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])[None]
    # class 0: inter 1, union |{0,1,5}| = 3; class 1: inter 2, union 3; class 2: inter 0, union 1
    # (the ignored pixel 4 counts for nobody); class 3 absent from both, so not averaged
    parts = E.seg_parts(pred, target, 4)
    assert value(parts, E.miou_of) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert value(parts, lambda t: E.miou_of(t, [1, 2])) == pytest.approx((2 / 3 + 0) / 2)
    # mIoU is over the whole set, not a mean over images: two copies change nothing
    assert value(torch.cat([parts, parts]), E.miou_of) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_depth_metrics_by_hand():
    pred, true = torch.tensor([[[1.0, 2.0, 4.0]]]), torch.tensor([[[1.0, 4.0, 2.0]]])
    parts = E.depth_parts(pred, true, cap=10.0)
    assert value(parts, E.rmse_of) == pytest.approx(math.sqrt(8 / 3))
    assert value(parts, E.absrel_of) == pytest.approx((0 + 0.5 + 1) / 3)
    where = torch.tensor([[[True, True, False]]])
    assert value(E.depth_parts(pred, true, 10.0, where), E.rmse_of) == pytest.approx(math.sqrt(2))
    sky = torch.tensor([[[1.0, math.inf, 0.0]]])  # sky and missing pixels are never scored
    assert value(E.depth_parts(pred, sky, 10.0), E.rmse_of) == 0.0


def test_align_scale_shift_and_zero_shot_depth():
    pred = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(E.align_scale_shift(pred, 3 * pred - 2), 3 * pred - 2, atol=1e-6)
    # fit to [0, 1, 1, 2]: slope 0.6, intercept 0.1 (hand-solved normal equations)
    assert torch.allclose(E.align_scale_shift(pred, torch.tensor([0.0, 1, 1, 2])),
                          torch.tensor([0.1, 0.7, 1.3, 1.9]), atol=1e-6)
    depth = torch.tensor([[[2.0, 4.0], [8.0, math.inf]]])  # (1, 2, 2), one sky pixel
    inverse = 5 / depth + 0.3  # any scale and shift of true inverse depth is a perfect answer
    z = E.zero_shot_depth(inverse, depth, cap=20.0)
    assert value(z, E.absrel_of) == pytest.approx(0, abs=1e-5) and value(z, E.delta1_of) == 1.0
    flat = E.zero_shot_depth(torch.ones_like(depth), depth, cap=20.0)  # no depth at all: mean inverse
    mean_inv = (1 / 2 + 1 / 4 + 1 / 8) / 3
    assert value(flat, E.absrel_of) == pytest.approx(np.mean([abs(1 / mean_inv - d) / d for d in (2, 4, 8)]),
                                                     rel=1e-5)


def test_correspondence_oracle_and_chance():
    """Perfect patch features (each B patch is the A patch nearest its true source point) score
    at least 0.95 at 32 and 64 px with 8-px patches, because the threshold is at least one patch
    side; chance is the share of A's patch centres within the threshold; a matcher that ignores
    the mirror does far worse."""
    assert E.corr_threshold(32, 8) == 8 and E.corr_threshold(64, 8) == pytest.approx(8) and \
        E.corr_threshold(224, 16) == pytest.approx(22.4)
    for S in (32, 64):
        scenes = [data.render_scene(5, i, S) for i in range(40)]
        images = [s["image"] for s in scenes]
        seg = torch.from_numpy(np.stack([s["seg"] for s in scenes])).long()
        warps = [E.second_view(im, np.random.default_rng([1, i]))[1] for i, im in enumerate(images)]
        g = S // 8
        centres, true, _ = E.match_geometry(warps, seg, S, (g, g))
        nearest = (true[:, :, None] - centres).norm(dim=-1).argmin(2)  # (n, N)
        Pa = torch.eye(g * g).reshape(1, g, g, g * g).repeat(len(scenes), 1, 1, 1)
        Pb = torch.eye(g * g)[nearest].reshape(len(scenes), g, g, g * g)
        c = E.correspondence(Pa, Pb, warps, seg, S, 8)
        assert value(c["model"]) >= 0.95 and value(c["ceiling"]) >= 0.95
        assert value(c["chance"]) == pytest.approx(math.pi * 8 ** 2 / S ** 2, rel=0.35)  # a disc of radius 8
        unflipped = E.correspondence(Pa, Pa, warps, seg, S, 8)  # "the same patch" is wrong after a warp
        assert value(unflipped["model"]) < 0.7


def test_grounding_by_hand():
    vocab = ["red cube", "blue cone", "green sphere"]
    text = torch.eye(3)
    regions = [torch.eye(3)[[0, 1]],                   # image 0: both boxes embed their own name
               torch.eye(3)[[2, 2]]]                   # image 1: both boxes look like "green sphere"
    names = [["red cube", "blue cone"], ["green sphere", "red cube"]]
    g = E.grounding(regions, names, text, vocab)
    assert value(g["acc"]) == pytest.approx(3 / 4)  # "red cube" in image 1 picks the wrong box
    assert value(g["name_acc"]) == pytest.approx(3 / 4)
    assert value(g["acc_chance"]) == pytest.approx(1 / 2)  # two boxes each: a random pick is right half the time


def test_zero_shot_twin_oracle_and_chance():
    """On single-object scenes an image embedding equal to its object's prompt embedding scores
    1.0 on colour and shape, and on many-object scenes the present-object variant is 1.0 for an
    embedding of any object present; random embeddings score chance (within 3 standard errors)."""
    scenes = [data.render_scene(3, i, 8) for i in range(1500)]
    names = E.toy_names()
    classes = torch.nn.functional.normalize(torch.randn(len(names), 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    some = torch.tensor([names.index(s["objects"][-1]["name"]) for s in scenes])
    parts, chance = E.zero_shot(classes[some], classes, scenes)
    assert all(value(p) == 1.0 for p in parts.values())
    assert chance["zs_color_acc"] == 1 / 8 and chance["zs_shape_acc"] == 1 / 4 and 2 / 32 < chance["zs_present_acc"] < 4 / 32
    single = sum(s["count"] == 1 for s in scenes)
    assert E.estimate(parts["zs_shape_acc"])[2] == single and E.estimate(parts["zs_present_acc"])[2] == 1500 - single
    noise = torch.randn(len(scenes), 64, generator=torch.Generator().manual_seed(1))
    parts, chance = E.zero_shot(noise, classes, scenes)
    for k, p in parts.items():
        v, se, _ = E.estimate(p)
        assert abs(v - chance[k]) < 3 * se + 0.01, k


def test_name_tokens_are_the_same_in_training_and_evaluation(tmp_path):
    """Grounding is scored with the names tokenized exactly as collate tokenizes them for training
    (name_length positions), not at the caption context, whose embedding differs."""
    model = mtv.MTV(mtv.build_config("tiny"), ("clip", "ground")).eval()
    tok = model.tokenize
    names = ["red cube", "small blue cone", "green sphere"]
    batch = data.collate([{"caption": "x", "boxes": torch.zeros(3, 4), "names": names}], tok)
    assert torch.equal(batch["name_tokens"], data.tokenize_names(tok, names))
    assert batch["name_tokens"].shape == (3, tok.name_length) and tok.name_length < tok.context_length
    with torch.no_grad():
        trained = model.encode_text(batch["name_tokens"])
    assert torch.allclose(E.embed_names(model, names, "cpu"), trained, atol=1e-6)
    assert not torch.allclose(E.embed_text(model, names, "cpu"), trained, atol=1e-3)  # the old, wrong path


# -- probes -------------------------------------------------------------------------------------


def labelled_features(n, classes, informative, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    X = torch.randn(n, 32, generator=g)
    if informative:
        X[:, :classes] += 3 * torch.nn.functional.one_hot(y, classes)
    return X, y


@pytest.mark.parametrize("probe", [E.linear_probe, E.knn_probe])
def test_classification_probes(probe):
    X, y = labelled_features(600, 4, informative=True)
    assert (probe(X[:400], y[:400], X[400:], 4) == y[400:]).float().mean() > 0.95
    X, y = labelled_features(600, 4, informative=False)
    assert (probe(X[:400], y[:400], X[400:], 4) == y[400:]).float().mean() < 0.4  # chance is 0.25
    assert E.majority_chance(y[:400], y[400:]) == pytest.approx(0.25, abs=0.06)


def smooth_depth(n, S, seed):
    """(n, S, S): each image a tilted plane in log depth plus sky (inf) above a random row."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 1, 1, generator=g) + 0.5, torch.rand(n, 1, 1, generator=g)
    rows = torch.linspace(0, 1, S)[:, None].expand(S, S)
    depth = torch.exp(a * (1 - rows) + b)
    return depth.masked_fill(rows < torch.rand(n, 1, 1, generator=g) * 0.3, math.inf)


def test_depth_probe():
    n, S, g = 60, 32, 4
    depth = smooth_depth(n, S, 0)
    sky = depth.isinf()[:, None].float()
    pool = torch.nn.functional.adaptive_avg_pool2d
    cells = (pool(depth.log().nan_to_num(posinf=0)[:, None], g) / (1 - pool(sky, g)).clamp(min=1e-6))[:, 0]
    noise = torch.randn(n, g, g, 16, generator=torch.Generator().manual_seed(1))
    good = torch.cat([cells[..., None], noise], -1)  # (n, g, g, 17): the patch's mean log depth is in it
    score = lambda P: E.depth_parts(E.depth_probe(P[:40], depth[:40], P[40:], depth[40:], cap=8.0), depth[40:], 8.0)
    d, r = score(good), score(noise)
    # what remains is bilinear upsampling at the borders; random features miss by ~40 %
    assert value(d, E.absrel_of) < 0.05 and value(d, E.absrel_of) < value(r, E.absrel_of) / 5
    assert value(d, E.rmse_of) < value(r, E.rmse_of) / 5


def test_seg_probe():
    n, S, g, C = 40, 16, 4, 3
    gen = torch.Generator().manual_seed(0)
    cls = torch.randint(0, C, (n, g, g), generator=gen)
    labels = cls.repeat_interleave(S // g, 1).repeat_interleave(S // g, 2)  # (n, S, S) patch-constant
    labels[:, 0, 0] = -1  # an ignored pixel
    noise = torch.randn(n, g, g, 8, generator=gen)
    good = torch.cat([3 * torch.nn.functional.one_hot(cls, C), noise], -1).float()
    score = lambda P: value(E.seg_parts(E.seg_probe(P[:30], labels[:30], P[30:], labels[30:], C), labels[30:], C),
                            E.miou_of)
    assert score(good) > 0.9 and score(noise) < 0.4


def test_position_features_are_the_dense_floor():
    """A depth probe on patch positions alone learns each position's mean depth: on images whose
    depth is a function of the row it is as good as the image; on random depth it is not."""
    n, S, g = 60, 32, 4
    rows = torch.linspace(1, 5, S)[:, None].expand(n, S, S).contiguous()  # depth grows with the row
    pos = E.position_features(n, g, g)
    assert pos.shape == (n, g, g, g * g) and torch.equal(pos[3, 1, 2], torch.eye(g * g)[1 * g + 2])
    fit = E.depth_parts(E.depth_probe(pos[:40], rows[:40], pos[40:], rows[40:], 8.0), rows[40:], 8.0)
    assert value(fit, E.absrel_of) < 0.05
    noisy = rows * torch.exp(torch.randn(n, 1, 1, generator=torch.Generator().manual_seed(0)))
    miss = E.depth_parts(E.depth_probe(pos[:40], noisy[:40], pos[40:], noisy[40:], 50.0), noisy[40:], 50.0)
    assert value(miss, E.absrel_of) > 0.3


def test_paired_gain_by_hand():
    """The gain over a baseline on the same items: positive when better, either way round; and
    with the two resampled together its se is that of the difference. A model that halves every
    scene's errors has gain = half the baseline's error, and its paired se is exactly half the
    baseline's se (the same resamples), well below the unpaired sqrt(se_model^2 + se_base^2)."""
    g = torch.Generator().manual_seed(0)
    base = torch.stack([torch.rand(100, generator=g) * 50, torch.rand(100, generator=g) * 10,
                        torch.full((100,), 20.0)], 1).double()  # depth_parts rows: sq. error, rel. error, pixels
    model = base * torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)  # every error halved
    for reduce in (E.rmse_of, E.absrel_of):
        v, se_v, _ = E.estimate(model, reduce)
        c, se_c, _ = E.estimate(base, reduce)
        gain, gain_se = E.paired_gain(model, base, reduce, lower=True)
        assert v == pytest.approx(c / 2) and gain == pytest.approx(c / 2) and gain > 0
        assert gain_se == pytest.approx(se_c / 2) and gain_se < 0.5 * math.sqrt(se_v ** 2 + se_c ** 2)
    # accuracies: the model is right wherever the baseline is, and on 30 more of 200 items
    right = torch.rand(200, generator=g) < 0.4
    better = right.clone()
    better[(~right).nonzero()[:30, 0]] = True
    gain, gain_se = E.paired_gain(E.hits(better), E.hits(right))
    assert gain == pytest.approx(30 / 200)
    assert E.paired_gain(E.hits(right), E.hits(better))[0] == pytest.approx(-30 / 200)  # worse: negative
    # paired, the se is that of the per-item differences (1 on 30 items, else 0): binomial at 0.15
    assert gain_se == pytest.approx(math.sqrt(0.15 * 0.85 / 200), rel=0.1)
    unpaired = math.hypot(E.estimate(E.hits(better))[1], E.estimate(E.hits(right))[1])  # ~0.049
    assert gain_se < 0.6 * unpaired
    # Scores rows carry it where the chance parts are paired, and nowhere else
    m = E.Scores()
    m.add("depth_probe_rmse", model, E.rmse_of, chance=base, paired=True)
    m.add("lin_shape_acc", E.hits(better), chance=0.25)
    r = m.rows["depth_probe_rmse"]
    assert r["gain"] == pytest.approx(r["chance"] - r["value"]) and r["gain"] > 0
    assert m.rows["lin_shape_acc"]["gain"] is None and m.rows["lin_shape_acc"]["gain_se"] is None


DENSE = [f"{probe}_{infix}{sub}{metric}" for infix in ("", "ml_") for sub in ("", "obj_")
         for probe, metric in (("depth_probe", "rmse"), ("depth_probe", "absrel"))] + \
        [f"seg_{infix}{sub}miou" for infix in ("", "ml_") for sub in ("", "obj_")]
OBJECT = [f"obj_{attr}_{infix}acc" for attr in ("shape", "color") for infix in ("", "ml_")] + \
         [f"obj_shape_{infix}knn_acc" for infix in ("", "ml_")]


@pytest.fixture(scope="module")
def scenes32():
    return [data.render_scene(11, i, 32) for i in range(30)]


def true_patch_log_depth(scenes, grid):
    logd, frac = E.patch_log_depth(E.stacked(scenes, "depth"), grid, E.TOY_CAP)
    return torch.where(frac > 0, logd, math.log(E.TOY_CAP))[..., None]  # (n, h, w, 1), all-sky patches far


def test_features_without_content_score_exactly_the_position_probe(scenes32):
    """Patch features that carry nothing beyond their position (here nothing at all: zeros, or a
    constant) give the position-relative depth and segmentation probes exactly the position-only
    probe's score: value == chance and gain 0 with se 0, for the last layer and the taps alike."""
    n = len(scenes32)
    assert torch.equal(E.with_position(torch.zeros(n, 4, 4, 8), 20), E.position_features(n, 4, 4))
    assert E.with_position(torch.randn(n, 4, 4, 8), 20).shape == (n, 4, 4, 8 + 16)
    m = E.Scores()
    E.toy_dense_probes(m, {"": torch.zeros(n, 4, 4, 8), "ml_": torch.full((n, 4, 4, 5), 0.3)}, scenes32)
    assert sorted(m.rows) == sorted(DENSE)
    for k, r in m.rows.items():
        assert r["value"] == r["chance"] and r["gain"] == 0 and r["gain_se"] == 0, k
    assert m.rows["depth_probe_rmse"]["chance"] > 1.5 * m.rows["depth_probe_rmse"]["ceiling"]  # room to gain
    # features that are a function of the position only (a position embedding, the same in every
    # image) gain nearly nothing either: the same information, only penalised a little differently
    pos_only = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(0)).expand(n, -1, -1, -1)
    m = E.Scores()
    E.toy_dense_probes(m, {"": pos_only}, scenes32)
    assert all(abs(r["gain"]) < 0.005 for r in m.rows.values())


def test_true_depth_features_reach_the_ceiling(scenes32):
    """The true mean log depth of each patch as its feature reaches the depth probe's ceiling (the
    probe on exactly that, without the position), with a clear gain over position alone."""
    truth = true_patch_log_depth(scenes32, (4, 4))
    m = E.Scores()
    E.toy_dense_probes(m, {"": truth, "ml_": torch.cat([truth, torch.randn(truth.shape[:3] + (3,))], -1)}, scenes32)
    for k in DENSE[:8]:  # the depth rows
        r = m.rows[k]
        assert r["value"] == pytest.approx(r["ceiling"], rel=0.03), k
        assert r["gain"] == pytest.approx(r["chance"] - r["value"]) and r["gain"] > 2 * r["gain_se"], k


def test_object_tokens_by_hand():
    """Weights are each object's share of its visible pixels per patch; a hidden object is left out."""
    seg = torch.tensor([[[2, 2, 4, 1],
                         [2, 1, 1, 1],
                         [1, 2, 1, 1],
                         [0, 0, 1, 1]]])  # 2x2 patches of 2x2 pixels; object 1 (id 3) is hidden
    P = torch.eye(4).view(1, 2, 2, 4)  # each patch's token names the patch
    X, img, obj = E.object_tokens(P, seg)
    assert img.tolist() == [0, 0] and obj.tolist() == [0, 2]
    assert torch.equal(X, torch.tensor([[0.75, 0.0, 0.25, 0.0],    # 3 pixels top left, 1 bottom left
                                        [0.0, 1.0, 0.0, 0.0]]))    # its one pixel top right


def test_token_spread_by_hand():
    """Tokens equal within each image: all variance is the image's (share 1); tokens that differ
    only by position, the same in every image: none of it (share 0); half and half by hand."""
    g = torch.Generator().manual_seed(0)
    per_image = torch.randn(5, 1, 1, 3, generator=g).expand(5, 2, 2, 3)
    per_position = torch.randn(1, 2, 2, 3, generator=g).expand(5, 2, 2, 3)
    shares = []
    for P in (per_image, per_position):
        m = E.Scores()
        E.toy_token_spread(m, P)
        shares.append(m.rows["patch_image_share"]["value"])
    assert shares[0] == pytest.approx(1) and shares[1] == pytest.approx(0, abs=1e-12)
    # two images, two patches of one feature: image means +-1, within-image deviations +-1
    P = torch.tensor([[2.0, 0.0], [-2.0, 0.0]]).view(2, 1, 2, 1)
    m = E.Scores()
    E.toy_token_spread(m, P)
    assert m.rows["patch_image_share"]["value"] == pytest.approx(0.5)


def test_object_tokens_recover_the_shape_of_objects_that_own_their_patches(scenes32):
    """Each patch's token is the one-hot shape of the object with most pixels in it (zeros where
    none): pooling under an object's true mask returns exactly its shape's one-hot whenever every
    patch it shows in belongs to an object of its shape, and a mix summing to 1 otherwise."""
    seg = E.stacked(scenes32, "seg").long()
    n, g = len(scenes32), 4
    K = int(seg.max()) + 1
    frac = E.patch_class_fractions(seg, (g, g), K)[0].view(n, g * g, K)[..., 2:]  # (n, patches, objects)
    shapes = [torch.tensor([data.SHAPES.index(o["shape"]) for o in s["objects"]] + [0] * (K - 2))[:K - 2]
              for s in scenes32]
    owner = frac.argmax(2)  # (n, patches)
    P = torch.stack([torch.nn.functional.one_hot(sh[o], 4) for sh, o in zip(shapes, owner)]).float()
    P = (P * (frac.sum(2, keepdim=True) > 0)).view(n, g, g, 4)  # no object pixel: a zero token
    X, img, obj = E.object_tokens(P, seg)
    visible = [(i, j) for i, s in enumerate(scenes32) for j in range(len(s["objects"])) if (s["seg"] == 2 + j).any()]
    assert list(zip(img.tolist(), obj.tolist())) == visible
    clean = 0
    for x, i, j in zip(X, img.tolist(), obj.tolist()):
        assert x.sum() == pytest.approx(1, abs=1e-6)
        covers = frac[i, :, j] > 0
        if (shapes[i][owner[i][covers]] == shapes[i][j]).all():  # every patch it shows in has its shape
            assert torch.allclose(x, torch.nn.functional.one_hot(shapes[i][j], 4).float(), atol=1e-6)
            clean += 1
    assert clean >= len(visible) // 3  # not vacuous: most objects own their patches (31 of 42 here)


def test_object_probes_on_true_labels_are_perfect(scenes32, monkeypatch):
    """Object features that are the true shape and colour one-hots score 1.0 on both, against the
    training objects' majority class; the items are the test scenes."""
    seg = E.stacked(scenes32, "seg").long()
    _, img, obj = E.object_tokens(torch.zeros(len(scenes32), 4, 4, 1), seg)
    objects = [scenes32[i]["objects"][j] for i, j in zip(img.tolist(), obj.tolist())]
    onehot = torch.cat([torch.nn.functional.one_hot(torch.tensor([vals.index(o[a]) for o in objects]), len(vals))
                        for a, vals in (("shape", data.SHAPES), ("color", data.COLORS))], 1).float()
    monkeypatch.setattr(E, "object_tokens", lambda P, seg: (onehot, img, obj))
    m = E.Scores()
    E.toy_object_probes(m, {"": None, "ml_": None}, scenes32)
    assert sorted(m.rows) == sorted(OBJECT)
    for k, r in m.rows.items():
        if "knn" not in k:  # the k-NN probe on shape alone: test_knn_object_probe_chance_and_ceiling
            assert r["value"] == 1.0 and r["ceiling"] == 1.0 and r["n"] == 10 and 0 < r["chance"] < 0.7, k
    shapes = torch.tensor([data.SHAPES.index(o["shape"]) for o in objects])
    assert m.rows["obj_shape_acc"]["chance"] == E.majority_chance(shapes[img < 20], shapes[img >= 20])


def test_knn_object_probe_chance_and_ceiling(monkeypatch):
    """DINO's weighted k-NN on object tokens: 1.0 on the true shape one-hots, at most the majority
    chance (within 2 se) on features without content (noise)."""
    scenes = [data.render_scene(12, i, 32) for i in range(240)]
    seg = E.stacked(scenes, "seg").long()
    _, img, obj = E.object_tokens(torch.zeros(len(scenes), 4, 4, 1), seg)
    shapes = torch.tensor([data.SHAPES.index(scenes[i]["objects"][j]["shape"]) for i, j in zip(img.tolist(), obj.tolist())])
    for features, perfect in ((torch.nn.functional.one_hot(shapes, 4).float(), True),
                              (torch.randn(len(shapes), 16, generator=torch.Generator().manual_seed(0)), False)):
        monkeypatch.setattr(E, "object_tokens", lambda P, seg, X=features: (X, img, obj))
        m = E.Scores()
        E.toy_object_probes(m, {"": None}, scenes)
        r = m.rows["obj_shape_knn_acc"]
        assert r["n"] == 80 and (r["value"] == 1.0 if perfect else r["value"] < r["chance"] + 2 * r["se"]), r
        assert perfect or r["value"] > 0.15  # noise votes at random, not against the truth


def test_taps_are_the_dpt_head_inputs():
    """extract's "taps" are the depth head's inputs side by side (the same block indices, through
    the final LayerNorm), also for a model without a depth head, whose last tap is the last block
    and so equals the final patch tokens."""
    import evaluate  # test_faults allows extract() only on a module named evaluate

    images = [s["image"] for s in E.render_toy(3, 32)]
    for tasks in (("clip", "depth"), ("ssl",)):
        model = mtv.MTV(tiny_config(), tasks).eval()
        f = evaluate.extract(model, images, ("patch", "taps"), torch.device("cpu"), "test")
        W = model.cfg.vision.width
        assert f["taps"].shape == (3, 4, 4, 4 * W) and torch.allclose(f["taps"][..., -W:], f["patch"], atol=1e-5)
        if "depth" in tasks:
            assert model.depth_head.layers == mtv.dpt_layers(model.cfg.vision) == (0, 1, 2, 3)
            with torch.no_grad():
                x = E.to_input(images, "cpu")
                taps = model.depth_taps(model.vision(x, layers=model.depth_head.layers)["layers"])
            assert torch.allclose(f["taps"].flatten(1, 2), torch.cat(taps, -1), atol=1e-6)
    assert mtv.dpt_layers(mtv.ViTConfig(depth=12)) == (2, 5, 8, 11)


# -- compare ------------------------------------------------------------------------------------


def fake_run(root, name, tasks, seed, metrics, init=False, se=0.05):
    folder = root / name / ("eval-init" if init else "eval")
    folder.mkdir(parents=True)
    results = {"checkpoint": str(root / name / "checkpoint.pt"), "init": init, "tasks": tasks, "seed": seed,
               "metrics": metrics, "se": {k: se for k in metrics}, "n": {k: 100 for k in metrics},
               "chance": {"zs_shape_acc": 0.25, "depth_probe_rmse": 4.0},
               "ceiling": {"zs_shape_acc": 1.0, "depth_probe_rmse": 1.0},
               "lower_is_better": [], "skipped": [], "data": "", "seconds": 1.0}
    (folder / "results.json").write_text(json.dumps(results))
    return str(root / name)


def test_compare_groups_seeds(tmp_path, capsys):
    runs = [fake_run(tmp_path, "vl-0", ["clip"], 0, {"zs_shape_acc": 0.2, "depth_probe_rmse": 3.0}),
            fake_run(tmp_path, "vl-1", ["clip"], 1, {"zs_shape_acc": 0.4, "depth_probe_rmse": 2.0}),
            fake_run(tmp_path, "all-0", ["ground", "clip", "ssl", "depth"], 0,
                     {"zs_shape_acc": 0.5, "depth_probe_rmse": 1.0})]
    fake_run(tmp_path, "all-0", ["ground", "clip", "ssl", "depth"], 0, {"zs_shape_acc": 0.26, "depth_probe_rmse": 2.8},
             init=True, se=0.02)
    table = E.main(["--compare", *runs, "--out", str(tmp_path / "cmp")])
    assert list(table) == ["init (untrained)", "clip", "clip+ssl+depth+ground"]  # untrained, then Figure 1 order
    sd = math.sqrt(0.02)  # sample std (ddof 1) of 0.2 and 0.4
    assert table["clip"]["zs_shape_acc"] == pytest.approx((0.3, sd))  # mean, seed std
    assert table["clip"]["depth_probe_rmse"] == pytest.approx((2.5, math.sqrt(0.5)))
    assert table["clip+ssl+depth+ground"]["zs_shape_acc"] == pytest.approx((0.5, 0.05))  # one seed: its se
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"| clip | 0,1 | 0.300 ± {sd:.3f} | 2.500 ± 0.707 |" in md and "depth_probe_rmse ↓" in md
    assert "| clip+ssl+depth+ground | 0 | 0.500 (se 0.050) |" in md and "± 0.000" not in md
    assert "| *chance* | – | 0.250 | 4.000 |" in md and "| *ceiling* | – | 1.000 | 1.000 |" in md
    # differences in pooled-spread units: (0.5 - 0.3) / sqrt((0.05^2 + 0.02) / 2) = 1.89 -> not bold
    assert "Difference from **clip**" in md and "| clip+ssl+depth+ground | 0 | +0.200 (+1.9σ) |" in md
    # from the untrained row: (0.5 - 0.26) / sqrt((0.05^2 + 0.02^2) / 2) = 6.3 -> bold
    assert "Difference from **init (untrained)**" in md and "**+0.240 (+6.3σ)**" in md
    assert (tmp_path / "cmp" / "radar.png").stat().st_size > 0
    js = json.loads((tmp_path / "cmp" / "compare.json").read_text())  # the same table for programs
    assert [r["label"] for r in js["rows"]] == list(table) and js["rows"][1]["seeds"] == [0, 1]
    assert js["rows"][1]["stats"]["zs_shape_acc"]["values"] == [0.2, 0.4]
    assert js["metrics"]["depth_probe_rmse"] == {"better": "↓", "chance": 4.0, "ceiling": 1.0}
    with pytest.raises(SystemExit) as e:
        E.main(["--compare", str(tmp_path / "missing")])
    assert e.value.code == 2 and "no eval/results.json" in capsys.readouterr().err


def test_compare_against_previous_and_last(tmp_path, capsys):
    """--against previous: each row from the row before it (a ladder's steps); --against last: from
    the largest row (a leave-one-out); both paired by seed. Values by hand."""
    shape = {"clip": (0.30, 0.34), "clip+ssl": (0.35, 0.37), "clip+ssl+depth+ground": (0.50, 0.56)}
    runs = [fake_run(tmp_path, f"{name}-seed{s}", name.split("+"), s, {"zs_shape_acc": v[s]})
            for name, v in shape.items() for s in (0, 1)]
    E.main(["--compare", *runs, "--out", str(tmp_path / "steps"), "--against", "previous"])
    md = (tmp_path / "steps" / "compare.md").read_text()
    assert "Difference from the row before it" in md and "Difference from **clip**" not in md
    # clip+ssl - clip per seed: +0.05, +0.03 -> mean 0.04, std 0.0141, ratio 2.8: bold
    assert "| clip+ssl (from clip) | 0,1 | **+0.040 ± 0.014 (+2.8)** |" in md
    # all four - clip+ssl: +0.15, +0.19 -> mean 0.17, std 0.028, ratio 6.0
    assert "| clip+ssl+depth+ground (from clip+ssl) | 0,1 | **+0.170 ± 0.028 (+6.0)** |" in md
    E.main(["--compare", *runs, "--out", str(tmp_path / "loo"), "--against", "last"])
    md = (tmp_path / "loo" / "compare.md").read_text()
    assert "Paired difference from **clip+ssl+depth+ground**" in md
    assert "| clip | 0,1 | **-0.210 ± 0.014 (-14.8)** |" in md  # 0.30-0.50, 0.34-0.56
    with pytest.raises(SystemExit) as e:
        E.main([runs[0] + "/checkpoint.pt", "--against", "last"])
    assert e.value.code == 2 and "--against" in capsys.readouterr().err


def test_compare_rows_by_recipe(tmp_path):
    """Runs named NAME-seedN are rows by NAME within a task set (a sweep of recipes for clip,ssl),
    so two recipes are not pooled as seeds of one; make ablate's TASKS-seedN names keep their label."""
    runs = [fake_run(tmp_path / "join", f"{name}-seed{s}", ["clip", "ssl"], s, {"zs_shape_acc": v + s / 100})
            for name, v in (("default", 0.3), ("late", 0.5)) for s in (0, 1)]
    runs.append(fake_run(tmp_path / "ladder", "clip+ssl-seed0", ["clip", "ssl"], 0, {"zs_shape_acc": 0.4}))
    table = E.main(["--compare", *runs, "--out", str(tmp_path / "cmp")])
    assert list(table) == ["clip+ssl", "clip+ssl [default]", "clip+ssl [late]"]
    assert table["clip+ssl [late]"]["zs_shape_acc"][0] == pytest.approx(0.505)


def test_radar_spans_chance_to_ceiling(tmp_path):
    """Axes run from chance to ceiling, so a single run is not stretched to itself."""
    r = E.radar_radius(np.array([0.625, 3.4, 0.1, 0.5]), np.array([0.25, 4.0, 0.25, 4.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    assert r == pytest.approx([0.5, 0.2, 0.0, 1.05])  # halfway; rmse 3.4 is 0.2 of the way 4 -> 1; clipped
    refs = {"zs_shape_acc": {"chance": 0.25, "ceiling": 1.0}, "depth_probe_rmse": {"chance": 4.0, "ceiling": 1.0}}
    rows = [("one", {"zs_shape_acc": {"mean": 0.625}, "depth_probe_rmse": {"mean": 3.4}})]
    assert E.radar(rows, list(refs), refs, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 0


# -- the CLI on a tiny random model -------------------------------------------------------------


def tiny_config(size=32):
    return mtv.MTVConfig(mtv.ViTConfig(size, 8, 32, 4, 2, 64), mtv.TextConfig(258, 64, 32, 1, 2, 64),
                         mtv.HeadConfig(64, 16, 32, 32, 16, 1))


def tiny_checkpoint(path, tasks=mtv.ALL_TASKS, size=32):
    torch.manual_seed(0)
    model = mtv.MTV(tiny_config(size), tasks)
    torch.save({"model": model.state_dict(), "model_config": model.config_dict(), "train_config": {"seed": 7}},
               path)
    return str(path)


TOY_METRICS = ["zs_shape_acc", "zs_color_acc", "zs_present_acc", "ret_i2t_r1", "ret_i2t_r5", "ret_t2i_r1",
               "ret_t2i_r5", "lin_count_acc", "lin_shape_acc", *OBJECT, *DENSE, "corr_recall",
               "zsdepth_absrel", "zsdepth_delta1", "ground_acc", "ground_name_acc", "patch_image_share"]


def test_toy_suite_end_to_end(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    E.main([ckpt, "--n", "60", "--device", "cpu"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tasks"] == list(mtv.ALL_TASKS) and results["seed"] == 7 and results["skipped"] == []
    assert sorted(results["metrics"]) == sorted(TOY_METRICS) and results["init"] is False
    assert all(math.isfinite(v) for v in results["metrics"].values())
    # every toy metric has a standard error, a count and a chance level; all but linear probes an
    # oracle-measured or exact ceiling; the diagnosis patch_image_share (a share, no score) neither
    for key in ("se", "n", "chance", "ceiling"):
        assert sorted(results[key]) == sorted(TOY_METRICS), key
        assert all((v is None) == (key in ("chance", "ceiling") and k == "patch_image_share")
                   for k, v in results[key].items()), key
    assert 0 < results["metrics"]["patch_image_share"] < 1
    assert results["n"]["corr_recall"] == 60 and results["n"]["seg_miou"] == 20  # probes test on the last 1/3
    assert all(results["n"][k] == 20 for k in OBJECT + DENSE)
    assert results["ceiling"]["corr_recall"] >= 0.95 and results["ceiling"]["zsdepth_absrel"] < 1e-4
    assert results["chance"]["depth_probe_rmse"] > results["ceiling"]["depth_probe_rmse"]
    assert results["chance"]["depth_probe_ml_rmse"] == results["chance"]["depth_probe_rmse"]  # one position probe
    assert all(results["ceiling"][k] == 1.0 for k in OBJECT)
    assert sorted(results["lower_is_better"]) == sorted(k for k in DENSE if not k.endswith("miou")) + ["zsdepth_absrel"]
    # the dense rows, and only they, carry their gain over the position-only probe
    assert sorted(results["gain"]) == sorted(results["gain_se"]) == sorted(DENSE)
    for k in DENSE:
        better = results["chance"][k] - results["metrics"][k] if k in results["lower_is_better"] else \
            results["metrics"][k] - results["chance"][k]
        assert results["gain"][k] == pytest.approx(better, abs=2e-6) and results["gain_se"][k] > 0, k
    md = (tmp_path / "eval" / "results.md").read_text()
    se = results["se"]["seg_miou"]
    assert f"| seg_miou ↑ | {results['metrics']['seg_miou']:.3f} ± {se:.3f} | 20 |" in md
    gain = f"{results['gain']['seg_miou']:+.3f} ± {results['gain_se']['seg_miou']:.3f}"
    assert f"| {results['ceiling']['seg_miou']:.3f} | {gain} | ADE20K segmentation |" in md
    assert "| 1.000 |  | linear probing |" in md  # no gain where there is no paired baseline
    assert "| value ± se | n | chance | ceiling | gain ± se |" in capsys.readouterr().out
    # --compare reads it beside a run evaluated before gains existed
    old = fake_run(tmp_path, "old", ["clip"], 0, {"zs_shape_acc": 0.3, "depth_probe_rmse": 2.0})
    table = E.main(["--compare", str(tmp_path), old, "--out", str(tmp_path / "cmp")])
    assert "obj_shape_ml_acc" in table["clip+ssl+depth+ground"] and "depth_probe_rmse" in table["clip"]


def test_teacher_tower_is_loaded_and_scored(tmp_path):
    """--tower teacher: the image-only features come from the checkpoint's EMA teacher, zero-shot
    from the student's pair of towers; the toy scenes are of the world the run trained on; a
    checkpoint without a teacher is scored by its student and says so."""
    torch.manual_seed(0)
    model = mtv.MTV(tiny_config(), ("clip", "ssl"))
    teacher = model.ssl_teacher()
    with torch.no_grad():
        for p in teacher.vision.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ckpt = str(tmp_path / "checkpoint.pt")
    torch.save({"model": model.state_dict(), "model_config": model.config_dict(), "teacher": teacher.state_dict(),
                "train_config": {"seed": 7, "world": "shapes"}}, ckpt)
    loaded, _ = E.load_checkpoint(ckpt, tower="teacher")
    assert E.tower_of(loaded) == "teacher" and E.tower_of(E.load_checkpoint(ckpt)[0]) == "student"
    assert all(torch.equal(v, teacher.vision.state_dict()[k]) for k, v in loaded.probe_vision.state_dict().items())
    images = [s["image"] for s in E.render_toy(4, 32, "shapes")]
    import evaluate  # test_faults allows extract() only on a module named evaluate

    f = evaluate.extract(loaded.eval(), images, ("pooled", "patch", "img"), torch.device("cpu"), None)
    with torch.no_grad():
        x = E.to_input(images, "cpu")
        t, st = teacher.vision.eval()(x), model.eval().vision(x)
    torch.testing.assert_close(f["pooled"], t["pooled"])
    torch.testing.assert_close(f["patch"].flatten(1, 2), t["patch"])
    torch.testing.assert_close(f["img"], torch.nn.functional.normalize(st["pooled"], dim=-1))
    assert not torch.allclose(f["pooled"], st["pooled"], atol=1e-3)
    by = {tower: E.main([ckpt, "--n", "30", "--tower", tower]) for tower in ("student", "teacher")}
    assert by["teacher"]["tower"] == "teacher" and (tmp_path / "eval-teacher" / "results.json").is_file()
    assert by["teacher"]["world"] == "shapes" and "shapes world" in by["teacher"]["data"]
    assert by["teacher"]["metrics"]["zs_shape_acc"] == by["student"]["metrics"]["zs_shape_acc"]
    assert by["teacher"]["metrics"]["lin_count_acc"] != by["student"]["metrics"]["lin_count_acc"] or \
        by["teacher"]["metrics"]["obj_shape_acc"] != by["student"]["metrics"]["obj_shape_acc"]
    (tmp_path / "plain").mkdir()
    plain = tiny_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    assert E.main([plain, "--n", "12", "--tower", "teacher"])["tower"] == "student"


def test_compare_pairs_seeds(tmp_path, capsys):
    """--compare's paired table: per-seed differences on the seeds two rows share, mean ± std and
    mean/std, bold where |mean| > 2 std (by hand); --tower teacher reads eval-teacher/."""
    a, b = [0.50, 0.55, 0.60], [0.45, 0.52, 0.55]  # differences 0.05, 0.03, 0.05: mean 0.0433, std 0.0115
    runs = [fake_run(tmp_path, f"r-seed{s}", ["ssl"], s, {"obj_shape_acc": a[s]}) for s in range(3)]
    for s in range(3):
        fake_run(tmp_path, f"r-seed{s}", ["ssl"], s, {"obj_shape_acc": b[s]}, init=True)
    E.main(["--compare", *runs, "--out", str(tmp_path / "cmp")])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    d = np.array(a) - np.array(b)
    mean, std = d.mean(), d.std(ddof=1)
    assert abs(mean) > 2 * std and f"**{mean:+.3f} ± {std:.3f} ({mean / std:+.1f})**" in md
    assert E.paired({"by_seed": {"0": 1.0, "1": 2.0}}, {"by_seed": {"1": 1.5, "2": 0.0}}) is None  # one shared seed
    assert E.paired({"by_seed": {"0": 1.0, "1": 2.0, "2": 3.0}}, {"by_seed": {"0": 0.0, "1": 2.0}}) == \
        pytest.approx((0.5, math.sqrt(0.5), 2))
    for s, patch in ((0, 8), (1, 8), (2, 8), (0, 4)):  # results now name their tower; one of another patch size
        name = f"r-seed{s}" if patch == 8 else "q-seed0"
        if patch == 4:
            fake_run(tmp_path, name, ["ssl"], 0, {"obj_shape_acc": 0.6}, init=True)
            fake_run(tmp_path, name, ["ssl"], 0, {"obj_shape_acc": 0.6})
        path = tmp_path / name / "eval-init" / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "vision": {"patch_size": patch}}))
    with pytest.raises(SystemExit) as e:
        E.main(["--compare", *runs, str(tmp_path / "q-seed0"), "--out", str(tmp_path / "cmp3")])
    assert e.value.code == 2 and "differ (another world or image tower" in capsys.readouterr().err
    fake_run(tmp_path / "again", "r-seed0", ["ssl"], 0, {"obj_shape_acc": 0.6})  # a second run of seed 0 in row r
    with pytest.raises(SystemExit) as e:
        E.main(["--compare", *runs, str(tmp_path / "again" / "r-seed0"), "--out", str(tmp_path / "cmp4")])
    assert e.value.code == 2 and "two runs of one seed" in capsys.readouterr().err
    for s in range(3):
        (tmp_path / f"r-seed{s}" / "eval").rename(tmp_path / f"r-seed{s}" / "eval-teacher")
    assert "ssl [r]" in E.main(["--compare", *runs, "--out", str(tmp_path / "cmp2"), "--tower", "teacher"])


def test_init_is_the_model_before_its_first_step(tmp_path):
    """--init rebuilds exactly the weights train.py started from: a run with lr 0 leaves them as
    they were, and its checkpoint's --init model equals them."""
    import pseudolabel
    import train

    data.main(["--out", str(tmp_path / "raw"), "--n", "8", "--size", "32"])
    pseudolabel.main(["--shards", str(tmp_path / "raw" / "*.tar"), "--out", str(tmp_path / "lab"),
                      "--depth-expert", "simulated", "--ground-expert", "none"])
    train.main(["--tasks", "clip,depth", "--data", str(tmp_path / "lab" / "*.tar"), "--steps", "1", "--lr", "0",
                "--batch-size", "4", "--image-size", "32", "--workers", "0", "--seed", "3",
                "--out", str(tmp_path / "run"), "--log-every", "1"])
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    model, seed = E.load_checkpoint(ckpt, init=True)
    trained = mtv.load_model(ckpt).state_dict()
    assert seed == 3 and all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    results = E.main([ckpt, "--n", "12", "--init"])
    assert results["init"] and (tmp_path / "run" / "eval-init" / "results.json").is_file()


def test_missing_heads_are_skipped(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ssl.pt", tasks=("ssl",))
    results = E.main([ckpt, "--n", "12", "--out", str(tmp_path / "ev")])
    assert len(results["skipped"]) == 3 and "zs_shape_acc" not in results["metrics"]
    assert {"depth_probe_ml_rmse", "seg_ml_miou", "obj_shape_ml_acc"} <= set(results["metrics"])  # taps, no head
    assert "skipped: zero-shot depth: the model has no depth head" in capsys.readouterr().out


def save_image(path, seed, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def test_imagenet_class_names(tmp_path, capsys):
    """WordNet-id folders are prompted with CLIP's curated names (by ILSVRC2012 class index, not by
    lemma: n02123045 is "tabby cat", its first lemma "tabby"), or with --class-names; other folder
    names as written; a folder outside the 1,000 classes or a names file without it: one line."""
    pytest.importorskip("open_clip")
    folders = ["n01440764", "n02123045"]
    assert E.imagenet_class_names(str(tmp_path), folders) == ["tench", "tabby cat"]
    (tmp_path / "mine.txt").write_text("n01440764 fish\nn02123045 tabby_cat, tabby\n")
    assert E.imagenet_class_names(str(tmp_path), folders, str(tmp_path / "mine.txt")) == ["fish", "tabby cat"]
    assert E.imagenet_class_names(str(tmp_path / "x"), ["golden_retriever"]) == ["golden retriever"]
    for args in ((["n99999999"],), (folders + ["n01443537"], str(tmp_path / "mine.txt"))):
        with pytest.raises(SystemExit) as e:
            E.imagenet_class_names(str(tmp_path), *args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err


def test_imagenet_zero_shot_from_val_alone(tmp_path, monkeypatch):
    """val/ alone gives zero-shot with CLIP's 80 templates and the bare name (81 prompts per class,
    built from names, never from WordNet ids); no linear or k-NN probe without train/. A SigLIP
    tokenizer gets the prompts lower-cased."""
    pytest.importorskip("open_clip")
    root = tmp_path / "imagenet"
    for c in ("n01440764", "n02123045"):
        save_image(root / "val" / c / "0.jpg", hash(c) % 1000)
    prompts = []
    real = E.embed_text
    monkeypatch.setattr(E, "embed_text", lambda model, texts, device: prompts.extend(texts) or real(model, texts, device))
    results = E.main([tiny_checkpoint(tmp_path / "c.pt"), "--imagenet", str(root), "--out", str(tmp_path / "ev")])
    assert list(results["metrics"]) == ["in_zs_acc"] and any("train/" in s for s in results["skipped"])
    assert len(prompts) == 2 * 81 and "a bad photo of a tabby cat." in prompts and "tabby cat" in prompts
    assert not any("n0" in p for p in prompts)
    model = mtv.load_model(tmp_path / "c.pt")
    model.cfg.text.tokenizer = "/some/siglip"  # only the tokenizer's kind is read
    prompts.clear()
    E.imagenet_suite(model, str(root), torch.device("cpu"), lambda s: None, E.parse_args(["x"]))
    assert "a bad photo of a tabby cat." in prompts and "a photo of the tench." in prompts
    assert "itap of a tench." in prompts and not any(p != p.lower() for p in prompts)


def test_bad_input_is_one_sentence(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    run = tmp_path / "run"
    run.mkdir()
    tiny_checkpoint(run / "checkpoint.pt")  # a run folder where a checkpoint is expected
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text("{}")  # --init of a SigLIP directory: it holds no seed
    for argv in ([str(tmp_path / "nope.pt")], [], [ckpt, "--n", "3"], [ckpt, "--compare", str(tmp_path)],
                 [ckpt, "--data", str(tmp_path / "*.tar")], [ckpt, "--ade", str(tmp_path)],
                 [str(run)], [str(tmp_path / "s"), "--init"]):
        with pytest.raises(SystemExit) as e:
            E.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("evaluate.py: error:") and "\n" not in err
        if argv == [str(run)]:
            assert str(run / "checkpoint.pt") in err


def test_siglip_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SiglipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64),
        text_config=dict(vocab_size=258, max_position_embeddings=32, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, projection_size=32))
    transformers.SiglipModel(cfg).save_pretrained(tmp_path / "siglip")
    results = E.main([str(tmp_path / "siglip"), "--n", "12"])
    assert results["tasks"] == ["clip"] and results["seed"] is None
    assert "zs_shape_acc" in results["metrics"] and "zsdepth_absrel" not in results["metrics"]
    assert (tmp_path / "siglip" / "eval" / "results.json").is_file()


def test_a_metric_without_test_items_is_left_out():
    """A tiny --n can hold no scene of a kind (no single-object scene: no zero-shot colour); the
    metric is left out instead of a bootstrap over nothing."""
    m = E.Scores()
    m.add("zs_color_acc", E.hits(torch.zeros(0, dtype=torch.bool)), chance=0.125, ceiling=1.0)
    m.add("zs_shape_acc", E.hits(torch.ones(3, dtype=torch.bool)), chance=0.25, ceiling=1.0)
    assert list(m.rows) == ["zs_shape_acc"] and m.rows["zs_shape_acc"]["value"] == 1.0
