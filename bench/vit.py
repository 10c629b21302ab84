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
        cfg = mtv.build_config(args.preset)
    except ValueError as e:
        raise SystemExit(str(e))

    torch.manual_seed(0)
    model = mtv.MTV(cfg, tasks=("clip",))
    ref = model.to_siglip().vision_model.to(args.device)  # identical weights
    ours = model.vision.to(args.device)
    print(f"reference attention: {ref.config._attn_implementation}")
    s = cfg.vision.image_size
    images = torch.randn(args.batch, 3, s, s, device=args.device)
    with torch.no_grad():
        diff = (ours(images)["pooled"] - ref(pixel_values=images).pooler_output).abs().max().item()
    print(f"max |ours - reference| pooled output: {diff:.2e}")

    def run_ours(x):
        return ours(x)["pooled"]

    def run_ref(x):
        return ref(pixel_values=x).pooler_output

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {"ours": [], "reference": []}
    for i in range(args.warmup + args.iters):
        for name, fn in (("ours", run_ours), ("reference", run_ref))[:: 1 if i % 2 else -1]:  # alternate order
            sync()
            start = time.perf_counter()
            fn(images).sum().backward()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the ratio of each back-to-back pair cancels slow drifts in machine load (a shared CPU)
    ratio = statistics.median(o / r for o, r in zip(times["ours"], times["reference"]))
    print(f"preset {args.preset}, batch {args.batch}, {args.device}, threads {torch.get_num_threads()}: "
          f"ours {med['ours'] * 1e3:.1f} ms, SiglipVisionModel {med['reference'] * 1e3:.1f} ms, ratio {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
