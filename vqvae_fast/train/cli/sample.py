"""Sample images of chosen classes from a trained prior (examples/train_prior.py).

    python examples/sample.py --prior runs/prior/checkpoint.pt --per-class 10 --out runs/samples

Writes DIR/samples.png (a grid, one row per class, labelled) and DIR/samples.pt =
{"images": uint8 (M, 3, 32, 32), "labels": int64 (M,)}. The same --seed gives the same images
on the same device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ...models.vqvae import KINDS, model_kind
from ..generation import class_grid_labels, generate, load_generator, save_labelled_grid
from ..loop import HelpFormatter, add_device_and_seed, pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--prior", required=True, help="checkpoint.pt of examples/train_prior.py")
    parser.add_argument("--model", choices=KINDS,
                        help="optional check: the prior's VQ-VAE must be of this kind")
    parser.add_argument("--per-class", type=int, default=10, help="samples of each class")
    parser.add_argument("--classes", nargs="+", help="class names or numbers (default: every class)")
    parser.add_argument("--out", default="runs/samples", help="output folder")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (< 1: safer samples)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely codes of each step")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="classifier-free guidance (1: the plain conditional model; higher: the class shows "
                             "more clearly, with less variety)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples drawn at once")
    add_device_and_seed(parser, "seed of the samples (the same seed and settings give the same images)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def resolve_classes(requested, class_names: list[str]) -> list[int]:
    if not requested:
        return list(range(len(class_names)))
    out = []
    for item in requested:
        if item.isdigit() and int(item) < len(class_names):
            out.append(int(item))
        elif item in class_names:
            out.append(class_names.index(item))
        else:
            raise SystemExit(f"error: unknown class {item!r}; the prior knows {', '.join(class_names)} "
                             f"(or 0..{len(class_names) - 1})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be >= 1")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be >= 1")
    if args.guidance < 0:
        parser.error("--guidance must be >= 0")
    device = pick_device(args.device)
    try:
        prior, vqvae, class_names, checkpoint = load_generator(args.prior, device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kind = model_kind(checkpoint["vqvae"])
    if args.model and args.model != kind:
        print(f"error: --model {args.model}, but the prior's VQ-VAE is a {kind}", file=sys.stderr)
        return 2
    classes = resolve_classes(args.classes, class_names)
    labels = class_grid_labels(classes, args.per_class)
    start = time.perf_counter()
    images = generate(prior, vqvae, labels, temperature=args.temperature, top_k=args.top_k, guidance=args.guidance,
                      seed=args.seed, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_labelled_grid(images, labels, class_names, out / "samples.png", args.per_class)
    torch.save({"images": images, "labels": labels}, out / "samples.pt")
    print(f"{images.shape[0]} samples ({len(classes)} classes) in {seconds:.1f} s -> {out}/samples.png, samples.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
