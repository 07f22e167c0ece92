#!/usr/bin/env python
"""Train a VQ-VAE on CIFAR-10.

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
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from vqvae_fast import VQVAE
from vqvae_fast.data import DataNotFoundError, load_cifar10
from vqvae_fast.model import save_checkpoint
from vqvae_fast.vector_quantizer import code_counts, usage_stats

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
    """(settings, checkpoint or None). On --resume the run's settings come from the checkpoint, and
    only run-control flags given on this command line (RUN_CONTROL) replace them."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
        unset = object()  # a default no flag can produce: what remains `unset` was not given
        explicit = build_parser()
        explicit.set_defaults(**{key: unset for key in vars(args)})
        given = {key: value for key, value in vars(explicit.parse_args(argv)).items() if value is not unset}
        ignored = sorted(f"--{key.replace('_', '-')}" for key in given if key not in RUN_CONTROL)
        if ignored:
            print(f"warning: ignored on --resume (the checkpoint's settings are used): {' '.join(ignored)}",
                  file=sys.stderr)
        args = argparse.Namespace(**{**checkpoint["args"], **{k: v for k, v in given.items() if k in RUN_CONTROL},
                                     "resume": args.resume})
        if "steps" in given or "epochs" in given:  # a new length replaces the saved one
            args.steps, args.epochs = given.get("steps"), given.get("epochs")
    if args.steps is None and args.epochs is None:
        args.steps = 300
    return args, checkpoint


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(name)


def build_model(args: argparse.Namespace) -> VQVAE:
    recipe = dict(RECIPES[args.recipe])
    ema = recipe.pop("ema")
    if args.ema is not None:  # --ema / --no-ema override the recipe
        ema = args.ema
    return VQVAE(num_codes=args.num_codes, code_dim=args.code_dim, beta=args.beta, channels=args.channels,
                 res_channels=args.res_channels, num_res_blocks=args.res_blocks,
                 ema_decay=args.ema_decay if ema else None, **recipe)


def to_images(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [0, 1], channels_last (the fast conv layout)."""
    return batch_uint8.float().div_(255).contiguous(memory_format=torch.channels_last)


class EpochOrder:
    """Shuffle order and flip decisions of each epoch, a pure function of (seed, epoch).

    Resuming needs no data-loader state: step s always sees the same images.
    """

    def __init__(self, seed: int, num_images: int, device: torch.device):
        self.seed, self.num_images, self.device = seed, num_images, device
        self.epoch = None

    def get(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_images, generator=generator)
            flip = torch.rand(self.num_images, generator=generator) < 0.5
            self.perm, self.flip = perm.to(self.device), flip.to(self.device)  # one copy per epoch
            self.epoch = epoch
        return self.perm, self.flip


def train_batch(train_uint8: torch.Tensor, order: EpochOrder, step: int, batch_size: int,
                steps_per_epoch: int) -> torch.Tensor:
    """The augmented batch (B, 3, H, W) in [0, 1] of global step `step`, cut on the device."""
    epoch, position = divmod(step, steps_per_epoch)
    perm, flip = order.get(epoch)
    rows = slice(position * batch_size, (position + 1) * batch_size)
    x = to_images(train_uint8[perm[rows]])
    return torch.where(flip[rows].view(-1, 1, 1, 1), x.flip(3), x)  # random horizontal flips


@torch.no_grad()
def evaluate(model: VQVAE, images_uint8: torch.Tensor, batch_size: int = 500) -> dict:
    """Test MSE / PSNR of the clamped reconstructions (fp32, as load_checkpoint(...).reconstruct gives)
    and code usage over all of `images_uint8`."""
    was_training = model.training
    model.eval()
    squared_error = torch.zeros((), dtype=torch.float64, device=images_uint8.device)
    counts = torch.zeros(model.quantizer.num_codes, device=images_uint8.device)
    for chunk in images_uint8.split(batch_size):
        out = model(to_images(chunk))
        squared_error += out.mse.double() * chunk.shape[0]
        counts += code_counts(out.indices, model.quantizer.num_codes)
    model.train(was_training)
    mse = float(squared_error) / max(1, images_uint8.shape[0])
    perplexity, codes_used = usage_stats(counts)
    return {"test_mse": mse, "test_psnr": psnr(mse), "perplexity": float(perplexity),
            "codes_used": int(codes_used), "dead_codes": int(model.quantizer.dead_mask().sum())}


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def save_reconstructions(model: VQVAE, images_uint8: torch.Tensor, path: Path, count: int = 16) -> None:
    """torchvision grid: the first `count` test images above their reconstructions."""
    x = to_images(images_uint8[:count])
    grid = make_grid(torch.cat([x, model.reconstruct(x)]).float().cpu(), nrow=x.shape[0], padding=2)
    save_image(grid, path)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
        model.encoder.compile()  # in place: state_dict keys stay the same
        model.decoder.compile()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = EpochOrder(args.seed, train_uint8.shape[0], device)
    num_params = sum(p.numel() for p in model.parameters())
    run_args = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}

    def save(at_step: int, elapsed: float) -> None:
        save_checkpoint(out_dir / "checkpoint.pt", model, optimizer=optimizer.state_dict(), step=at_step,
                        rng=rng_state(device), args=run_args, elapsed_s=elapsed)

    # Running sums of (loss, mse, perplexity) on the device: read only when logging.
    log_sums = torch.zeros(3, device=device)
    eval_sums = torch.zeros(3, device=device)
    log_count = eval_count = 0
    start_step, start_time = step, time.perf_counter()
    eval_seconds, test_metrics = 0.0, None
    progress = tqdm(total=total_steps, initial=step, disable=args.quiet, desc=f"{args.recipe}", unit="step",
                    dynamic_ncols=True)
    model.train()
    while step < total_steps:
        x = train_batch(train_uint8, order, step, batch_size, steps_per_epoch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        step += 1
        stats = torch.stack([out.loss.detach().float(), out.mse.float(), out.perplexity.float()])
        log_sums += stats
        eval_sums += stats
        log_count, eval_count = log_count + 1, eval_count + 1
        progress.update(1)
        if step % args.log_every == 0 or step == total_steps:
            loss, mse, perplexity = (log_sums / log_count).tolist()
            progress.set_postfix(loss=f"{loss:.4f}", psnr=f"{psnr(mse):.2f}", ppl=f"{perplexity:.0f}")
            log_sums.zero_()
            log_count = 0
        is_last = step == total_steps
        if step % args.eval_every == 0 or is_last:
            eval_start = time.perf_counter()
            loss, mse, perplexity = (eval_sums / eval_count).tolist()
            eval_sums.zero_()
            eval_count = 0
            test_metrics = evaluate(model, test_uint8 if is_last else test_uint8[:args.eval_images])
            wall = time.perf_counter() - start_time
            line = {"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": loss,
                    "train_psnr": psnr(mse), "train_perplexity": perplexity, **test_metrics,
                    "elapsed_s": elapsed_before + wall,
                    "images_per_s": (step - start_step) * batch_size / max(wall - eval_seconds, 1e-9)}
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            if not is_last:  # the last checkpoint is written below, with the final wall time
                save(step, elapsed_before + wall)
            eval_seconds += time.perf_counter() - eval_start
    progress.close()
    if test_metrics is None:  # nothing trained in this invocation
        test_metrics = evaluate(model, test_uint8)

    train_seconds = time.perf_counter() - start_time - eval_seconds
    final = {"recipe": args.recipe, "steps": step, "batch_size": batch_size, "lr": args.lr,
             "ema_decay": model.config["ema_decay"], "seed": args.seed, "device": str(device), "amp": args.amp,
             "params": num_params, "train_images": train_uint8.shape[0], "test_images": test_uint8.shape[0],
             **test_metrics}
    final["wall_s"] = elapsed_before + time.perf_counter() - start_time
    final["images_per_s"] = (step - start_step) * batch_size / max(train_seconds, 1e-9)
    save_reconstructions(model, test_uint8, out_dir / "recon.png")
    save(step, final["wall_s"])
    (out_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"test PSNR {final['test_psnr']:.2f} dB (MSE {final['test_mse']:.5f}), perplexity {final['perplexity']:.1f}, "
          f"codes used {final['codes_used']}/{args.num_codes}, {final['wall_s']:.0f} s, "
          f"{final['images_per_s']:.0f} images/s -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
