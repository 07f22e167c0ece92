"""One training step of VectorQuantizer as a whole: the per-code statistics out of the search,
the codebook update in two Triton launches (equal to its plain-PyTorch form), the kernel
launches per step, and the step under torch.compile (CUDA graphs on a GPU)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import HAS_CUDA, backend_device
from vqvae_fast import VectorQuantizer
from vqvae_fast.functional import quantize_with_code_stats
from vqvae_fast.vector_quantizer import LAPLACE_EPS, update_codebook_state

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", ((300, 77, 40), (40, 333, 24), (9, 45, 520)), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("deterministic", (False, True), ids=("atomics", "deterministic"))
def test_code_stats_of_the_search_match_a_plain_count(dtype, shape, deterministic):
    device = backend_device("triton")
    n, k, d = shape
    z, codebook = torch.randn(n, d, device=device).to(dtype), torch.randn(k, d, device=device).to(dtype)
    torch.use_deterministic_algorithms(deterministic)
    out = quantize_with_code_stats(z, codebook, backend="triton", with_sums=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected_counts = torch.bincount(out.indices, minlength=k).float()
    expected_sums = torch.zeros(k, d, dtype=acc, device=device).index_add_(0, out.indices, z.to(acc))
    assert torch.equal(out.counts, expected_counts)
    assert out.sums.dtype == acc
    torch.testing.assert_close(out.sums, expected_sums, rtol=1e-6, atol=1e-5)
    if deterministic:  # fixed-order sums: the same bits twice
        assert torch.equal(quantize_with_code_stats(z, codebook, backend="triton", with_sums=True).sums, out.sums)
    counts_only = quantize_with_code_stats(z, codebook, backend="triton")
    assert torch.equal(counts_only.counts, expected_counts) and counts_only.sums.numel() == 0


def _state(k, d, ema, generator):
    usage = torch.rand(k, generator=generator) * 0.3  # about a third of the codes below 0.1: dead
    ema_count = torch.rand(k, generator=generator) * 5 if ema else None
    ema_sum = torch.randn(k, d, generator=generator) if ema else None
    return usage, ema_count, ema_sum, torch.randn(k, d, generator=generator)


@pytest.mark.parametrize("ema", (None, 0.8), ids=("learned", "ema"))
@pytest.mark.parametrize("restart", (False, True), ids=("keep", "restart"))
@pytest.mark.parametrize("normalize", (False, True), ids=("euclidean", "cosine"))
@pytest.mark.parametrize("gather", (False, True), ids=("candidates", "rows"))
def test_triton_codebook_update_matches_its_plain_form(ema, restart, normalize, gather):
    device = backend_device("triton")
    import vqvae_fast.ops.triton_ops  # noqa: F401,I001  (registers the op)

    g = torch.Generator().manual_seed(3)
    k, d, n = 70, 19, 150
    counts = torch.bincount(torch.randint(0, k // 2, (n,), generator=g), minlength=k).float()  # half the codes unused
    sums = torch.randn(k, d, generator=g)
    flat = torch.randn(n, d, generator=g)
    rows = torch.randint(0, n, (k,), generator=g) if gather else None
    candidates = flat if gather else torch.randn(k, d, generator=g)
    results = []
    for update in (update_codebook_state, torch.ops.vqvae_fast.triton_update_codebook_state):
        state = [t.to(device) if t is not None else None for t in _state(k, d, ema is not None, torch.Generator().manual_seed(5))]
        report = update(*state, counts.to(device), sums.to(device), candidates.to(device),
                        rows.to(device) if rows is not None else None, usage_decay=0.9, ema_decay=ema,
                        dead_threshold=0.1, restart=restart, normalize=normalize, laplace_eps=LAPLACE_EPS)
        results.append((state, report))
    (plain, plain_report), (fused, fused_report) = results
    for a, b in zip(plain, fused):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(fused_report[0], plain_report[0], rtol=2e-6, atol=0)
    assert torch.equal(fused_report[1], plain_report[1])
    assert int(plain_report[1][1]) > 5, "the state no longer has dead codes to test"


def test_training_steps_agree_between_the_cpu_and_triton_layers():
    """Five steps with k-means init, EMA and restarts: the same codes and (to rounding) the
    same codebook state whether the layer runs on the cpu or the triton backend."""
    device = backend_device("triton")
    states = []
    for backend in ("cpu", "triton") if device == "cpu" else ("reference", "triton"):
        torch.manual_seed(0)
        vq = VectorQuantizer(48, 12, ema_decay=0.8, kmeans_init=True, restart_dead=True, dead_threshold=0.3,
                             backend=backend).to(device)
        data = torch.Generator().manual_seed(1)
        codes = []
        for _ in range(5):
            out = vq(torch.randn(200, 12, generator=data).to(device))
            codes.append(out.indices)
        states.append((vq.state_dict(), codes, int(out.dead_codes)))
    (a, codes_a, _), (b, codes_b, _) = states
    for step, (x, y) in enumerate(zip(codes_a, codes_b)):
        assert torch.equal(x, y), f"step {step}: the layers chose different codes"
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=name)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that launch a kernel on a GPU (views and allocations launch none)."""
    NO_KERNEL = {"view", "_unsafe_view", "reshape", "permute", "expand", "unsqueeze", "squeeze", "detach", "alias",
                 "slice", "select", "t", "transpose", "as_strided", "empty", "empty_like", "empty_strided",
                 "new_empty", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.NO_KERNEL and not name.startswith("triton_"):  # our ops: counted by launch below
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_launches(monkeypatch):
    """Names of the Triton kernels launched, in order."""
    from vqvae_fast.ops import triton_nearest_code as kernels

    launched = []
    cls = type(kernels._search_kernel)
    run = cls.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__ if hasattr(self, "fn") and hasattr(self.fn, "__name__") else self.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", counting_run)
    return launched


@pytest.mark.parametrize("ema", (0.99, None), ids=("ema", "learned"))
@pytest.mark.parametrize("distance", ("euclidean", "cosine"))
@pytest.mark.parametrize("rows", (256, 40), ids=("one-split", "split-codebook"))
def test_kernel_launches_per_training_step(rows, distance, ema, triton_launches):
    """Forward and backward of the layer with EMA and dead-code restarts (after its k-means
    init): a copy of the codebook (the update rewrites it), the search with its statistics
    (5 launches, +1 merge when the codebook is split), one draw of restart candidates, the
    update (2), and grad_z. Nothing else launches, and nothing waits for the GPU. Cosine: the
    same, normalised inside the kernels, and one launch for the norms of the backward. A learned
    codebook (no EMA): + the codebook gradient (+ its normalisation's, cosine) in the backward.
    (aten ops inside our own ops, such as the zero fill of a codebook gradient, are not counted.)"""
    device = backend_device("triton")
    if device == "cuda" and rows == 40:
        rows = 4  # fewer row blocks than SMs: the split plan on a GPU too
    if device == "cuda" and rows == 256:
        rows = 65536  # enough row blocks for every SM: one split
    vq = VectorQuantizer(256, 16, ema_decay=ema, kmeans_init=True, kmeans_iters=2, restart_dead=True,
                         backend="triton", distance=distance).to(device)
    x = torch.randn(rows, 16, device=device, requires_grad=True)
    vq(x)  # k-means init and (on a GPU) autotuning
    g = torch.randn(rows, 16, device=device)
    triton_launches.clear()
    with _CountOps() as forward:
        out = vq(x)
    forward_launches = list(triton_launches)
    loss = out.loss + (out.quantized * g).sum()
    triton_launches.clear()
    with _CountOps() as backward:
        loss.backward()
    search = ["_stats_kernel", "_prepare_kernel", "_search_kernel"] + (["_merge_kernel"] if rows <= 40 else [])
    assert forward_launches == search + ["_rescore_kernel", "_loss_kernel", "_code_state_kernel",
                                         "_code_vectors_kernel"]
    assert forward.ops == {"clone": 1, "randint": 1}
    cosine = distance == "cosine"
    codebook_grad = [] if ema else ["_codebook_diff_atomic_kernel"] + (["_codebook_normalization_grad_kernel"] if cosine
                                                                       else [])
    assert triton_launches == (["_inverse_norms_kernel"] if cosine else []) + ["_grad_z_kernel"] + codebook_grad
    assert backward.ops == {"ones_like": 1, "mul": 1}  # the seed of backward() and d(quantized * g), not ours


def _model(device, backend):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        VectorQuantizer(64, 32, ema_decay=0.9, kmeans_init=True, restart_dead=True, channels_last=True,
                        backend=backend),
    ).to(device)


def _init(*models, batch):
    for model in models:  # k-means init from the same draws, eagerly
        torch.manual_seed(1)
        model(batch)


def _train(model, forward, batches):
    """Training steps (forward by `forward`, backward of the layer's loss and the output's), the losses."""
    torch.manual_seed(2)  # the restarts' draws
    losses = []
    for x in batches:
        out = forward(x)
        loss = out.loss + out.quantized.square().mean()
        loss.backward()
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def test_compiled_training_step_matches_eager_on_the_cpu():
    """torch.compile(fullgraph=True) of a model with the layer: no graph break (so nothing in
    its training step needs the host), and the same losses and codebook as eager."""
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # the restarts' draws as in eager
    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    eager, compiled = _model("cpu", "cpu"), _model("cpu", "cpu")
    _init(eager, compiled, batch=batches[0])
    expected = _train(eager, eager, batches)
    got = _train(compiled, torch.compile(compiled, fullgraph=True), batches)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1].codebook, eager[1].codebook, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_training_step_is_captured_in_a_cuda_graph():
    """torch.compile(mode="reduce-overhead") captures the whole step, the layer's Triton
    launches and its codebook update included, and replays it with the same results."""
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # the restarts' draws as in eager
    batches = [torch.randn(4096, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
               for i in range(6)]
    eager, compiled = _model("cuda", "triton"), _model("cuda", "triton")
    _init(eager, compiled, batch=batches[0])
    expected = _train(eager, eager, batches)
    got = _train(compiled, torch.compile(compiled, mode="reduce-overhead", fullgraph=True), batches)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1].codebook, eager[1].codebook, rtol=1e-4, atol=1e-5)
