"""The application around the library: the one training loop (loop.py) and what it trains.

    loop.py            fit() and Task: the loop every trainer shares
    checkpoint.py      RNG state and --resume of a training checkpoint (files: vqvae_fast.checkpoint)
    data.py            CIFAR-10 batches from disk (or a download)
    cifar10.py         the VQ-VAE trainer (examples/train_cifar10.py's command line and TrainConfig)
    reconstruction.py  its Task: reconstruction loss, PSNR, codebook statistics
    tuning.py          Optuna search over the trainer's settings
    codes.py           encode a dataset to code grids and back
    generation.py      the prior's Task, sampling, prior checkpoints
    classification.py  the sample classifier's Task
    metrics.py         PSNR and FID

It imports the models and the library below it; nothing below imports it.
"""
