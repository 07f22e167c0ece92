"""The generation pipeline's and the tuner's commands (examples/<name>.py runs each one's `main`):
sample, codes (encode/decode), train_classifier, evaluate_samples, tune_cifar10. The two trainers'
commands are vqvae_fast.train.cifar10 and vqvae_fast.train.prior_trainer."""
