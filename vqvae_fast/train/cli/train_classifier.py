"""Train a small CIFAR-10 classifier: the yardstick of class-conditional samples.

    python examples/train_classifier.py --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        --out runs/classifier

Trained on the training images only (flips, random crops), by the same loop as the other
trainers; OUT/final.json has its held-out `test_accuracy`, OUT/checkpoint.pt its weights
(for examples/evaluate_samples.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...checkpoint import atomic_save
from ...models.classifier import Classifier
from ..checkpoint import rng_state
from ..classification import ClassifierTask
from ..data import DataNotFoundError, load_cifar10
from ..loop import HelpFormatter, add_device_and_seed, fit, pick_device, warmup_cosine

FORMAT = "vqvae_fast/classifier/1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a cifar-10-batches-py folder (or its parent)")
    parser.add_argument("--out", default="runs/classifier", help="output folder")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage")
    add_device_and_seed(parser, "seed of the weights, the data order and the augmentation")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations and checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    try:
        data = load_cifar10(args.data_dir, download=False)
    except DataNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Classifier(width=args.width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    scheduler = warmup_cosine(optimizer, args.steps, min(200, args.steps // 10 + 1))

    def save(step: int, elapsed: float) -> None:
        atomic_save({"format": FORMAT, "config": model.config, "model": model.state_dict(), "step": step,
                     "rng": rng_state(device), "args": vars(args), "elapsed_s": elapsed}, out_dir / "checkpoint.pt")

    task = ClassifierTask(model, (data["train"].to(device), data["train_labels"].to(device)),
                          (data["test"].to(device), data["test_labels"].to(device)), args.batch_size, args.seed)
    result = fit(task, model, optimizer, steps=args.steps, out_dir=out_dir, save=save, device=device,
                 eval_every=args.eval_every, quiet=args.quiet, desc="classifier", scheduler=scheduler)
    save(result.step, result.wall_s)
    final = {"steps": result.step, **result.metrics, "train_images": data["train"].shape[0],
             "test_images": data["test"].shape[0], "wall_s": result.wall_s}
    (out_dir / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    print(f"held-out accuracy {final['test_accuracy']:.3f} on {final['test_images']} images, "
          f"{final['wall_s']:.0f} s -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
