"""The objectives' pull on the shared image tower, and the options that balance it (train.py)."""

import json
import math

import pytest
import torch

import mtv
import train

TASKS = ("clip", "depth", "ground")


def tiny_model():
    torch.manual_seed(0)
    cfg = mtv.MTVConfig(mtv.ViTConfig(32, 8, 32, 4, 2, 64), mtv.TextConfig(258, 16, 32, 1, 2, 64),
                        mtv.HeadConfig(64, 16, 32, 32, 16, 1))
    return mtv.MTV(cfg, TASKS)


def tiny_batch(model):
    g = torch.Generator().manual_seed(1)
    B = 4
    x0y0 = torch.rand(B, 2, 2, generator=g) * 0.5
    return {"global": torch.randn(B, 3, 32, 32, generator=g), "text": model.tokenize(["a", "b", "c", "d"]),
            "depth": torch.rand(B, 32, 32, generator=g), "depth_valid": torch.ones(B, 32, 32, dtype=torch.bool),
            "boxes": torch.cat([x0y0, x0y0 + 0.4], -1), "box_valid": torch.ones(B, 2, dtype=torch.bool),
            "name_tokens": model.tokenize(["red cube", "blue cone"] * B, length=16), "name_id": torch.arange(8) % 3}


def test_pull_is_autograd_of_each_loss_alone():
    """pull_TASK is the norm of that weighted loss's gradient on the tower's own parameters (the
    attention-pool head left out), each computed by its own backward pass; cos_A_B their cosine."""
    model = tiny_model()
    objectives = train.Objectives(model, TASKS, train.TrainConfig(), {"clip": 1.0, "depth": 2.0, "ground": 0.5})
    batch = tiny_batch(model)
    terms, weight = objectives.weighted(objectives(model(batch), None, batch, 0.04)[0])
    assert weight == {"clip": 1.0, "depth": 2.0, "ground": 0.5}
    params = train.tower_params(model)
    names = {id(p): n for n, p in model.vision.named_parameters()}
    assert not any(names[id(p)].startswith("head.") for p in params) and len(params) > 10
    row = train.pull(terms, params)
    by_hand = {}
    for k in TASKS:
        model.zero_grad()
        t, _ = objectives.weighted(objectives(model(batch), None, batch, 0.04)[0])
        t[k].backward()
        by_hand[k] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        assert row[f"pull_{k}"] == pytest.approx(float(by_hand[k].norm()), rel=1e-5), k
    cos = float(by_hand["clip"] @ by_hand["depth"] / (by_hand["clip"].norm() * by_hand["depth"].norm()))
    assert row["cos_clip_depth"] == pytest.approx(cos, abs=1e-5)
    assert set(row) == {"pull_clip", "pull_depth", "pull_ground", "cos_clip_depth", "cos_clip_ground",
                        "cos_depth_ground"}


def test_uncertainty_weighting_by_hand():
    """Kendall, Gal & Cipolla (2018) eq. 7: each term is exp(-s) w L / 2 + s / 2; d/ds = (1 -
    exp(-s) w L) / 2, so for a fixed loss s settles at log(w L) and the weight at 1 / (2 w L)."""
    model = tiny_model()
    objectives = train.Objectives(model, ("clip", "depth"), train.TrainConfig(balance="uncertainty"),
                                  {"clip": 1.0, "depth": 3.0})
    with torch.no_grad():
        objectives.log_vars["clip"].fill_(0.5)
    parts = {"clip": torch.tensor(2.0), "depth": torch.tensor(0.1)}
    terms, weight = objectives.weighted(parts)
    assert float(terms["clip"].detach()) == pytest.approx(0.5 * math.exp(-0.5) * 2.0 + 0.25)
    assert float(terms["depth"].detach()) == pytest.approx(0.5 * 3.0 * 0.1)
    assert {k: float(v) for k, v in weight.items()} == pytest.approx({"clip": 0.5 * math.exp(-0.5), "depth": 1.5})
    sum(terms.values()).backward()
    assert float(objectives.log_vars["clip"].grad) == pytest.approx(0.5 * (1 - math.exp(-0.5) * 2.0))
    opt = torch.optim.SGD(objectives.log_vars.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        sum(objectives.weighted(parts)[0].values()).backward()
        opt.step()
    assert float(objectives.log_vars["clip"].detach()) == pytest.approx(math.log(2.0), abs=1e-4)
    assert float(objectives.log_vars["depth"].detach()) == pytest.approx(math.log(0.3), abs=1e-4)
    assert train.Objectives(model, ("clip",), train.TrainConfig()).log_vars is None


def test_weights_from_a_run_equalise_its_pulls(tmp_path, capsys):
    """--weights-from: w_k times the pulls' geometric mean over pull_k, on the second half of the
    measurements: pulls 8 and 2 (geometric mean 4) under weights 1 and 3 give 0.5 and 6."""
    rows = [{"step": 10, "pull_clip": 100.0, "pull_depth": 1.0}, {"step": 20, "loss": 1.0},
            {"step": 30, "pull_clip": 8.0, "pull_depth": 2.0}, {"step": 40, "pull_clip": 8.0, "pull_depth": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "config.json").write_text(json.dumps({"loss_weights": {"clip": 1.0, "depth": 3.0}}))
    assert train.main(["--weights-from", str(tmp_path)]) == "clip=0.5,depth=6"
    assert "--loss-weights clip=0.5,depth=6" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--weights-from", str(tmp_path)])
    assert e.value.code == 2 and "--pull-every" in capsys.readouterr().err
