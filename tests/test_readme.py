"""README as a guide: every `python ...` line of README.md and docs/*.md runs as written (toy-sized
where the line would take minutes), in a fresh folder, through this interpreter (the project's .venv
under `make test`).

A command line this file does not know fails the test: a new command must be given a toy-sized
form here, or a reason why it cannot run on a CPU without data."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
SMALL_TRAIN = ["--steps", "2", "--batch-size", "4", "--image-size", "32", "--workers", "0", "--n-local", "2"]

# README or docs/ line (as it reads, continuation lines joined, comment dropped) -> the argv run in
# its place, in order (later lines use what earlier ones made), or the reason it is not run.
COMMANDS = {
    "python data.py --out DIR --n 6000 --val-n 512 [--size 64] [--seed 0]":
        ["data.py", "--out", "DIR", "--n", "24", "--val-n", "8", "--size", "32", "--seed", "0"],
    "python data.py --preview DIR/val-000000.tar --png preview.png":
        ["data.py", "--preview", "DIR/val-000000.tar", "--png", "preview.png"],
    "python pseudolabel.py --shards 'DIR/*.tar' --out LABELLED --depth-expert simulated --ground-expert simulated":
        ["pseudolabel.py", "--shards", "DIR/*.tar", "--out", "LABELLED", "--depth-expert", "simulated",
         "--ground-expert", "simulated"],
    "python train.py --tasks clip,ssl,depth,ground":
        ["train.py", "--tasks", "clip,ssl,depth,ground", "--toy-n", "24", *SMALL_TRAIN],
    "python train.py --tasks clip,ssl --data 'LABELLED/train-*.tar' --val-data 'LABELLED/val-*.tar' "
    "--model tiny --steps 2000 --batch-size 64 --lr 1e-3 --loss-weights clip=1,ssl=0.5 --out runs/x":
        ["train.py", "--tasks", "clip,ssl", "--data", "LABELLED/train-*.tar", "--val-data", "LABELLED/val-*.tar",
         "--model", "tiny", "--lr", "1e-3", "--loss-weights", "clip=1,ssl=0.5", "--out", "runs/x", *SMALL_TRAIN],
    "python train.py ... --out runs/x --resume latest":  # "..." = the line above
        ["train.py", "--tasks", "clip,ssl", "--data", "LABELLED/train-*.tar", "--model", "tiny", "--out", "runs/x",
         "--resume", "latest", "--steps", "4", *SMALL_TRAIN[2:]],  # two more steps
    "python evaluate.py runs/x/checkpoint.pt [--data 'LABELLED/val-*.tar']":
        ["evaluate.py", "runs/x/checkpoint.pt", "--data", "LABELLED/val-*.tar", "--n", "8"],
    "python evaluate.py runs/x/checkpoint.pt --init":
        ["evaluate.py", "runs/x/checkpoint.pt", "--init", "--n", "12"],
    "python evaluate.py --compare runs/ablate/*":
        ["evaluate.py", "--compare", "runs/x"],
    "python evaluate.py path/to/MTV-base-patch16-224 --imagenet IN --coco COCO --ade ADE --nyu NYU --spair SPAIR "
    "--navi NAVI --kitti KITTI --out runs/table5/mtv":
        "needs the released MTV weights and the seven datasets; tests/test_benchmarks.py runs every benchmark on "
        "mini-datasets in their layouts, tests/test_evaluate.py a random SigLIP directory",
    "python evaluate.py path/to/siglip-base-patch16-224 --imagenet IN --coco COCO --ade ADE --nyu NYU --spair SPAIR "
    "--navi NAVI --kitti KITTI --out runs/table5/siglip":
        "needs SigLIP B/16 weights and the seven datasets (same code path as the line above)",
    "python evaluate.py runs/cc3m-b16-all/checkpoint.pt --imagenet IN1K --coco COCO --nyu NYUV2 --ade ADE20K --spair SPAIR":
        "the CC3M recipe: a B/16 run and real benchmarks (same code path as the line above)",
    "python evaluate.py --compare runs/cc3m-b16-*":
        "the CC3M recipe's runs; --compare itself runs above",
    "python -m bench --gpu --json gpu-check.json":
        "needs a CUDA GPU; tests/test_gpu_paths.py checks that it refuses here in one line with exit 2 and "
        "runs the same check function on the CPU",
}


def readme_commands():
    """The `python ...` lines of README's bash blocks, then those of docs/*.md that README does not
    have (the real-data commands moved there), each once, in order."""
    lines = []
    for path in [ROOT / "README.md", *DOCS]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for cmd in re.sub(r"\\\n\s*", "", block).splitlines():
                cmd = re.sub(r"\s+#.*$", "", cmd).strip()
                if cmd.startswith("python "):
                    lines.append(re.sub(r"\s+", " ", cmd))
    return list(dict.fromkeys(lines))


def test_every_readme_python_line_is_known():
    assert sorted(readme_commands()) == sorted(COMMANDS)


def test_readme_python_lines_run(tmp_path):
    for line in readme_commands():
        argv = COMMANDS[line]
        if isinstance(argv, str):
            print(f"not run: {line} ({argv})")
            continue
        argv = [str(ROOT / argv[0]), *argv[1:]]
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
    assert (tmp_path / "preview.png").stat().st_size > 0
    assert (tmp_path / "runs" / "x" / "eval" / "results.json").is_file()
    assert (tmp_path / "runs" / "x" / "eval-init" / "results.json").is_file()
    assert (tmp_path / "runs" / "x" / "compare.md").is_file()


@pytest.mark.parametrize("target", ["demo", "test", "install", "ablate"])
def test_make_targets_exist(target):
    assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M)


def test_models_table_parameter_counts():
    """The README's Models table says each preset's parameters (towers / with all heads) as
    test_model counts towers; a preset whose shape changes must change its row."""
    import torch

    import mtv
    heads = ("dino_head.",  # what test_model's SigLIP comparison leaves out of the towers
             "ibot_head.", "depth_head.", "ground_head.", "ground_logit_", "vision.mask_token")
    rows = re.findall(r"^\| `([^`]+)` \|.*\| ([\d.]+)M / ([\d.]+)M \|$", (ROOT / "README.md").read_text(), re.M)
    assert {name for name, _, _ in rows} == set(mtv.PRESETS)
    for name, towers, total in rows:
        with torch.device("meta"):
            model = mtv.MTV(mtv.build_config(name))
        counts = [sum(p.numel() for n, p in model.named_parameters() if not n.startswith(heads)),
                  sum(p.numel() for p in model.parameters())]
        assert [round(c / 1e6, 1) for c in counts] == [float(towers), float(total)], name


def test_ablate_defaults_are_the_readme_recipe():
    """`make ablate` at its defaults must run the recipe that README Results chose and reports."""
    make = dict(re.findall(r"^(\w+)\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M))
    recipe = re.search(r"The chosen recipe is `(\S+)`,\s+([\d,]+)\s+steps\s+at\s+lr\s+(\S+)\*\*",
                       (ROOT / "README.md").read_text())
    assert recipe, "README Results names no chosen recipe"
    assert (make["MODEL"], make["STEPS"], make["LR"]) == (recipe[1], recipe[2].replace(",", ""), recipe[3])
    joining = re.search(r"^RECIPE \?= (.*)$", (ROOT / "Makefile").read_text(), re.M)[1].strip()
    assert f"`RECIPE ?= {joining}`" in (ROOT / "README.md").read_text(), "README does not name the joining recipe"
