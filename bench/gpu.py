"""The prepared GPU check: `python -m bench --gpu [--json FILE]`, one command on one CUDA GPU that
finishes in a few minutes (about 8 at most) and prints what a CC3M run needs to know:

1. the B/16 training step in bf16 autocast (train.py's settings: fused AdamW, EMA teacher), for
   all four tasks and for clip alone, eager and torch.compile'd: ms per step, images/s, MFU
   (FLOPs counted by torch.utils.flop_counter / time / the GPU's dense bf16 peak), peak memory,
   and the compile time;
2. the real-size experts with random weights (bench/experts.py: the same compute as trained
   ones) through pseudolabel.py's expert classes at their native resolutions (518 px Depth
   Anything V2, 960 px OWLv2): images/s and utilisation;
3. a one-process NCCL process group: initialisation time and an all-reduce checked for its value.

It needs nothing but this repository, torch >= 2.11 and transformers >= 5.17 (no network, no
weights). Without CUDA it refuses in one line. tests/test_gpu_paths.py runs the same function on
the CPU with the tiny preset, tiny experts and gloo: every line of it except the CUDA calls.
"""

import json
import os
import socket
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

import mtv
import pseudolabel
from bench import experts as experts_lib
from bench.__main__ import PEAK_BF16, Step, count_flops, expert_cost, labelled_toy, make_sync, peak_bf16, timed


def memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def step_speed(step, n, sync):
    """Seconds per step over n steps after 3 warm-up steps (where compilation happens), the
    warm-up's seconds, and the peak memory of the timed steps."""
    warm = timed(lambda: [step() for _ in range(3)], sync)
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    seconds = timed(lambda: [step() for _ in range(n)], sync) / n
    return seconds, warm, memory_gb(step.device)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_group(device, backend):
    """Seconds to initialise a one-process group and all-reduce 4 MB on device; whether the sum is right."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sync = make_sync(device)
    start = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        x = torch.full((1 << 20,), 2.0, device=device)
        dist.all_reduce(x)
        sync()
        seconds = time.perf_counter() - start
        ok = bool((x == 2.0).all())  # one process: the sum is the tensor itself
    finally:
        dist.destroy_process_group()
    return seconds, ok


def check(device, preset="B/16", batch=64, steps=10, subsets=(mtv.ALL_TASKS, ("clip",)), compile=True,
          experts=tuple(experts_lib.REAL_SIZE), expert_batch=16, backend="nccl", precision="auto", image_size=None,
          compile_after_s=240, root=None, say=print, save=None):
    """Runs the check on device and returns its report (a dict). experts: names of
    experts_lib.REAL_SIZE, or (kind, folder) pairs; image_size: default the preset's; root:
    where the toy shard and the expert folders are written (default: a temporary folder).

    Each measurement that fails prints one line and is recorded under report["errors"], and the
    check goes on with the next, so one failure (a compiler missing on a bare GPU machine, an
    NCCL problem) does not lose the others; save(report), if given, is called after each stage.
    Compiled steps come last, clip alone first (it compiles faster), as the slowest and least
    certain part: one that would start after compile_after_s seconds is skipped with a line, so
    the check stays within about 8 minutes."""
    import tempfile

    start = time.perf_counter()
    sync = make_sync(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16(name) if device.type == "cuda" else None
    say(f"GPU check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"bf16 peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} "
        f"(known: {', '.join(PEAK_BF16)})")
    report = {"device": name, "torch": torch.__version__, "peak_bf16": peak, "steps": [], "experts": {},
              "errors": {}}

    def elapsed():
        return time.perf_counter() - start

    def attempt(what, fn):
        """fn(), or one line and an entry in report["errors"] if it raises."""
        try:
            fn()
        except (Exception, SystemExit) as e:  # a failed part (SystemExit: pseudolabel's one-line refusals)
            # must not take the others with it
            report["errors"][what] = f"{type(e).__name__}: {e}"
            say(f"[{elapsed():4.0f} s] {what}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None:
            save(report)

    with tempfile.TemporaryDirectory() as scratch:
        root = root or scratch
        os.makedirs(root, exist_ok=True)

        # 1. the training step, on toy scenes labelled by the simulated experts
        size = image_size or mtv.build_config(preset).vision.image_size
        samples = labelled_toy(root, min(batch, 16), size)[2]
        flops = {}

        def time_step(tasks, compiled):
            step = Step(preset, samples, batch, device, tasks, precision=precision, compile=compiled,
                        image_size=size)
            if tasks not in flops:
                flops[tasks] = count_flops(step)  # eager; the compiled step does the same work
            seconds, warm, mem = step_speed(step, steps, sync)
            del step
            f = flops[tasks]
            mfu = f / seconds / peak if peak else None
            report["steps"].append({"tasks": list(tasks), "compiled": compiled, "batch": batch, "seconds": seconds,
                                    "images_per_s": batch / seconds, "flops": f, "mfu": mfu, "memory_gb": mem,
                                    "warmup_seconds": warm})
            shown = {"mfu": "n/a" if mfu is None else f"{mfu:.1%}", "mem": "n/a" if mem is None else f"{mem:.1f} GB"}
            say(f"[{elapsed():4.0f} s] {preset} step, {'+'.join(tasks):<22} {'compiled' if compiled else 'eager':<8} "
                f"batch {batch}: {seconds * 1e3:7.1f} ms, {batch / seconds:7.0f} img/s, "
                f"{f / batch / 1e9:.0f} GFLOP/img, MFU {shown['mfu']}, peak mem {shown['mem']}, "
                f"first 3 steps {warm:.0f} s")

        for tasks in subsets:
            attempt(f"{preset} step {'+'.join(tasks)} eager", partial(time_step, tuple(tasks), False))

        # 2. the experts, at the precision pseudolabel.py uses (auto: bf16 on CUDA), on images of
        # the size the README's img2dataset command writes
        cfg = pseudolabel.LabelConfig("", root, "", "", device=str(device), precision=precision)
        photos = experts_lib.photo_samples(expert_batch) if experts else []

        def time_expert(which):
            label, (kind, folder) = ((which, experts_lib.save_real_size(root, which)) if isinstance(which, str)
                                     else (os.path.basename(which[1]), which))
            expert = pseudolabel.load_expert(kind, folder, cfg, device)
            c = expert_cost(kind, expert, photos, sync, 3)
            del expert
            c["images_per_s"] = 1 / c["seconds"]
            c["mfu"] = c["flops"] / c["seconds"] / peak if peak else None
            report["experts"][label] = c
            (h, w), (mh, mw) = c["input"], c["model_input"]
            say(f"[{elapsed():4.0f} s] expert {label:<26} batch {expert_batch}, {w}x{h} -> {mw}x{mh}: "
                f"{c['images_per_s']:7.1f} img/s, {c['flops'] / 1e9:.0f} GFLOP/img, "
                f"MFU {'n/a' if c['mfu'] is None else format(c['mfu'], '.1%')}")

        for which in experts:
            attempt(f"expert {which if isinstance(which, str) else which[1]}", partial(time_expert, which))

    # 3. the process group
    def process_group():
        seconds, ok = one_process_group(device, backend)
        report["process_group"] = {"backend": backend, "seconds": seconds, "all_reduce_ok": ok}
        say(f"[{elapsed():4.0f} s] {backend}: one-process group initialised and all-reduced in {seconds:.2f} s, "
            f"result {'right' if ok else 'WRONG'}")
        if not ok:
            raise RuntimeError(f"{backend} all-reduce gave a wrong sum")

    attempt(f"{backend} process group", process_group)

    # 4. the compiled steps, the quicker compile first
    for tasks in sorted(subsets, key=len) if compile else ():
        if elapsed() > compile_after_s:
            say(f"[{elapsed():4.0f} s] {preset} step, {'+'.join(tasks)} compiled: skipped, the check has run "
                f"past {compile_after_s} s (compare eager and compiled with train.py --compile instead)")
            continue
        attempt(f"{preset} step {'+'.join(tasks)} compiled", partial(time_step, tuple(tasks), True))
    report["seconds"] = elapsed()
    say(f"[{elapsed():4.0f} s] done" + (f"; {len(report['errors'])} part(s) FAILED: {', '.join(report['errors'])}"
                                         if report["errors"] else ""))
    return report


def main(args):
    """`python -m bench --gpu`: refuses in one line without CUDA; else runs check() on cuda:0,
    writing --json after every stage; exit code 1 if any part failed."""
    if not torch.cuda.is_available():
        print("python -m bench --gpu: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); run it on a GPU machine",
              file=sys.stderr)
        raise SystemExit(2)

    def save(report):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    report = check(torch.device("cuda", 0), batch=args.mfu_batch, save=save)
    if report["errors"]:
        raise SystemExit(1)
    return report
