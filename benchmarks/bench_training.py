"""End to end: training images/s of the VQ-VAE with each quantizer, against the plain cdist one.

    python benchmarks/bench_training.py                        # CPU, batch 128 of 32x32 images
    python benchmarks/bench_training.py --device cuda --amp    # GPU, encoder/decoder under bf16 autocast
    python benchmarks/bench_training.py --device cuda --amp --preset tokenizer

Presets (--batch-size and --image-size override theirs):

    cifar      the default: batch 128 of 32x32 images, K=512 codes of D=64 on an 8x8 grid per
               image, so N = 64 * 128 = 8192 vectors per step
    tokenizer  an image tokenizer's size: batch 64 of 64x64 images, K=16384 codes of D=64 (the
               default code size) on a 16x16 grid per image, so N = 256 * 64 = 16384 vectors per step

Models, all `vqvae_fast.VQVAE` with its default architecture (two stride-2 levels: 4x
downsampling; the preset sets K), the same initial weights, trained with Adam on the same
random batches:

    default recipe, vqvae_fast[B]   VQVAE(backend=B): k-means init, dead-code restarts, fused op
    plain recipe, vqvae_fast[B]     VQVAE.plain(backend=B): classic recipe, fused op
    plain recipe, cdist quantizer   classic recipe with cdist + argmin + gather and the reference
                                    loss in plain PyTorch: the baseline
    plain recipe, reference         VQVAE.plain() as examples/train_cifar10.py --recipe plain
                                    runs it (float64 lookup)

"plain, vqvae_fast" against "plain, cdist" differs only in the quantizer op. A step is the
training loop's: forward, loss.backward(), optimizer.step(). Models run interleaved, a few
steps each per round, so machine noise hits all alike; medians over rounds are reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import vqvae_fast
from harness import OtherLoad, machine_info, measure_undisturbed, sync, write_json
from providers import cdist_indices, lookup_forward, ours_backends
from vqvae_fast.vector_quantizer import VQOutput, code_counts, usage_stats

BASELINE = "plain recipe, cdist quantizer"
# name: (batch size, image size, VQVAE arguments); every other VQVAE argument is its default.
PRESETS = {
    "cifar": (128, 32, {}),
    "tokenizer": (64, 64, {"num_codes": 16384}),
}


class CdistQuantizer(nn.Module):
    """The classic VQ layer in plain PyTorch: cdist + argmin + gather, reference loss, straight-through.

    Takes and returns what VQVAE expects of its quantizer: (B, D, H, W) in, VQOutput out.
    """

    def __init__(self, codebook: torch.Tensor, beta: float):
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone())
        self.num_codes, self.dim = codebook.shape
        self.quantize = lookup_forward(cdist_indices, beta)

    def forward(self, x: torch.Tensor, *, update: bool | None = None) -> VQOutput:
        moved = x.movedim(1, -1)
        flat = moved.reshape(-1, self.dim).to(self.codebook.dtype)
        quantized, indices, loss = self.quantize(flat, self.codebook)
        perplexity, codes_used = usage_stats(code_counts(indices, self.num_codes))
        return VQOutput(quantized.to(x.dtype).reshape(moved.shape).movedim(-1, 1), indices.reshape(moved.shape[:-1]),
                        loss, perplexity, codes_used, torch.zeros((), dtype=torch.long, device=x.device))


def build_models(device: str, **model_kwargs) -> dict[str, nn.Module]:
    """Every model to compare, all starting from the same weights; model_kwargs go to VQVAE."""
    def fresh(factory, **kwargs):
        torch.manual_seed(0)  # same initial weights (and codebook) for every model
        return factory(**model_kwargs, **kwargs).to(device)

    models = {}
    for backend in ours_backends(device):
        models[f"default recipe, vqvae_fast[{backend}]"] = fresh(vqvae_fast.VQVAE, backend=backend)
        models[f"plain recipe, vqvae_fast[{backend}]"] = fresh(vqvae_fast.VQVAE.plain, backend=backend)
    baseline = fresh(vqvae_fast.VQVAE.plain)
    baseline.quantizer = CdistQuantizer(baseline.quantizer.codebook, baseline.quantizer.beta).to(device)
    models[BASELINE] = baseline
    models["plain recipe, reference"] = fresh(vqvae_fast.VQVAE.plain)
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cifar",
                        help="batch, image size and codebook: cifar (default) or tokenizer (see above)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (128 or 64)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's (32 or 64)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 CPU, 10 GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per model per round (default 2 CPU, 20 GPU)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast, as train_cifar10.py --amp")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-other-load", type=float, default=None, metavar="SHARE",
                        help="on a shared machine: measure again (after waiting for an idle machine, up to 4 "
                             "tries) while other processes used more than this share of the CPUs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = args.device
    rounds = args.rounds or (10 if device == "cuda" else 5)
    steps = args.steps or (20 if device == "cuda" else 2)
    preset_batch, preset_size, model_kwargs = PRESETS[args.preset]
    args.batch_size = args.batch_size or preset_batch
    args.image_size = args.image_size or preset_size

    models = build_models(device, **model_kwargs)
    optimizers = {name: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=args.lr)
                  for name, m in models.items()}
    g = torch.Generator(device=device).manual_seed(0)
    batches = [torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g, device=device)
               for _ in range(4)]

    def train(name: str, count: int, first: int = 0) -> float:
        model, optimizer = models[name], optimizers[name]
        sync(device)
        start = time.perf_counter()
        for i in range(first, first + count):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.amp):
                out = model(batches[i % len(batches)])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        sync(device)
        return time.perf_counter() - start

    for name in models:  # warm-up: k-means init on the first batch, allocator, kernels
        train(name, 2)

    def time_rounds() -> dict:
        """Interleaved rounds: each model trains `steps` steps per round, the order rotating."""
        seconds = {name: [] for name in models}
        names = list(models)
        with OtherLoad() as other_load:
            for r in range(rounds):
                for i in range(len(names)):
                    name = names[(i + r) % len(names)]
                    seconds[name].append(train(name, steps, first=r * steps))
        return dict(seconds=seconds, share=other_load.share)

    measured = measure_undisturbed(time_rounds, lambda m: m["share"], args.max_other_load)
    seconds, other_share = measured["seconds"], measured["share"]

    info = machine_info(device)
    config = models[BASELINE].config
    n_vectors = args.batch_size * (args.image_size // 2 ** config["levels"]) ** 2
    print(f"training step ({args.preset} preset), batch {args.batch_size} of {args.image_size}x{args.image_size} images "
          f"(N={n_vectors} vectors, K={config['num_codes']}, D={config['code_dim']})"
          f"{' bf16 autocast' if args.amp else ''} on {device} "
          f"({info.get('gpu') or info['cpu']}, {info['torch_threads']} threads); median of {rounds} rounds "
          f"of {steps} steps")
    print(f"{'model':<38}{'images/s':>10}{'min..max':>16}{'ms/step':>9}{'vs cdist':>10}")
    rows = []
    base = statistics.median(seconds[BASELINE])
    for name, samples in seconds.items():
        med = statistics.median(samples)
        rate = [args.batch_size * steps / s for s in samples]
        row = dict(model=name, images_per_s=args.batch_size * steps / med, min_images_per_s=min(rate),
                   max_images_per_s=max(rate), ms_per_step=1e3 * med / steps, speedup_vs_cdist=base / med,
                   samples_s=samples)
        rows.append(row)
        print(f"{name:<38}{row['images_per_s']:>10.1f}{f'{min(rate):.1f}..{max(rate):.1f}':>16}"
              f"{row['ms_per_step']:>9.1f}{row['speedup_vs_cdist']:>9.2f}x")
    print(f"other processes used {other_share:.0%} of the machine's CPU time while timing")
    if args.json:
        write_json(args.json, dict(machine=info, preset=args.preset, batch_size=args.batch_size,
                                   image_size=args.image_size, num_codes=config["num_codes"],
                                   code_dim=config["code_dim"], amp=args.amp, rounds=rounds, steps_per_round=steps, n_vectors=n_vectors,
                                   other_processes_cpu_share=other_share, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
