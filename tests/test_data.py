"""The toy world, shard I/O and the streaming reader (data.py)."""

import io
import itertools
import json
import math
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data


def room_depth(camera, size):
    """Depth (camera z) at which each pixel's ray meets the floor or the back wall, computed from
    the camera alone: rays through pixel centres, rolled, then pitched down."""
    focal = 0.5 / math.tan(camera["fov"] / 2)
    c = ((np.arange(size) + 0.5) / size - 0.5) / focal
    u, v = np.meshgrid(c, -c)                                     # camera x right, y up, z = 1
    cr, sr = math.cos(camera["roll"]), math.sin(camera["roll"])
    x, y = u * cr - v * sr, u * sr + v * cr
    cp, sp = math.cos(camera["pitch"]), math.sin(camera["pitch"])
    dy, dz = y * cp - sp, y * sp + cp                             # world up and ahead of a z = 1 ray
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = np.where(dy < 0, -camera["height"] / dy, np.inf)
        wall = np.where(dz > 0, camera["wall"] / dz, np.inf)
        wall = np.where(camera["height"] + wall * dy <= camera["wall_height"], wall, np.inf)
    return np.minimum(floor, wall)


def test_render_is_deterministic_and_resolution_independent():
    a, b = data.render_scene(0, 3), data.render_scene(0, 3)
    for k in ("image", "depth", "seg"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["caption"] == b["caption"] and a["objects"] == b["objects"]
    assert not np.array_equal(a["image"], data.render_scene(0, 4)["image"])
    assert not np.array_equal(a["image"], data.render_scene(1, 3)["image"])
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8
    assert a["depth"].dtype == np.float32 and a["seg"].dtype == np.uint8
    for size in (128, 224):
        s = data.render_scene(0, 3, size)
        assert s["image"].shape == (size, size, 3) and s["depth"].shape == s["seg"].shape == (size, size)
        assert s["caption"] == a["caption"]                       # the same scene, only sharper
        assert [o["name"] for o in s["objects"]] == [o["name"] for o in a["objects"]]


@pytest.mark.parametrize("size", [64, 128])
def test_depth_is_consistent_with_occlusion(size):
    for index in range(12):
        s = data.render_scene(7, index, size)
        floor, depth, seg = room_depth(s["camera"], size), s["depth"], s["seg"]
        np.testing.assert_allclose(depth[seg == 1], floor[seg == 1], rtol=1e-4)
        assert np.isinf(depth[seg == 0]).all() and np.isinf(floor[seg == 0]).all()
        objects = seg >= 2
        assert (depth[objects] < floor[objects] * (1 - 1e-5)).all()   # nearer than the floor behind
        for i, o in enumerate(s["objects"]):
            rows, cols = np.nonzero(seg == 2 + i)
            x0, y0, x1, y1 = (np.array(o["box"]) * size).round().astype(int)
            assert len(rows) and (x0, y0) == (cols.min(), rows.min())
            assert (x1, y1) == (cols.max() + 1, rows.max() + 1)
            assert 0 < o["visible"] <= 1


def test_layout_keeps_objects_visible_and_captions_name_them():
    counts = set()
    for index in range(150):
        s = data.render_scene(1, index, captions="full")
        counts.add(s["count"])
        assert s["count"] == len(s["objects"])
        assert len({o["name"] for o in s["objects"]}) == s["count"]          # names are unique
        for i, o in enumerate(s["objects"]):
            assert o["name"] == f"{o['color']} {o['shape']}" and o["name"] in s["caption"]
            assert o["shape"] in data.SHAPES and o["color"] in data.COLORS and o["size"] in data.SIZES
            assert o["visible"] >= 0.4 and (s["seg"] == 2 + i).sum() >= 12  # never (nearly) hidden
    assert {1, 2} <= counts <= {1, 2, 3}


def test_depth_png_round_trip():
    rng = np.random.default_rng(0)
    inv = rng.uniform(0.1, 3.0, (20, 30))
    valid = rng.random((20, 30)) > 0.2
    got, got_valid = data.decode_depth_png(data.encode_depth_png(inv, valid))
    lo, hi = inv[valid].min(), inv[valid].max()
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_allclose(got[valid], (inv[valid] - lo) / (hi - lo), atol=0.6 / 65534)
    assert (got[~valid] == 0).all() and got.dtype == np.float32


def toy_samples(n, seed=0):
    return [(f"{i:09d}", data.scene_members(data.render_scene(seed, i), seed, i)) for i in range(n)]


def test_shard_round_trip_is_lossless(tmp_path):
    samples = toy_samples(3)
    scene = data.render_scene(0, 0)
    samples[0][1]["depth.png"] = data.encode_depth_png(1 / scene["depth"][::2, ::2])   # half resolution
    ground = {"entities": [{"name": "red cube", "box": [0.1, 0.2, 0.5, 0.6], "score": 0.9}], "expert": "e"}
    samples[0][1]["ground.json"] = json.dumps(ground).encode()
    path = tmp_path / "s.tar"
    assert data.write_shard(path, iter(samples)) == 3
    assert os.listdir(tmp_path) == ["s.tar"] and data.count_samples(str(path)) == 3
    for (key, members), (want_key, want) in zip(data.iter_tar(path), samples, strict=True):
        assert key == want_key and members == want
        s, truth = data.decode_sample(key, members), data.render_scene(0, int(key))
        np.testing.assert_array_equal(s["image"], truth["image"])
        np.testing.assert_array_equal(s["gt_depth"], truth["depth"])
        np.testing.assert_array_equal(s["gt_seg"], truth["seg"])
        assert s["caption"] == truth["caption"] and s["gt"]["objects"] == truth["objects"]
        assert s["meta"]["count"] == truth["count"] and s["meta"]["index"] == int(key)
    first = data.decode_sample(*samples[0])
    inv = 1 / scene["depth"][::2, ::2]
    np.testing.assert_allclose(first["depth"], (inv - inv.min()) / (inv.max() - inv.min()), atol=1e-5)
    assert first["depth_valid"].all() and first["ground"] == ground


def tiny_members(i, caption=None):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), i % 256, np.uint8)).save(buf, format="PNG")
    return {"png": buf.getvalue(), "txt": (caption or f"sample {i}").encode()}


def test_bad_samples_are_skipped_and_counted(tmp_path, capsys):
    good = [(f"{i:09d}", tiny_members(i)) for i in range(3)]
    bad = [tiny_members(10 + i) for i in range(9)]
    bad[0]["png"] = bad[0]["png"][:40]                                      # truncated image
    del bad[1]["txt"]                                                       # missing caption
    bad[2]["txt"] = b"\xff\xfe not utf-8"                                   # undecodable caption
    bad[3]["ground.json"] = b"{not json"                                    # unreadable label
    bad[4]["ground.json"] = json.dumps({"entities": [{"name": 3, "box": [0, 0, 1, 1]}]}).encode()
    bad[5]["ground.json"] = json.dumps({"entities": [{"name": "a", "box": [0.5, 0.1, 1.4, 0.3],
                                                      "score": 1}]}).encode()  # box outside 0..1
    bad[6]["depth.png"] = data.encode_depth_png(np.ones((8, 8)))            # larger than the 4x4 image
    bad[7]["depth.png"] = b"not a png"
    del bad[8]["png"]                                                       # no image at all
    samples = good[:1] + [(f"{10 + i:09d}", m) for i, m in enumerate(bad)] + good[1:]
    data.write_shard(tmp_path / "s.tar", samples)
    ds = data.ShardDataset(str(tmp_path / "*.tar"))
    assert [s["key"] for s in ds] == [k for k, _ in good]
    assert ds.bad == len(bad)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("data: skipped sample") for line in lines)
    strict = data.ShardDataset(str(tmp_path / "*.tar"), require=("depth.png",))
    assert list(strict) == [] and strict.bad == len(samples)


def write_tiny_shards(tmp_path, n_shards, per_shard):
    for s in range(n_shards):
        data.write_shard(tmp_path / f"t-{s:06d}.tar",
                         [(f"{s}-{i:04d}", tiny_members(s * 100 + i)) for i in range(per_shard)])
    return str(tmp_path / "t-*.tar"), [f"{s}-{i:04d}" for s in range(n_shards) for i in range(per_shard)]


@pytest.mark.parametrize("n_shards", [1, 3, 4, 9])        # by sample (< 4 streams) and by shard
def test_rank_worker_split_covers_every_sample_once(tmp_path, monkeypatch, n_shards):
    pattern, keys = write_tiny_shards(tmp_path, n_shards, 5)
    assert data.count_samples(pattern) == len(keys)
    seen = []
    for rank, worker in itertools.product(range(2), range(2)):
        info = types.SimpleNamespace(id=worker, num_workers=2)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
        ds = data.ShardDataset(pattern, rank=rank, world=2, shuffle_buffer=4, seed=3)
        seen += [s["key"] for s in ds]
    assert sorted(seen) == keys                                # every sample exactly once


def test_repeat_reshuffles_each_epoch(tmp_path):
    pattern, keys = write_tiny_shards(tmp_path, 3, 6)
    ds = data.ShardDataset(pattern, shuffle_buffer=8, repeat=True)
    stream = [s["key"] for s in itertools.islice(ds, 36)]
    first, second = stream[:18], stream[18:]
    assert sorted(first) == sorted(second) == sorted(keys) and first != second and first != keys
    assert [s["key"] for s in data.ShardDataset(pattern)] == keys                # no buffer: file order


def keep_key_and_rng(sample, rng):
    return (sample["key"], float(rng.random()))


def as_list(batch):
    return batch


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_exactly(tmp_path, workers):
    pattern, _ = write_tiny_shards(tmp_path, 3, 7)

    def stream(skip, n=14):
        ds = data.ShardDataset(pattern, transform=keep_key_and_rng, batch_size=3, collate=as_list,
                               shuffle_buffer=5, seed=4, repeat=True, skip_batches=skip)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return list(itertools.islice(loader, n - skip))

    full = stream(0)
    for skip in (1, 5, 8):                                     # 8 batches: past the end of epoch 0
        assert stream(skip) == full[skip:]


def test_reads_img2dataset_output(tmp_path):
    image = data.render_scene(0, 0)["image"]
    samples = []
    for i in range(3):
        jpg = io.BytesIO()
        Image.fromarray(image).save(jpg, format="JPEG", quality=90)
        meta = {"url": f"http://example.com/{i}.jpg", "key": f"{i:09d}", "status": "success",
                "error_message": None, "width": 64, "height": 64, "caption": f"photo {i}"}
        samples.append((f"{i:09d}", {"jpg": jpg.getvalue(), "txt": f"photo {i}".encode(),
                                     "json": json.dumps(meta).encode()}))
    data.write_shard(tmp_path / "00000.tar", samples)
    got = list(data.ShardDataset(str(tmp_path / "00000.tar")))
    assert [s["caption"] for s in got] == ["photo 0", "photo 1", "photo 2"]
    assert got[0]["image"].shape == (64, 64, 3) and got[0]["meta"]["url"].endswith("0.jpg")
    assert np.abs(got[0]["image"].astype(int) - image).mean() < 8  # JPEG is lossy, but it is this image


def test_cli_writes_shards_and_preview(tmp_path, capsys):
    out = tmp_path / "toy"
    data.main(["--out", str(out), "--n", "5", "--val-n", "3", "--shard-size", "2"])
    assert sorted(os.listdir(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                       "val-000000.tar", "val-000001.tar"]
    assert data.count_samples(str(out / "train-*.tar")) == 5
    assert data.count_samples(str(out / "val-*.tar")) == 3
    val = [data.decode_sample(k, m) for k, m in data.iter_tar(out / "val-000000.tar")]
    assert all(s["meta"]["index"] >= data.VAL_OFFSET for s in val)   # disjoint from the train scenes
    data.main(["--preview", str(out / "train-000000.tar"), "--png", str(tmp_path / "p.png")])
    assert Image.open(tmp_path / "p.png").size[0] > 200


@pytest.mark.parametrize("argv", [["--out", "x", "--n", "0"], ["--out", "x"], ["--preview", "nope.tar"],
                                  ["--preview", "nope.tar", "--png", "p.png"], ["--n", "many"]])
def test_cli_rejects_bad_input(argv, capsys):
    with pytest.raises(SystemExit) as e:
        data.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data.py: error:")
