"""How fast mtv is against what it could be: `python -m bench [--quick] [--device cuda] [--json FILE]`.

Every row is a ratio of two things timed in this one process, interleaved round by round (a
median over rounds of each round's ratio), so a shared or throttled machine slows both sides
alike. The rows:

    (a) our image tower vs transformers' SiglipVisionModel of the same shape, fwd+bwd (bench/vit.py)
    (b) one 4-task training step (train.py's loop body, tiny preset, a fixed batch made by
        data.make_views/collate) vs the sum of its parts timed one by one, and the step's
        achieved FLOP/s (FLOPs counted by torch's FlopCounterMode) vs a plain large matmul's
    (c) the data pipeline's images/s (train.make_loader: ShardDataset + make_views + collate,
        0 and 1 loader workers) vs the images/s the step consumes; > 1: the data keeps up
    (d) pseudo-labelling images/s per expert (pseudolabel.label_shard with that expert alone:
        simulated, and tiny random transformers experts built from configs) vs the step's images/s
    (e) CUDA only: model FLOP utilisation in bf16 of the B/16 preset's 4-task step, counted FLOPs /
        time / the device's dense bf16 peak
    (f) CPU only: a sweep's images/s as make ablate runs it (one one-thread train.py per core) vs
        one train.py with every core: what parallel lanes buy over one run at a time
    (g) the real-size experts, Depth Anything V2 Small and Base and OWLv2 B/16, with random weights
        (bench/experts.py; the same compute as trained weights) through pseudolabel.py's expert
        classes on images as the README's CC3M shards hold them (256 x 256): FLOPs counted per
        image, seconds per image, and
        the achieved FLOP/s vs the plain matmul's
    (h) FLOPs per image of the B/16 training step for each task subset of the Figure 1 ladder,
        against clip alone: the numbers the README's CC3M compute estimate multiplies out

`python -m bench --gpu` is the prepared GPU check instead (bench/gpu.py).

The tiny random experts of (d) are sized like the tests' ones: their rows time the code path
(processor, model call, post-processing, encoding, writing); (g) times the real sizes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from importlib.util import find_spec

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

import data
import losses
import mtv
import pseudolabel
import train
from bench import experts as experts_lib
from bench import vit

# Dense bf16 tensor-core peaks (no sparsity) by device name, from the vendors' data sheets.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "GH200": 989e12, "B200": 2250e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_bf16(name):
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100", "L40S" before "L4"
        if key in name:
            return PEAK_BF16[key]
    return None


# -----------------------------------------------------------------------------------------------
# Timing


def make_sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, sync):
    """Seconds one call of fn takes, with queued device work drained before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FlopCounterMode knows CUDA's fused attention kernels but not the CPU's (torch 2.14
# counts 0 FLOPs for scaled_dot_product_attention on a CPU): the same formulas for the CPU kernels.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(fn):
    """FLOPs of one call of fn: matmuls, convolutions and attention (2 per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()


class CountSyncs(TorchDispatchMode):
    """The ops of a CPU run that would make the host wait for a GPU: reading a value (item, float(),
    bool()), nonzero and boolean-mask indexing (the result's size lives on the device), and tensors
    made from Python values ("lift_fresh"), which a CUDA run copies host-to-device with a wait
    (torch.as_tensor(3, device="cuda")); a Python scalar assigned into a tensor shows up as one too,
    though CUDA fills that without waiting. On CUDA, cuda_syncs() below counts the real ones."""

    KINDS = {"_local_scalar_dense": "item", "nonzero": "nonzero", "masked_select": "masked_select",
             "lift_fresh": "tensor from a Python value"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_") and any(
                t is not None and t.dtype == torch.bool for t in args[1]):
            self.ops.append("boolean index")
        elif name in self.KINDS:
            self.ops.append(self.KINDS[name])
        return func(*args, **(kwargs or {}))


def cuda_syncs(fn):
    """The synchronizing CUDA calls fn makes, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return ["cuda sync" for w in caught if "synchronizing CUDA operation" in str(w.message)]


# -----------------------------------------------------------------------------------------------
# The training step of train.py, on one fixed batch


def labelled_toy(root, n, size):
    """A small toy world at size px, labelled by the simulated experts as train.py's default is:
    (raw shard, labelled shard, its decoded samples)."""
    raw = os.path.join(root, "raw-000000.tar")
    data.write_shard(raw, ((f"{i:09d}", data.scene_members(data.render_scene(0, i, size), 0, i)) for i in range(n)))
    shard = os.path.join(root, "train-000000.tar")
    sim = pseudolabel.LabelConfig(raw, root, "simulated", "simulated")
    experts = {k: pseudolabel.load_expert(k, "simulated", sim, None) for k in ("depth", "ground")}
    experts["tagger"] = pseudolabel.SimulatedTagger(sim.noise, sim.seed)  # as pseudolabel.py's default here
    pseudolabel.label_shard(raw, shard, experts, sim, progress=lambda k: None)
    return raw, shard, [data.decode_sample(k, m) for k, m in data.iter_tar(shard)]


def fixed_batch(samples, model, aug, tasks, device):
    views = [data.make_views(s, np.random.default_rng(i), aug, tasks) for i, s in enumerate(samples)]
    return train.to_device(data.collate(views, model.tokenize), device)


class Step:
    """train.py's loop body (forward, teacher, objectives, backward, clip, AdamW, EMA) with its
    settings: fused AdamW on CUDA, foreach AdamW on CPU; autocast as train.py's --precision
    (auto: bf16 on CUDA, fp32 on CPU); with compile, the model torch.compile'd as train.py does."""

    def __init__(self, preset, samples, batch_size, device, tasks=mtv.ALL_TASKS, n_local=4, precision="auto",
                 compile=False, image_size=None):
        cfg = mtv.build_config(preset)
        cfg.vision.image_size = size = image_size or cfg.vision.image_size
        self.tasks, self.device, self.batch_size = tasks, device, batch_size
        self.model = mtv.MTV(cfg, tasks).to(device)
        self.student = torch.compile(self.model) if compile else self.model  # as train.py compiles
        self.teacher = self.model.ssl_teacher().to(device) if "ssl" in tasks else None
        self.objectives = train.Objectives(self.model, tasks, train.TrainConfig()).to(device)
        self.optimizer = torch.optim.AdamW(train.param_groups(self.model, 0.04), lr=1e-5,
                                           **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        self.autocast = mtv.autocast(device, precision)
        self.aug = data.AugConfig(size=size, local_size=size // 2, n_local=n_local if "ssl" in tasks else 0,
                                  patch_size=cfg.vision.patch_size)
        self.batch = fixed_batch([samples[i % len(samples)] for i in range(batch_size)], self.model,
                                 self.aug, tasks, device)

    def __call__(self):
        loss = self.forward_backward()
        self.update()
        return loss

    def forward_backward(self):
        with self.autocast:
            out = self.student(self.batch)
            target = self.teacher(self.batch) if self.teacher is not None else None
        parts, _ = self.objectives(out, target, self.batch, 0.04)
        loss = sum(parts.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def update(self):
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        if self.teacher is not None:
            train.ema_update(self.teacher, self.model, 0.99)

    def parts(self):
        """{name: fn}: the step cut into pieces that together do its work once. Each head and loss
        runs on detached copies of its inputs, so its backward stops where the towers begin."""
        m, b, obj, ac = self.model, self.batch, self.objectives, self.autocast
        n = len(b["text"])
        mask = torch.cat([torch.zeros_like(b["ibot_mask"]), b["ibot_mask"]])  # (2B, N) view 1 masked
        grid = m._grid(b["global"])
        with torch.no_grad(), ac:
            vis = m.vision(b["global"], mask=mask, layers=m.depth_head.layers)
            local = m.vision(b["local"])["pooled"]
            target = self.teacher(b)
            txt, name = m.encode_text(b["text"]), m.encode_text(b["name_tokens"])

        def leaf(x):
            return x.detach().clone().requires_grad_(True)

        def backward(*xs):
            sum(x.float().sum() for x in xs if x is not None).backward()

        def vision_global():
            with ac:
                v = m.vision(b["global"], mask=mask, layers=m.depth_head.layers)
            backward(v["pooled"], v["patch"], *v["layers"])

        def vision_local():
            with ac:
                v = m.vision(b["local"])
            backward(v["pooled"])

        def teacher():
            with ac:
                self.teacher(b)

        def text(tokens):
            with ac:
                t = m.encode_text(tokens)
            backward(t)

        def clip():
            img, t = leaf(torch.nn.functional.normalize(vis["pooled"][:n].float(), dim=-1)), leaf(txt)
            losses.siglip_loss(img, t.float(), m.logit_scale.exp(), m.logit_bias)["clip"].backward()

        def dino():
            with ac:
                g, l = m.dino_head(leaf(vis["pooled"])), m.dino_head(leaf(local))
            obj.dino(g.float(), l.float(), target["dino_global"].float(), 0.04)["dino"].backward()

        def ibot():
            with ac:
                p = m.ibot_head(leaf(vis["patch"][n:]))
            obj.ibot(p.float(), target["ibot"].float(), b["ibot_mask"], 0.04)["ibot"].backward()

        def depth():
            with ac:
                d = m.depth_head([leaf(x[:n]) for x in vis["layers"]], grid, b["global"].shape[-2:])
            losses.depth_loss(d.float(), b["depth"], b["depth_valid"])["depth"].backward()

        def ground():
            with ac:
                r = m.ground_head(leaf(vis["patch"][:n]), grid, b["boxes"])  # (B, M, D)
            first = torch.argsort((~b["box_valid"]).flatten().byte(), stable=True)[: len(b["name_tokens"])]
            r = r.flatten(0, 1)[first]  # (R, D) the valid boxes, as MTV.forward gathers them
            losses.ground_loss(r.float(), leaf(name).float(), b["name_id"], m.ground_logit_scale.exp(),
                               m.ground_logit_bias)["ground"].backward()

        return {"vision, 2 global views": vision_global, "vision, local views": vision_local,
                "teacher, 2 global views (forward)": teacher, "text, captions": partial(text, b["text"]),
                "text, entity names": partial(text, b["name_tokens"]), "clip loss": clip,
                "dino head + loss": dino, "ibot head + loss": ibot, "depth head + loss": depth,
                "ground head + loss": ground, "clip grad + AdamW + EMA": self.update}


def matmul_reference(device):
    """(fn, FLOPs) of a plain square matmul in the step's precision, the machine's practical peak."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


# -----------------------------------------------------------------------------------------------
# The sections


def tower_vs_reference(args, rows):
    shapes = [("tiny", args.batch)] + ([("B/16", 32)] if args.device.type == "cuda" else [])
    for preset, batch in shapes:
        r = vit.compare(preset, batch, 1, 2 * args.rounds, str(args.device))
        rows.append(row("a", f"image tower fwd+bwd: ours / SiglipVisionModel, {preset} (< 1: ours faster)",
                        r["ratio"], f"batch {batch}, fp32: {ms(r['ours'])} vs {ms(r['reference'])}, "
                        f"{r['attention']} attention, max |diff| {r['max_diff']:.1e}"))


def step_vs_parts(args, step, rows, report):
    sync = make_sync(args.device)
    parts = step.parts()
    matmul, mm_flops = matmul_reference(args.device)
    step_flops = count_flops(step)
    part_flops = {k: count_flops(fn) for k, fn in parts.items()}
    # forward and backward: the CPU's foreach AdamW reads its step counters, fused CUDA AdamW does not
    if args.device.type == "cuda":
        sync_ops = cuda_syncs(step.forward_backward)
    else:
        with CountSyncs() as counter:
            step.forward_backward()
        sync_ops = counter.ops
    times = {k: [] for k in ["step", "matmul", *parts]}
    for r in range(args.rounds + 1):  # round 0 warms up
        got = {"matmul": timed(matmul, sync), "step": timed(step, sync)}
        got |= {k: timed(fn, sync) for k, fn in parts.items()}  # the update last: it uses the grads left
        if r:
            for k, v in got.items():
                times[k].append(v)
    over_parts = statistics.median(s / sum(times[k][i] for k in parts) for i, s in enumerate(times["step"]))
    peak = statistics.median((step_flops / s) / (mm_flops / m) for s, m in zip(times["step"], times["matmul"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    mm_rate = mm_flops / med["matmul"]
    rows.append(row("b", "4-task step / sum of its parts", over_parts,
                    f"tiny, batch {step.batch_size}: step {ms(med['step'])}, {len(parts)} parts "
                    f"{ms(sum(med[k] for k in parts))}"))
    rows.append(row("b", "4-task step FLOP/s / plain matmul FLOP/s (fraction of matmul peak)", peak,
                    f"{step_flops / 1e9:.1f} GFLOP counted per step, {step_flops / med['step'] / 1e9:.1f} "
                    f"GFLOP/s vs matmul {mm_rate / 1e9:.1f} GFLOP/s"))
    report["step"] = {"batch": step.batch_size, "seconds": med["step"], "flops": step_flops,
                      "matmul_flops_per_s": mm_rate, "host_waits": {k: sync_ops.count(k) for k in set(sync_ops)},
                      "parts": {k: {"seconds": med[k], "flops": part_flops[k],
                                    "fraction_of_matmul_peak": part_flops[k] / med[k] / mm_rate}
                                for k in parts}}
    return med["step"]


def pipeline_vs_step(args, step, shards, rows):
    """Loader images/s over bursts of batches (prefetched batches drained first, so a burst times
    what the loader makes while the trainer waits) vs the step's images/s, round by round."""
    sync, burst = make_sync(args.device), 2 if args.quick else 4
    cfg = train.TrainConfig(batch_size=step.batch_size, shuffle_buffer=64)
    for workers in (0, 1):
        loader = train.make_loader(cfg, shards, step.tasks, step.model, step.aug, skip=0, seed=0,
                                   workers=workers)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        ratios, ips = [], []
        for _ in range(args.rounds):
            for _ in range(2 * workers):  # DataLoader's prefetch_factor (2) per worker
                next(it)
            t = timed(lambda: [next(it) for _ in range(burst)], sync)
            s = timed(step, sync)
            ips.append(burst * step.batch_size / t)
            ratios.append(ips[-1] / (step.batch_size / s))
        del it, loader
        rows.append(row("c", f"data pipeline / training step images/s, {workers} loader worker(s)",
                        statistics.median(ratios),
                        f"{statistics.median(ips):.0f} img/s (make_views + collate, "
                        f"{step.aug.n_local} local crops) vs step {step.batch_size / args.step_seconds:.1f} img/s"))


def labelling_vs_step(args, step, raw_shard, root, rows):
    sync = make_sync(args.device)
    cfg = pseudolabel.LabelConfig(raw_shard, root, "", "", device=str(args.device), batch_size=16)
    experts = {"simulated depth": ("depth", "simulated"), "simulated ground": ("ground", "simulated")}
    try:
        depth_dir, owl_dir = experts_lib.save_tiny(os.path.join(root, "experts"), args.size)
        experts |= {"tiny random Depth Anything": ("depth", depth_dir), "tiny random OWLv2": ("ground", owl_dir)}
    except ImportError:
        print("transformers is not installed: the real experts' rows are left out", file=sys.stderr)
    loaded = {name: {"depth": None, "ground": None, "tagger": pseudolabel.CaptionTagger()}  # the real path's names
              | {kind: pseudolabel.load_expert(kind, path, cfg, args.device)} for name, (kind, path) in experts.items()}
    n = data.count_samples([raw_shard])
    out = os.path.join(root, "labelled-by-one.tar")

    def label(which):
        pseudolabel.label_shard(raw_shard, out, which, cfg, progress=lambda k: None)

    for which in loaded.values():
        label(which)  # warm-up: first calls build caches and kernels
    ratios = {name: [] for name in loaded}
    ips = {name: [] for name in loaded}
    for _ in range(args.rounds):
        s = timed(step, sync)
        for name, which in loaded.items():
            ips[name].append(n / timed(partial(label, which), sync))
            ratios[name].append(ips[name][-1] / (step.batch_size / s))
    for name in loaded:
        rows.append(row("d", f"pseudo-labelling / training step images/s, {name}",
                        statistics.median(ratios[name]),
                        f"{statistics.median(ips[name]):.0f} img/s ({n} images a shard, decode + expert + "
                        f"encode + write)"))


def mfu(args, samples, rows, report):
    if args.device.type != "cuda":
        rows.append(row("e", "MFU, bf16, B/16 preset 4-task step", None, "n/a on CPU"))
        return
    sync = make_sync(args.device)
    step = Step("B/16", samples, args.mfu_batch, args.device)
    flops = count_flops(step)
    for _ in range(3):
        step()
    n = 5 if args.quick else 20
    seconds = timed(lambda: [step() for _ in range(n)], sync) / n
    name = torch.cuda.get_device_name(args.device)
    peak = peak_bf16(name)
    matmul, mm_flops = matmul_reference(args.device)
    mm = statistics.median(timed(matmul, sync) for _ in range(10))
    achieved = flops / seconds
    detail = (f"{name}, batch {args.mfu_batch}: {flops / 1e12:.2f} TFLOP counted per step, {ms(seconds)}, "
              f"{achieved / 1e12:.0f} TFLOP/s; bf16 matmul here {mm_flops / mm / 1e12:.0f} TFLOP/s")
    if peak is None:
        rows.append(row("e", "MFU, bf16, B/16 preset 4-task step", None, detail + "; no peak known for this device"))
    else:
        rows.append(row("e", "MFU, bf16, B/16 preset 4-task step", achieved / peak,
                        detail + f"; peak {peak / 1e12:.0f} TFLOP/s"))
    report["mfu"] = {"device": name, "batch": args.mfu_batch, "seconds": seconds, "flops": flops,
                     "peak": peak, "memory_gb": torch.cuda.max_memory_allocated(args.device) / 2**30}


def expert_cost(kind, expert, samples, sync, rounds):
    """One real expert class of pseudolabel.py on decoded samples: FLOPs and seconds per image, and
    the size its processor feeds the model. The FLOP count's pass is the warm-up."""
    queries = [pseudolabel.extract_entities(s["caption"]) for s in samples]
    call = (lambda: expert(samples)) if kind == "depth" else (lambda: expert(samples, queries))
    flops = count_flops(call) / len(samples)
    seconds = statistics.median(timed(call, sync) for _ in range(rounds)) / len(samples)
    image = samples[0]["image"]
    resize = getattr(expert.processor, "image_processor", expert.processor)  # OWLv2's: image and text
    return {"flops": flops, "seconds": seconds, "input": list(image.shape[:2]),
            "model_input": list(resize(images=[image], return_tensors="pt")["pixel_values"].shape[-2:])}


def real_experts(args, root, rows, report):
    """Depth Anything V2 Small and Base and OWLv2 B/16 at their published sizes with random weights
    (bench/experts.py), through pseudolabel's expert classes on photo-sized images: FLOPs counted
    per image, and seconds per image on this device; utilisation against the plain matmul."""
    if find_spec("transformers") is None:
        print("transformers is not installed: the real-size experts' rows are left out", file=sys.stderr)
        return
    sync = make_sync(args.device)
    matmul, mm_flops = matmul_reference(args.device)
    mm_rate = mm_flops / statistics.median(timed(matmul, sync) for _ in range(5))
    samples = experts_lib.photo_samples(1 if args.quick else 2)
    cfg = pseudolabel.LabelConfig("", root, "", "", device=str(args.device))
    report["experts"] = {}
    for name in experts_lib.REAL_SIZE:
        kind, folder = experts_lib.save_real_size(os.path.join(root, "real-experts"), name)
        expert = pseudolabel.load_expert(kind, folder, cfg, args.device)
        c = expert_cost(kind, expert, samples, sync, 1 if args.quick else 2)
        del expert
        report["experts"][name] = c
        (h, w), (mh, mw) = c["input"], c["model_input"]
        rows.append(row("g", f"real-size {name}, random weights: FLOP/s / plain matmul FLOP/s",
                        c["flops"] / c["seconds"] / mm_rate,
                        f"{c['flops'] / 1e9:.0f} GFLOP counted per image ({w}x{h} -> {mw}x{mh}), "
                        f"{c['seconds']:.2f} s per image on {'this GPU' if args.device.type == 'cuda' else 'this CPU'}"))


def flops_by_subset(args, samples, rows, report):
    """FLOPs per image of the B/16 training step (forward, backward, teacher; train.py's default
    4 local crops for ssl) for the Figure 1 ladder's task subsets, counted on 2 images on this
    device: what the README's CC3M estimate multiplies out. Ratio: against clip alone."""
    ladder = [("clip",), ("clip", "ssl"), ("clip", "ssl", "ground"), mtv.ALL_TASKS]
    counted = {}
    for tasks in ladder:
        step = Step("B/16", samples, 2, args.device, tasks)
        counted[",".join(tasks)] = count_flops(step) / 2
        del step
    report["b16_flops_per_image"] = counted
    for tasks, flops in counted.items():
        rows.append(row("h", f"B/16 step FLOPs per image, {tasks} / clip", flops / counted["clip"],
                        f"{flops / 1e9:.0f} GFLOP per image (224 px, fwd + bwd + teacher)"))


def grid_throughput(args, shard, root, rows):
    """A sweep's throughput (make ablate): as many one-thread training processes as cores, side by
    side, against one process with every core; images/s of all lanes together over the one run's.
    Each side is train.py itself on the same shard (clip, 32 px); the per-step time is read from
    its metrics.jsonl (second half of the steps), so start-up and the first steps do not count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    steps = 10 if args.quick else 30

    def launch(out, threads):
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py"),
               "--tasks", "clip", "--data", shard, "--steps", str(steps), "--batch-size", str(args.batch),
               "--image-size", "32", "--workers", "0", "--log-every", str(steps // 2), "--ckpt-every", str(steps),
               "--out", out]
        return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def images_per_s(outs, procs):
        if any(p.wait() for p in procs):
            raise RuntimeError("a bench training run failed")
        def last_row(out):
            with open(os.path.join(out, "metrics.jsonl")) as f:
                return json.loads(f.readlines()[-1])

        return sum(last_row(o)["img_per_s"] for o in outs)

    one = os.path.join(root, "grid-one")
    single = images_per_s([one], [launch(one, cores)])
    lanes = [os.path.join(root, f"grid-lane{i}") for i in range(cores)]
    together = images_per_s(lanes, [launch(o, 1) for o in lanes])
    rows.append(row("f", f"sweep images/s: {cores} lanes x 1 thread / 1 run x {cores} threads", together / single,
                    f"clip, 32 px, batch {args.batch}: {together:.0f} against {single:.0f} images/s"))


# -----------------------------------------------------------------------------------------------
# Output


def ms(seconds):
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def row(section, what, ratio, detail):
    return {"section": section, "what": what, "ratio": ratio, "detail": detail}


def print_table(rows, report):
    width = max(len(r["what"]) for r in rows) + 6
    print(f"\n{'':<{width}}{'ratio':>8}  detail")
    for r in rows:
        value = "n/a" if r["ratio"] is None else f"{r['ratio']:.3g}"
        print(f"({r['section']}) {r['what']:<{width - 4}}{value:>8}  {r['detail']}")
    s = report.get("step")
    if s:
        print(f"\nthe 4-task step, part by part (tiny, batch {s['batch']}; fraction of the matmul's FLOP/s):")
        for k, p in sorted(s["parts"].items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"  {k:<36}{ms(p['seconds']):>10}{p['flops'] / 1e9:>9.2f} GFLOP"
                  f"{p['fraction_of_matmul_peak']:>8.2f}")
        waits = s["host_waits"]
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(waits.items()))
        where = "" if report["device_type"] == "cuda" else "; counted on CPU, see CountSyncs"
        print(f"host waits for the GPU in one step's forward and backward: {sum(waits.values())}"
              + (f" ({kinds})" if waits else "") + where)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and a smaller batch (~1-2 min on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--json", metavar="FILE", help="also write the table and the breakdown as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; one keeps a shared CPU from being oversubscribed (with two busy "
                        "neighbours, two threads ran the step 10x slower); 0 = torch's default")
    p.add_argument("--batch", type=int, default=0, help="images per step for (a)-(d); 0 = 8 with --quick, else 16")
    p.add_argument("--mfu-batch", type=int, default=64, help="images per step for the B/16 MFU row and --gpu")
    p.add_argument("--gpu", action="store_true",
                   help="run the prepared GPU check instead (bench/gpu.py, a few minutes on one CUDA GPU): the B/16 "
                        "step eager and compiled, the real-size experts, NCCL; refuses without CUDA")
    args = p.parse_args(argv)
    if args.gpu:
        from bench import gpu

        return gpu.main(args)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but no CUDA device is available")
    if args.threads and args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (8 if args.quick else 16)
    args.rounds = 3 if args.quick else 7
    args.size = mtv.build_config("tiny").vision.image_size
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    print(f"mtv benchmark on {where}; torch {torch.__version__}; {'quick' if args.quick else 'full'}: "
          f"{args.rounds} rounds, batch {args.batch}")
    torch.manual_seed(0)
    rows, report = [], {"device_type": args.device.type}
    with tempfile.TemporaryDirectory() as root:
        raw, shard, samples = labelled_toy(root, 4 * args.batch, args.size)

        print("(a) image tower ...", flush=True)
        tower_vs_reference(args, rows)
        print("(b) training step and its parts ...", flush=True)
        step = Step("tiny", samples, args.batch, args.device)
        args.step_seconds = step_vs_parts(args, step, rows, report)
        print("(c) data pipeline ...", flush=True)
        pipeline_vs_step(args, step, [shard], rows)
        print("(d) pseudo-labelling ...", flush=True)
        labelling_vs_step(args, step, raw, root, rows)
        del step
        print("(e) MFU ...", flush=True)
        mfu(args, samples, rows, report)
        if args.device.type == "cpu":
            print("(f) sweep lanes ...", flush=True)
            grid_throughput(args, shard, root, rows)
        print("(g) real-size experts (random weights) ...", flush=True)
        real_experts(args, root, rows, report)
        print("(h) B/16 step FLOPs by task subset ...", flush=True)
        flops_by_subset(args, samples, rows, report)
    print_table(rows, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "quick": args.quick, "rows": rows, **report},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    main()
