"""Every registered `vqvae_fast::` op has the schema written once in
vqvae_fast/ops/registration.py (SCHEMAS): the C++ library's m.def strings and the Triton
custom ops are checked against it, so no restatement can drift."""
from __future__ import annotations

import pytest
import torch

import vqvae_fast  # noqa: F401  (loads the C++ library, when built)
from vqvae_fast._extension import has_compiled
from vqvae_fast.ops import triton_available
from vqvae_fast.ops.registration import SCHEMAS, schema_arguments

CPP_OPS = ("nearest_code", "quantize_fwd", "quantize_bwd", "cpu_forward_path", "cpu_pack_norms")
TRITON_OPS = ("triton_nearest_code", "triton_quantize_fwd", "triton_quantize_stats_fwd", "triton_quantize_bwd",
              "triton_residual_nearest_code", "triton_residual_quantize_fwd", "triton_stage_losses_bwd",
              "triton_update_codebook_state")


def registered(name: str) -> str:
    return str(getattr(torch.ops.vqvae_fast, name).default._schema)


def test_every_op_is_stated_once():
    assert set(SCHEMAS) == set(CPP_OPS) | set(TRITON_OPS)
    for name, schema in SCHEMAS.items():
        assert schema.startswith(f"{name}("), name
        assert schema_arguments(name).startswith("(") and " -> " in schema_arguments(name)
        torch._C.parse_schema(f"vqvae_fast::{schema}")  # well formed


@pytest.mark.skipif(not has_compiled(), reason="vqvae_fast._C not built")
@pytest.mark.parametrize("name", CPP_OPS)
def test_cpp_op_schema(name):
    assert registered(name) == f"vqvae_fast::{SCHEMAS[name]}"


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_op_schema(name):
    import vqvae_fast.ops.triton_ops  # noqa: F401  (registers the triton_ ops)

    assert registered(name) == f"vqvae_fast::{SCHEMAS[name]}"


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_functions_take_the_schema_arguments(name):
    """The Python functions behind the triton_ ops: the schema's argument names, in order, with its
    defaults (a caller may reach the function with only the arguments it passed)."""
    import inspect

    from vqvae_fast.ops import triton_ops

    schema = getattr(torch.ops.vqvae_fast, name).default._schema
    params = list(inspect.signature(getattr(triton_ops, name)._init_fn).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for param, argument in zip(params, schema.arguments):
        expected = inspect.Parameter.empty if argument.default_value is None and not argument.has_default_value() \
            else argument.default_value
        assert param.default == expected, (name, param.name)


def test_every_registered_op_is_stated():
    """No op of the namespace is left out of SCHEMAS."""
    if triton_available():
        import vqvae_fast.ops.triton_ops  # noqa: F401
    names = {op.split("::", 1)[1].split(".", 1)[0] for op in torch._C._dispatch_get_all_op_names()
             if op.startswith("vqvae_fast::")}
    assert names <= set(SCHEMAS), names - set(SCHEMAS)
    expected = (set(CPP_OPS) if has_compiled() else set()) | (set(TRITON_OPS) if triton_available() else set())
    assert expected <= names
