"""The package's layers import only downward: the library (ops, functional, reference,
vector_quantizer, distributed, checkpoint) never imports the models or the training code, and
the models never import the training code. Read from the source (every import statement,
function-level ones included), so a lazy import cannot hide a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vqvae_fast"
LAYERS = {"library": 0, "models": 1, "train": 2}


def layer(module: str) -> str:
    """'library', 'models' or 'train' of a dotted module name inside vqvae_fast."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("models", "train") else "library"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The vqvae_fast modules a file imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: list[str]) -> set[str]:
    """The vqvae_fast modules that `source`, a module of `package`, imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
            found.update(n for n in [base, *names] if n.startswith("vqvae_fast"))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vqvae_fast"))
    return found


# vqvae_fast/__init__.py is the façade: it re-exports the public names of every layer.
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downward(path):
    own = layer(module_name(path))
    upward = sorted(m for m in imported_modules(path) if LAYERS[layer(m)] > LAYERS[own])
    assert not upward, f"{module_name(path)} ({own}) imports {upward} from a layer above it"


def test_the_check_sees_a_violation():
    """Relative and absolute, module-level and lazy imports are all resolved."""
    assert "vqvae_fast.vector_quantizer" in imported_modules(PACKAGE / "models" / "vqvae.py")
    source = "def f():\n    from ..train.loop import fit\nimport vqvae_fast.train.data\n"
    found = imports_in(source, ["vqvae_fast", "models"])
    assert {"vqvae_fast.train.loop", "vqvae_fast.train.loop.fit", "vqvae_fast.train.data"} <= found
    assert {layer(m) for m in found} == {"train"}


def test_the_public_api_keeps_its_names():
    import vqvae_fast

    for name in ("VQVAE", "VQVAE2", "load_checkpoint", "CheckpointError", "VectorQuantizer", "quantize",
                 "nearest_code", "quantize_with_code_stats", "InputError"):
        assert hasattr(vqvae_fast, name), name
