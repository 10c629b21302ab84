"""Label-consistent views, iBOT masks and collation (data.py)."""

import zlib

import numpy as np
import pytest
import torch

import data

def tokenize(texts, length=None):
    """A stand-in for the model's tokenizer: (n, 2) LongTensor."""
    rows = [[len(t), sum(map(ord, t)) % 997] for t in texts]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


tokenize.name_length = 2


def hand_sample():
    """16x16 image whose pixels encode their position, an 8x8 depth map (half resolution), 4 boxes."""
    y, x = np.mgrid[:16, :16]
    image = np.stack([x * 16, y * 16, np.zeros_like(x)], -1).astype(np.uint8)
    depth = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    valid = np.ones((8, 8), bool)
    valid[0, 3] = False
    entities = [{"name": "inside", "box": [0.375, 0.125, 0.5, 0.25], "score": 1.0},
                {"name": "half out", "box": [0.0, 0.125, 0.25, 0.25], "score": 1.0},
                {"name": "below the crop", "box": [0.2, 0.6, 0.4, 0.9], "score": 1.0},
                {"name": "mostly out", "box": [0.0, 0.1, 0.15, 0.2], "score": 1.0}]
    return {"key": "hand", "image": image, "caption": "a hand-made sample", "depth": depth,
            "depth_valid": valid, "ground": {"entities": entities}}


def up(m):
    """Nearest-neighbour 2x upsampling."""
    return np.repeat(np.repeat(m, 2, 0), 2, 1)


def test_crop_and_flip_moves_depth_and_boxes_with_the_image():
    s = hand_sample()
    # Crop rows 0..8, columns 2..10 of the 16x16 image (x in 0.125..0.625, y in 0..0.5), keep 8x8, flip.
    v = data.crop_and_flip(s, crop=(0, 2, 8, 8), flip=True, size=8, min_visible=0.3)
    np.testing.assert_array_equal(v["image"].permute(1, 2, 0).numpy(), s["image"][0:8, 2:10][:, ::-1])
    # The same region of the half-resolution depth map is rows 0..4, columns 1..5, each pixel 2x2.
    np.testing.assert_array_equal(v["depth"].numpy(), up(s["depth"][0:4, 1:5])[:, ::-1])
    flipped = s["depth"][:, ::-1]                              # = the mirrored region of the flipped map
    np.testing.assert_array_equal(v["depth"].numpy(), up(flipped[0:4, 3:7]))
    np.testing.assert_array_equal(v["depth_valid"].numpy(), up(s["depth_valid"][0:4, 1:5])[:, ::-1])
    assert not v["depth_valid"][0:2, 2:4].any() and v["depth_valid"].sum() == 60
    # By hand: x' = (x - 0.125) / 0.5, y' = y / 0.5, clipped to 0..1; then the flip x' -> 1 - x'.
    # "inside" [0.375, 0.125, 0.5, 0.25] -> [0.5, 0.25, 0.75, 0.5] -> [0.25, 0.25, 0.5, 0.5]
    # "half out" [0, 0.125, 0.25, 0.25] -> [-0.25, 0.25, 0.25, 0.5], half survives: [0, 0.25, 0.25, 0.5]
    #   -> [0.75, 0.25, 1, 0.5]; "below the crop" keeps nothing; "mostly out" keeps 1/6 < 0.3.
    assert v["names"] == ["inside", "half out"]
    want = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 1.0, 0.5]])
    torch.testing.assert_close(v["boxes"], want)
    loose = data.crop_and_flip(s, crop=(0, 2, 8, 8), flip=False, size=8, min_visible=0.1)
    assert loose["names"] == ["inside", "half out", "mostly out"]
    torch.testing.assert_close(loose["boxes"][2], torch.tensor([0.0, 0.2, 0.05, 0.4]))


def square_sample():
    """A red square on black whose depth map (half resolution) and box mark the same square."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:20, 10:24, 0] = 255
    depth = np.zeros((16, 16), np.float32)
    depth[4:10, 5:12] = 1
    box = [10 / 32, 8 / 32, 24 / 32, 20 / 32]
    return {"key": "square", "image": image, "caption": "a red square", "depth": depth,
            "depth_valid": np.ones((16, 16), bool),
            "ground": {"entities": [{"name": "red square", "box": box, "score": 1.0}]}}


def test_make_views_keeps_image_depth_and_boxes_aligned():
    aug = data.AugConfig(size=32, jitter=0.0, min_visible=0.0)
    for seed in range(20):
        v = data.make_views(square_sample(), np.random.default_rng(seed), aug, ("clip", "depth", "ground"))
        red = v["global"][0, 0] > 0                            # normalised: > 0 means brighter than 0.5
        ys, xs = np.nonzero(v["depth"].numpy() > 0.5)
        if not len(ys):
            continue
        x0, y0, x1, y1 = (v["boxes"][0] * 32).tolist()
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
        ry, rx = np.nonzero(red.numpy())
        assert abs(rx.mean() - xs.mean()) <= 1 and abs(ry.mean() - ys.mean()) <= 1


@pytest.mark.parametrize("tasks", [("clip",), ("clip", "ssl"), ("clip", "depth"), ("clip", "ground"),
                                   ("clip", "ssl", "depth", "ground")])
def test_make_views_and_collate_shapes(tasks):
    aug = data.AugConfig(size=16, local_size=8, n_local=3, patch_size=4)
    samples = [hand_sample() for _ in range(3)]
    samples[1]["ground"] = {"entities": []}                    # a sample without boxes still batches
    views = [data.make_views(s, np.random.default_rng(i), aug, tasks) for i, s in enumerate(samples)]
    g = 2 if "ssl" in tasks else 1
    assert views[0]["global"].shape == (g, 3, 16, 16) and views[0]["global"].dtype == torch.float32
    assert views[0]["global"].min() >= -1 and views[0]["global"].max() <= 1
    b = data.collate(views, tokenize)
    want = {"global", "text"}
    want |= {"local", "ibot_mask"} if "ssl" in tasks else set()
    want |= {"depth", "depth_valid"} if "depth" in tasks else set()
    want |= {"boxes", "box_valid", "name_tokens", "name_id"} if "ground" in tasks else set()
    assert set(b) == want
    assert b["global"].shape == (g * 3, 3, 16, 16) and b["text"].shape == (3, 2)
    if "ssl" in tasks:
        assert b["local"].shape == (3 * 3, 3, 8, 8) and b["ibot_mask"].shape == (3, 16)
    if "depth" in tasks:
        assert b["depth"].shape == (3, 16, 16) and b["depth_valid"].dtype == torch.bool
    if "ground" in tasks:
        m = b["boxes"].shape[1]
        assert b["boxes"].shape == (3, m, 4)
        assert b["box_valid"].sum(1).tolist() == [len(v["names"]) for v in views]
        assert len(views[1]["names"]) == 0 and m == max(len(v["names"]) for v in views)
        names = [n for v in views for n in v["names"]]
        assert b["name_tokens"].shape == (len(names), 2) and b["name_id"].dtype == torch.int64
        assert b["name_id"].tolist() == [zlib.crc32(n.encode()) for n in names]


def test_collate_is_view_major():
    aug = data.AugConfig(size=8, local_size=8, n_local=2, jitter=0.0)
    samples = [{"key": str(i), "image": np.full((16, 16, 3), 40 * i, np.uint8), "caption": "x"}
               for i in range(3)]
    views = [data.make_views(s, np.random.default_rng(i), aug, ("ssl",)) for i, s in enumerate(samples)]
    b = data.collate(views, tokenize)
    level = ((b["global"].mean((1, 2, 3)) * 0.5 + 0.5) * 255 / 40).round()   # the sample it came from
    assert level.tolist() == [0, 1, 2, 0, 1, 2]
    assert ((b["local"].mean((1, 2, 3)) * 0.5 + 0.5) * 255 / 40).round().tolist() == [0, 1, 2, 0, 1, 2]


def test_ibot_block_mask():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        mask = data.block_mask(rng, 8, (0.1, 0.5)).reshape(8, 8).numpy()
        assert 0.1 * 64 - 1 <= mask.sum() <= 0.5 * 64 + 1
        # Block-wise: masked patches come in rectangles, so most have a masked 4-neighbour.
        padded = np.pad(mask, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert (mask & neighbours).sum() >= 0.5 * mask.sum()
    assert data.block_mask(np.random.default_rng(0), 14, (0.3, 0.3)).sum() == round(0.3 * 196)


def test_missing_labels_raise_a_clear_error():
    s = hand_sample()
    del s["depth"], s["depth_valid"]
    with pytest.raises(ValueError, match="depth.png.*pseudolabel.py"):
        data.make_views(s, np.random.default_rng(0), data.AugConfig(size=16), ("clip", "depth"))
    data.make_views(s, np.random.default_rng(0), data.AugConfig(size=16), ("clip", "ground"))


def test_dino_colour_augmentation_only_on_the_ssl_views():
    """Hue and grayscale (DINO's colour augmentation) change the second global view and the local
    crops, never view 0 when its caption (or grounding names) describe it, but view 0 too with ssl
    alone; with both off the views are as before."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = 220                                            # pure red: grayscale shows at once
    sample = {"key": "red", "image": image, "caption": "a red square"}
    grey = lambda v: (v.max(0).values - v.min(0).values).abs().max() < 1e-6  # (3, S, S): R = G = B
    aug = data.AugConfig(size=32, local_size=16, n_local=2, jitter=0, hue=0.0, grayscale=1.0, flip=0)
    v = data.make_views(sample, np.random.default_rng(0), aug, ("clip", "ssl"))
    assert not grey(v["global"][0]) and grey(v["global"][1]) and all(grey(x) for x in v["local"])
    aug = data.AugConfig(size=32, local_size=16, n_local=2, jitter=0, hue=0.5, grayscale=0.0, flip=0)
    v = data.make_views(sample, np.random.default_rng(0), aug, ("clip", "ssl"))
    colour = lambda x: x.mean((1, 2))                              # a uniform image: its one colour
    assert torch.allclose(colour(v["global"][0]), torch.tensor([220 / 127.5 - 1, -1.0, -1.0]))
    assert not torch.allclose(colour(v["global"][1]), colour(v["global"][0]), atol=1e-3)
    # without a text task view 0 is an ssl view (both of DINO's global views are colour-augmented);
    # grounding names colours, so with it view 0 stays true as with clip
    aug = data.AugConfig(size=32, local_size=16, n_local=0, jitter=0, hue=0.0, grayscale=1.0, flip=0)
    assert grey(data.make_views(sample, np.random.default_rng(0), aug, ("ssl",))["global"][0])
    named = sample | {"ground": {"entities": [{"name": "red square", "box": [0.0, 0.0, 1.0, 1.0], "score": 1.0}]}}
    v = data.make_views(named, np.random.default_rng(0), aug, ("ssl", "ground"))
    assert not grey(v["global"][0]) and grey(v["global"][1])
    off = data.AugConfig(size=32, local_size=16, n_local=2, hue=0.0, grayscale=0.0)
    a = data.make_views(sample, np.random.default_rng(1), off, ("ssl",))
    b = data.make_views(sample, np.random.default_rng(1), off, ("ssl",))
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])


def test_caption_view_jitter_is_its_own():
    """caption_jitter=0 (SLIP's CLIP view) leaves view 0 unjittered with clip, and only then: the
    second global view keeps its jitter, and without clip view 0 is jittered as before."""
    image = np.full((32, 32, 3), 100, np.uint8)
    sample = {"key": "grey", "image": image, "caption": "a grey square"}
    plain = torch.full((3, 32, 32), 100 / 127.5 - 1)
    aug = data.AugConfig(size=32, local_size=16, n_local=0, caption_jitter=0.0, hue=0, grayscale=0)
    v = data.make_views(sample, np.random.default_rng(0), aug, ("clip", "ssl"))
    assert torch.allclose(v["global"][0], plain, atol=1e-5) and not torch.allclose(v["global"][1], plain, atol=1e-3)
    v = data.make_views(sample, np.random.default_rng(0), aug, ("ssl",))
    assert not torch.allclose(v["global"][0], plain, atol=1e-3)


def pieces(mask):
    """Number of 4-connected pieces of a 2-D bool array."""
    seen, count = np.zeros_like(mask), 0
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        count, stack, seen[i, j] = count + 1, [(i, j)], True
        while stack:
            a, b = stack.pop()
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < mask.shape[0] and 0 <= d < mask.shape[1] and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
    return count


def test_ibot_mask_smallest_block():
    """A quarter of a 4x4 grid masked: with BEiT's smallest block of 4 patches it is mostly one
    block (a whole object of the toy world); with min_block=1 it often comes in several pieces."""
    def mean_pieces(min_block):
        rng = np.random.default_rng(0)
        masks = [data.block_mask(rng, 4, (0.25, 0.25), min_block).reshape(4, 4).numpy() for _ in range(300)]
        assert all(m.sum() == 4 for m in masks)
        return np.mean([pieces(m) for m in masks])
    assert mean_pieces(4) < 1.35 < 1.5 < mean_pieces(1)  # 1.27 and 1.60 at this seed


def test_ibot_mask_probability_and_both_views():
    """mask_prob: the share of views masked at all; mask_views="both" masks the first ssl view
    too, drawn on its own; the defaults mask the last view of every image, as before."""
    aug = data.AugConfig(size=16, local_size=8, n_local=0, patch_size=4, mask_prob=0.5, mask_views="both")
    views = [data.make_views(hand_sample(), np.random.default_rng(i), aug, ("ssl",)) for i in range(300)]
    last, first = (torch.stack([v[k] for v in views]) for k in ("ibot_mask", "ibot_mask_first"))
    for m in (last, first):
        assert 0.4 < m.any(1).float().mean() < 0.6 and (m.sum(1)[m.any(1)] >= 2).all()
    assert (last.any(1) != first.any(1)).float().mean() > 0.3  # independent draws
    assert data.collate(views[:3], tokenize)["ibot_mask_first"].shape == (3, 16)
    plain = [data.make_views(hand_sample(), np.random.default_rng(i), data.AugConfig(size=16, local_size=8,
                                                                                     patch_size=4), ("ssl",))
             for i in range(50)]
    assert all(v["ibot_mask"].any() and "ibot_mask_first" not in v for v in plain)


def test_crop_scales_and_local_size_reach_the_views(monkeypatch):
    """global_scale, local_scale and local_size are what make_views crops with (ssl alone: every
    global view is an ssl view)."""
    seen = []
    crop = data.random_crop
    monkeypatch.setattr(data, "random_crop", lambda rng, h, w, scale: seen.append(scale) or crop(rng, h, w, scale))
    aug = data.AugConfig(size=16, local_size=12, n_local=3, patch_size=4, global_scale=(0.7, 1.0),
                         local_scale=(0.2, 0.5))
    v = data.make_views(hand_sample(), np.random.default_rng(0), aug, ("ssl",))
    assert seen == [(0.7, 1.0)] * 2 + [(0.2, 0.5)] * 3 and v["local"].shape == (3, 3, 12, 12)
