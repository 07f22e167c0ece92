#!/usr/bin/env python
"""Train a VQ-VAE (or the two-level VQ-VAE-2, `--model vqvae2`) on CIFAR-10.

    python examples/train_cifar10.py --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        --steps 300 --batch-size 128 --out runs/default

Writes OUT/metrics.jsonl (one line per evaluation), OUT/final.json, OUT/recon.png (test images
above their reconstructions) and OUT/checkpoint.pt (for --resume and vqvae_fast.load_checkpoint).
`--recipe plain` trains the classic VQ-VAE (cdist lookup, uniform codebook init, no restarts,
no EMA) with everything else equal, for comparison.

The whole dataset lives on the device as uint8 and batches are cut and augmented there, so the
loop never waits on the host; the only syncs are the logging steps.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from vqvae_fast.data import DataNotFoundError, load_cifar10
from vqvae_fast.model import MODELS, save_checkpoint
from vqvae_fast.reconstruction import ReconstructionTask, save_reconstructions
from vqvae_fast.training import (fit, parse_with_resume, pick_device, rng_state, set_rng_state,  # noqa: F401
                                 to_images)  # to_images: for the tests

RECIPES = {
    # The project's recipe: k-means init, dead-code restarts, EMA codebook, fused quantizer.
    "default": dict(kmeans_init=True, restart_dead=True, ema=True, backend="auto"),
    # The classic VQ-VAE recipe, the baseline: plain cdist lookup, uniform init, codebook by gradient.
    "plain": dict(kmeans_init=False, restart_dead=False, ema=False, backend="reference"),
}
# Flags that only steer this invocation; on --resume every other setting comes from the checkpoint.
RUN_CONTROL = ("data_dir", "no_download", "out", "steps", "epochs", "device", "workers", "compile", "eval_every",
               "eval_images", "log_every", "quiet", "resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="data",
                        help="a cifar-10-batches-py folder or its parent; the official release is downloaded "
                             "here if absent and the network allows")
    parser.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    parser.add_argument("--out", default="runs/cifar10", help="output folder")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (300 when neither --steps nor --epochs is given)")
    length.add_argument("--epochs", type=float, help="training epochs, instead of --steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--model", choices=sorted(MODELS), default="vqvae",
                        help="'vqvae': one 8x8 grid of codes; 'vqvae2': the two-level VQ-VAE-2 (4x4 top, 8x8 bottom)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                        help="codebook recipe: 'default' (k-means init, dead-code restarts, EMA) or 'plain' (classic)")
    parser.add_argument("--num-codes", type=int, default=512)
    parser.add_argument("--code-dim", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.25, help="commitment loss weight")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction,
                        help="EMA codebook updates instead of codebook gradients (default: the recipe's choice)")
    parser.add_argument("--ema-decay", type=float, default=0.9)
    parser.add_argument("--channels", type=int, default=160, help="encoder/decoder width")
    parser.add_argument("--res-channels", type=int, default=128, help="residual block hidden width")
    parser.add_argument("--res-blocks", type=int, default=2, help="residual blocks in encoder and decoder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (the quantizer stays fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT")
    parser.add_argument("--workers", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); data needs no loader processes "
                             "since it lives on the device")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations and checkpoints")
    parser.add_argument("--eval-images", type=int, default=2048,
                        help="test images for the periodic evaluations (the final one uses all)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between progress-bar updates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict | None]:
    """(settings, checkpoint or None); see vqvae_fast.training.parse_with_resume."""
    args, checkpoint = parse_with_resume(build_parser, argv, RUN_CONTROL, "vqvae_fast/1")
    if args.steps is None and args.epochs is None:
        args.steps = 300
    return args, checkpoint


def build_model(args: argparse.Namespace):
    recipe = dict(RECIPES[args.recipe])
    ema = recipe.pop("ema")
    if args.ema is not None:  # --ema / --no-ema override the recipe
        ema = args.ema
    model_class = MODELS[getattr(args, "model", "vqvae")]
    return model_class(num_codes=args.num_codes, code_dim=args.code_dim, beta=args.beta, channels=args.channels,
                       res_channels=args.res_channels, num_res_blocks=args.res_blocks,
                       ema_decay=args.ema_decay if ema else None, **recipe)


def main(argv: list[str] | None = None) -> int:
    args, checkpoint = parse_args(argv)
    device = pick_device(args.device)
    if args.workers > 0:
        torch.set_num_threads(args.workers)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")

    try:
        data = load_cifar10(args.data_dir, download=not args.no_download)
    except DataNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train_uint8, test_uint8 = data["train"].to(device), data["test"].to(device)
    batch_size = min(args.batch_size, train_uint8.shape[0])
    steps_per_epoch = train_uint8.shape[0] // batch_size
    total_steps = args.steps if args.steps is not None else math.ceil(args.epochs * steps_per_epoch)

    model = build_model(args).to(device, memory_format=torch.channels_last)
    # The codebook is not in the optimizer under EMA (it has no gradient); fused Adam: one kernel on GPUs.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 fused=device.type == "cuda")
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, elapsed_before = checkpoint["step"], checkpoint["elapsed_s"]
        set_rng_state(checkpoint["rng"], device)
    if args.compile:
        for module in (model.encoder, model.decoder):
            module.compile()  # in place: state_dict keys stay the same

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_args = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}

    def save(at_step: int, elapsed: float) -> None:
        save_checkpoint(out_dir / "checkpoint.pt", model, optimizer=optimizer.state_dict(), step=at_step,
                        rng=rng_state(device), args=run_args, elapsed_s=elapsed)

    task = ReconstructionTask(model, train_uint8, test_uint8, batch_size, args.seed, args.eval_images)
    result = fit(task, model, optimizer, steps=total_steps, out_dir=out_dir, save=save, device=device,
                 eval_every=args.eval_every, log_every=args.log_every, amp=args.amp, quiet=args.quiet,
                 desc=f"{args.model} {args.recipe}", start_step=step, elapsed_before=elapsed_before)

    final = {"model": args.model, "recipe": args.recipe, "steps": result.step, "batch_size": batch_size,
             "lr": args.lr, "ema_decay": model.config["ema_decay"], "seed": args.seed, "device": str(device),
             "amp": args.amp, "params": sum(p.numel() for p in model.parameters()),
             "train_images": train_uint8.shape[0], "test_images": test_uint8.shape[0], **result.metrics,
             "wall_s": result.wall_s, "images_per_s": result.items_per_s}
    model.eval()
    save_reconstructions(model, test_uint8, out_dir / "recon.png")
    save(result.step, final["wall_s"])
    (out_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"test PSNR {final['test_psnr']:.2f} dB (MSE {final['test_mse']:.5f}), perplexity {final['perplexity']:.1f}, "
          f"codes used {final['codes_used']}/{args.num_codes}, {final['wall_s']:.0f} s, "
          f"{final['images_per_s']:.0f} images/s -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
