"""README as a guide: every `python ...` line of README.md and docs/*.md runs as written (toy-sized
where the line would take minutes), in a fresh folder, through this interpreter (the project's .venv
under `make test`); README stays short; every relative link in README.md and docs/ resolves.

A command line this file does not know fails the test: a new command must be given a toy-sized
form here, or a reason why it cannot run on a CPU without data."""

import ast
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 350  # issue 36: a guide, with the research log in docs/
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


def test_readme_is_a_guide():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, at most {README_MAX_LINES}: move detail into docs/"


def relative_links(path):
    """(target, line number) of every relative link and image in a Markdown file: inline
    [text](target), ![alt](target) and reference definitions [x]: target; fenced code blocks and
    inline code are not Markdown links, and web and mail addresses are not checked."""
    text = re.sub(r"```.*?```", lambda m: "\n" * m[0].count("\n"), path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = [(m[1], m.start()) for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)]
    found += [(m[1], m.start()) for m in re.finditer(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.M)]
    return [(target, text.count("\n", 0, at) + 1) for target, at in found
            if not re.match(r"(https?:|mailto:)", target)]


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Every relative link of README.md and docs/*.md names a file that exists (the log moved to
    docs/ by issue 36 links tables, plots and code from there), and a #Lx-Ly anchor into a .py file
    names lines that file has, so a range left behind by a shorter file fails."""
    bad = []
    for target, line in relative_links(path):
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            bad.append(f"{path.name}:{line}: {target} (no such file)")
            continue
        lines = re.fullmatch(r"L(\d+)(?:-L(\d+))?", anchor)
        if lines and where.suffix == ".py":
            first, last = int(lines[1]), int(lines[2] or lines[1])
            n = len(where.read_text().splitlines())
            if not first <= last <= n:
                bad.append(f"{path.name}:{line}: {target} ({where.name} has {n} lines)")
    assert not bad, "\n".join(bad)


def test_link_check_catches_broken_links(tmp_path):
    """The link check itself: a missing file and a line range past the end are reported, a web
    address, a same-page anchor and a link inside code are not."""
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    (tmp_path / "page.md").write_text(
        "[ok](a.py#L1-L2) [ok](#top) [web](https://example.org/x) `[code](nowhere.md)`\n"
        "```\n[code](nowhere.md)\n```\n"
        "[gone](missing.md) ![img](missing.png)\n[stale](a.py#L2-L9)\n[ref]: other.md\n")
    found = relative_links(tmp_path / "page.md")
    assert [t for t, _ in found] == ["a.py#L1-L2", "#top", "missing.md", "missing.png", "a.py#L2-L9", "other.md"]
    assert [line for _, line in found] == [1, 1, 5, 5, 6, 7]


def t_tail(t, df):
    """P(|T| > t) for Student's t with 2 or 4 degrees of freedom, in closed form."""
    x = t / math.sqrt(df + t * t)
    return {2: 1 - x, 4: 1 - x * (3 - x * x) / 2}[df]


def test_chance_bold_cells_as_readme_states():
    """README "Reading the numbers": with n seeds a row and no true difference, Δ/σ (σ the pooled
    seed std, evaluate.difference) is sqrt(2/n) t_(2n-2). The closed form is checked by simulation
    and the numbers README quotes are recomputed here."""
    import numpy as np

    rng = np.random.default_rng(0)
    for n, df in ((3, 4), (2, 2)):
        a, b = rng.standard_normal((2, 200_000, n))
        ratio = (a.mean(1) - b.mean(1)) / np.sqrt((a.var(1, ddof=1) + b.var(1, ddof=1)) / 2)
        assert abs((np.abs(ratio) > 2).mean() - t_tail(2 / math.sqrt(2 / n), df)) < 0.004
    text = (ROOT / "README.md").read_text()
    para = re.search(r"\*\*How many bold cells chance alone gives\.\*\*(.*?)\n\n", text, re.S)
    assert para, "README has no paragraph on how many bold cells chance alone gives"
    three, two, t4 = t_tail(2 / math.sqrt(2 / 3), 4), t_tail(2, 2), t_tail(2, 4)
    for quoted in (f"{2 / math.sqrt(2 / 3):.3f}) = {three:.3f}", f"{40 * three:.1f} bold cells in a table of 40",
                   f"P(|t_2| > 2) = {two:.3f}", f"{40 * two:.1f} in 40", f"P(|t_4| > 2) = {t4:.3f}",
                   f"{40 * t4:.1f} in 40"):
        assert quoted in para[1], f"README's chance paragraph should say {quoted!r}"


CODE_LINK = re.compile(r"\[`?([A-Za-z_][\w.]*)`?\]\(([\w/.]+\.py)#L(\d+)-L(\d+)\)")


def definition_lines(path, dotted):
    """(first, last) line of the function or class `dotted` names in path ("module.Class.method",
    the module part optional), decorators included; None if the file defines no such name."""
    nodes, node = ast.parse(path.read_text()).body, None
    parts = dotted.split(".")
    for part in parts[1:] if parts[0] == path.stem else parts:
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            return None
        nodes = node.body
    return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_code_links_name_their_definitions_lines(path):
    """A link [module.function](module.py#La-Lb) spans exactly the lines that define that function
    today, so a formula's link cannot drift to other code when lines move above it."""
    bad = []
    for m in CODE_LINK.finditer(path.read_text()):
        name, file, first, last = m[1], m[2], int(m[3]), int(m[4])
        span = definition_lines((path.parent / file).resolve(), name)
        if span != (first, last):
            bad.append(f"{path.name}: [{name}]({file}#L{first}-L{last}) should be " +
                       (f"#L{span[0]}-L{span[1]}" if span else f"a name {file} defines"))
    assert not bad, "\n".join(bad)
