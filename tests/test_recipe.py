"""The training recipe against its references: the caption view stays true to its caption, weight
decay spares the position tables, the SSL prototypes are frozen at the start (DINO), the DPT head
reads normalised taps (Depth Anything V2), the sigmoid biases start at their batch's prior, names
that differ only in size are one grounding class, KoLeo sums its two views (DINOv2), train.py
picks its threads without oversubscribing, and a run starts from DINO's init or another run's weights."""

import json
import math

import numpy as np
import pytest
import torch

import data
import evaluate
import losses
import mtv
import pseudolabel
import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data.main(["--out", str(root / "raw"), "--n", "16", "--size", "32"])
    pseudolabel.main(["--shards", str(root / "raw" / "*.tar"), "--out", str(root / "lab"),
                      "--depth-expert", "simulated", "--ground-expert", "simulated"])
    return str(root / "lab" / "*.tar")


def run(shards, out, tasks, *extra):
    train.main(["--tasks", tasks, "--data", shards, "--steps", "1", "--batch-size", "4", "--image-size", "32",
                "--workers", "0", "--n-local", "2", "--log-every", "1", "--out", str(out), *extra])
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_mirror_caption_swaps_left_and_right():
    assert data.mirror_caption("The red cube is left of the blue cone. Left of it: right.") == \
        "The red cube is right of the blue cone. Right of it: left."
    assert data.mirror_caption("A bright light on the floor.") == "A bright light on the floor."  # words only


def sample_with_relation(size=32):
    image = np.zeros((size, size, 3), np.uint8)
    image[:, : size // 2] = 255  # a white left half: whether a view is flipped can be read off it
    return {"key": "k", "image": image, "caption": "A red cube is left of a blue cone."}


def test_caption_view_is_true_of_its_caption():
    """View 0 under clip: flipped -> caption mirrored (the white half moves right); cropped at
    0.9-1 of the area, not DINO's 0.35-1."""
    rng = np.random.default_rng(0)
    sample = sample_with_relation()
    for flip, relation in ((1.0, "right of"), (0.0, "left of")):
        aug = data.AugConfig(size=32, flip=flip, jitter=0)
        v = data.make_views(sample, rng, aug, ("clip",))
        white_left = v["global"][0, :, :, :8].mean() > v["global"][0, :, :, -8:].mean()
        assert relation in v["caption"] and white_left == (flip == 0.0)
    areas = []
    real = data.random_crop
    data.random_crop = lambda rng, h, w, scale, *a: areas.append(scale) or real(rng, h, w, scale, *a)
    try:
        data.make_views(sample, rng, data.AugConfig(size=32, n_local=0), ("clip", "ssl"))
        data.make_views(sample, rng, data.AugConfig(size=32, n_local=0), ("ssl",))
    finally:
        data.random_crop = real
    assert areas == [(0.9, 1.0), (0.35, 1.0), (0.35, 1.0), (0.35, 1.0)]  # caption view; ssl view 1; ssl alone


def test_position_tables_are_not_decayed():
    model = mtv.MTV(mtv.build_config("tiny"))
    decay, plain = train.param_groups(model, 0.04)
    plain_ids = {id(p) for p in plain["params"]}
    for name in ("vision.pos_embed", "text.pos_embed", "vision.head.probe", "text.token_embed.weight"):
        assert id(dict(model.named_parameters())[name]) in plain_ids, name
    assert id(model.vision.patch_embed.weight) in {id(p) for p in decay["params"]}


def test_prototypes_frozen_at_the_start(shards, tmp_path):
    """Within --freeze-last-layer the DINO/iBOT prototype layers keep their initial values while
    the rest of the SSL head learns; with 0 they move from the first step."""
    init = mtv.MTV.initialised(mtv.config_from_dict(run(shards, tmp_path / "a", "ssl", "--freeze-last-layer", "0.5")
                                                     ["model_config"]["config"]), ("ssl",), 0).state_dict()
    for freeze, out in (("0.5", tmp_path / "a"), ("0", tmp_path / "b")):
        ck = run(shards, out, "ssl", "--freeze-last-layer", freeze) if freeze == "0" else \
            torch.load(out / "checkpoint.pt", weights_only=True)
        w = ck["model"]
        proto = [k for k in w if ".last_layer.parametrizations.weight.original1" in k]
        assert len(proto) == 2 and torch.equal(w["dino_head.mlp.0.weight"], init["dino_head.mlp.0.weight"]) is False
        assert all(torch.equal(w[k], init[k]) for k in proto) == (freeze == "0.5"), freeze


def test_depth_head_reads_normalised_taps(monkeypatch):
    model = mtv.MTV(mtv.build_config("tiny"), ("depth",)).eval()
    seen = []
    real = model.depth_head.forward
    monkeypatch.setattr(model.depth_head, "forward", lambda layers, *a: seen.extend(layers) or real(layers, *a))
    x = torch.randn(2, 3, 64, 64)
    raw = model.vision(x, layers=model.depth_head.layers, pool=False)["layers"]
    with torch.no_grad():
        model.predict_depth(x)
    assert len(seen) == 4
    for tap, r in zip(seen, raw):
        torch.testing.assert_close(tap, model.vision.norm(r))
        assert tap.mean(-1).abs().max() < 1e-4 and not torch.allclose(tap, r)


def test_sigmoid_biases_start_at_the_batch_prior(shards, tmp_path):
    """clip: -log(B - 1) over the global batch (SigLIP's -10 is that for 32k); ground its own scale
    and bias, at -log(2.5 B - 1)."""
    ck = run(shards, tmp_path / "r", "clip,ground", "--lr", "0")
    heads = ck["model_config"]["config"]["heads"]
    assert heads["clip_bias"] == pytest.approx(-math.log(3)) and heads["ground_bias"] == pytest.approx(-math.log(9))
    assert ck["model"]["logit_bias"].item() == pytest.approx(-math.log(3))
    assert ck["model"]["ground_logit_bias"].item() == pytest.approx(-math.log(9))
    assert "ground_logit_scale" in ck["model"]


def test_names_differing_in_size_are_one_grounding_class():
    assert data.entity_id("small red cube") == data.entity_id("red cube") == data.entity_id("Large red cube")
    assert data.entity_id("red cube") != data.entity_id("red cone") and data.entity_id("small") != 0
    tok = mtv.build_tokenizer(mtv.build_config("tiny").text)
    b = data.collate([{"caption": "x", "boxes": torch.zeros(2, 4), "names": ["small red cube", "blue cone"]},
                      {"caption": "y", "boxes": torch.zeros(1, 4), "names": ["red cube"]}], tok)
    assert b["name_id"][0] == b["name_id"][2] != b["name_id"][1]
    assert not torch.equal(b["name_tokens"][0], b["name_tokens"][2])  # each is embedded as written


def test_koleo_sums_the_two_views():
    cfg = train.TrainConfig(koleo=1.0)
    model = mtv.MTV(mtv.build_config("tiny"), ("ssl",))
    obj = train.Objectives(model, ("ssl",), cfg)
    g = torch.Generator().manual_seed(0)
    K, K2 = model.cfg.heads.dino_prototypes, model.cfg.heads.ibot_prototypes
    out = {"dino_global": torch.randn(8, K, generator=g), "pooled": torch.randn(8, 16, generator=g),
           "ibot": torch.randn(4, 4, K2, generator=g)}
    target = {"dino_global": torch.randn(8, K, generator=g), "ibot": torch.randn(4, 4, K2, generator=g)}
    _, logs = obj(out, target, {"ibot_mask": torch.ones(4, 4, dtype=torch.bool)}, 0.04)
    a, b = out["pooled"].chunk(2)
    torch.testing.assert_close(logs["koleo"], losses.koleo_loss(a) + losses.koleo_loss(b))


def test_threads_follow_the_environment_or_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train.pick_threads(1) == (1, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert train.pick_threads(2)[0] == 4 and train.pick_threads(16)[0] == 1


def test_bench_grid_throughput_row(tmp_path):
    """python -m bench's row (f) runs train.py as lanes and as one run and reports their ratio."""
    import argparse

    from bench.__main__ import grid_throughput

    data.main(["--out", str(tmp_path / "raw"), "--n", "16", "--size", "32"])
    rows = []
    grid_throughput(argparse.Namespace(quick=True, batch=4), str(tmp_path / "raw" / "train-000000.tar"),
                    str(tmp_path), rows)
    (r,) = rows
    assert r["section"] == "f" and 0.2 < r["ratio"] < 20 and "images/s" in r["detail"]


def test_ssl_terms_are_weighed_on_their_own(shards, tmp_path):
    """--loss-weights dino=a,ibot=b: the ssl objective is a * DINO + b * iBOT (DINOv2 and SigLIP 2
    weigh the two terms separately); the first step's logged terms do not depend on the weights."""
    assert train.parse_weights("ibot=0.25", ("clip", "ssl")) == {"clip": 1.0, "ssl": 1.0, "dino": 1.0, "ibot": 0.25}
    logged = {}
    for name, spec in (("both", ""), ("dino", "ibot=0"), ("scaled", "ssl=2,dino=0.5,ibot=3")):
        run(shards, tmp_path / name, "ssl", "--loss-weights", spec, "--seed", "3")
        with open(tmp_path / name / "metrics.jsonl") as f:
            logged[name] = [json.loads(line) for line in f][0]
    d, i = logged["both"]["dino"], logged["both"]["ibot"]
    assert logged["both"]["loss"] == pytest.approx(d + i, rel=1e-5)
    assert logged["dino"]["dino"] == pytest.approx(d, rel=1e-5) and logged["dino"]["loss"] == pytest.approx(d, rel=1e-5)
    assert logged["scaled"]["loss"] == pytest.approx(2 * (0.5 * d + 3 * i), rel=1e-5)


def test_ssl_term_weights_need_ssl():
    with pytest.raises(SystemExit):
        train.parse_weights("ibot=0", ("clip",))


def test_teacher_momentum_end_fixes_the_momentum(shards, tmp_path):
    """--teacher-momentum m --teacher-momentum-end m keeps the EMA momentum at m (SILC); at 0 the
    teacher is the student after every step. With the default end (1.0) the second step's momentum
    is already above 0 and the teacher lags the student."""
    for end, same in (("0", True), ("1", False)):
        ckpt = run(shards, tmp_path / end, "ssl", "--steps", "2", "--teacher-momentum", "0",
                   "--teacher-momentum-end", end, "--freeze-last-layer", "0")
        student = {k[len("vision."):]: v for k, v in ckpt["model"].items() if k.startswith("vision.")}
        teacher = {k[len("vision."):]: v for k, v in ckpt["teacher"].items() if k.startswith("vision.")}
        assert student.keys() == teacher.keys()
        assert all(torch.equal(student[k], teacher[k]) for k in student) == same, end


def test_ssl_joins_at_ssl_start(shards, tmp_path, monkeypatch):
    """--ssl-start 0.5 of 4 steps: steps 1-2 train clip alone (no ssl loss logged, the loss is clip's)
    and leave the teacher at its initialisation; at step 3 the teacher is first set to the student
    (momentum 0, SigLIP 2), then follows it by EMA after steps 3 and 4."""
    init = mtv.MTV.initialised(mtv.config_from_dict(run(shards, tmp_path / "ref", "clip,ssl")["model_config"]["config"]),
                               ("clip", "ssl"), 0)
    start_teacher = {k: v.clone() for k, v in init.ssl_teacher().state_dict().items()}
    calls = []
    real = train.ema_update

    def spy(teacher, student, momentum):
        before = teacher.state_dict()
        calls.append((momentum, all(torch.equal(before[k], start_teacher[k]) for k in before)))
        real(teacher, student, momentum)
        if momentum == 0.0:  # the copy: teacher equals student, parameter for parameter
            s = dict(student.named_parameters())
            assert all(torch.equal(p, s[n]) for n, p in teacher.named_parameters())

    monkeypatch.setattr(train, "ema_update", spy)
    run(shards, tmp_path / "late", "clip,ssl", "--steps", "4", "--ssl-start", "0.5")
    with open(tmp_path / "late" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [("dino" in r, "ibot" in r) for r in rows] == [(False, False)] * 2 + [(True, True)] * 2
    assert rows[0]["loss"] == pytest.approx(rows[0]["clip"], rel=1e-6)
    assert [m for m, _ in calls][:1] == [0.0] and len(calls) == 3 and 0 < calls[1][0] < 1
    assert calls[0][1], "the teacher moved before --ssl-start"
    with pytest.raises(SystemExit):  # nothing to train before ssl joins
        train.check_config(train.TrainConfig(tasks="ssl", ssl_start=0.5))


def test_separate_ssl_views(shards, tmp_path):
    """--ssl-views separate (SigLIP 2): with clip, ssl reads two views of its own after the caption
    view, so the caption view's pixels move SigLIP's image embedding but not DINO's outputs; with
    shared views (DINO's pair) they move both. Without clip there is no caption view to keep apart."""
    sample = sample_with_relation()
    shapes = {}
    for views in ("shared", "separate"):
        aug = data.AugConfig(size=32, local_size=16, n_local=2, ssl_views=views)
        shapes[views] = [data.make_views(sample, np.random.default_rng(0), aug, t)["global"].shape[0]
                         for t in (("clip", "ssl"), ("ssl",))]
    assert shapes == {"shared": [2, 2], "separate": [3, 2]}
    cfg = mtv.build_config("micro")
    cfg.vision.image_size = 32
    model = mtv.MTV.initialised(cfg, ("clip", "ssl"), 0).eval()
    teacher = model.ssl_teacher().eval()
    for g, moves_ssl in ((2, True), (3, False)):
        b = 2
        batch = {"global": torch.randn(g * b, 3, 32, 32), "local": torch.randn(2 * b, 3, 16, 16),
                 "ibot_mask": torch.zeros(b, 16, dtype=torch.bool), "text": model.tokenize(["a", "b"])}
        batch["ibot_mask"][:, :3] = True
        edited = {**batch, "global": batch["global"].clone()}
        edited["global"][:b] += 1.0  # the caption view of both images
        with torch.no_grad():
            a, e = model(batch), model(edited)
            ta, te = teacher(batch), teacher(edited)
        assert not torch.allclose(a["img"], e["img"])
        assert (not torch.allclose(a["dino_global"], e["dino_global"])) == moves_ssl, g
        assert (not torch.allclose(ta["dino_global"], te["dino_global"])) == moves_ssl, g
        assert torch.allclose(a["ibot"], e["ibot"]) and a["dino_global"].shape[0] == 2 * b


def test_prototypes_flag_sets_both_heads(shards, tmp_path):
    ck = run(shards, tmp_path / "k", "ssl", "--prototypes", "24")
    heads = ck["model_config"]["config"]["heads"]
    assert heads["dino_prototypes"] == heads["ibot_prototypes"] == 24
    assert ck["model"]["dino_head.last_layer.parametrizations.weight.original1"].shape[0] == 24
    assert mtv.load_model(tmp_path / "k" / "checkpoint.pt").dino_head.last_layer.out_features == 24


def test_ssl_start_leaves_ssl_at_least_one_step():
    """0.99 of 50 steps rounds to 50: ssl would never join; it joins at the last step instead."""
    from types import SimpleNamespace
    run_ = SimpleNamespace(cfg=train.TrainConfig(ssl_start=0.99), total=50)
    assert train.ssl_phase(run_) == (49, 1)
    assert train.ssl_phase(SimpleNamespace(cfg=train.TrainConfig(ssl_start=0.8), total=1500)) == (1200, 300)
    assert train.ssl_phase(SimpleNamespace(cfg=train.TrainConfig(), total=10)) == (0, 10)


@pytest.mark.parametrize("init", ["big_vision", "dino"])
def test_vit_init(init):
    """--vit-init dino: DINO's truncated normal with std 0.02 on the image tower's dense layers and
    position table; big_vision (SigLIP's): xavier-uniform, std sqrt(2 / (fan_in +
    fan_out)), and a position table of std width^-1/2. The choice travels with the model's config, so
    evaluate.py --init rebuilds it; a config from before the option loads as big_vision."""
    cfg = mtv.build_config("micro")
    cfg.vision.init = init
    model = mtv.MTV.initialised(cfg, ("ssl",), 0)
    dino = init == "dino"
    for layer in (model.vision.blocks[0].mlp.fc1, model.vision.blocks[-1].attn.q_proj, model.vision.head.mlp.fc2):
        want = 0.02 if dino else math.sqrt(2 / sum(layer.weight.shape))
        assert layer.weight.std().item() == pytest.approx(want, rel=0.05)
        assert not layer.bias.any()
    assert model.vision.pos_embed.std().item() == pytest.approx(0.02 if dino else cfg.vision.width ** -0.5, rel=0.05)
    rebuilt = mtv.MTV.initialised(mtv.MTV.from_config_dict(model.config_dict()).cfg, ("ssl",), 0)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in model.state_dict().items())
    old = model.config_dict()
    del old["config"]["vision"]["init"]
    assert mtv.MTV.from_config_dict(old).cfg.vision.init == "big_vision"
    cfg.vision.init = "timm"
    with pytest.raises(ValueError, match="unknown vision init 'timm'"):
        mtv.MTV(cfg, ("ssl",))


@pytest.mark.parametrize("preset", ["micro", "tiny", "S/16", "B/16", "L/16"])
def test_preset_init(preset):
    """Every preset starts from SigLIP's init, the toy ones too (docs/log-balance.md: from DINO's,
    `ssl` alone fell below its untrained model, a control that held from SigLIP's): xavier-uniform,
    std sqrt(2 / (fan_in + fan_out)) on every dense weight of the image tower, 0.088 for micro's
    square layers, 0.036 for S/16's first MLP layer; --vit-init dino gives 0.02 (test_vit_init).
    B/16 and L/16 are checked by config only (their towers take seconds to build)."""
    cfg = train.model_config(train.TrainConfig(model=preset), world=1)
    assert cfg.vision.init == "big_vision"
    assert train.model_config(train.TrainConfig(model=preset, vit_init="dino"), world=1).vision.init == "dino"
    if preset in ("B/16", "L/16"):
        return
    torch.manual_seed(0)
    tower = mtv.VisionTower(cfg.vision)
    for name, w in tower.named_parameters():
        if w.ndim != 2 or name == "pos_embed" or name.startswith("head.attn"):
            continue  # the position table and nn.MultiheadAttention's fused weights: test_vit_init
        assert w.std().item() == pytest.approx(math.sqrt(2 / sum(w.shape)), rel=0.05), name


def test_init_from_copies_the_shared_weights(shards, tmp_path, capsys):
    """--init-from a depth run's checkpoint: an ssl run starts (step 0) with that run's image tower,
    its own ssl heads as --seed makes them, and a teacher equal to the student; a checkpoint of
    another image tower, or a missing one, is one sentence and exit 2."""
    src = run(shards, tmp_path / "depth", "depth", "--steps", "2")
    base = ["--tasks", "ssl", "--data", shards, "--batch-size", "4", "--image-size", "32", "--workers", "0",
            "--n-local", "2"]
    plain = train.setup(train.parse_args(base + ["--out", str(tmp_path / "plain")]))
    r = train.setup(train.parse_args(base + ["--out", str(tmp_path / "from"),
                                             "--init-from", str(tmp_path / "depth" / "checkpoint.pt")]))
    ours, fresh = r.model.state_dict(), plain.model.state_dict()
    copied = [k for k in src["model"] if k in ours]
    assert r.step == 0 and len(copied) > 20 and all(k.startswith("vision.") for k in copied)
    assert all(torch.equal(ours[k], src["model"][k]) for k in copied)
    assert not torch.equal(ours["vision.blocks.0.mlp.fc1.weight"], fresh["vision.blocks.0.mlp.fc1.weight"])
    assert all(torch.equal(ours[k], fresh[k]) for k in ours if k not in copied)  # ssl heads, mask token
    assert all(torch.equal(v, ours[k]) for k, v in r.teacher.state_dict().items())
    assert f"--init-from: {len(copied)} of {len(ours)} tensors" in capsys.readouterr().out
    run(shards, tmp_path / "ran", "ssl", "--init-from", str(tmp_path / "depth" / "checkpoint.pt"))
    with pytest.raises(SystemExit) as e:  # its --init model is not the one it started from
        evaluate.load_checkpoint(str(tmp_path / "ran" / "checkpoint.pt"), init=True)
    assert e.value.code == 2 and "started from the weights of" in capsys.readouterr().err
    for extra, message in ((["--image-size", "64"], "has another image tower (image_size 32 against 64)"),
                           ([], "is not a checkpoint file")):
        path = str(tmp_path / "depth" / ("checkpoint.pt" if extra else "nope.pt"))
        with pytest.raises(SystemExit) as e:
            train.setup(train.parse_args(base + ["--out", str(tmp_path / "x"), "--init-from", path, *extra]))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and "\n" not in err
