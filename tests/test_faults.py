"""Faults that must not cost a run: SIGKILLs with resume, half-written and hostile checkpoints, bad
samples, a NaN loss, a killed pseudo-labeller, hostile tar member names. CPU, about a minute.

Set MTV_FAULT_SEED to replay the kill times of a failed run (the seed is in the failure message)."""

import ast
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import losses
import mtv
import pseudolabel
import train

ROOT = Path(__file__).resolve().parents[1]
# Small and fast, as tests/test_train.py: 32 px scenes, 8 images a step, no loader processes.
FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--n-local", "2",
        "--shuffle-buffer", "16", "--log-every", "1"]
STEPS = 8
STATE = ("model", "teacher", "objectives", "optimizer")  # the checkpoint's tensors that must match
# Subprocesses compute with one thread, as this process does below: the same kernels, bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread here and in the subprocesses (bit-identical runs; a small shared CPU is not
    oversubscribed); train.main's --deterministic switch is undone for the tests that follow."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # train.main sets its threads from it
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny toy world (48 train scenes at 32 px in 2 shards), labelled by the simulated experts."""
    root = tmp_path_factory.mktemp("toy")
    data.main(["--out", str(root / "raw"), "--n", "48", "--size", "32", "--shard-size", "24"])
    pseudolabel.main(["--shards", str(root / "raw" / "*.tar"), "--out", str(root / "lab"),
                      "--depth-expert", "simulated", "--ground-expert", "simulated"])
    return root / "lab"


def train_args(shards):
    return ["--tasks", "clip,ssl,depth,ground", "--data", str(shards / "train-*.tar"), "--steps", str(STEPS),
            "--deterministic", *FAST]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run, keeping a copy of its checkpoint before the last (before-last.pt)."""
    root = tmp_path_factory.mktemp("reference")
    save = train.save_checkpoint

    def save_and_keep(path, state):
        save(path, state)
        if state["step"] == STEPS - 2:
            shutil.copy(path, root / "before-last.pt")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_checkpoint", save_and_keep)
        train.main(train_args(shards) + ["--out", str(root / "run"), "--ckpt-every", "2"])
    return root


def tensors(state, prefix=""):
    """{dotted key: tensor} of every tensor in a nested checkpoint."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else []
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}.{key}").items()}


def assert_same_run(got_dir, ref_dir):
    """Every tensor of the final checkpoints equal (weights, teacher, DINO centres, AdamW state), and
    every logged loss of every step equal."""
    got, ref = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (got_dir, ref_dir))
    assert got["step"] == ref["step"] == STEPS
    got_t, ref_t = (tensors({k: ck[k] for k in STATE}) for ck in (got, ref))
    assert got_t.keys() == ref_t.keys() and len(ref_t) > 100
    for k in ref_t:
        assert torch.equal(got_t[k], ref_t[k]), k
    logged = ("loss", "grad_norm", "clip", "dino", "ibot", "depth", "ground")
    rows = [[{k: json.loads(line)[k] for k in ("step", *logged)} for line in open(d / "metrics.jsonl")]
            for d in (got_dir, ref_dir)]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == list(range(1, STEPS + 1))


def step_of(ckpt):
    """The step of the checkpoint at this path, 0 if there is none yet (mmap: the tensors are not read)."""
    try:
        return torch.load(ckpt, weights_only=True, mmap=True)["step"]
    except FileNotFoundError:
        return 0


def size(path):
    """Bytes in the file, 0 if it is not there (any more)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -----------------------------------------------------------------------------------------------
# Killed training runs


def test_three_sigkills_then_resume_is_exact(shards, reference, tmp_path):
    """Killed three times (a checkpoint every step): at a random moment of a step, in the middle of
    writing checkpoint.pt.tmp, and at a random moment again; resumed each time with --resume latest.
    The same weights and logs as never stopping."""
    seed = int(os.environ.get("MTV_FAULT_SEED", random.randrange(2**16)))
    rng = random.Random(seed)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *train_args(shards), "--ckpt-every", "1",
           "--out", str(out), "--resume", "latest"]
    stopped = [0]
    for when in ("random", "writing", "random"):
        target = min(stopped[-1] + rng.randint(1, 2), STEPS - 3)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while step_of(out / "checkpoint.pt") < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if when == "random":
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere in the next step, its logging or its checkpoint
        else:  # once the next checkpoint has started to reach the disk (105 MB: a few tenths of a second)
            while proc.poll() is None and time.time() < deadline and not size(out / "checkpoint.pt.tmp"):
                time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"the run ended before it was killed (MTV_FAULT_SEED={seed})"
        stopped.append(step_of(out / "checkpoint.pt"))
    assert stopped[1] <= stopped[2] <= stopped[3] < STEPS, f"{stopped} (MTV_FAULT_SEED={seed})"
    train.main(cmd[2:])
    assert_same_run(out, reference / "run")
    assert not list(out.glob("*.tmp*"))


def test_half_written_checkpoint_tmp_is_ignored(shards, reference, tmp_path, capsys):
    """A run killed while writing checkpoint.pt.tmp leaves it truncated; resume reads only the
    renamed checkpoint.pt, and finishes exactly as the uninterrupted run."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "before-last.pt", out / "checkpoint.pt")
    shutil.copy(reference / "run" / "metrics.jsonl", out / "metrics.jsonl")  # the log got further
    whole = (reference / "run" / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt.tmp").write_bytes(whole[: len(whole) // 2])  # the last save, killed half way
    train.main(train_args(shards) + ["--out", str(out), "--resume", "latest", "--ckpt-every", "2"])
    assert f"resumed from {out / 'checkpoint.pt'} at step {STEPS - 2}" in capsys.readouterr().out
    assert_same_run(out, reference / "run")
    assert not (out / "checkpoint.pt.tmp").exists()


class Evil:
    """Unpickling this creates a file: proof, if it ever exists, that a loader ran code from a checkpoint."""

    marker = None

    def __reduce__(self):
        return open, (str(self.marker), "w")


def evil_checkpoint(path, marker, like):
    ck = torch.load(like, weights_only=True)
    Evil.marker = marker
    ck["train_config"]["note"] = Evil()
    torch.save(ck, path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "pickled object"])
def test_bad_checkpoint_is_one_error_line_and_exit_2(shards, reference, tmp_path, capsys, kind):
    out = tmp_path / "run"
    out.mkdir()
    ckpt, marker = out / "checkpoint.pt", tmp_path / "code-ran"
    whole = (reference / "before-last.pt").read_bytes()
    if kind == "pickled object":
        evil_checkpoint(ckpt, marker, reference / "before-last.pt")
    else:
        ckpt.write_bytes({"truncated": whole[: len(whole) // 3], "empty": b"",
                          "garbage": b"not a checkpoint \x00\xff" * 1000}[kind])
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(train_args(shards) + ["--out", str(out), "--resume", "latest"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("train.py: error: --resume:") and "is not a readable checkpoint" in err
    assert ckpt.read_bytes() == before and not marker.exists()
    if kind == "pickled object":
        assert "weights_only=True" in err and "Unsupported global" in err


def test_load_model_refuses_pickled_objects(reference, tmp_path):
    marker = tmp_path / "code-ran"
    evil_checkpoint(tmp_path / "evil.pt", marker, reference / "before-last.pt")
    with pytest.raises(ValueError, match="not a readable mtv checkpoint.*weights_only=True.*Unsupported global"):
        mtv.load_model(tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="not a readable mtv checkpoint"):
        mtv.load_model(tmp_path / "garbage.pt")
    assert not marker.exists()
    assert mtv.load_model(reference / "before-last.pt").tasks == mtv.ALL_TASKS  # the honest one loads


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch,
                                                                                capsys):
    """depth_loss turns NaN from step 3 on; the NaN check runs at log and checkpoint steps (every 2
    here, no per-step sync), so the run stops at step 4 before writing a checkpoint: the step-2 one stays."""
    calls, depth_loss = [], losses.depth_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        d = depth_loss(*args, **kwargs)
        if len(calls) >= 3:
            d["depth"] = d["depth"] * float("nan")
        return d

    monkeypatch.setattr(losses, "depth_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(train_args(shards) + ["--out", str(out), "--log-every", "2", "--ckpt-every", "2"])
    assert e.value.code == 2 and len(calls) == 4
    err = capsys.readouterr().err
    assert "train.py: error: the loss or its gradient became NaN" in err and "between step 2 and 4" in err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    for k, v in tensors({k: ck[k] for k in STATE}).items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
    assert not list(out.glob("*.tmp*"))


# -----------------------------------------------------------------------------------------------
# Bad samples


def bad_shard(shards, path):
    """12 good samples of the labelled toy world with 4 broken ones among them; returns the broken keys."""
    good = list(data.iter_tar(str(shards / "train-000000.tar")))[:16]
    broken = {}
    for (key, members), (fault, change) in zip(good[1::4], [
        ("truncated png", lambda m: {"png": m["png"][: len(m["png"]) // 2]}),
        ("caption not UTF-8", lambda m: {"txt": b"a red cube \xff\xfe on a \xc3 floor"}),
        ("depth.png larger than the image", lambda m: {"depth.png": data.encode_depth_png(np.ones((64, 64)))}),
        ("box out of 0..1", lambda m: {"ground.json": json.dumps({"entities": [
            {"name": "red cube", "box": [0.2, 0.1, 1.7, 0.5], "score": 0.9}], "expert": "simulated"}).encode()}),
    ]):
        members.update(change(members))
        broken[key] = fault
    data.write_shard(str(path), good)
    return broken


def test_bad_samples_are_skipped_and_counted(shards, tmp_path, capsys):
    broken = bad_shard(shards, tmp_path / "bad-000000.tar")
    ds = data.ShardDataset(str(tmp_path / "bad-000000.tar"))
    keys = [s["key"] for s in ds]
    assert len(keys) == 12 and not set(keys) & set(broken) and ds.bad == 4
    err = capsys.readouterr().err
    assert err.count("data: skipped sample") == 4
    for key, why in zip(broken, ["unreadable png", "unreadable txt", "larger than the image", "not inside 0..1"]):
        assert f"skipped sample {key} " in err and why in err


def test_training_continues_past_bad_samples(shards, tmp_path, capsys):
    broken = bad_shard(shards, tmp_path / "bad-000000.tar")
    # and a shard cut off in the middle of a member: the samples before the cut still count
    whole = (shards / "train-000001.tar").read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(whole[: len(whole) // 2 + 700])
    out = tmp_path / "run"
    train.main(["--tasks", "clip,ssl,depth,ground", "--data", str(tmp_path / "bad-*.tar"), "--out", str(out),
                "--steps", "3", *FAST])
    err = capsys.readouterr().err
    assert all(f"skipped sample {key} " in err for key in broken)
    assert "bad-000001.tar: unreadable shard, the rest of it is skipped" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


# -----------------------------------------------------------------------------------------------
# A killed pseudo-labeller (tests/test_pseudolabel.py simulates the crash in-process; this kills a
# real process while it writes a shard)


def test_pseudolabel_sigkill_mid_shard_then_rerun_is_identical(tmp_path):
    data.main(["--out", str(tmp_path / "raw"), "--n", "24", "--size", "32", "--shard-size", "8"])
    args = ["--shards", str(tmp_path / "raw" / "*.tar"), "--depth-expert", "simulated",
            "--ground-expert", "simulated", "--batch-size", "2"]
    pseudolabel.main(args + ["--out", str(tmp_path / "whole")])

    # The same run in a process slowed to 0.2 s a batch, so the kill lands while shard 1 is written.
    slow = ("import sys, time, pseudolabel as pl\nlabel = pl.label_batch\n"
            "def slow(*args):\n    time.sleep(0.2)\n    yield from label(*args)\n"
            "pl.label_batch = slow\npl.main(sys.argv[1:])")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", slow, *args, "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(size(p) for p in out.glob("train-000001.tar.tmp*")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (out / "train-000000.tar").exists() and not (out / "train-000001.tar").exists()
    assert list(out.glob("train-000001.tar.tmp*"))  # half a shard, under its temporary name only

    summary = pseudolabel.main(args + ["--out", str(out)])
    assert summary["images"] == 24 and summary["shards"] == 3
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))  # no partial file left
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


# -----------------------------------------------------------------------------------------------
# Files from elsewhere: read as data, never run or extracted


def test_hostile_tar_member_names_are_read_as_data(tmp_path, monkeypatch):
    """Members named ../evil and /abs/.../evil, and a symlink to /etc/passwd: the readers take them
    as sample keys and bytes (the symlink is skipped), and nothing is written outside --out."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where an extracting reader would write ../evil.png: tmp_path/evil.png
    absolute = tmp_path / "abs" / "evil"
    scene = data.scene_members(data.render_scene(0, 0, 32), 0, 0)
    samples = [("../evil", scene), (str(absolute), scene)]
    shard = work / "hostile-000000.tar"
    data.write_shard(str(shard), samples)
    with tarfile.open(shard, "a") as tar:  # a symlink sample: link.png -> /etc/passwd, link.txt a caption
        info = tarfile.TarInfo("link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
        info = tarfile.TarInfo("link.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"link"))
    before = sorted(tmp_path.rglob("*"))

    ds = data.ShardDataset(str(shard))
    got = list(ds)
    assert [s["key"] for s in got] == ["../evil", str(absolute)] and ds.bad == 1  # link: no image
    assert all(s["image"].shape == (32, 32, 3) for s in got)
    summary = pseudolabel.main(["--shards", str(shard), "--out", str(work / "out"), "--depth-expert", "simulated",
                                "--ground-expert", "simulated"])
    assert summary["images"] == 2
    labelled = dict(data.iter_tar(str(work / "out" / "hostile-000000.tar")))
    assert list(labelled) == ["../evil", str(absolute)] and "depth.png" in labelled["../evil"]

    new = sorted(set(tmp_path.rglob("*")) - set(before))
    assert all(p.is_relative_to(work / "out") for p in new), new
    assert not (tmp_path / "evil.png").exists() and not absolute.parent.exists()


def test_every_load_is_weights_only_and_nothing_is_extracted():
    """Static check of the sources: every torch.load passes weights_only=True, no tar is extracted."""
    # runs/ is git-ignored scratch (training runs, one-off scripts): not the project's sources
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "runs"} & set(p.relative_to(ROOT).parts)]
    loads = 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch":
                loads += 1
                assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords), f"{where}: torch.load without weights_only=True"
            if getattr(node.func.value, "id", None) != "evaluate":  # evaluate.extract: features, not files
                assert node.func.attr not in ("extract", "extractall"), f"{where}: a tar member is extracted to disk"
    assert loads >= 3  # train.py, mtv.py, evaluate.py at least
