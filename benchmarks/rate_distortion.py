"""Rate-distortion of the VQ-VAE with flat and residual quantizers on CIFAR-10: held-out PSNR
against the bits an image's codes take (positions x log2 of the codebook size, over all stages).

    python benchmarks/rate_distortion.py --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        --json benchmarks/results/rate_distortion_cpu.json --plot docs/rate_distortion.png

Each point is one run of the CIFAR-10 trainer (vqvae_fast.train.cifar10, the default recipe and
architecture, --steps and --batch-size as given), differing only in its quantizer: the flat
VQ-VAE with 512 and 4096 codes, and the residual VQ-VAE (`--model rqvae`) with 2, 4 and 8 stages
of 512 codes (its 1-stage point is the flat 512) and 2 stages of 64 (12 bits a position, as the
flat 4096). `--seeds 0 1` runs every point once per seed (the trainer's --seed: weights, data
order, k-means seeds); the plot and the printed summary give each point's mean over its seeds.
Runs already in the JSON (by point and seed) are kept: the command resumes a partial sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from vqvae_fast.train.cifar10 import TrainConfig, train

# name: (model, stages, codes per stage)
POINTS = {
    "flat 512": ("vqvae", 1, 512),
    "flat 4096": ("vqvae", 1, 4096),
    "rq 2x64": ("rqvae", 2, 64),
    "rq 2x512": ("rqvae", 2, 512),
    "rq 4x512": ("rqvae", 4, 512),
    "rq 8x512": ("rqvae", 8, 512),
}


def run_point(name: str, base: TrainConfig, out_root: Path, seed: int = 0) -> dict:
    model, stages, codes = POINTS[name]
    config = dataclasses.replace(base, model=model, stages=stages, num_codes=codes, seed=seed,
                                 out=str(out_root / f"{name.replace(' ', '_')}_seed{seed}"))
    start = time.perf_counter()
    final = train(config)
    return {"name": name, "seed": seed, "model": model, "stages": stages, "num_codes": codes,
            "code_bits_per_image": final["code_bits_per_image"], "test_psnr": final["test_psnr"],
            "test_mse": final["test_mse"], "codes_used": final["codes_used"], "wall_s": time.perf_counter() - start}


def seed_of(result: dict) -> int:
    return result.get("seed", 0)  # results written before --seeds existed are seed 0


def summary(results: list[dict]) -> list[dict]:
    """One entry per point: its fields, test_psnr the mean over its seeds, with their list."""
    points = {}
    for r in results:
        points.setdefault(r["name"], []).append(r)
    return [dict(runs[0], test_psnr=sum(r["test_psnr"] for r in runs) / len(runs),
                 seeds=[seed_of(r) for r in runs], seed_psnr=[r["test_psnr"] for r in runs])
            for runs in points.values()]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:  # every point, named
        ax.annotate(r["name"], (r["code_bits_per_image"], r["test_psnr"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    series = (  # (label, which points, marker, line)
        ("flat VQ-VAE", lambda r: r["model"] == "vqvae", "s", "none"),
        ("residual, 512 codes a stage (1 stage: flat 512)",
         lambda r: r["num_codes"] == 512 and (r["model"] == "rqvae" or r["name"] == "flat 512"), "o", "-"),
        ("residual, 64 codes a stage", lambda r: r["model"] == "rqvae" and r["num_codes"] == 64, "^", "none"),
    )
    for label, chosen, marker, line in series:
        points = sorted((r for r in results if chosen(r)), key=lambda r: r["code_bits_per_image"])
        if points:
            ax.plot([r["code_bits_per_image"] for r in points], [r["test_psnr"] for r in points], marker=marker,
                    linestyle=line, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per image (8 x 8 positions x stages x log2 codes)")
    ax.set_ylabel("test PSNR (dB), mean over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="a cifar-10-batches-py folder (or its parent)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, from: {', '.join(POINTS)}")
    parser.add_argument("--out", default="runs/rate_distortion", help="the runs' folders")
    parser.add_argument("--json", type=Path, required=True, help="results (kept and extended across invocations)")
    parser.add_argument("--plot", type=Path, help="PSNR against bits per image (PNG)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="CPU threads (0: the cores other processes leave free)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run every point once per seed")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.points.split(",") if n.strip()]
    unknown = sorted(set(names) - set(POINTS))
    if unknown:
        parser.error(f"unknown points {unknown}; choose from {list(POINTS)}")
    data = json.loads(args.json.read_text()) if args.json.is_file() else {"results": []}
    done = {(r["name"], seed_of(r)) for r in data["results"]}
    base = TrainConfig(data_dir=args.data_dir, no_download=True, steps=args.steps, batch_size=args.batch_size,
                       device=args.device, workers=args.workers, quiet=True)
    for name, seed in ((name, seed) for name in names for seed in args.seeds):
        if (name, seed) in done:
            print(f"{name} seed {seed}: kept from {args.json}")
            continue
        result = run_point(name, base, Path(args.out), seed)
        data["results"].append(result)
        data.update(command="python benchmarks/rate_distortion.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    steps=args.steps, batch_size=args.batch_size, torch=torch.__version__,
                    cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    date=time.strftime("%Y-%m-%d"))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{name} seed {seed}: {result['code_bits_per_image']:.0f} bits/image, test PSNR "
              f"{result['test_psnr']:.2f} dB, {result['wall_s']:.0f} s")
    for point in summary(data["results"]):
        seeds = ", ".join(f"{p:.2f}" for p in point["seed_psnr"])
        print(f"{point['name']}: {point['code_bits_per_image']:.0f} bits/image, test PSNR {point['test_psnr']:.2f} dB "
              f"(seeds {point['seeds']}: {seeds})")
    if args.plot:
        plot(data["results"], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
