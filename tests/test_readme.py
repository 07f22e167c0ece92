"""The README's Python snippets run, as written, and say what they claim (issue 19, item 4).

Every ```python (or ```py, ```python3) fenced block of README.md is named by the section it sits
in and its place there ("API #1": the first Python block under "## API") and must appear in
exactly one of RUN and NOT_RUNNABLE below; a new block in neither, or an entry whose block is
gone, fails test_every_python_block_is_run_or_listed. A block with `import vqvae_fast` under
another fence (or none) fails too: it would escape both lists.

Each block in RUN is executed unchanged (same sizes: both take well under a second on the CPU),
in a fresh namespace, with a temporary directory as the working directory, after its setup (the
files it expects the README's earlier steps to have written), then its checks assert what the
block's comments and the surrounding text claim. Tracebacks point at README.md's own lines.

Blocks that belong together: none are chained. The model block's last line loads
"runs/default/checkpoint.pt", which the Quick start's bash command
(`python examples/train_cifar10.py --data-dir data --steps 300 --out runs/default`) writes: its
setup runs that command's entry point first, into the temporary directory, with 2 steps of a tiny
model on the synthetic `toy_cifar` batches (tests/conftest.py), so the line loads a real
trainer-written checkpoint.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PYTHON_TAGS = {"python", "py", "python3"}


@dataclass
class Block:
    key: str  # "<section heading> #<n-th Python block in that section>"
    tag: str
    line: int  # README line of the block's first code line (1-based)
    code: str


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of the README, with the heading it sits under (Python ones numbered)."""
    blocks, heading, counts = [], "(before any heading)", {}
    fence, tag, start, body = None, "", 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            opening = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)", line)
            if opening:
                fence, tag, start, body = opening.group(1), opening.group(2).lower(), number + 1, []
            elif re.match(r"^#{1,6}\s", line):
                heading = line.lstrip("#").strip()
        elif re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
            key = heading
            if tag in PYTHON_TAGS:
                counts[heading] = counts.get(heading, 0) + 1
                key = f"{heading} #{counts[heading]}"
            blocks.append(Block(key, tag, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the fence opened above line {start} is never closed"
    return blocks


def python_blocks() -> dict[str, Block]:
    return {b.key: b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.tag in PYTHON_TAGS}


# ---------------------------------------------------------------------------------------------
# Blocks not run, each with its reason. Empty today: every Python block of the README runs.
# Add "<section> #<n>": "why" for a block that cannot run here (a GPU-only or multi-process
# example, a placeholder path no setup can provide), never to hide a failure.
NOT_RUNNABLE: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Blocks run: setup (given the pytest fixtures it asks for, in the temporary working directory)
# and checks (given the namespace the block left).

@dataclass
class Run:
    checks: Callable[[dict], None]
    setup: Callable[..., None] | None = None
    fixtures: tuple[str, ...] = ()
    # statement index -> (name, alias): before that statement runs, the value of name is kept as alias
    snapshots: dict[int, tuple[str, str]] = field(default_factory=dict)


def check_api(ns: dict) -> None:
    import vqvae_fast

    z, codebook, idx = ns["z"], ns["codebook"], ns["idx"]
    assert idx.shape == (4096,) and idx.dtype == torch.int64  # "(N,) int64"
    quantized, indices, loss = ns["quantized"], ns["indices"], ns["loss"]
    assert isinstance(vqvae_fast.quantize(z, codebook), vqvae_fast.QuantizeOutput)
    assert torch.equal(indices, idx)
    assert torch.equal(quantized, codebook[indices])  # "bit for bit codebook[indices]"
    assert loss.dim() == 0 and loss.requires_grad  # differentiable w.r.t. the codebook
    expected = ((codebook[indices] - z) ** 2).mean() * 1.25  # codebook term + beta 0.25 commitment
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    out = ns["out"]
    assert out.quantized.shape == (8, 64, 16, 16)  # (B, D, H, W) in, same layout out
    assert out.indices.shape == (8, 16, 16) and out.indices.dtype == torch.int64
    quantized_, indices_, loss_ = out  # "It returns (quantized, indices, loss)"
    for name in ("perplexity", "codes_used", "dead_codes"):
        assert getattr(out, name).dim() == 0, name


def checkpoint_from_quick_start(toy_cifar: Path) -> None:
    """Write runs/default/checkpoint.pt as the Quick start's command does, at a tiny size."""
    spec = importlib.util.spec_from_file_location("readme_train_cifar10", REPO / "examples/train_cifar10.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    tiny = ["--device", "cpu", "--no-download", "--batch-size", "16", "--num-codes", "32", "--code-dim", "8",
            "--channels", "16", "--res-channels", "8", "--res-blocks", "1", "--quiet"]
    assert trainer.main(["--data-dir", str(toy_cifar), "--steps", "2", "--out", "runs/default", *tiny]) == 0
    assert Path("runs/default/checkpoint.pt").is_file()


def check_model(ns: dict) -> None:
    import vqvae_fast

    built, x = ns["model_as_built"], ns["x"]
    assert built.config["num_codes"] == 512 and built.config["code_dim"] == 64  # "512 codes x 64"
    assert built.config["beta"] == 0.25
    params = sum(p.numel() for p in built.parameters())
    assert 1.5e6 < params < 1.7e6, params  # "~1.6 M params"
    out = ns["out"]
    for name in ("reconstruction", "indices", "loss", "recon_loss", "vq_loss", "mse", "perplexity",
                 "codes_used", "dead_codes"):
        value = getattr(out, name)
        assert name in ("reconstruction", "indices") or value.dim() == 0, name  # "(0-dim tensors)"
    assert out.reconstruction.shape == x.shape
    assert all(p.grad is not None for p in built.encoder.parameters())  # loss.backward() reached the encoder
    codes, images = ns["codes"], ns["images"]
    assert codes.shape == (8, 8, 8) and codes.dtype == torch.int64  # "32x32 -> 8x8 codes"
    assert images.shape == (8, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, built.reconstruct(x))  # "equals model.reconstruct(x)"
    loaded = ns["model"]
    assert isinstance(loaded, vqvae_fast.VQVAE) and not loaded.training  # "eval mode"
    assert loaded.config["num_codes"] == 32  # the quick-start run's model, not a fresh one
    assert loaded.decode(loaded.encode(x)).shape == x.shape


RUN: dict[str, Run] = {
    "API #1": Run(check_api),
    "VQ-VAE model and CIFAR-10 trainer #1": Run(
        check_model, setup=checkpoint_from_quick_start, fixtures=("toy_cifar",),
        snapshots={-1: ("model", "model_as_built")}),  # before the last line replaces `model` with the loaded one
}


# ---------------------------------------------------------------------------------------------

def test_every_python_block_is_run_or_listed():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    keys = [b.key for b in blocks if b.tag in PYTHON_TAGS]
    assert len(keys) == len(set(keys))
    assert not set(RUN) & set(NOT_RUNNABLE), "a block is both run and listed as not runnable"
    unlisted = sorted(set(keys) - set(RUN) - set(NOT_RUNNABLE))
    assert not unlisted, f"README Python blocks neither run nor listed in NOT_RUNNABLE: {unlisted}"
    stale = sorted((set(RUN) | set(NOT_RUNNABLE)) - set(keys))
    assert not stale, f"entries for README Python blocks that no longer exist: {stale}"
    assert all(reason.strip() for reason in NOT_RUNNABLE.values())
    hidden = [f"README.md:{b.line} (```{b.tag})" for b in blocks if b.tag not in PYTHON_TAGS
              and re.search(r"^\s*(import|from)\s+vqvae_fast\b", b.code, re.M)]
    assert not hidden, f"Python code outside a ```python fence, so never run: {hidden}"


def run_block(block: Block, snapshots: dict[int, tuple[str, str]]) -> dict:
    """Execute the block statement by statement in a fresh namespace (line numbers: README.md's)."""
    tree = ast.parse(block.code, filename=str(README))
    ast.increment_lineno(tree, block.line - 1)
    statements = tree.body
    wanted = {i % len(statements): names for i, names in snapshots.items()}
    ns: dict = {"__name__": "__readme__"}
    for i, statement in enumerate(statements):
        if i in wanted:
            name, alias = wanted[i]
            ns[alias] = ns[name]
        exec(compile(ast.Module([statement], type_ignores=[]), str(README), "exec"), ns)
    return ns


@pytest.mark.parametrize("key", sorted(RUN))
def test_readme_block_runs(key, request, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert key in blocks, f"README.md has no Python block {key!r} any more"
    spec = RUN[key]
    monkeypatch.chdir(tmp_path)
    if spec.setup is not None:
        spec.setup(*(request.getfixturevalue(name) for name in spec.fixtures))
    spec.checks(run_block(blocks[key], spec.snapshots))
