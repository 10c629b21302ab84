"""Forward+backward time of our image tower against transformers' SiglipVisionModel of the same shape.

    python -m bench.vit --preset tiny --batch 8
    python -m bench.vit --preset S/16 --batch 2

SiglipVisionModel with attn_implementation="sdpa" is the same network as `mtv.VisionTower`
(same weights after conversion, same fused attention), so the ratio measures only our code's overhead.
Both run in this process, interleaved, after warm-up; medians are reported.
"""

import argparse
import statistics
import time

import torch

import mtv


def compare(preset, batch, warmup, iters, device):
    """Median fwd+bwd seconds of our tower and SiglipVisionModel (same weights, same input), and the
    median of their per-pair ratios. Raises ValueError for an unknown preset."""
    cfg = mtv.build_config(preset)
    torch.manual_seed(0)
    model = mtv.MTV(cfg, tasks=("clip",))
    ref = model.to_siglip().vision_model.to(device)  # identical weights
    ours = model.vision.to(device)
    s = cfg.vision.image_size
    images = torch.randn(batch, 3, s, s, device=device)
    with torch.no_grad():
        diff = (ours(images)["pooled"] - ref(pixel_values=images).pooler_output).abs().max().item()

    def run_ours(x):
        return ours(x)["pooled"]

    def run_ref(x):
        return ref(pixel_values=x).pooler_output

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {"ours": [], "reference": []}
    for i in range(warmup + iters):
        for name, fn in (("ours", run_ours), ("reference", run_ref))[:: 1 if i % 2 else -1]:  # alternate order
            sync()
            start = time.perf_counter()
            fn(images).sum().backward()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the ratio of each back-to-back pair cancels slow drifts in machine load (a shared CPU)
    ratio = statistics.median(o / r for o, r in zip(times["ours"], times["reference"]))
    return {"ours": med["ours"], "reference": med["reference"], "ratio": ratio, "max_diff": diff,
            "attention": ref.config._attn_implementation}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(mtv.PRESETS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for k, v in sorted(vars(args).items()):
        print(f"{k}: {v}")
    try:
        r = compare(args.preset, args.batch, args.warmup, args.iters, args.device)
    except ValueError as e:
        raise SystemExit(str(e))
    print(f"reference attention: {r['attention']}")
    print(f"max |ours - reference| pooled output: {r['max_diff']:.2e}")
    print(f"preset {args.preset}, batch {args.batch}, {args.device}, threads {torch.get_num_threads()}: "
          f"ours {r['ours'] * 1e3:.1f} ms, SiglipVisionModel {r['reference'] * 1e3:.1f} ms, ratio {r['ratio']:.3f}")
    return r["ratio"]


if __name__ == "__main__":
    main()
