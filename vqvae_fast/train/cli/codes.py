"""Images to code grids and back, with a trained VQ-VAE (or VQ-VAE-2).

    python examples/codes.py encode --vqvae runs/default/checkpoint.pt \
        --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py --out runs/codes.pt
    python examples/codes.py encode --vqvae runs/default/checkpoint.pt --images my_folder --out runs/mine.pt
    python examples/codes.py decode --codes runs/codes.pt --split test --count 64 --out runs/decoded.png

`encode` writes one file: every split's code grids (every level) and labels, with the VQ-VAE
that made them (so the codes decode without anything else). A folder of images: sub-folders are
classes (torchvision's ImageFolder layout), images are resized to 32x32. `decode` writes the
images of the first --count grids of a split as a PNG grid (and --tensor FILE: all of them as
uint8). examples/train_prior.py reads such a file with --codes.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torchvision.utils import save_image

from ...checkpoint import CheckpointError, read_checkpoint
from ...models.vqvae import model_from_checkpoint
from ..codes import CIFAR10_CLASSES, decode_codes, encode_dataset, load_codes, load_image_folder, save_codes
from ..data import DataNotFoundError, load_cifar10
from ..loop import pick_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode", help="images -> codes file")
    encode.add_argument("--vqvae", required=True, help="checkpoint.pt of examples/train_cifar10.py")
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="a cifar-10-batches-py folder (or its parent): splits train and test")
    source.add_argument("--images", help="a folder of images (sub-folders: classes): split 'images'")
    encode.add_argument("--flips", action="store_true", help="also encode the training images' mirror images")
    encode.add_argument("--out", required=True, help="the codes file to write")
    encode.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="'auto' (the default): CUDA when available")
    decode = commands.add_parser("decode", help="codes file -> images")
    decode.add_argument("--codes", required=True, help="a file written by `encode`")
    decode.add_argument("--split", help="which split's grids (default: the file's only split, else test)")
    decode.add_argument("--count", type=int, default=64, help="grids in the PNG (default: 64)")
    decode.add_argument("--out", required=True, help="the PNG grid to write")
    decode.add_argument("--tensor", help="also write every decoded image of the split here (uint8, torch.save)")
    decode.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="'auto' (the default): CUDA when available")
    return parser


def encode(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    checkpoint = read_checkpoint(args.vqvae, "vqvae_fast/1")
    if args.data_dir:
        data = load_cifar10(args.data_dir, download=False)
        splits = {"train": (data["train"], data["train_labels"]), "test": (data["test"], data["test_labels"])}
        class_names = CIFAR10_CLASSES
    else:
        images, labels, class_names = load_image_folder(args.images)
        splits = {"images": (images, labels)}
    start = time.perf_counter()
    payload = encode_dataset(checkpoint, splits, device=device, flips=args.flips, class_names=class_names)
    seconds = time.perf_counter() - start
    save_codes(payload, args.out)
    count = sum(split["labels"].shape[0] for split in payload["splits"].values())
    shapes = " + ".join(f"{h}x{w}" for h, w in (level["shape"] for level in payload["levels"]))
    print(f"{count} images -> {shapes} codes in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s) -> {args.out}")
    return 0


def decode(args: argparse.Namespace) -> int:
    payload = load_codes(args.codes)
    if args.split is None:  # a file of one split (e.g. --images): that one
        args.split = next(iter(payload["splits"])) if len(payload["splits"]) == 1 else "test"
    if args.split not in payload["splits"]:
        raise ValueError(f"{args.codes} has no split {args.split!r}; it has {', '.join(payload['splits'])}")
    model = model_from_checkpoint(payload["vqvae"]).to(pick_device(args.device))
    codes = payload["splits"][args.split]["codes"]
    images = decode_codes(model, tuple(c if args.tensor else c[:args.count] for c in codes))
    save_image(images[:args.count].float() / 255, args.out, nrow=16)
    if args.tensor:
        torch.save({"images": images, "labels": payload["splits"][args.split]["labels"]}, args.tensor)
    print(f"{min(args.count, images.shape[0])} images -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return encode(args) if args.command == "encode" else decode(args)
    except (CheckpointError, DataNotFoundError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
