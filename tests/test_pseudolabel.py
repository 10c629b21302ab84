"""pseudolabel.py: entities, the OWLv2 padding correction, filtering, the simulated tagger, simulated
and (tiny, random) real experts end to end, resumability, bad samples and CLI errors. CPU, offline,
~15 s."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import pseudolabel as pl


def labelled_run(shards, out, *extra):
    return pl.main(["--shards", str(shards), "--out", str(out), *extra])


def simulated(shards, out, *extra):
    return labelled_run(shards, out, "--depth-expert", "simulated", "--ground-expert", "simulated", *extra)


def read_shard(path):
    return dict(data.iter_tar(str(path)))


def naming_every_object(members):
    """A caption that names every object of a toy sample by its name (web captions often do not)."""
    return "A photo of " + " and ".join("a " + o["name"] for o in json.loads(members["gt.json"])["objects"]) + "."


def recaptioned(samples, caption):
    """(key, members) samples with their caption replaced by caption(members)."""
    return [(key, dict(members, txt=caption(members).encode())) for key, members in samples]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Three train shards of 4 toy scenes at 32 px (and a val shard, unused)."""
    root = tmp_path_factory.mktemp("toy")
    data.main(["--out", str(root), "--n", "12", "--val-n", "4", "--size", "32", "--shard-size", "4"])
    return root


# -----------------------------------------------------------------------------------------------
# Entities


@pytest.mark.parametrize("caption, expected", [
    ("A small red cube, a blue sphere and a large green cone on a slate floor. The blue sphere is "
     "left of the green cone.", ["small red cube", "blue sphere", "large green cone", "slate floor"]),
    ("Two dogs playing with a red frisbee in the park.", ["dog", "red frisbee", "park"]),
    ("A photo of a man riding a horse on the beach at sunset", ["man", "horse", "beach", "sunset"]),
    ("The cube is red.", ["cube"]),
    ("A bowl of fresh berries and two boxes on a wooden table", ["bowl", "fresh berry", "box", "wooden table"]),
    ("", []),
])
def test_entities_from_captions(caption, expected):
    assert pl.extract_entities(caption) == expected


def test_entities_from_a_vocabulary():
    vocab = ["red cube", "blue sphere", "cone"]
    assert pl.extract_entities("Two red cubes and a blue sphere.", vocab) == ["red cube", "blue sphere"]
    assert pl.extract_entities("A green cylinder.", vocab) == []


# -----------------------------------------------------------------------------------------------
# Boxes


def test_unpad_boxes_hand_made():
    # A 48 x 64 (H x W) image is padded to a 64 x 64 square at the bottom: x is unchanged, y
    # stretches by 64 / 48, and a box reaching into the padding is clipped to the image.
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.1, 0.6, 0.2, 0.9]])
    expected = torch.tensor([[0.25, 1 / 3, 0.5, 2 / 3], [0.1, 0.8, 0.2, 1.0]])
    assert torch.allclose(pl.unpad_boxes(boxes, 48, 64), expected)
    # A tall 64 x 32 image is padded on the right: x stretches by 2.
    assert torch.allclose(pl.unpad_boxes(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 64, 32),
                          torch.tensor([[0.2, 0.2, 0.6, 0.4]]))


def test_unpad_boxes_matches_the_owlv2_processor():
    """A white rectangle, found in the processor's padded square, maps back to its place in the image."""
    from transformers import Owlv2ImageProcessor

    image = np.zeros((48, 64, 3), np.uint8)
    image[12:24, 16:40] = 255  # rows 12..24, columns 16..40
    x = Owlv2ImageProcessor(size={"height": 64, "width": 64})(images=[image], return_tensors="pt")
    bright = x["pixel_values"][0, 0] > 1.0  # (64, 64) the rectangle after normalisation
    rows, cols = bright.any(1).nonzero()[:, 0], bright.any(0).nonzero()[:, 0]
    in_square = torch.tensor([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]]) / 64.0
    assert torch.allclose(pl.unpad_boxes(in_square, 48, 64), torch.tensor([[16 / 64, 12 / 48, 40 / 64, 24 / 48]]),
                          atol=1.5 / 48)


def test_filter_boxes():
    cfg = pl.LabelConfig("", "", "", "", score_threshold=0.3, nms_iou=0.5, max_boxes=3, min_box_size=0.05)
    det = {"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5],      # kept
                                  [0.12, 0.1, 0.5, 0.52],    # same name, overlaps the first: NMS
                                  [0.1, 0.1, 0.5, 0.5],      # other name: NMS leaves it
                                  [0.6, 0.6, 0.62, 0.9],     # too narrow
                                  [0.6, 0.6, 0.9, 0.9],      # below the threshold
                                  [0.0, 0.6, 0.3, 0.9],      # kept
                                  [0.7, 0.0, 0.9, 0.2]]),    # fourth best: over max_boxes
           "scores": torch.tensor([0.9, 0.8, 0.7, 0.9, 0.2, 0.6, 0.5]),
           "names": ["cube", "cube", "ball", "cube", "cube", "cone", "cone"]}
    kept = pl.filter_boxes(det, cfg)
    assert kept["names"] == ["cube", "ball", "cone"]
    assert torch.allclose(kept["scores"], torch.tensor([0.9, 0.7, 0.6]))


# -----------------------------------------------------------------------------------------------
# Simulated experts


def test_simulated_experts_formats_round_trip_and_quality(toy, tmp_path):
    perfect = simulated(toy / "train-*.tar", tmp_path / "perfect", "--noise", "0")
    q = perfect["label_quality"]
    assert q["depth"]["absrel"] < 1e-3 and q["depth"]["delta1"] == 1.0
    for when in ("before_filtering", "after_filtering"):
        assert q["boxes"][when]["precision"] == 1.0 and q["boxes"][when]["recall"] == 1.0
    assert perfect["experts"] == {"depth": ["simulated"], "ground": ["simulated"], "tagger": ["simulated"]}
    tags = q["tags"]
    assert tags["tagger"] == ["simulated"] and tags["precision"] == 1.0 and tags["recall"] == 1.0
    assert tags["per_image"] == tags["true_objects"] / 12  # one tag per object, no others
    assert perfect["images"] == 12 and perfect["shards"] == 3
    assert json.load(open(tmp_path / "perfect" / "summary.json")) == perfect

    original, labelled = read_shard(toy / "train-000000.tar"), read_shard(tmp_path / "perfect" / "train-000000.tar")
    assert list(labelled) == list(original)
    for key, members in labelled.items():
        assert set(members) == set(original[key]) | {"depth.png", "ground.json"}
        assert all(members[ext] == b for ext, b in original[key].items())
        assert Image.open(io.BytesIO(members["depth.png"])).mode.startswith("I;16")
        s = data.decode_sample(key, members)
        assert s["depth"].shape == s["image"].shape[:2] and s["depth_valid"].all()
        assert s["depth"].min() >= 0 and s["depth"].max() <= 1
        assert s["ground"]["expert"] == "simulated" and s["ground"]["tagger"] == "simulated"
        for e in s["ground"]["entities"]:
            assert set(e) == {"name", "box", "score"} and all(0 <= v <= 1 for v in e["box"])

    noisy = simulated(toy / "train-*.tar", tmp_path / "noisy", "--noise", "2")["label_quality"]
    assert noisy["depth"]["absrel"] > 10 * q["depth"]["absrel"] and noisy["depth"]["delta1"] < 1
    assert noisy["boxes"]["before_filtering"]["precision"] < 1 and noisy["boxes"]["after_filtering"]["recall"] < 1
    # Filtering removes mostly false boxes: precision rises.
    assert noisy["boxes"]["after_filtering"]["precision"] > noisy["boxes"]["before_filtering"]["precision"]
    assert noisy["tags"]["precision"] < 1 or noisy["tags"]["recall"] < 1  # 12 images: one of them surely


# -----------------------------------------------------------------------------------------------
# The simulated tagger (RAM++'s stand-in): names from the truth, not from the caption


@pytest.fixture(scope="module")
def scenes():
    """The tagger's view of 200 toy scenes: {"gt": {"objects"}, "key"} (about 250 objects)."""
    return [{"gt": {"objects": data.render_scene(0, i, 32)["objects"]}, "key": f"{i:09d}"} for i in range(200)]


def test_simulated_tagger_at_noise_0_names_exactly_the_objects_present(scenes):
    tagger = pl.SimulatedTagger(noise=0, seed=0)
    tags = tagger(scenes)
    for s, t in zip(scenes, tags):
        names = [o["name"] for o in s["gt"]["objects"]]  # distinct within a scene
        assert sorted(t) == sorted(names) and t == sorted(t)  # every object, nothing else, in name order
    # Deterministic per (seed, key): the same tags again, in any batch order; another seed differs.
    noisy = pl.SimulatedTagger(noise=1, seed=0)
    assert noisy(scenes) == noisy(scenes[::-1])[::-1] == pl.SimulatedTagger(noise=1, seed=0)(scenes)
    assert noisy(scenes) != pl.SimulatedTagger(noise=1, seed=1)(scenes)
    assert all(len(t) == len(set(t)) for t in noisy(scenes))


def test_simulated_tagger_rates_at_noise_1(scenes, monkeypatch):
    """Each object of the toy scenes alone in an image, 4,000 images: with one object, a tag other
    than its name is a confusion or a hallucination, so the rates can be read off the tags."""
    objects = [o for s in scenes for o in s["gt"]["objects"]]
    n = 4000
    alone = [{"gt": {"objects": [objects[k % len(objects)]]}, "key": f"alone-{k}"} for k in range(n)]
    T = pl.SimulatedTagger
    M, C, F = T.MISS, T.CONFUSE, T.FALSE

    def near(x, expected, se):
        assert abs(x - expected) < 4 * se, (x, expected, se)

    def run():
        tags = T(noise=1, seed=0)(alone)
        named = np.array([s["gt"]["objects"][0]["name"] in t for s, t in zip(alone, tags)])
        others = [[x for x in t if x != s["gt"]["objects"][0]["name"]] for s, t in zip(alone, tags)]
        return tags, named, others

    # All three at once: named with probability (1-M)(1-C); a confusion or Poisson(F) hallucinations
    # otherwise; no tag at all when missed and nothing hallucinated.
    tags, named, others = run()
    p = (1 - M) * (1 - C)
    near(named.mean(), p, np.sqrt(p * (1 - p) / n))
    wrong = np.array([len(o) for o in others])
    near(wrong.mean(), (1 - M) * C + F, wrong.std() / np.sqrt(n))
    p = M * np.exp(-F)
    near(np.mean([len(t) == 0 for t in tags]), p, np.sqrt(p * (1 - p) / n))

    # One failure at a time, at its own rate.
    monkeypatch.setattr(T, "CONFUSE", 0.0)
    monkeypatch.setattr(T, "FALSE", 0.0)
    tags, named, others = run()
    assert not any(others)
    near(1 - named.mean(), M, np.sqrt(M * (1 - M) / n))

    monkeypatch.setattr(T, "MISS", 0.0)
    monkeypatch.setattr(T, "CONFUSE", C)
    tags, named, others = run()
    assert all(len(t) == 1 for t in tags)
    near(1 - named.mean(), C, np.sqrt(C * (1 - C) / n))
    changed = set()
    for s, o in zip(alone, others):
        for tag in o:  # a wrong colour or a wrong shape, the other word right
            truth = s["gt"]["objects"][0]
            colour, shape = tag.split()
            assert (colour == truth["color"]) != (shape == truth["shape"]) and tag in T.NAMES
            changed.add("shape" if colour == truth["color"] else "colour")
    assert changed == {"colour", "shape"}

    # Every object missed: what is left is hallucinated, toy names of objects not present.
    monkeypatch.setattr(T, "MISS", 1.0)
    monkeypatch.setattr(T, "CONFUSE", 0.0)
    monkeypatch.setattr(T, "FALSE", F)
    tags, named, others = run()
    assert not named.any()
    hallucinated = np.array([len(t) for t in tags])
    near(hallucinated.mean(), F, np.sqrt(F / n))  # Poisson
    assert all(set(t) <= set(T.NAMES) for t in tags)
    monkeypatch.setattr(T, "FALSE", 2.0)  # in the scenes of several objects too, none of them named
    assert not any({o["name"] for o in s["gt"]["objects"]} & set(t) for s, t in zip(scenes, T(1, 0)(scenes)))


def test_grounding_names_come_from_the_tagger_not_the_caption(toy, tmp_path, capsys):
    """Alt-text that names nothing: the simulated tagger still has the boxes grounded by name; the
    caption's noun phrases give none."""
    os.makedirs(tmp_path / "in")
    data.write_shard(str(tmp_path / "in" / "a.tar"),
                     recaptioned(data.iter_tar(str(toy / "train-000000.tar")), lambda m: "a photo."))
    tagged = simulated(tmp_path / "in" / "*.tar", tmp_path / "tagged", "--noise", "0")  # --tagger auto
    for key, members in read_shard(tmp_path / "tagged" / "a.tar").items():
        assert members["txt"] == b"a photo."
        g, truth = json.loads(members["ground.json"]), json.loads(members["gt.json"])
        assert g["tagger"] == "simulated"
        assert sorted(e["name"] for e in g["entities"]) == sorted(o["name"] for o in truth["objects"])
    assert tagged["experts"]["tagger"] == ["simulated"]
    q = tagged["label_quality"]
    assert q["tags"]["recall"] == 1.0 and q["boxes"]["after_filtering"]["recall"] == 1.0
    out = capsys.readouterr().out
    assert "tagger=simulated" in out and "tag quality vs truth (4 images, tagger simulated)" in out

    caption = simulated(tmp_path / "in" / "*.tar", tmp_path / "caption", "--noise", "0", "--tagger", "caption")
    for key, members in read_shard(tmp_path / "caption" / "a.tar").items():
        g = json.loads(members["ground.json"])
        assert g["tagger"] == "caption" and g["entities"] == []
    tags = caption["label_quality"]["tags"]
    assert caption["experts"]["tagger"] == ["caption"] and tags["per_image"] == 0 and tags["recall"] == 0
    assert tags["precision"] is None


@pytest.mark.parametrize("tagger, message", [
    (["--tagger", "simulated"], "--tagger simulated names the objects of the toy world's truth"),
    ([], "--ground-expert simulated and its tagger (--tagger auto)"),
])
def test_simulated_tagger_needs_the_truth(toy, tmp_path, capsys, tagger, message):
    os.makedirs(tmp_path / "in")
    no_truth = [(key, {e: b for e, b in members.items() if e != "gt.json"})
                for key, members in data.iter_tar(str(toy / "train-000000.tar"))]
    data.write_shard(str(tmp_path / "in" / "real.tar"), no_truth)
    with pytest.raises(SystemExit) as e:
        labelled_run(tmp_path / "in" / "*.tar", tmp_path / "out", "--depth-expert", "none",
                     "--ground-expert", "simulated", *tagger)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "real.tar lacks (no gt.json member)" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "real.tar")


def test_vocabulary_file_replaces_noun_phrases(toy, tmp_path):
    names = [f"{c} {s}" for c in data.COLORS for s in data.SHAPES]
    (tmp_path / "vocab.txt").write_text("# toy names\n" + "\n".join(names) + "\n")
    os.makedirs(tmp_path / "in")
    data.write_shard(str(tmp_path / "in" / "a.tar"),
                     recaptioned(data.iter_tar(str(toy / "train-000000.tar")), naming_every_object))
    # --tagger auto with --vocab: the caption's vocabulary entries, not the simulated tagger
    simulated(tmp_path / "in" / "a.tar", tmp_path / "out", "--vocab", str(tmp_path / "vocab.txt"), "--noise", "0")
    for key, members in read_shard(tmp_path / "out" / "a.tar").items():
        g = json.loads(members["ground.json"])
        found = [e["name"] for e in g["entities"]]
        assert g["tagger"] == "vocab"
        assert sorted(found) == sorted(o["name"] for o in json.loads(members["gt.json"])["objects"])


def test_resume_after_a_crash_gives_identical_shards(toy, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    simulated(toy / "train-*.tar", whole, "--batch-size", "2")

    # Crash in the middle of the second shard, after its first batch was written out.
    second = list(read_shard(toy / "train-000001.tar"))
    label_batch = pl.label_batch

    def crash(batch, *args):
        if batch and batch[0][1]["key"] == second[2]:
            raise RuntimeError("killed")
        yield from label_batch(batch, *args)

    monkeypatch.setattr(pl, "label_batch", crash)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        simulated(toy / "train-*.tar", resumed, "--batch-size", "2")
    assert sorted(os.listdir(resumed)) == [".stats", "train-000000.tar"]  # no partial file
    assert os.listdir(resumed / ".stats") == ["train-000000.tar.json"]

    # A run killed outright (SIGKILL) cannot clean up: its temporary file is removed by the rerun.
    (resumed / "train-000001.tar.tmp12345").write_bytes(b"half a shard")
    monkeypatch.setattr(pl, "label_batch", label_batch)
    summary = simulated(toy / "train-*.tar", resumed, "--batch-size", "2")
    assert sorted(os.listdir(resumed)) == sorted(os.listdir(whole))
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes()
    assert summary["images"] == 12 and summary["shards"] == 3


def test_bad_samples_are_skipped_and_counted(toy, tmp_path, capsys):
    good = list(data.iter_tar(str(toy / "train-000000.tar")))
    broken = (good[1][0], dict(good[1][1], png=b"not a png"))
    no_truth = (good[2][0], {k: v for k, v in good[2][1].items() if k != "gt_depth.npy"})  # simulated needs it
    os.makedirs(tmp_path / "in")
    data.write_shard(str(tmp_path / "in" / "bad-000000.tar"), [good[0], broken, no_truth, good[3]])
    summary = simulated(tmp_path / "in" / "*.tar", tmp_path / "out")
    assert summary["images"] == 2 and summary["bad_samples"] == 2
    assert list(read_shard(tmp_path / "out" / "bad-000000.tar")) == [good[0][0], good[3][0]]
    err = capsys.readouterr().err
    assert err.count(f"skipping bad sample {good[1][0]}") == 1 and err.count(f"skipping bad sample {good[2][0]}") == 1


# -----------------------------------------------------------------------------------------------
# Real experts: tiny random Depth Anything and OWLv2 built from configs, loaded by path.


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Tiny random Depth Anything and OWLv2 at 32 px (bench/experts.py). OWLv2's box head is zero,
    so every patch predicts OWLv2's prior box: patch-sized, centred on the patch's lower-right
    corner. The boxes are then known, and so is their place after unpadding."""
    from bench.experts import save_tiny

    root = tmp_path_factory.mktemp("experts")
    save_tiny(str(root), 32)
    return root


def test_real_experts_by_path(toy, experts, tmp_path):
    # The toy shard plus an img2dataset-like shard (image and caption only) with a wide image.
    os.makedirs(tmp_path / "in")
    toy_samples = recaptioned(data.iter_tar(str(toy / "train-000000.tar")), naming_every_object)
    data.write_shard(str(tmp_path / "in" / "a.tar"), toy_samples)
    wide = np.asarray(Image.open(io.BytesIO(toy_samples[0][1]["png"])))[8:32]  # (24, 32, 3)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    data.write_shard(str(tmp_path / "in" / "b.tar"), [("wide", {"png": buf.getvalue(), "txt": b"A red cube."})])

    summary = labelled_run(tmp_path / "in" / "*.tar", tmp_path / "out", "--depth-expert", str(experts / "depth"),
                           "--ground-expert", str(experts / "owl"), "--device", "cpu", "--batch-size", "3",
                           "--score-threshold", "0", "--min-box-size", "0")
    assert summary["images"] == 5 and summary["experts"]["ground"] == [str(experts / "owl")]
    assert summary["boxes"]["per_image"]["before_filtering"] == 16  # one box per patch, (32 / 8)^2
    assert "label_quality" in summary  # the toy samples carry truth, so even real experts are scored
    for shard in ("a.tar", "b.tar"):
        for key, members in read_shard(tmp_path / "out" / shard).items():
            s = data.decode_sample(key, members)
            assert s["depth"].shape == s["image"].shape[:2]
            assert s["ground"]["expert"] == str(experts / "owl") and s["ground"]["tagger"] == "caption"
            queries = pl.extract_entities(s["caption"])
            assert all(e["name"] in queries and 0 <= e["score"] <= 1 for e in s["ground"]["entities"])

    # The wide image was padded to 32 x 32 at the bottom: the prior boxes' rows, 0.25 high and
    # centred on 0.25, 0.5, 0.75 of the square, come back stretched by 32 / 24; the fourth row lies
    # in the padding and is gone.
    entities = read_shard(tmp_path / "out" / "b.tar")["wide"]["ground.json"]
    boxes = np.array([e["box"] for e in json.loads(entities)["entities"]])  # (12, 4)
    assert len(boxes) == 12
    assert np.allclose(sorted(set(boxes[:, 1].round(3))), [1 / 6, 1 / 2, 5 / 6], atol=1e-3)
    assert np.allclose(sorted(set(boxes[:, 3].round(3))), [1 / 2, 5 / 6, 1], atol=1e-3)
    assert np.allclose(sorted(set(boxes[:, 0].round(3))), [0.125, 0.375, 0.625, 0.875], atol=1e-3)


# -----------------------------------------------------------------------------------------------
# Mistakes on the command line: one sentence, exit code 2.


@pytest.mark.parametrize("args, message", [
    (["--shards", "{tmp}/nothing-*.tar"], "matches no files"),
    (["--depth-expert", "no-such-owner/no-such-model"], "could not be loaded"),
    (["--ground-expert", "{tmp}/missing/folder"], "no such model folder"),
    (["--depth-expert", "none", "--ground-expert", "none"], "nothing to label"),
    (["--noise", "-1"], "--noise"),
    (["--depth-expert", "simulted"], "did you mean 'simulated'?"),  # refused before any hub request
    (["--ground-expert", "owlv2"], "hub name owner/name"),
    (["--tagger", "simulated", "--vocab", "{tmp}/vocab.txt"], "takes its names from the scene truth"),
    (["--tagger", "ram"], "--tagger"),
])
def test_cli_errors(toy, tmp_path, capsys, args, message):
    argv = ["--shards", str(toy / "train-*.tar"), "--out", str(tmp_path / "out"),
            "--depth-expert", "simulated", "--ground-expert", "simulated"]
    with pytest.raises(SystemExit) as e:
        pl.main(argv + [a.format(tmp=tmp_path) for a in args])  # a repeated flag: the last one wins
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_transformers_is_a_clear_error(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pl, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        simulated(toy / "train-*.tar", tmp_path / "out", "--depth-expert", "depth-anything/Depth-Anything-V2-Small-hf")
    assert e.value.code == 2 and "needs transformers" in capsys.readouterr().err
