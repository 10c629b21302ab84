"""evaluate.py: metrics on hand-computed cases, probes on features that do / do not hold the answer,
--compare aggregation, the real-data layouts, and the whole CLI on a tiny random model."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import mtv


# -- metrics ------------------------------------------------------------------------------------


def test_accuracy_and_recall_at_k():
    assert E.accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    sim = torch.tensor([[0.9, 0.1, 0.0],    # query 0: right (0) ranked 1st
                        [0.8, 0.5, 0.7],    # query 1: right (1) ranked 3rd
                        [0.1, 0.9, 0.3]])   # query 2: right (2) ranked 2nd
    right = torch.eye(3, dtype=torch.bool)
    assert E.recall_at_k(sim, right, 1) == pytest.approx(1 / 3)
    assert E.recall_at_k(sim, right, 2) == pytest.approx(2 / 3)
    assert E.recall_at_k(sim, right, 5) == 1.0  # k beyond the gallery = all of it
    right[1, 0] = True  # a second right answer (COCO: 5 captions per image)
    assert E.recall_at_k(sim, right, 1) == pytest.approx(2 / 3)


def test_miou_by_hand():
    target = torch.tensor([0, 0, 1, 1, -1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    # class 0: inter 1, union |{0,1,5}| = 3; class 1: inter 2, union 3; class 2: inter 0, union 1
    # (the ignored pixel 4 counts for nobody); class 3 absent from both, so not averaged
    assert E.miou(pred, target, 4) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_depth_metrics_by_hand():
    pred, true = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 4.0, 2.0])
    assert E.rmse(pred, true) == pytest.approx(math.sqrt(8 / 3))
    assert E.absrel(pred, true) == pytest.approx((0 + 0.5 + 1) / 3)
    assert E.delta1(pred, true) == pytest.approx(1 / 3)
    assert E.delta1(torch.tensor([1.2, 0.85]), torch.tensor([1.0, 1.0])) == 1.0


def test_align_scale_shift_and_zero_shot_depth():
    pred = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(E.align_scale_shift(pred, 3 * pred - 2), 3 * pred - 2, atol=1e-6)
    # fit to [0, 1, 1, 2]: slope 0.6, intercept 0.1 (hand-solved normal equations)
    assert torch.allclose(E.align_scale_shift(pred, torch.tensor([0.0, 1, 1, 2])),
                          torch.tensor([0.1, 0.7, 1.3, 1.9]), atol=1e-6)
    depth = torch.tensor([[[2.0, 4.0], [8.0, math.inf]]])  # (1, 2, 2), one sky pixel
    inverse = 5 / depth + 0.3  # any scale and shift of true inverse depth is a perfect answer
    z = E.zero_shot_depth(inverse, depth, cap=20.0)
    assert z["absrel"] == pytest.approx(0, abs=1e-5) and z["delta1"] == 1.0
    flat = E.zero_shot_depth(torch.ones_like(depth), depth, cap=20.0)  # no depth at all: mean inverse
    mean_inv = (1 / 2 + 1 / 4 + 1 / 8) / 3
    assert flat["absrel"] == pytest.approx(np.mean([abs(1 / mean_inv - d) / d for d in (2, 4, 8)]), rel=1e-5)


def test_correspondence_recall_and_geometry():
    pred = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    true = torch.zeros(3, 2)
    assert E.correspondence_recall(pred, true, 5.0) == pytest.approx(2 / 3)
    # Features that tell patches apart (one-hot positions) match every patch exactly, also across a
    # mirror; without a warp known to correspondence() they would not.
    n, g, S = 2, 4, 32
    Pa = torch.eye(g * g).reshape(1, g, g, g * g).repeat(n, 1, 1, 1)
    seg = torch.full((n, S, S), 2)  # every pixel on an object
    assert E.correspondence(Pa, Pa, [(0, 0, S, False)] * n, seg, S) == 1.0
    assert E.correspondence(Pa, Pa.flip(2), [(0, 0, S, True)] * n, seg, S) == 1.0
    assert E.correspondence(Pa, Pa, [(0, 0, S, True)] * n, seg, S) < 0.5
    image = np.random.default_rng(0).integers(0, 255, (S, S, 3), dtype=np.uint8)
    view, (x0, y0, c, flip) = E.second_view(image, np.random.default_rng(3))
    assert view.shape == image.shape and 0.5 * S <= c <= 0.9 * S and x0 + c <= S and y0 + c <= S


def test_grounding_by_hand():
    vocab = ["red cube", "blue cone", "green sphere"]
    text = torch.eye(3)
    regions = [torch.eye(3)[[0, 1]],                   # image 0: both boxes embed their own name
               torch.eye(3)[[2, 2]]]                   # image 1: both boxes look like "green sphere"
    names = [["red cube", "blue cone"], ["green sphere", "red cube"]]
    g = E.grounding(regions, names, text, vocab)
    assert g["acc"] == pytest.approx(3 / 4)  # "red cube" in image 1 picks the wrong box
    assert g["name_acc"] == pytest.approx(3 / 4)


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
    assert probe(X[:400], y[:400], X[400:], y[400:], 4) > 0.95
    X, y = labelled_features(600, 4, informative=False)
    assert probe(X[:400], y[:400], X[400:], y[400:], 4) < 0.4  # chance is 0.25


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
    d = E.depth_probe(good[:40], depth[:40], good[40:], depth[40:], cap=8.0)
    r = E.depth_probe(noise[:40], depth[:40], noise[40:], depth[40:], cap=8.0)
    # what remains is bilinear upsampling at the borders; random features miss by ~40 %
    assert d["absrel"] < 0.05 and d["absrel"] < r["absrel"] / 5 and d["rmse"] < r["rmse"] / 5


def test_seg_probe():
    n, S, g, C = 40, 16, 4, 3
    gen = torch.Generator().manual_seed(0)
    cls = torch.randint(0, C, (n, g, g), generator=gen)
    labels = cls.repeat_interleave(S // g, 1).repeat_interleave(S // g, 2)  # (n, S, S) patch-constant
    labels[:, 0, 0] = -1  # an ignored pixel
    noise = torch.randn(n, g, g, 8, generator=gen)
    good = torch.cat([3 * torch.nn.functional.one_hot(cls, C), noise], -1).float()
    assert E.seg_probe(good[:30], labels[:30], good[30:], labels[30:], C) > 0.9
    assert E.seg_probe(noise[:30], labels[:30], noise[30:], labels[30:], C) < 0.4


# -- compare ------------------------------------------------------------------------------------


def fake_run(root, name, tasks, seed, metrics):
    (root / name / "eval").mkdir(parents=True)
    results = {"checkpoint": str(root / name / "checkpoint.pt"), "tasks": tasks, "seed": seed,
               "metrics": metrics, "lower_is_better": [], "skipped": [], "data": "", "seconds": 1.0}
    (root / name / "eval" / "results.json").write_text(json.dumps(results))
    return str(root / name)


def test_compare_groups_seeds(tmp_path, capsys):
    runs = [fake_run(tmp_path, "vl-0", ["clip"], 0, {"zs_shape_acc": 0.2, "depth_probe_rmse": 3.0}),
            fake_run(tmp_path, "vl-1", ["clip"], 1, {"zs_shape_acc": 0.4, "depth_probe_rmse": 2.0}),
            fake_run(tmp_path, "all-0", ["ground", "clip", "ssl", "depth"], 0,
                     {"zs_shape_acc": 0.5, "depth_probe_rmse": 1.0})]
    table = E.main(["--compare", *runs, "--out", str(tmp_path / "cmp")])
    assert list(table) == ["clip", "clip+ssl+depth+ground"]  # Figure 1 order, canonical task order
    assert table["clip"]["zs_shape_acc"] == pytest.approx((0.3, 0.1))  # mean, population std
    assert table["clip"]["depth_probe_rmse"] == pytest.approx((2.5, 0.5))
    assert table["clip+ssl+depth+ground"]["zs_shape_acc"] == pytest.approx((0.5, 0.0))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| clip | 0,1 | 0.300 ± 0.100 | 2.500 ± 0.500 |" in md and "depth_probe_rmse ↓" in md
    assert (tmp_path / "cmp" / "radar.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        E.main(["--compare", str(tmp_path / "missing")])
    assert e.value.code == 2 and "no eval/results.json" in capsys.readouterr().err


# -- the CLI on a tiny random model -------------------------------------------------------------


def tiny_checkpoint(path, tasks=mtv.ALL_TASKS, size=32):
    cfg = mtv.MTVConfig(mtv.ViTConfig(size, 8, 32, 4, 2, 64), mtv.TextConfig(258, 64, 32, 1, 2, 64),
                        mtv.HeadConfig(64, 16, 32, 32, 16, 1))
    torch.manual_seed(0)
    model = mtv.MTV(cfg, tasks)
    torch.save({"model": model.state_dict(), "model_config": model.config_dict(), "train_config": {"seed": 7}},
               path)
    return str(path)


TOY_METRICS = ["zs_shape_acc", "zs_color_acc", "ret_i2t_r1", "ret_i2t_r5", "ret_t2i_r1", "ret_t2i_r5",
               "lin_count_acc", "lin_shape_acc", "depth_probe_rmse", "depth_probe_absrel", "seg_miou",
               "corr_recall", "zsdepth_absrel", "zsdepth_delta1", "ground_acc", "ground_name_acc"]


def test_toy_suite_end_to_end(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    E.main([ckpt, "--n", "60", "--device", "cpu"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tasks"] == list(mtv.ALL_TASKS) and results["seed"] == 7 and results["skipped"] == []
    assert sorted(results["metrics"]) == sorted(TOY_METRICS)
    assert all(math.isfinite(v) for v in results["metrics"].values())
    assert sorted(results["lower_is_better"]) == ["depth_probe_absrel", "depth_probe_rmse", "zsdepth_absrel"]
    assert "| seg_miou ↑ |" in (tmp_path / "eval" / "results.md").read_text()


def test_missing_heads_are_skipped(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ssl.pt", tasks=("ssl",))
    results = E.main([ckpt, "--n", "12", "--out", str(tmp_path / "ev")])
    assert len(results["skipped"]) == 3 and "zs_shape_acc" not in results["metrics"]
    assert "skipped: zero-shot depth: the model has no depth head" in capsys.readouterr().out


def save_image(path, seed, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def test_real_data_layouts(tmp_path):
    """Tiny fixtures in each documented layout parse and give every real-data metric."""
    imagenet, coco, nyu, ade = (tmp_path / d for d in ("imagenet", "coco", "nyu", "ade"))
    for split, n in (("train", 4), ("val", 2)):
        for c in ("tabby_cat", "goldfish"):
            for i in range(n):
                save_image(imagenet / split / c / f"{i}.jpg", hash((split, c, i)) % 1000)
    spec = {"images": [{"id": 10 + i, "file_name": f"{i}.jpg"} for i in range(3)],
            "annotations": [{"image_id": 10 + i % 3, "caption": f"caption {i}"} for i in range(6)]}
    for i in range(3):
        save_image(coco / f"{i}.jpg", i)
    (coco / "captions.json").write_text(json.dumps(spec))
    for i in range(4):
        save_image(nyu / f"{i:03d}.png", i)
        mm = np.random.default_rng(i).integers(500, 9000, (30, 40)).astype(np.uint16)
        mm[0] = 0  # missing depth
        if i % 2:
            np.save(nyu / f"{i:03d}_depth.npy", mm / 1000)
        else:
            Image.fromarray(mm).save(nyu / f"{i:03d}_depth.png")  # 16-bit millimetres
            assert np.allclose(E.read_depth(str(nyu / f"{i:03d}_depth.png")), mm / 1000)
        save_image(ade / "images" / f"a{i}.jpg", i)
        (ade / "annotations").mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 4, (30, 40), dtype=np.uint8)).save(
            ade / "annotations" / f"a{i}.png")
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pt")
    results = E.main([ckpt, "--imagenet", str(imagenet), "--coco", str(coco), "--nyu", str(nyu),
                      "--ade", str(ade)])
    assert sorted(results["metrics"]) == sorted(
        ["in_zs_acc", "in_lin_acc", "in_knn_acc", "coco_i2t_r1", "coco_i2t_r5", "coco_t2i_r1", "coco_t2i_r5",
         "nyu_probe_rmse", "nyu_probe_absrel", "nyu_zsdepth_absrel", "nyu_zsdepth_delta1", "ade_miou"])
    assert all(math.isfinite(v) for v in results["metrics"].values())
    assert results["metrics"]["coco_i2t_r5"] == 1.0  # 3 images: every caption is within the top 5


def test_bad_input_is_one_sentence(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    for argv in ([str(tmp_path / "nope.pt")], [], [ckpt, "--n", "3"], [ckpt, "--compare", str(tmp_path)],
                 [ckpt, "--data", str(tmp_path / "*.tar")], [ckpt, "--ade", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            E.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("evaluate.py: error:") and "\n" not in err


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
