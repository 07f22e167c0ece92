"""The CIFAR-10 VQ-VAE trainer: its settings (`build_parser`), the model they make, and `train`,
which `examples/train_cifar10.py` runs from the command line and `vqvae_fast.train.tuning` runs per trial.

Writes OUT/metrics.jsonl (one line per evaluation), OUT/final.json, OUT/recon.png (held-out images
above their reconstructions) and OUT/checkpoint.pt (for --resume and vqvae_fast.load_checkpoint).
The whole dataset lives on the device as uint8 and batches are cut and augmented there, so the
loop never waits on the host; the only syncs are the logging steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..models.images import to_images
from ..models.vqvae import ACTIVATIONS, MODELS, save_checkpoint
from .checkpoint import parse_with_resume, rng_state, set_rng_state
from .data import DataNotFoundError, load_cifar10
from .loop import HelpFormatter, fit, pick_device, set_cpu_threads, warmup_cosine
from .reconstruction import ReconstructionTask, save_reconstructions

# The defaults below (lr, beta, EMA decay, dead threshold, code size and count, residual width,
# activation) are the best trial of the second Optuna study in the README (examples/tune_cifar10.py,
# 300 steps x 128 on the CIFAR-10 subset, docs/results/tune300b/). Before it: --lr 1.3e-3 --beta 0.4
# --ema-decay 0.87 --dead-threshold 0.37 --num-codes 1024 --res-channels 128 --activation relu (the
# first study's); before that: --lr 1e-3 --beta 0.25 --ema-decay 0.9 --dead-threshold 0.1
# --code-dim 64 --num-codes 512 --res-channels 128 --activation relu.
RECIPES = {
    # The project's recipe: k-means init, dead-code restarts, EMA codebook, fused quantizer.
    "default": dict(kmeans_init=True, restart_dead=True, ema=True, backend="auto"),
    # The classic VQ-VAE recipe, the baseline: plain cdist lookup, uniform init, codebook by gradient.
    "plain": dict(kmeans_init=False, restart_dead=False, ema=False, backend="reference"),
}
# --model: the checkpoints' model classes, and the residual VQ-VAE (a VQVAE with stages > 1).
MODEL_CHOICES = {**MODELS, "rqvae": MODELS["vqvae"]}
# Flags that only steer this invocation; on --resume every other setting comes from the checkpoint.
RUN_CONTROL = ("data_dir", "no_download", "out", "steps", "epochs", "device", "workers", "compile", "eval_every",
               "eval_images", "log_every", "quiet", "resume", "dist_timeout")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, by the names of the trainer's flags (`--num-codes` is num_codes);
    the flags' help says what each does. The defaults are the command line's. Build one directly
    (`TrainConfig(data_dir=..., steps=300)`, `dataclasses.replace(config, lr=1e-3)`) or from a
    command line (`parse_args`); `problem()` says what is invalid, in the flags' words."""

    data_dir: str = "data"
    no_download: bool = False
    out: str = "runs/cifar10"
    steps: int | None = None  # neither steps nor epochs: 300 steps
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 2.35e-3
    lr_schedule: str = "constant"
    model: str = "vqvae"
    stages: int = 4  # residual stages of --model rqvae
    quantizer_dropout: float = 0.0
    recipe: str = "default"
    num_codes: int = 4096
    code_dim: int = 32
    beta: float = 0.51
    gradient: str = "ste"
    ema: bool | None = None  # None: the recipe's choice
    ema_decay: float = 0.756
    dead_threshold: float = 0.07
    channels: int = 160
    res_channels: int = 64
    res_blocks: int = 2
    activation: str = "silu"
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    seed: int = 0
    resume: str | None = None
    workers: int = 0
    eval_every: int = 100
    eval_images: int = 2048
    val_images: int = 0
    log_every: int = 10
    quiet: bool = False
    dist_timeout: float = 600.0

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "TrainConfig":
        """The settings of a parsed command line (or a checkpoint's saved ones): the fields it
        has; anything else (a setting a newer or older version wrote) is left out."""
        names = {field.name for field in dataclasses.fields(cls)}
        values = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        return cls(**{key: value for key, value in values.items() if key in names})

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.epochs * steps_per_epoch) if self.epochs is not None else 300

    def problem(self) -> str | None:
        """What is wrong with the settings, in the words of their flags, or None."""
        return invalid_setting(self)


DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a VQ-VAE (or the two-level VQ-VAE-2, --model vqvae2) "
                                                 "on CIFAR-10.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULTS.data_dir,
                        help="a cifar-10-batches-py folder or its parent; the official release is downloaded "
                             "here if absent and the network allows")
    parser.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    parser.add_argument("--out", default=DEFAULTS.out, help="output folder")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (300 when neither --steps nor --epochs is given)")
    length.add_argument("--epochs", type=float, help="training epochs, instead of --steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="images per step in all (under torchrun: the global batch, split across processes)")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default=DEFAULTS.lr_schedule,
                        help="'cosine': linear warm-up over the first 5%% of the steps, then cosine decay to 10%% "
                             "of --lr at the last step")
    parser.add_argument("--model", choices=sorted(MODEL_CHOICES), default=DEFAULTS.model,
                        help="'vqvae': one 8x8 grid of codes; 'vqvae2': the two-level VQ-VAE-2 (4x4 top, 8x8 bottom); "
                             "'rqvae': the VQ-VAE with a residual quantizer of --stages codebooks (8x8 x stages codes)")
    parser.add_argument("--stages", type=int, default=DEFAULTS.stages,
                        help="--model rqvae: residual stages, each a codebook of --num-codes")
    parser.add_argument("--quantizer-dropout", type=float, default=DEFAULTS.quantizer_dropout,
                        help="--model rqvae: the share of training steps that use a random prefix of the stages")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULTS.recipe,
                        help="codebook recipe: 'default' (k-means init, dead-code restarts, EMA) or 'plain' (classic)")
    parser.add_argument("--num-codes", type=int, default=DEFAULTS.num_codes, help="codebook size")
    parser.add_argument("--code-dim", type=int, default=DEFAULTS.code_dim, help="dimension of each code vector")
    parser.add_argument("--beta", type=float, default=DEFAULTS.beta, help="commitment loss weight")
    parser.add_argument("--gradient", choices=("ste", "rotation"), default=DEFAULTS.gradient,
                        help="how the quantizer passes gradients to the encoder: straight through, or the "
                             "rotation trick (Fifty et al., 2024)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction,
                        help="EMA codebook updates instead of codebook gradients (default: the recipe's choice)")
    parser.add_argument("--ema-decay", type=float, default=DEFAULTS.ema_decay, help="EMA codebook decay (with --ema)")
    parser.add_argument("--dead-threshold", type=float, default=DEFAULTS.dead_threshold,
                        help="restart codes whose running usage falls below this share of uniform use")
    parser.add_argument("--channels", type=int, default=DEFAULTS.channels, help="encoder/decoder width")
    parser.add_argument("--res-channels", type=int, default=DEFAULTS.res_channels, help="residual block hidden width")
    parser.add_argument("--res-blocks", type=int, default=DEFAULTS.res_blocks, help="residual blocks in encoder and decoder")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default=DEFAULTS.activation,
                        help="activation of the encoder and decoder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=DEFAULTS.device,
                        help="'auto': CUDA when available (under torchrun: the process's LOCAL_RANK GPU)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (the quantizer stays fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder and decoder")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the weights and the data order")
    parser.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT")
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers,
                        help="CPU threads for torch (0: the cores other processes leave free, said in one line "
                             "when fewer than all); data needs no loader processes since it lives on the device")
    parser.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, help="steps between evaluations and checkpoints")
    parser.add_argument("--eval-images", type=int, default=DEFAULTS.eval_images,
                        help="held-out images for the periodic evaluations (the final one uses all)")
    parser.add_argument("--val-images", type=int, default=DEFAULTS.val_images,
                        help="hold out this many training images (a fixed draw, the same for every seed) and "
                             "evaluate on them instead of the test images; metrics are then named val_*")
    parser.add_argument("--log-every", type=int, default=DEFAULTS.log_every, help="steps between progress-bar updates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--dist-timeout", type=float, default=DEFAULTS.dist_timeout,
                        help="under torchrun: seconds a collective may wait for the other processes before the "
                             "run fails (a dead or stuck process never hangs the others)")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict | None]:
    """(settings, checkpoint or None) of a command line; see vqvae_fast.train.checkpoint.parse_with_resume.
    Invalid settings exit with the parser's usage error (status 2)."""
    args, checkpoint = parse_with_resume(build_parser, argv, RUN_CONTROL, "vqvae_fast/1")
    if checkpoint is not None:
        # Settings that became flags after a checkpoint was written: its model config has the
        # value the run used (not today's default); a model older than the setting had its
        # constructor's default.
        config = checkpoint.get("config", {})
        for key, before in (("dead_threshold", None), ("gradient", None), ("activation", "relu")):
            if key not in checkpoint["args"]:
                if key in config:
                    setattr(args, key, config[key])
                elif before is not None:
                    setattr(args, key, before)
    if args.steps is None and args.epochs is None:
        args.steps = 300
    config = TrainConfig.from_namespace(args)
    problem = config.problem()
    if problem:
        build_parser().error(problem)
    return config, checkpoint


def invalid_setting(args: TrainConfig) -> str | None:
    """What is wrong with the settings, in the words of their flags, or None."""
    checks = [
        ("--steps", args.steps is None or args.steps >= 0, "must be >= 0"),
        ("--epochs", args.epochs is None or args.epochs > 0, "must be > 0"),
        ("--batch-size", args.batch_size >= 1, "must be >= 1"),
        ("--lr", 0 < args.lr < math.inf, "must be a positive number"),
        ("--beta", 0 <= args.beta < math.inf, "must be a finite number >= 0"),
        ("--ema-decay", 0 <= args.ema_decay < 1, "must be in [0, 1)"),
        ("--dead-threshold", 0 <= args.dead_threshold < math.inf, "must be a finite number >= 0"),
        ("--num-codes", args.num_codes >= 1, "must be >= 1"),
        ("--code-dim", args.code_dim >= 1, "must be >= 1"),
        ("--stages", args.stages >= 1, "must be >= 1"),
        ("--quantizer-dropout", 0 <= args.quantizer_dropout <= 1, "must be in [0, 1]"),
        ("--val-images", args.val_images >= 0, "must be >= 0"),
        ("--eval-every", args.eval_every >= 1, "must be >= 1"),
    ]
    for flag, ok, rule in checks:
        if not ok:
            return f"{flag} {rule}, got {getattr(args, flag[2:].replace('-', '_'))}"
    return None


def build_model(config: TrainConfig):
    recipe = dict(RECIPES[config.recipe])
    ema = recipe.pop("ema")
    if config.ema is not None:  # --ema / --no-ema override the recipe
        ema = config.ema
    if config.model == "rqvae":
        recipe.update(stages=config.stages, quantizer_dropout=config.quantizer_dropout)
    return MODEL_CHOICES[config.model](num_codes=config.num_codes, code_dim=config.code_dim, beta=config.beta,
                                       channels=config.channels, res_channels=config.res_channels,
                                       num_res_blocks=config.res_blocks, ema_decay=config.ema_decay if ema else None,
                                       gradient=config.gradient, dead_threshold=config.dead_threshold,
                                       activation=config.activation, **recipe)


def split_validation(train_uint8: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, validation images): `count` images drawn once with a fixed generator,
    so every run and every trial of a study holds out the same ones."""
    if not 0 <= count < train_uint8.shape[0]:
        raise ValueError(f"--val-images must be in [0, {train_uint8.shape[0]}) for {train_uint8.shape[0]} "
                         f"training images, got {count}")
    order = torch.randperm(train_uint8.shape[0], generator=torch.Generator().manual_seed(20241008))
    held = torch.zeros(train_uint8.shape[0], dtype=torch.bool)
    held[order[:count]] = True
    held = held.to(train_uint8.device)
    return train_uint8[~held], train_uint8[held]


def train(args: TrainConfig, checkpoint: dict | None = None,
          report: Callable[[int, dict], None] | None = None,
          on_finish: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Run the training `args` describe (resuming `checkpoint` if given) and return final.json's
    content. Invalid settings raise ValueError naming the flag. `report(step, metrics)` is called after every evaluation (the tuner prunes there).
    Under torchrun every process calls this; rank 0 returns final.json's content, the others {}.
    `on_finish(model)` runs on every process after training, while the process group still exists.
    Raises DataNotFoundError when the images cannot be found."""
    if not isinstance(args, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(args).__name__} (parse_args() makes one from flags)")
    problem = args.problem()
    if problem:
        raise ValueError(problem)
    run, device = distributed.start(pick_device(args.device), args.dist_timeout)
    try:
        return _train(args, checkpoint, report, on_finish, run, device)
    finally:
        distributed.stop()


def _train(args, checkpoint, report, on_finish, run: distributed.Run, device: torch.device) -> dict:
    set_cpu_threads(args.workers)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")

    data = load_cifar10(args.data_dir, download=not args.no_download)
    train_uint8, held_out = data["train"], data["test"]
    split = "test"
    if args.val_images:
        train_uint8, held_out = split_validation(train_uint8, args.val_images)
        split = "val"
    train_uint8, held_out = train_uint8.to(device), held_out.to(device)
    batch_size = min(args.batch_size, train_uint8.shape[0])
    steps_per_epoch = train_uint8.shape[0] // batch_size
    total_steps = args.total_steps(steps_per_epoch)

    model = build_model(args).to(device, memory_format=torch.channels_last)
    train_model = model
    if run.distributed:
        # No buffer broadcast in forward: the quantizers keep their buffers in step themselves (and
        # rank 0's broadcast would overwrite them); parameters start equal (same seed) and DDP checks that.
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              **distributed.ddp_without_buffer_sync())
        if run.is_main:
            print(f"DDP: {run.world} processes ({torch.distributed.get_backend()}), global batch {batch_size} "
                  f"({batch_size // run.world} per process), lr {args.lr}", file=sys.stderr)
    # The codebook is not in the optimizer under EMA (it has no gradient); fused Adam: one kernel on GPUs.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 fused=device.type == "cuda")
    scheduler = None
    if args.lr_schedule == "cosine":
        scheduler = warmup_cosine(optimizer, total_steps, max(1, total_steps // 20))
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None and "scheduler" in checkpoint:
            scheduler.load_state_dict(checkpoint["scheduler"])
        step, elapsed_before = checkpoint["step"], checkpoint["elapsed_s"]
        set_rng_state(checkpoint["rng"], device)
    if args.compile:
        for module in (model.encoder, model.decoder):
            module.compile()  # in place: state_dict keys stay the same

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_args = dataclasses.asdict(args)

    def save(at_step: int, elapsed: float) -> None:  # rank 0 only (fit and below)
        extra = {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
        save_checkpoint(out_dir / "checkpoint.pt", model, optimizer=optimizer.state_dict(), step=at_step,
                        rng=rng_state(device), args=run_args, elapsed_s=elapsed, **extra)

    task = ReconstructionTask(model, train_uint8, held_out, batch_size, args.seed, args.eval_images, split=split,
                              report=report, run=run, train_model=train_model)
    result = fit(task, model, optimizer, steps=total_steps, out_dir=out_dir, save=save, device=device,
                 eval_every=args.eval_every, log_every=args.log_every, amp=args.amp, quiet=args.quiet,
                 desc=f"{args.model} {args.recipe}", start_step=step, elapsed_before=elapsed_before, run=run,
                 scheduler=scheduler)
    if on_finish is not None:
        on_finish(model)
    if not run.is_main:
        return {}

    final = {"model": args.model, "recipe": args.recipe, "steps": result.step, "batch_size": batch_size,
             "lr": args.lr, "lr_schedule": args.lr_schedule, "ema_decay": model.config["ema_decay"], "gradient": model.config["gradient"],
             "seed": args.seed, "device": str(device), "amp": args.amp, "processes": run.world,
             "params": sum(p.numel() for p in model.parameters()), "train_images": train_uint8.shape[0],
             f"{split}_images": held_out.shape[0], **result.metrics, "wall_s": result.wall_s,
             "this_run_s": result.wall_s - elapsed_before,
             "images_per_s": result.items_per_s}
    model.eval()
    final.update(code_budget(model, held_out[:1]))
    save_reconstructions(model, held_out, out_dir / "recon.png")
    save(result.step, final["wall_s"])
    (out_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    return final


@torch.no_grad()
def code_budget(model, image_uint8: torch.Tensor) -> dict:
    """{"codes": codes in all codebooks, "code_bits_per_image": the bits one image's codes take
    (positions x log2 of their codebook's size, over every level or stage)}."""
    levels = model.encode_levels(to_images(image_uint8))
    bits = sum(grid[0].numel() * math.log2(quantizer.num_codes) for grid, quantizer in zip(levels, model.quantizers))
    return {"codes": sum(q.num_codes for q in model.quantizers), "code_bits_per_image": bits}


def seconds(final: dict) -> str:
    """The run's time for the summary line: a resumed run says how much of it was this invocation's."""
    total, this_run = final["wall_s"], final.get("this_run_s", final["wall_s"])
    return f"{total:.0f} s" if abs(total - this_run) < 0.5 else f"{total:.0f} s in all ({this_run:.0f} s this run)"


def main(argv: list[str] | None = None) -> int:
    args, checkpoint = parse_args(argv)
    try:
        final = train(args, checkpoint)
    except DataNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not final:  # not rank 0 of a torchrun job: rank 0 reports
        return 0
    split = "val" if "val_psnr" in final else "test"
    print(f"{split} PSNR {final[f'{split}_psnr']:.2f} dB (MSE {final[f'{split}_mse']:.5f}), "
          f"perplexity {final['perplexity']:.1f}, codes used {final['codes_used']}/{final['codes']}, "
          f"{seconds(final)}, {final['images_per_s']:.0f} images/s -> {args.out}")
    return 0
