"""The paper's benchmarks on real data: each reader on a mini-dataset in the layout users download
(made here, a few images each), and each protocol on a case where a wrong choice (normalisation,
crop, mask, averaging) gives a different number than the right one."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
import evaluate as E
from test_evaluate import tiny_checkpoint


def noise_image(path, seed, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


# -- SPair-71k ----------------------------------------------------------------------------------


def make_spair(root, pairs, split="test"):
    """pairs: (category, src name, trg name, src_kps, trg_kps, trg box); images are made on the fly
    (noise, 48 x 32: wider than high, so the square padding matters)."""
    folder = root / "PairAnnotation" / split
    folder.mkdir(parents=True, exist_ok=True)
    for i, (cat, src, trg, sk, tk, box) in enumerate(pairs):
        for name in (src, trg):
            if not (root / "JPEGImages" / cat / name).exists():
                noise_image(root / "JPEGImages" / cat / name, hash(name) % 1000, 48, 32)
        (folder / f"{i:06d}-{src[:-4]}-{trg[:-4]}:{cat}.json").write_text(json.dumps(
            {"category": cat, "src_imname": src, "trg_imname": trg, "src_kps": sk, "trg_kps": tk,
             "trg_bndbox": box, "src_bndbox": box, "viewpoint_variation": 0}))


# A 48 x 32 image padded to 48 x 48 and resized to 32 px: 4 x 4 patches of 12 original pixels, with
# centres at 6, 18, 30, 42. These keypoints sit on patch centres inside the unpadded image.
CENTRES = [[6, 6], [30, 18], [42, 30], [18, 6]]


def test_spair_identical_images_score_one(tmp_path):
    """A pair of one image with itself: every keypoint on a patch centre transfers onto itself for
    any model, so PCK is 1.0; the chance (a random patch) and the ceiling are reported beside it."""
    make_spair(tmp_path, [("cat", "a.jpg", "a.jpg", CENTRES, CENTRES, [0, 0, 10, 10]),
                          ("dog", "b.jpg", "b.jpg", CENTRES[:2], CENTRES[:2], [0, 0, 10, 10])])
    results = E.main([tiny_checkpoint(tmp_path / "c.pt"), "--spair", str(tmp_path), "--out", str(tmp_path / "ev")])
    assert results["metrics"]["spair_pck"] == 1.0 and results["ceiling"]["spair_pck"] == 1.0
    assert results["chance"]["spair_pck"] == pytest.approx(1 / 16)  # a 10-px box: only the right patch is near


def test_keypoint_transfer_under_a_known_shift():
    """Target features = source features moved one patch right: the transfer finds the shifted
    patch (PCK 1.0 against the shifted truth); scored against the unshifted points the error is one
    patch (1/4 of the side), a hit only where the threshold 0.1 x box exceeds it."""
    Fa = torch.randn(4, 4, 8)
    Fb = torch.roll(Fa, 1, dims=1)
    pts = torch.tensor([[0.125, 0.125], [0.375, 0.625], [0.625, 0.875]], dtype=torch.float64)
    pred = E.keypoint_transfer(Fa, Fb, pts)
    assert torch.allclose(pred, pts + torch.tensor([0.25, 0.0], dtype=torch.float64))
    for scale, hit in ((1.0, 0.0), (3.0, 1.0)):  # box side = 1 or 3 padded sides: thresholds 0.1 and 0.3
        got = E.pck_parts(pred, pts, scale, n_classes=2, cls=1, h=4, w=4)
        assert got["model"].tolist() == [0, 3 * hit, 0, 3]
        assert got["ceiling"].tolist() == [0, 3, 0, 3]


def test_spair_pck_is_a_mean_over_classes_and_scaled_by_the_target_box(tmp_path):
    """PCK per class, then the mean over classes (not over keypoints): class cat 4/4, class dog 0/1
    -> 0.5 (the keypoint mean would be 0.8). The threshold is 10 % of the target box's longer side
    over the padded side: an error of 0.03 of the side is a hit for a 48-px box in a 48-px square
    (threshold 0.1), a miss for a 12-px box (0.025)."""
    pred = torch.tensor([[0.125, 0.125]], dtype=torch.float64)
    truth = torch.tensor([[0.125, 0.155]], dtype=torch.float64)
    big = E.pck_parts(pred, truth, 48 / 48, 2, 0, 4, 4)["model"]
    small = E.pck_parts(pred, truth, 12 / 48, 2, 0, 4, 4)["model"]
    assert big[0] == 1 and small[0] == 0
    parts = torch.stack([torch.tensor([4.0, 0, 4, 0]), torch.tensor([0.0, 0, 0, 1])])
    assert E.estimate(parts, E.class_mean)[0] == 0.5


def test_spair_keypoints_scale_by_the_longer_side(tmp_path):
    """The reader gives each image's longer side (the padded square's): 48 for a 48 x 32 image, so
    that x and y are divided alike; dividing y by the height would move every keypoint."""
    make_spair(tmp_path, [("cat", "a.jpg", "b.jpg", CENTRES, CENTRES, [1, 2, 30, 20])])
    (p,) = data.read_spair(str(tmp_path))
    assert p["src_side"] == p["trg_side"] == 48 and p["trg_box"] == [1, 2, 30, 20]
    assert p["src_kps"].shape == (4, 2) and p["src"].endswith("JPEGImages/cat/a.jpg")


def test_spair_subsample_per_class(tmp_path):
    pairs = [("cat", f"{i}.jpg", f"{i + 1}.jpg", CENTRES, CENTRES, [0, 0, 9, 9]) for i in range(5)]
    make_spair(tmp_path, pairs)
    kept = data.read_spair(str(tmp_path), per_class=3)
    again = data.read_spair(str(tmp_path), per_class=3)
    assert len(kept) == 3 and [p["src"] for p in kept] == [p["src"] for p in again]  # seeded
    assert len(data.read_spair(str(tmp_path), per_class=0)) == 5


@pytest.mark.parametrize("breakage, message", [
    ("no_pairs", "PairAnnotation/test"), ("no_image", "images listed in PairAnnotation"),
    ("bad_json", "not an SPair pair annotation")])
def test_spair_bad_folder_one_line(tmp_path, capsys, breakage, message):
    make_spair(tmp_path, [("cat", "a.jpg", "b.jpg", CENTRES, CENTRES, [0, 0, 9, 9])])
    if breakage == "no_pairs":
        for f in (tmp_path / "PairAnnotation" / "test").iterdir():
            f.unlink()
    elif breakage == "no_image":
        (tmp_path / "JPEGImages" / "cat" / "b.jpg").unlink()
    else:
        f = next((tmp_path / "PairAnnotation" / "test").iterdir())
        f.write_text(json.dumps({"category": "cat"}))
    with pytest.raises(SystemExit) as e:
        E.main([tiny_checkpoint(tmp_path / "c.pt"), "--spair", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err



# -- NAVI (Probe3D's wild-set correspondence) ---------------------------------------------------


def make_navi(root, angles=(0, 90, 180), obj="bottle", multiview=True, h=48, w=64, box=(10, 30, 20, 50)):
    """One object's wild set: photo i seen by a camera turned angles[i] degrees about the object's
    y axis, t = (0, 0, 1000 (i + 1)) mm, focal 100 px; depth 655 (= 1.0005 m in NAVI's 16-bit
    coding) inside box (rows r0:r1, cols c0:c1), 0 elsewhere. multiview: a multiview_00 folder
    beside it (Probe3D skips objects without one; 3d_scan/ does not count)."""
    folder = root / obj / "wild_set"
    (folder / "depth").mkdir(parents=True, exist_ok=True)
    (root / obj / "3d_scan").mkdir(exist_ok=True)  # every NAVI object has one; it is no photo collection
    if multiview:
        (root / obj / "multiview_00").mkdir(exist_ok=True)
    notes = []
    for i, deg in enumerate(angles):
        noise_image(folder / "images" / f"{i:03d}.jpg", 500 + i, w, h)
        depth = np.zeros((h, w), np.uint16)
        depth[box[0]:box[1], box[2]:box[3]] = 655
        Image.fromarray(depth).save(folder / "depth" / f"{i:03d}.png")
        half = np.radians(deg) / 2
        notes.append({"filename": f"{i:03d}.jpg", "image_size": [h, w],
                      "camera": {"q": [np.cos(half), 0, np.sin(half), 0], "t": [0, 0, 1000 * (i + 1)], "focal_length": 100.0}})
    (folder / "annotations.json").write_text(json.dumps(notes))
    return folder


def test_navi_reader_pairs_within_120_degrees(tmp_path):
    """Photos at 0, 90 and 180 degrees: 0 and 180 are 180 degrees apart, so each pairs with the 90
    one; an object without another collection is skipped; poses in metres from NAVI's quaternion
    (w, x, y, z); Probe3D's downsampled_ copies are read where they exist and are not photos."""
    folder = make_navi(tmp_path)
    make_navi(tmp_path, obj="lonely", multiview=False)
    for f in ("images/downsampled_000.jpg", "depth/downsampled_000.png"):
        (folder / f).write_bytes((folder / f.replace("downsampled_", "")).read_bytes())
    pairs = data.read_navi(str(tmp_path), every=1)
    names = [tuple(p["image"].split("/")[-1] for p in pair) for pair in pairs]
    assert names[0] == ("downsampled_000.jpg", "001.jpg") and names[2] == ("002.jpg", "001.jpg")
    assert names[1][0] == "001.jpg" and len(names) == 3 and all("lonely" not in p["image"] for pair in pairs for p in pair)
    assert all(a["image"] != b["image"] for a, b in pairs)  # never a photo with itself
    assert pairs[0][0]["depth"].endswith("depth/downsampled_000.png")
    turn = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # 90 degrees about y
    assert np.allclose(pairs[0][1]["pose"][:3, :3], turn) and np.allclose(pairs[0][1]["pose"][:3, 3], [0, 0, 2])
    assert len(data.read_navi(str(tmp_path))) == 1  # every 4th first image: Probe3D's instances[::4]
    with pytest.raises(data.BenchmarkError, match="within 80 degrees"):
        data.read_navi(str(tmp_path), max_angle=80)  # 90 degrees between neighbours: no pair left


def test_navi_view_decodes_depth_lifts_points_and_crops_the_object(tmp_path):
    """A 512 x 512 photo (no resize), focal 1000 px at the original 1024 px (500 at 512), depth 655
    in rows 100:357, cols 200:329: the box is 256 high and 128 wide, so the square crop is rows
    100:356, cols 136:392 (centred), and the 128 grid reads every 2nd pixel: cell (i, j) is pixel
    (100 + 2i, 136 + 2j), with depth for j in 32..96; its point is ((u + 0.5 - 256) z / 500, ...)."""
    folder = make_navi(tmp_path, angles=(0, 30), h=512, w=512, box=(100, 357, 200, 329))
    pairs = data.read_navi(str(tmp_path), every=1)
    photo = dict(pairs[0][0], size=(1024, 1024), focal=1000.0)
    image, xyz = E.navi_view(photo, 32)
    assert image.shape == (32, 32, 3) and xyz.shape == (128, 128, 3)
    has = xyz[..., 2] > 0
    assert has[:, 32:97].all() and not has[:, :32].any() and not has[:, 97:].any()
    z = 655.35 / 655
    assert torch.allclose(xyz[10, 40], torch.tensor([(216.5 - 256) * z / 500, (120.5 - 256) * z / 500, z]), atol=1e-6)
    crop = np.asarray(Image.open(folder / "images" / "000.jpg").convert("RGB"))[100:356, 136:392]
    want = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BICUBIC)).astype(float)
    assert np.abs(image.astype(float) - want).mean() < 1.0


def test_navi_view_turns_photos_upright_by_their_exif_orientation(tmp_path):
    """NAVI's original JPEGs carry an EXIF orientation that the annotations and depth maps assume
    applied (Probe3D's resize script applies it): a photo stored on its side with orientation 6
    is read upright, so that it lines up with its depth map."""
    folder = make_navi(tmp_path, angles=(0, 30), h=64, w=48, box=(0, 64, 0, 48))
    y, x = np.mgrid[0:64, 0:48]
    upright = np.stack([x * 5, y * 4, np.full_like(x, 128)], -1).astype(np.uint8)  # smooth: nearest's offsets matter little
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(np.rot90(upright, 1).copy()).save(folder / "images" / "000.jpg", exif=exif, quality=100)
    photo = data.read_navi(str(tmp_path), every=1)[0][0]
    image, _ = E.navi_view(photo, 32)
    stored = np.asarray(Image.open(folder / "images" / "000.jpg").convert("RGB"))
    assert stored.shape == (48, 64, 3)  # on its side as stored
    frame = np.asarray(Image.fromarray(np.asarray(ImageOps.exif_transpose(Image.open(folder / "images" / "000.jpg")).convert("RGB")))
                       .resize((512, 682), Image.NEAREST))[85:597]
    want = np.asarray(Image.fromarray(frame[:511, :511]).resize((32, 32), Image.BICUBIC)).astype(float)
    assert np.abs(image.astype(float) - want).mean() < 2.0
    sideways = np.asarray(Image.fromarray(stored).resize((32, 32), Image.BICUBIC)).astype(float)
    assert np.abs(sideways - want).mean() > 20  # what reading it as stored would give

def test_navi_recall_under_a_known_camera_turn():
    """Camera b = camera a turned 180 degrees about its optical axis: b's points are a's rotated
    in the grid with x, y negated, and b's features the same rotation of a's. Every match is then
    exact: recall 1 at 1, 2 and 5 cm with the true pose; with the identity pose (the wrong one)
    most of them miss. The ceiling is 1 (every point of a has its twin in b)."""
    g = torch.Generator().manual_seed(0)
    v, u = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    z = 1 + 0.1 * torch.rand(16, 16, generator=g)
    z[:3] = 0  # no depth in the top rows
    pa = torch.stack([(u - 7.5) * z / 20, (v - 7.5) * z / 20, z], -1)
    pb = pa.flip(0, 1) * torch.tensor([-1.0, -1.0, 1.0])
    Fa = torch.randn(4, 4, 8, generator=g)
    found, matched = E.navi_matches(Fa, Fa.flip(0, 1), pa, pb)
    assert len(found) == 13 * 16
    turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))
    right = E.navi_parts(found @ turn.T, matched, pb)
    assert right["model"][:, 0].tolist() == [13 * 16] * 3 and right["ceiling"][:, 0].tolist() == [13 * 16] * 3
    wrong = E.navi_parts(found, matched, pb)["model"]
    assert (wrong[:, 0] < 0.2 * 13 * 16).all()


def test_navi_relative_pose_moves_camera_a_points_into_camera_b():
    """An object point X seen by two cameras (poses P_a, P_b: object -> camera): the map takes
    P_a X to P_b X (its inverse, or P_a P_b^-1, would not: the poses are not symmetric here)."""
    rng = np.random.default_rng(0)
    poses = []
    for q, t in ((rng.normal(size=4), [0.1, -0.2, 1.5]), (rng.normal(size=4), [-0.3, 0.0, 2.0])):
        P = np.eye(4)
        P[:3, :3], P[:3, 3] = data.quaternion_matrix(q), t
        poses.append(P)
    X = np.array([0.05, 0.02, -0.04, 1.0])
    moved = E.relative_pose(*poses).double() @ torch.from_numpy(poses[0] @ X)
    assert np.allclose(moved.numpy(), poses[1] @ X, atol=1e-6)
    assert not np.allclose(E.relative_pose(poses[1], poses[0]).double().numpy() @ poses[0] @ X, poses[1] @ X, atol=1e-3)


def test_navi_keeps_the_matches_that_pass_the_ratio_test_best():
    """Point 0 of a has one close feature in b (ratio d1/d2 ~ 0.04), point 1 has two nearly
    equal ones (ratio ~ 1): with one match to keep, Lowe's ratio test keeps point 0 and its match."""
    e = torch.eye(4)
    Fa = torch.stack([e[0] + 0.3 * e[3], e[1] + 0.3 * e[3]])[None]  # (1, 2, 4): the grid is the point grid
    Fb = torch.stack([e[0], e[1], e[1] + 0.05 * e[2]])[None]  # (1, 3, 4)
    pa = torch.tensor([[[0.0, 0, 1], [1, 0, 1]]])
    pb = torch.tensor([[[5.0, 0, 1], [6, 0, 1], [7, 0, 1]]])
    found, matched = E.navi_matches(Fa, Fb, pa, pb, n=1)
    assert found.tolist() == [[0, 0, 1]] and matched.tolist() == [[5, 0, 1]]
    found, matched = E.navi_matches(Fa, Fb, pa, pb, n=2)
    assert found.tolist() == [[0, 0, 1], [1, 0, 1]] and matched[1].tolist() == [6, 0, 1]

def test_navi_pair_without_points_counts_nothing():
    """A photo whose grid has no depth point: no match, zero rows (not a crash, not a miss)."""
    pa, pb = torch.zeros(4, 4, 3), torch.rand(4, 4, 3) + 0.5
    found, matched = E.navi_matches(torch.randn(2, 2, 8), torch.randn(2, 2, 8), pa, pb)
    assert len(found) == len(matched) == 0
    assert all(v.sum() == 0 for v in E.navi_parts(found, matched, pb).values())


def test_navi_recall_thresholds_by_hand():
    """Errors 0.5, 1.5, 3 and 10 cm: recall 1/4 at 1 cm, 2/4 at 2 cm, 3/4 at 5 cm. Of b's two
    points one lies 0.4 cm from the truth: chance 1/2 at every threshold, ceiling 1."""
    moved = torch.tensor([[0.0, 0.0, 1.0]]).repeat(4, 1)
    matched = moved + torch.tensor([[0.005, 0, 0], [0.015, 0, 0], [0.03, 0, 0], [0.1, 0, 0]])
    pb = torch.tensor([[[0.0, 0.0, 1.004], [0.0, 0.0, 3.0]]])
    got = E.navi_parts(moved, matched, pb)
    assert got["model"].tolist() == [[1, 4], [2, 4], [3, 4]]
    assert got["chance"].tolist() == [[2, 4]] * 3 and got["ceiling"].tolist() == [[4, 4]] * 3


@pytest.mark.parametrize("breakage, message", [
    ("no_wild_set", "no OBJECT/wild_set/"), ("bad_notes", "is not a NAVI collection"),
    ("no_depth", "depth maps of"), ("too_far", "no wild-set photo has a partner"), ("depth_size", "its photo")])
def test_navi_bad_folder_one_line(tmp_path, capsys, breakage, message):
    folder = make_navi(tmp_path, angles=(0, 170) if breakage == "too_far" else (0, 90))
    if breakage == "no_wild_set":
        folder.rename(tmp_path / "bottle" / "elsewhere")
    elif breakage == "bad_notes":
        (folder / "annotations.json").write_text(json.dumps([{"filename": "000.jpg"}]))
    elif breakage == "no_depth":
        (folder / "depth" / "001.png").unlink()
    elif breakage == "depth_size":
        Image.fromarray(np.full((24, 32), 655, np.uint16)).save(folder / "depth" / "001.png")
    with pytest.raises(SystemExit) as e:
        E.main([tiny_checkpoint(tmp_path / "c.pt"), "--navi", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err

# -- COCO (Karpathy's 5k test split) ------------------------------------------------------------


def make_coco(root, n_test=3, n_val=2):
    images = []
    for i in range(n_test + n_val):
        name = f"COCO_val2014_{i:012d}.jpg"
        noise_image(root / "val2014" / name, i, 40, 30)
        images.append({"filepath": "val2014", "filename": name, "split": "test" if i < n_test else "val",
                       "sentences": [{"raw": f"caption {i} {j}"} for j in range(5 + (i == 0))]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def test_coco_reads_the_karpathy_test_split(tmp_path):
    """Only split "test" counts, with every caption of each image (image 0 has 6)."""
    make_coco(tmp_path)
    files, captions, owner = data.read_coco_karpathy(str(tmp_path))
    assert len(files) == 3 and len(captions) == 16 and owner[:7] == [0] * 6 + [1]
    assert files[2].endswith("val2014/COCO_val2014_000000000002.jpg")
    results = E.main([tiny_checkpoint(tmp_path / "c.pt"), "--coco", str(tmp_path), "--out", str(tmp_path / "ev")])
    assert {f"coco_{w}_r{k}" for w in ("i2t", "t2i") for k in (1, 5, 10)} == set(results["metrics"])
    assert results["metrics"]["coco_t2i_r5"] == 1.0 and results["n"]["coco_t2i_r1"] == 16  # 3 images: all in the top 5


# -- NYUv2 (Eigen split, BTS layout) ------------------------------------------------------------


def make_nyu(root, n_train=3, n_test=2):
    """480 x 640 frames as NYUv2's, depth in 16-bit millimetres with holes (0) and far pixels (> 10 m)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            folder = root / "official_splits" / split / f"scene_{i % 2:04d}"
            noise_image(folder / f"rgb_{i:05d}.jpg", 100 * (split == "test") + i, 640, 480)
            mm = np.random.default_rng(i).integers(500, 9000, (480, 640)).astype(np.uint16)
            mm[:10] = 0
            mm[-5:] = 12000
            Image.fromarray(mm).save(folder / f"sync_depth_{i:05d}.png")


def test_nyu_per_image_rmse_is_not_pooled():
    """Image A: one scored pixel 3 m off; image B: 99 exact pixels. The mean of per-image RMSEs is
    1.5; the RMSE of all pixels pooled would be sqrt(9 / 100) = 0.3."""
    D = torch.ones(2, 10, 10)
    pred = D.clone()
    pred[0, 0, 0] = 4.0
    keep = torch.ones(2, 10, 10, dtype=torch.bool)
    keep[0] = False
    keep[0, 0, 0] = True
    keep[1, 0, 0] = False
    assert E.estimate(E.per_image_rmse(pred, D, keep))[0] == pytest.approx(1.5)


def test_nyu_scores_eigen_crop_ignores_far_and_missing():
    """Deeper than 10 m and missing (0) are left out, not clamped; zero-shot counts Eigen's crop of
    the frame (rows 45-470, columns 41-600), the probes all of Probe3D's centre square."""
    frame = E.eigen_mask(480, 640)
    assert frame[45:471, 41:601].all() and not frame[:45].any() and not frame[471:].any() and not frame[:, :41].any()
    D = torch.full((1, 480, 640), 5.0)
    D[0, 100, 100], D[0, 200, 200] = 12.0, 0.0
    keep = E.nyu_scored(D, frame)
    assert not keep[0, 100, 100] and not keep[0, 200, 200] and keep[0, 300, 300] and not keep[0, 10, 10]
    assert int(keep.sum()) == 426 * 560 - 2
    assert int(E.nyu_scored(D[:, :, :480], True).sum()) == 480 * 480 - 2  # the probe: the whole centre square


def test_nyu_reader_layout(tmp_path):
    make_nyu(tmp_path)
    sets = data.read_nyu_eigen(str(tmp_path))
    assert [len(sets[s]) for s in ("train", "test")] == [3, 2]
    image, depth = sets["test"][1]
    assert image.endswith("official_splits/test/scene_0001/rgb_00001.jpg") and depth.endswith("sync_depth_00001.png")
    d = data.read_depth_png(depth)
    assert d.dtype == np.float32 and d[0, 0] == 0 and d[-1, 0] == 12.0
    (tmp_path / "official_splits" / "test" / "scene_0000" / "sync_depth_00000.png").unlink()
    with pytest.raises(data.BenchmarkError, match="sync_depth"):
        data.read_nyu_eigen(str(tmp_path))


# -- ADE20K (official split) --------------------------------------------------------------------


def make_ade(root, n_train=3, n_val=2):
    for split, folder, n in (("train", "training", n_train), ("val", "validation", n_val)):
        for i in range(n):
            name = f"ADE_{split}_{i:08d}"
            noise_image(root / "images" / folder / f"{name}.jpg", 200 * (split == "val") + i, 40 + 4 * i, 30)
            (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
            label = np.random.default_rng(i).integers(0, 151, (30, 40 + 4 * i), dtype=np.uint8)
            Image.fromarray(label).save(root / "annotations" / folder / f"{name}.png")


def test_ade_is_scored_at_label_resolution_with_150_classes(tmp_path, monkeypatch):
    """Each validation label map is scored at its own size (40 and 44 px wide here, not the 32-px
    input), over 150 classes, with label 0 ignored (-1) and label k as class k - 1."""
    make_ade(tmp_path)
    seen = []
    real = E.seg_parts
    monkeypatch.setattr(E, "seg_parts", lambda p, t, c: seen.append((tuple(t.shape), c, int(t.min()), int(t.max())))
                        or real(p, t, c))
    results = E.main([tiny_checkpoint(tmp_path / "c.pt"), "--ade", str(tmp_path), "--out", str(tmp_path / "ev")])
    assert {(shape, c) for shape, c, _, _ in seen} == {((1, 30, 40), 150), ((1, 30, 44), 150)}
    assert min(lo for *_, lo, _ in seen) == -1 and max(hi for *_, hi in seen) <= 149
    assert set(results["metrics"]) == {"ade_miou"} and results["n"]["ade_miou"] == 2
    assert "ade_miou" in results["gain"]


# -- all at once, as a user with the data runs it -----------------------------------------------


def test_every_benchmark_in_one_run(tmp_path):
    """evaluate.py CKPT --imagenet --coco --spair --navi --nyu --ade --kitti on mini-datasets in their layouts:
    every metric with a finite value and se."""
    pytest.importorskip("open_clip")
    for c in ("n01440764", "n02123045"):
        for split, n in (("val", 2), ("train", 3)):
            for i in range(n):
                noise_image(tmp_path / "in" / split / c / f"{i}.JPEG", hash((c, split, i)) % 1000, 40, 30)
    make_coco(tmp_path / "coco")
    make_spair(tmp_path / "spair", [("cat", "a.jpg", "b.jpg", CENTRES, CENTRES, [0, 0, 40, 30])])
    make_nyu(tmp_path / "nyu")
    make_ade(tmp_path / "ade")
    make_kitti(tmp_path / "kitti")
    make_navi(tmp_path / "navi", angles=(0, 45, 90, 120))
    results = E.main([tiny_checkpoint(tmp_path / "c.pt"), "--imagenet", str(tmp_path / "in"),
                      "--coco", str(tmp_path / "coco"), "--spair", str(tmp_path / "spair"), "--navi", str(tmp_path / "navi"),
                      "--nyu", str(tmp_path / "nyu"), "--ade", str(tmp_path / "ade"), "--kitti", str(tmp_path / "kitti"),
                      "--out", str(tmp_path / "ev")])
    expected = {"in_zs_acc", "in_lin_acc", "in_knn_acc", "spair_pck", "navi_recall_1cm", "navi_recall_2cm", "navi_recall_5cm", "nyu_probe_rmse", "nyu_probe_ml_rmse",
                "nyu_zsdepth_absrel", "nyu_zsdepth_delta1", "ade_miou", "kitti_zsdepth_absrel", "kitti_zsdepth_delta1",
                *(f"coco_{w}_r{k}" for w in ("i2t", "t2i") for k in (1, 5, 10))}
    assert set(results["metrics"]) == expected
    assert all(np.isfinite(results["metrics"][k]) and np.isfinite(results["se"][k]) for k in expected)


# -- KITTI (Eigen test, annotated depth) and zero-shot relative depth ---------------------------


def make_kitti(root, n=3):
    lines = []
    for i in range(n):
        image = f"2011_09_26/2011_09_26_drive_0002_sync/image_02/data/{i:010d}.png"
        gt = f"2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/{i:010d}.png"
        noise_image(root / "raw" / image, 300 + i, 124, 38)
        depth = (np.random.default_rng(i).uniform(2, 90, (38, 124)) * 256).astype(np.uint16)
        depth[:, ::3] = 0  # the lidar's holes
        (root / "data_depth_annotated" / gt).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(depth).save(root / "data_depth_annotated" / gt)
        lines.append(f"{image} {gt} 721.5377")
    lines.append("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000099.png None 721.5377")
    (root / data.KITTI_LIST).write_text("\n".join(lines) + "\n")


def test_kitti_reader_skips_frames_without_ground_truth(tmp_path):
    make_kitti(tmp_path)
    pairs = data.read_kitti_eigen(str(tmp_path))
    assert len(pairs) == 3 and pairs[0][0].endswith("raw/2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000000.png")
    d = data.read_depth_png(pairs[0][1], scale=256.0)
    assert d.max() <= 90 and d.max() > 80 and (d[:, ::3] == 0).all()  # metres, with holes and far points


def test_zero_shot_depth_in_disparity_or_depth_space():
    """A prediction exact in disparity up to scale and shift scores AbsRel 0 in both spaces; a noisy
    one, aligned by the closed-form least squares, scores by hand |a - t| / t in disparity and
    |1/a - 1/t| t in depth: the two spaces give different numbers."""
    D = torch.tensor([[[1.0, 2.0, 4.0, 8.0]]])  # depth; disparity 1, .5, .25, .125
    exact = 3 * (1 / D) + 2
    for space in ("depth", "disparity"):
        z = E.zero_shot_depth(exact, D, 80.0, space)
        assert E.absrel_of(z.sum(0)) == pytest.approx(0, abs=1e-9) and E.delta1_of(z.sum(0)) == 1
    noisy = 1 / D + torch.tensor([0.05, -0.05, 0.05, -0.05])
    p = noisy.flatten().double()
    t = (1 / D).flatten().double()
    pc = p - p.mean()
    aligned = (pc * (t - t.mean())).sum() / (pc * pc).sum() * pc + t.mean()
    by_hand = {"disparity": ((aligned - t).abs() / t).mean(), "depth": ((1 / aligned - 1 / t).abs() * t).mean()}
    for space, want in by_hand.items():
        assert E.absrel_of(E.zero_shot_depth(noisy, D, 80.0, space).sum(0)) == pytest.approx(float(want))
    assert by_hand["disparity"] != pytest.approx(float(by_hand["depth"]))


def test_zero_shot_depth_per_image_mean():
    """per_image: two images' AbsRel are averaged, not their pixels pooled (4 pixels against 1)."""
    D = torch.tensor([[[1.0, 2.0, 4.0, 8.0]], [[1.0, 0, 0, 0]]])  # the second has one valid pixel
    pred = 1 / D.clamp(min=1)
    pred[0] = pred[0] + torch.tensor([0.05, -0.05, 0.05, -0.05])
    pooled, mean = (E.absrel_of(E.zero_shot_depth(pred, D, 80.0, "disparity", per_image=b).sum(0)) for b in (False, True))
    first = E.absrel_of(E.zero_shot_depth(pred[:1], D[:1], 80.0, "disparity").sum(0))
    assert mean == pytest.approx(first / 2) and pooled == pytest.approx(first * 4 / 5)


def test_kitti_garg_crop_and_80_m(tmp_path, monkeypatch):
    """Only Garg's crop of each frame is scored, depth beyond 80 m and holes left out."""
    make_kitti(tmp_path, n=1)
    seen = []
    real = E.zero_shot_depth
    monkeypatch.setattr(E, "zero_shot_depth", lambda p, D, cap, *a, **k: seen.append(D.clone()) or real(p, D, cap, *a, **k))
    results = E.main([tiny_checkpoint(tmp_path / "c.pt"), "--kitti", str(tmp_path), "--out", str(tmp_path / "ev")])
    (D,) = seen
    scored = D[0] > 0
    rows, cols = scored.any(1).nonzero()[:, 0], scored.any(0).nonzero()[:, 0]
    assert rows.min() >= int(0.40810811 * 38) and rows.max() < int(0.99189189 * 38)
    assert cols.min() >= int(0.03594771 * 124) and cols.max() < int(0.96405229 * 124)
    assert D.max() <= 80 and set(results["metrics"]) == {"kitti_zsdepth_absrel", "kitti_zsdepth_delta1"}


# -- Bad files, KITTI's layouts, NAVI's equal rotations (a user's real downloads) ---------------


def make_benchmark(name, root):
    """A mini-dataset of one benchmark in its layout; returns (an image, a PNG label or depth map or
    None) that the reader will read."""
    if name == "imagenet":
        for c in ("n01440764", "n02123045"):
            for i in range(2):
                noise_image(root / "val" / c / f"{i}.JPEG", hash((c, i)) % 1000, 40, 30)
        return root / "val" / "n02123045" / "1.JPEG", None
    if name == "coco":
        make_coco(root)
        return root / "val2014" / "COCO_val2014_000000000001.jpg", None
    if name == "spair":
        make_spair(root, [("cat", "a.jpg", "b.jpg", CENTRES, CENTRES, [0, 0, 40, 30])])
        return root / "JPEGImages" / "cat" / "b.jpg", None
    if name == "navi":
        folder = make_navi(root, angles=(0, 45, 90))
        return folder / "images" / "001.jpg", folder / "depth" / "002.png"
    if name == "nyu":
        make_nyu(root)
        return (root / "official_splits" / "test" / "scene_0001" / "rgb_00001.jpg",
                root / "official_splits" / "train" / "scene_0000" / "sync_depth_00002.png")
    if name == "ade":
        make_ade(root)
        return (root / "images" / "validation" / "ADE_val_00000001.jpg",
                root / "annotations" / "training" / "ADE_train_00000002.png")
    make_kitti(root)
    return (root / "raw" / "2011_09_26" / "2011_09_26_drive_0002_sync" / "image_02" / "data" / "0000000001.png",
            root / "data_depth_annotated" / "2011_09_26_drive_0002_sync" / "proj_depth" / "groundtruth" / "image_02"
            / "0000000002.png")


@pytest.mark.parametrize("breakage", ["truncated image", "error page as PNG"])
@pytest.mark.parametrize("name", ["imagenet", "coco", "spair", "navi", "nyu", "ade", "kitti"])
def test_a_file_that_does_not_decode_ends_in_one_line_naming_it(tmp_path, capsys, monkeypatch, name, breakage):
    """Real downloads hold truncated JPEGs and HTML error pages saved under an image's name: every
    reader decodes its files before any work, and evaluate.py names the file in one line, exit 2,
    before a feature is extracted (here: even before the toy suite of the same call)."""
    image, png = make_benchmark(name, tmp_path / name)
    bad = image if breakage == "truncated image" or png is None else png
    if breakage == "truncated image":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_bytes(b"<html><body>503 Service Unavailable</body></html>\n")
    monkeypatch.setattr(E, "extract", lambda *a, **k: pytest.fail("features extracted before the files were checked"))
    with pytest.raises(SystemExit) as e:
        E.main([tiny_checkpoint(tmp_path / "c.pt"), f"--{name}", str(tmp_path / name), "--data", "x*.tar"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and str(bad) in err and "cannot be decoded" in err and "\n" not in err


def test_nyu_zero_shot_scores_the_whole_frame_within_eigens_crop(tmp_path, monkeypatch):
    """Depth 2 m everywhere but a band at columns 41-79 (inside Eigen's crop, outside Probe3D's
    centre square), 4 m: a flat prediction aligned per image is exact on the centre square and
    wrong only on the band, so the zero-shot AbsRel is > 0 only if the whole frame is scored (BTS,
    Depth Anything); 8 m in the rows above Eigen's crop changes nothing, since they are not scored."""
    make_nyu(tmp_path, n_train=2, n_test=2)

    def depth_maps(top):
        for f in (tmp_path / "official_splits").glob("*/*/sync_depth_*.png"):
            mm = np.full((480, 640), 2000, np.uint16)
            mm[:, 41:80] = 4000
            mm[:45] = top  # rows above Eigen's crop
            Image.fromarray(mm).save(f)

    depth_maps(2000)
    real, seen = E.extract, []

    def flat_depth(model, items, want, *a, **k):
        if want == ("depth",):
            seen.append(np.asarray(items[0]).shape)
            return {"depth": torch.ones(len(items), 4, 4)}
        return real(model, items, want, *a, **k)

    monkeypatch.setattr(E, "extract", flat_depth)
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    results = E.main([ckpt, "--nyu", str(tmp_path), "--out", str(tmp_path / "ev")])
    assert results["metrics"]["nyu_zsdepth_absrel"] > 0.05  # the band, 39 of Eigen's 560 columns, 50 % off
    assert results["metrics"]["nyu_zsdepth_delta1"] < 1.0
    assert seen and all(s[:2] == (32, 32) for s in seen)  # the whole frame, resized to the square input
    depth_maps(8000)  # 8 m above Eigen's crop: outside what is scored, so the same AbsRel
    again = E.main([ckpt, "--nyu", str(tmp_path), "--out", str(tmp_path / "ev2")])
    assert again["metrics"]["nyu_zsdepth_absrel"] == pytest.approx(results["metrics"]["nyu_zsdepth_absrel"])


def test_navi_never_pairs_photos_with_equal_rotations(tmp_path):
    """Two photos whose rotations are equal (one quaternion a multiple of the other) come out
    ~1e-6 degrees apart from float rounding; they are the same view, not a pair."""
    folder = make_navi(tmp_path, angles=(0, 0))
    q = np.array([-1.2096265493756504, -1.7330027043844558, -1.1541714262983167, 1.4207998428900637])
    notes = json.loads((folder / "annotations.json").read_text())
    notes[0]["camera"]["q"], notes[1]["camera"]["q"] = q.tolist(), (1.7 * q).tolist()
    (folder / "annotations.json").write_text(json.dumps(notes))
    R = np.stack([data.quaternion_matrix(q), data.quaternion_matrix(1.7 * q)])
    angle = np.degrees(np.arccos(np.clip((np.einsum("ij,ij", R[0], R[1]) - 1) / 2, -1, 1)))
    assert 0 < angle < data.NAVI_SAME_VIEW  # the rounding this guards against
    with pytest.raises(data.BenchmarkError, match="no wild-set photo has a partner"):
        data.read_navi(str(tmp_path), every=1)


@pytest.mark.parametrize("layout", ["bts", "depth_anything", "kitti_train_val"])
def test_kitti_read_in_each_reference_layout(tmp_path, layout):
    """BTS: eigen_test_files_with_gt.txt, the drives at the root; Depth Anything: kitti_eigen_test_
    files_with_gt.txt listing absolute paths of another machine, raw_data/ and data_depth_annotated_
    zoedepth/, two columns; KITTI's own annotated depth with its train/ and val/ level."""
    make_kitti(tmp_path / "ours")
    src = tmp_path / "ours"
    root = tmp_path / layout
    raw, gt = {"bts": ("", "data_depth_annotated"), "depth_anything": ("raw_data", "data_depth_annotated_zoedepth"),
               "kitti_train_val": ("raw", "data_depth_annotated/val")}[layout]
    (root / raw).mkdir(parents=True, exist_ok=True)
    (src / "raw" / "2011_09_26").rename(root / raw / "2011_09_26")
    (root / gt).parent.mkdir(parents=True, exist_ok=True)
    (src / "data_depth_annotated").rename(root / gt)
    lines = (src / data.KITTI_LIST).read_text().splitlines()
    if layout == "depth_anything":
        lines = [" ".join([f"/mnt/data/Kitti/raw_data/{a}", "None" if b == "None" else
                           f"/mnt/data/Kitti/data_depth_annotated_zoedepth/{b}"]) for a, b, _ in map(str.split, lines)]
    name = "eigen_test_files_with_gt.txt" if layout == "bts" else data.KITTI_LIST
    (root / name).write_text("\n".join(lines) + "\n")
    pairs = data.read_kitti_eigen(str(root))
    assert len(pairs) == 3 and all(os.path.isfile(p) for pair in pairs for p in pair)
    assert pairs[1][0].endswith("2011_09_26_drive_0002_sync/image_02/data/0000000001.png")
    assert pairs[1][1].endswith("proj_depth/groundtruth/image_02/0000000001.png")
    os.remove(pairs[2][1])
    with pytest.raises(data.BenchmarkError, match="1 images or depth maps of .* are missing"):
        data.read_kitti_eigen(str(root))
