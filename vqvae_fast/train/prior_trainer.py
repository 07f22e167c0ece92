"""The class-conditional prior's trainer: its settings (`build_parser`) and `main`, which
`examples/train_prior.py` runs from the command line.

    python examples/train_prior.py --vqvae runs/default/checkpoint.pt \
        --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py --out runs/prior

Encodes the CIFAR-10 folder with the VQ-VAE (the training images and their mirror images, and
the test images: OUT/codes.pt), then trains a small causal transformer over the code grids
given the class (vqvae_fast/models/prior.py says why a transformer). Writes OUT/metrics.jsonl (one
line per evaluation: held-out bits per code), OUT/samples.png (a few samples of every class,
refreshed at each evaluation), OUT/checkpoint.pt (the prior with its VQ-VAE: what
examples/sample.py reads) and OUT/final.json, whose `test_bits_per_code` (held-out negative
log-likelihood per code position, in bits) stands next to `unigram_bits_per_code` (the training
codes' frequencies as a model of the same held-out codes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, atomic_save, read_checkpoint
from ..models.prior import CodePrior, unigram_bits_per_code
from ..models.vqvae import KINDS, model_from_checkpoint, model_kind
from .checkpoint import parse_with_resume, rng_state, set_rng_state
from .codes import CIFAR10_CLASSES, encode_dataset, load_codes, save_codes
from .data import DataNotFoundError, load_cifar10
from .cifar10 import seconds
from .generation import PRIOR_FORMAT, PriorTask, prior_payload
from .loop import (HelpFormatter, NoEmptyFolderLeft, add_device_and_seed, fit, pick_device, set_cpu_threads,
                   warmup_cosine)

RUN_CONTROL = ("vqvae", "data_dir", "codes", "model", "no_download", "out", "steps", "device", "workers", "compile",
               "eval_every", "log_every", "quiet", "resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a class-conditional prior over the codes of a trained "
                                                 "VQ-VAE (or VQ-VAE-2).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--vqvae", help="checkpoint.pt of examples/train_cifar10.py (VQ-VAE or VQ-VAE-2)")
    parser.add_argument("--data-dir", help="the cifar-10-batches-py folder (or its parent) to encode")
    parser.add_argument("--codes", help="a codes file of examples/codes.py encode, instead of --vqvae/--data-dir")
    parser.add_argument("--model", choices=KINDS,
                        help="optional check: the VQ-VAE must be of this kind (the prior follows its levels anyway)")
    parser.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    parser.add_argument("--no-flips", action="store_true", help="do not add the mirror images' codes to training")
    parser.add_argument("--out", default="runs/prior", help="output folder")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64, help="code grids per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of the weight matrices")
    parser.add_argument("--dim", type=int, default=192, help="transformer width")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=6, help="attention heads")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout in the transformer blocks")
    parser.add_argument("--class-dropout", type=float, default=0.1,
                        help="share of training labels replaced by 'no class', so samples can use guidance")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the sample grids")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the prior's training forward")
    add_device_and_seed(parser, "seed of the prior's weights, the batch order and the class dropout")
    parser.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT")
    parser.add_argument("--workers", type=int, default=0,
                        help="CPU threads for torch (0: the cores other processes leave free, said in one line "
                             "when fewer than all)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between evaluations and checkpoints")
    parser.add_argument("--log-every", type=int, default=10, help="steps between progress-bar updates")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def load_or_encode(args: argparse.Namespace, device: torch.device, out_dir: Path) -> dict:
    """The codes payload: --codes, or OUT/codes.pt from an earlier invocation of this run, or the
    CIFAR-10 folder encoded now with --vqvae (and saved to OUT/codes.pt)."""
    if args.codes:
        return load_codes(args.codes)
    cached = out_dir / "codes.pt"
    if args.resume and cached.is_file():
        return load_codes(cached)
    if not args.vqvae or not args.data_dir:
        raise ValueError("give --vqvae CKPT and --data-dir DIR (or --codes FILE)")
    try:
        vqvae = read_checkpoint(args.vqvae, "vqvae_fast/1")
    except CheckpointError as error:
        raise ValueError(f"--vqvae: {error}") from None
    data = load_cifar10(args.data_dir, download=not args.no_download)
    payload = encode_dataset(vqvae, {"train": (data["train"], data["train_labels"]),
                                     "test": (data["test"], data["test_labels"])},
                             device=device, flips=not args.no_flips, class_names=CIFAR10_CLASSES)
    save_codes(payload, cached)
    return payload


def main(argv: list[str] | None = None) -> int:
    args, checkpoint = parse_with_resume(build_parser, argv, RUN_CONTROL, PRIOR_FORMAT)
    device = pick_device(args.device)
    set_cpu_threads(args.workers)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    with NoEmptyFolderLeft(out_dir) as folder:  # a bad --vqvae or --data-dir leaves no empty OUT behind
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            payload = load_or_encode(args, device, out_dir)
        except (DataNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            folder.failed()
            return 2

    kind = model_kind(payload["vqvae"])
    if args.model and args.model != kind:
        print(f"error: --model {args.model}, but the VQ-VAE is a {kind}", file=sys.stderr)
        return 2
    splits = payload["splits"]
    train_parts = [splits["train"]] + ([splits["train_flipped"]] if "train_flipped" in splits and not args.no_flips
                                       else [])
    train_codes = tuple(torch.cat([part["codes"][level] for part in train_parts]).to(device)
                        for level in range(len(payload["levels"])))
    train_labels = torch.cat([part["labels"] for part in train_parts]).to(device)
    test_codes = tuple(c.to(device) for c in splits["test"]["codes"])
    test_labels = splits["test"]["labels"].to(device)
    class_names = payload["class_names"]
    level_codes = [level["num_codes"] for level in payload["levels"]]

    prior = CodePrior([level["shape"] for level in payload["levels"]], level_codes, num_classes=len(class_names),
                      dim=args.dim, depth=args.depth, heads=args.heads, dropout=args.dropout).to(device)
    vqvae = model_from_checkpoint(payload["vqvae"]).to(device)
    decay = [p for n, p in prior.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in prior.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = warmup_cosine(optimizer, args.steps, args.warmup)
    step, elapsed_before = 0, 0.0
    if checkpoint is not None:
        prior.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step, elapsed_before = checkpoint["step"], checkpoint["elapsed_s"]
        set_rng_state(checkpoint["rng"], device)
    if args.compile:
        prior.compile()  # in place: state_dict keys stay the same

    run_args = vars(args)

    def save(at_step: int, elapsed: float) -> None:
        atomic_save(prior_payload(prior, payload["vqvae"], class_names, optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), step=at_step, rng=rng_state(device),
                                  args=run_args, elapsed_s=elapsed), out_dir / "checkpoint.pt")

    task = PriorTask(prior, vqvae, (train_codes, train_labels), (test_codes, test_labels), args.batch_size,
                     args.seed, out_dir, class_names, class_dropout=args.class_dropout, guidance=args.guidance)
    result = fit(task, prior, optimizer, steps=args.steps, out_dir=out_dir, save=save, device=device,
                 eval_every=args.eval_every, log_every=args.log_every, amp=args.amp, quiet=args.quiet,
                 desc="prior", start_step=step, elapsed_before=elapsed_before, scheduler=scheduler)
    save(result.step, result.wall_s)

    baseline = unigram_bits_per_code(train_codes, test_codes, level_codes)
    positions = prior.length
    final = {"steps": result.step, "batch_size": args.batch_size, "params": sum(p.numel() for p in prior.parameters()),
             "levels": payload["levels"], "train_grids": train_labels.shape[0], "test_grids": test_labels.shape[0],
             **result.metrics, **baseline,
             "test_bits_per_image": result.metrics["test_bits_per_code"] * positions,
             "unigram_bits_per_image": baseline["unigram_bits_per_code"] * positions,
             "gain_bits_per_code": baseline["unigram_bits_per_code"] - result.metrics["test_bits_per_code"],
             "wall_s": result.wall_s, "this_run_s": result.wall_s - elapsed_before, "grids_per_s": result.items_per_s, "device": str(device), "seed": args.seed}
    (out_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"held-out {final['test_bits_per_code']:.3f} bits per code (unigram {final['unigram_bits_per_code']:.3f}: "
          f"{final['gain_bits_per_code']:+.3f} better), {seconds(final)} -> {out_dir}")
    return 0
