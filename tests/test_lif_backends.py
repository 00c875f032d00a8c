"""Every neuron kernel (cpp, triton, cuda) against the pure-PyTorch reference: spikes bit-exact,
final membrane and gradients (x, v_init, PLIF's w) within the per-dtype tolerances, over every mode
combination, surrogate, dtype and awkward shape/stride."""
import importlib.util

import pytest
import torch

import snnkd_fast
from snnkd_fast.lif.surrogates import SURROGATES

from conftest import device_for, skip_unless_runnable
from lif_helpers import NEURON_KINDS, make_inputs, run_neuron
from tolerances import assert_grad_close, assert_value_close, compute_dtype

SURROGATE_NAMES = [s.name for s in SURROGATES]
RESETS = {"hard0": 0.0, "hard-0.3": -0.3, "soft": None}


def _modes():
    for kind in NEURON_KINDS:
        for decay_input in ((True,) if kind == "if" else (True, False)):
            for reset in RESETS:
                for detach_reset in (False, True):
                    for surrogate in SURROGATE_NAMES:
                        yield pytest.param(kind, decay_input, reset, detach_reset, surrogate,
                                           id=f"{kind}-di{int(decay_input)}-{reset}-det{int(detach_reset)}-{surrogate}")


def compare(kind, shape, dtype, backend, device, seed=0, x_transform=None, **kwargs):
    x, v_init, grad_spikes, grad_v, w = make_inputs(shape, dtype, device, seed=seed)
    if x_transform is not None:
        x = x_transform(x)
        grad_spikes = torch.randn(x.shape, dtype=torch.float64, device=device).to(dtype)
    kernel = run_neuron(kind, x, v_init, w, grad_spikes, grad_v, backend, **kwargs)
    reference = run_neuron(kind, x, v_init, w, grad_spikes, grad_v, "torch", **kwargs)
    assert kernel.spikes.dtype == x.dtype and kernel.spikes.shape == x.shape
    assert torch.equal(kernel.spikes, reference.spikes), "spikes differ from the reference"
    # v_final and the v_init / w gradients are in the compute dtype (float32 for half x): its tolerance
    acc = compute_dtype(dtype)
    assert_value_close(kernel.v_final, reference.v_final, acc, "v_final")
    assert_grad_close(kernel.grad_x, reference.grad_x, dtype, "grad x")
    assert_grad_close(kernel.grad_v_init, reference.grad_v_init, acc, "grad v_init")
    if kind == "plif":
        assert_grad_close(kernel.grad_w, reference.grad_w, acc, "grad w")
    return kernel, reference


@pytest.mark.parametrize("kind, decay_input, reset, detach_reset, surrogate", list(_modes()))
def test_every_mode_matches_reference(kernel_target, kind, decay_input, reset, detach_reset, surrogate):
    """float32 (the instantiation training runs: the surrogates through fast_exp on the CPU) and,
    but for triton, float64 (the exact formulas at tight tolerances)."""
    backend, device = kernel_target
    for dtype in (torch.float32,) if backend == "triton" else (torch.float32, torch.float64):
        kernel, _ = compare(kind, (5, 3, 7), dtype, backend, device, decay_input=decay_input,
                            v_reset=RESETS[reset], detach_reset=detach_reset, surrogate=surrogate, alpha=1.7, tau=3.0)
        assert 0 < kernel.spikes.sum() < kernel.spikes.numel(), "inputs must exercise both spiking and silent steps"


@pytest.mark.parametrize("decay_input", [True, False], ids=["di1", "di0"])
@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("detach_reset", [False, True], ids=["det0", "det1"])
def test_plif_float32_vector_paths(kernel_target, decay_input, reset, detach_reset):
    """PLIF in float32 over 300 neurons (a full 256-neuron CPU block, whole vectors and a remainder):
    the decay gradient's vectorized loops, one instantiation per decay_input, reset and detach."""
    backend, device = kernel_target
    compare("plif", (6, 300), torch.float32, backend, device, decay_input=decay_input, v_reset=RESETS[reset],
            detach_reset=detach_reset)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 1), (4, 2, 5, 3), (6, 301), (2, 1024), (8, 4, 33)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_shapes(kernel_target, kind, shape):
    backend, device = kernel_target
    compare(kind, shape, torch.float32, backend, device, v_reset=None)


@pytest.mark.parametrize("shape", [(16, 2500), (65, 1100), (129, 600)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_cpu_block_widths(kind, shape):
    """The CPU kernels' block width follows T (csrc/lif/lif_cpu_typed.h, cpu_block: 1024 neurons at
    T = 16, 512 at T = 65, 256 at T = 129): several blocks, the last partial, against the reference
    in float64 (PLIF's decay gradient sums one partial per block)."""
    skip_unless_runnable("cpp", "cpu")
    compare(kind, shape, torch.float64, "cpp", "cpu", v_reset=None if kind == "if" else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_dtypes(kernel_target, kind, dtype):
    backend, device = kernel_target
    if backend == "triton" and dtype == torch.float64:
        x = torch.randn(3, 4, dtype=dtype, device=device)
        with pytest.raises(TypeError, match="float64"):
            snnkd_fast.lif_multistep(x, backend="triton")
        return
    compare(kind, (6, 5, 9), dtype, backend, device, surrogate="atan")


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded", "offset"])
def test_non_contiguous_inputs(kernel_target, layout):
    backend, device = kernel_target
    transforms = {
        "transposed": lambda x: x.transpose(1, 2),
        "strided": lambda x: x[:, :, ::2],
        "expanded": lambda x: x[:, :1].expand(-1, 4, -1),  # stride 0 along dim 1
        "offset": lambda x: x[1:],  # storage offset: the kernel's vector loads must stay aligned-safe
    }
    x, v_init, grad_spikes, grad_v, w = make_inputs((5, 4, 6), torch.float32, device)
    xt = transforms[layout](x)
    assert not xt.is_contiguous() or xt.storage_offset() > 0
    v0 = torch.zeros(xt.shape[1:], dtype=torch.float64, device=device)
    gs = torch.randn(xt.shape, dtype=torch.float64, device=device).float()
    gv = torch.randn(xt.shape[1:], dtype=torch.float64, device=device)
    kernel = run_neuron("lif", xt, v0, None, gs, gv, backend)
    reference = run_neuron("lif", xt, v0, None, gs, gv, "torch")
    assert torch.equal(kernel.spikes, reference.spikes)
    assert_grad_close(kernel.grad_x, reference.grad_x, torch.float32, "grad x")


def test_broadcast_v_init_gradient_is_summed(kernel_target):
    backend, device = kernel_target
    x, _, grad_spikes, grad_v, _ = make_inputs((4, 3, 5), torch.float32, device)
    v_row = torch.randn(5, dtype=torch.float64, device=device)
    kernel = run_neuron("lif", x, v_row, None, grad_spikes, grad_v, backend)
    reference = run_neuron("lif", x, v_row, None, grad_spikes, grad_v, "torch")
    assert kernel.grad_v_init.shape == (5,)
    assert_grad_close(kernel.grad_v_init, reference.grad_v_init, torch.float32, "grad v_init")


@pytest.mark.parametrize("kind", NEURON_KINDS)
def test_state_carried_across_calls_equals_one_call(kernel_target, kind):
    """Running T steps as two calls, passing the final membrane on, is the same as one call."""
    backend, device = kernel_target
    x, v_init, *_ = make_inputs((6, 2, 9), torch.float32, device)
    w = torch.tensor(0.2, device=device)
    from lif_helpers import neuron_call

    whole, v_whole = neuron_call(kind, x, v_init.float(), w, backend=backend, return_v=True)
    first, v_mid = neuron_call(kind, x[:4], v_init.float(), w, backend=backend, return_v=True)
    second, v_end = neuron_call(kind, x[4:], v_mid, w, backend=backend, return_v=True)
    assert torch.equal(whole, torch.cat([first, second]))
    assert torch.equal(v_whole, v_end)


def test_only_spikes_or_only_membrane_used(kernel_target):
    """Autograd may deliver no gradient for one output; the kernels must treat it as zero."""
    backend, device = kernel_target
    x = (torch.randn(4, 10, device=device) * 1.5 + 0.4).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    spikes, v = snnkd_fast.lif_multistep(x, backend=backend, return_v=True)
    spikes_ref, v_ref = snnkd_fast.lif_multistep(x_ref, backend="torch", return_v=True)
    v.sum().backward()
    v_ref.sum().backward()
    assert_grad_close(x.grad, x_ref.grad, torch.float32, "membrane-only gradient")
    x.grad = None
    x_ref.grad = None
    spikes, v = snnkd_fast.lif_multistep(x, backend=backend, return_v=True)
    spikes_ref, _ = snnkd_fast.lif_multistep(x_ref, backend="torch", return_v=True)
    spikes.sum().backward()
    spikes_ref.sum().backward()
    assert_grad_close(x.grad, x_ref.grad, torch.float32, "spike-only gradient")


def test_backward_saves_one_sequence_tensor(kernel_target):
    """The autograd graph keeps a single [T, ...] tensor (the charged membrane), never spikes too."""
    backend, device = kernel_target
    T, N = 6, 50
    x = torch.randn(T, N, device=device, requires_grad=True)
    w = torch.tensor(0.1, device=device, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        snnkd_fast.plif_multistep(x, w, backend=backend)
    sequence_sized = [t for t in saved if t.numel() >= T * N]
    assert len(sequence_sized) == 1, [tuple(t.shape) for t in saved]
    assert sequence_sized[0].dtype == torch.float32
    if backend == "cpp":  # the CPU keeps the input itself (H is recomputed): nothing T-long is added
        assert sequence_sized[0].data_ptr() == x.data_ptr()


def test_cpu_backward_keeps_the_input_in_its_dtype():
    """On the CPU a bf16 input is what the backward keeps (2 bytes per neuron-step; H would take 4),
    through the eager C++ node and through the torch.library formula alike."""
    if not snnkd_fast.backends()["cpp"]:
        pytest.skip(snnkd_fast.backends()["cpp"].reason)
    from snnkd_fast import _library

    for cxx_autograd in (True, False):
        saved = []
        x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
        previous, _library.CXX_AUTOGRAD = _library.CXX_AUTOGRAD, cxx_autograd
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                spikes = snnkd_fast.lif_multistep(x, backend="cpp")
        finally:
            _library.CXX_AUTOGRAD = previous
        sequence_sized = [t for t in saved if t.numel() >= x.numel()]
        assert [(t.dtype, t.data_ptr()) for t in sequence_sized] == [(torch.bfloat16, x.data_ptr())]
        spikes.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.bfloat16


def _lean_cases():
    for neuron, decay_inputs in ((0, (True,)), (1, (True, False)), (2, (True, False))):
        for decay_input in decay_inputs:
            for v_reset, soft in ((0.0, False), (-0.3, False), (0.0, True)):
                for detach in (False, True):
                    yield neuron, decay_input, v_reset, soft, detach


# (T, N): a partial 256-neuron block (CPU) / an N that takes one-neuron accesses (CUDA), T = 1, several
# threads' tasks; on the CPU also T = 16 and 65 (blocks of 1024 and 512 neurons, cpu_block in
# csrc/lif/lif_cpu_typed.h) over several blocks, the last partial; on CUDA also the recomputing backward's 8-step chunks at their edges, the longest
# sequences it stages in shared memory (32 steps in float64, 64 in float32) and one step more, which
# recharge into a temporary H first.
LEAN_SHAPES = {"cpp": [(5, 785), (1, 3, 7), (3, 20000), (16, 2500), (65, 1100)],
               "cuda": [(5, 785), (1, 3, 7), (8, 1024), (9, 4096), (17, 333), (32, 256), (33, 200), (64, 300),
                        (65, 100)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_lean_pair_is_the_saved_h_pair(backend, dtype):
    """lif_forward_lean + lif_backward_from_x (no H written, H recomputed from x: on the CPU block by
    block one block ahead of the backward, on CUDA into shared memory or, for longer sequences, into a
    temporary) give
    lif_forward + lif_backward's bits: spikes, v_final, grad_x, grad_v_init and PLIF's decay
    gradient, for every mode and surrogate, tau a power of two (the CPU charge multiplies by 1/tau)
    or not, per-neuron or one-value v_init, with and without a spike or membrane gradient. On CUDA
    the decay gradient is a block reduction whose partition differs (one neuron per thread where the
    saved-H kernel takes four): equal to rounding there, bitwise elsewhere."""
    device = device_for(backend)
    skip_unless_runnable(backend, device)
    ops = torch.ops.snnkd_fast
    acc = compute_dtype(dtype)
    for shape in LEAN_SHAPES[backend]:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.4).to(dtype).to(device)
        grad_spikes = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        grad_v = torch.randn(shape[1:], generator=g, dtype=torch.float64).to(acc).to(device)
        v_inits = {"step": (torch.randn(shape[1:], generator=g, dtype=torch.float64) * 0.5).to(acc).to(device),
                   "one": torch.full((1,), 0.2, dtype=acc, device=device)}
        for neuron, decay_input, v_reset, soft, detach in _lean_cases():
            decay = torch.tensor(0.35, dtype=acc, device=device) if neuron == 2 else None
            for tau in ((2.0, 3.0, 0.5) if neuron == 1 else (2.0,)):
                for surrogate in range(len(SURROGATES)):
                    scalars = (neuron, tau, decay_input, 1.0, v_reset, soft, detach, surrogate, 2.5)
                    for v_name, v_init in v_inits.items():
                        spikes, v_final, h_seq = ops.lif_forward(x, v_init, decay, *scalars)
                        lean_spikes, lean_v_final = ops.lif_forward_lean(x, v_init, decay, *scalars)
                        case = f"{shape} {scalars} v_init={v_name}"
                        assert torch.equal(lean_spikes, spikes) and torch.equal(lean_v_final, v_final), case
                        for gs, gv in ((grad_spikes, grad_v), (grad_spikes, None), (None, grad_v)):
                            expected = ops.lif_backward(gs, gv, h_seq, v_init, decay, dtype, *scalars, neuron == 2)
                            got = ops.lif_backward_from_x(gs, gv, x, v_init, decay, dtype, *scalars, neuron == 2)
                            for name, a, b in zip(("grad_x", "grad_v_init", "grad_decay"), got, expected):
                                where = f"{name} {case} grad_spikes={gs is not None} grad_v={gv is not None}"
                                assert a.dtype == b.dtype and a.shape == b.shape, where
                                if name == "grad_decay" and device == "cuda":  # float32: sums of
                                    tol = 1e-10 if acc == torch.float64 else 3e-4  # ~1e4 terms of either sign
                                    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=where)
                                else:
                                    assert torch.equal(a, b), where


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_recompute_h_switch_picks_the_pair_and_keeps_the_numbers(backend, monkeypatch):
    """lif/op.py's _RECOMPUTE_H_DEVICES decides which pair a device's BPTT runs, for the eager C++
    node (neuron_multistep's recompute_h) and the torch.library path alike: the lean pair keeps x
    itself for the backward, the saved-H pair a float32 H. Spikes, v_final and the gradients of x,
    v_init and PLIF's w are the same either way (w's to rounding on CUDA, whose two backward kernels
    sum the decay gradient over different blocks)."""
    device = device_for(backend)
    skip_unless_runnable(backend, device)
    from snnkd_fast import _library
    from snnkd_fast.lif import op as lif_op

    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(6, 3, 40, generator=g) * 1.5 + 0.4).to(device)
    v0 = (torch.randn(3, 40, generator=g) * 0.3).to(device)
    weights = torch.randn(6, 3, 40, generator=g).to(device)
    results = {}
    for cxx_autograd in (True, False):
        for recompute in (True, False):
            monkeypatch.setattr(lif_op, "_RECOMPUTE_H_DEVICES", frozenset({device} if recompute else ()))
            monkeypatch.setattr(_library, "CXX_AUTOGRAD", cxx_autograd)
            x, v_init = x0.clone().requires_grad_(), v0.clone().requires_grad_()
            w = torch.tensor(0.3, device=device, requires_grad=True)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                lif_spikes, lif_v = snnkd_fast.lif_multistep(x, v_init, backend=backend, return_v=True)
                plif_spikes = snnkd_fast.plif_multistep(x, w, backend=backend, surrogate="atan")
            kept = [t for t in saved if t.numel() >= x.numel()]
            assert len(kept) == 2, [tuple(t.shape) for t in kept]
            for t in kept:
                assert (t.data_ptr() == x.data_ptr()) == recompute, (cxx_autograd, recompute)
            ((lif_spikes * weights).sum() + lif_v.sum() + (plif_spikes * weights).sum()).backward()
            results[cxx_autograd, recompute] = (lif_spikes, lif_v, plif_spikes, x.grad, v_init.grad, w.grad)
    first = results[True, True]
    for key, result in results.items():
        for name, a, b in zip(("lif spikes", "v_final", "plif spikes", "grad x", "grad v_init", "grad w"),
                              result, first):
            if name == "grad w" and device == "cuda":
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
            else:
                assert torch.equal(a, b), f"{name} {key}"


@pytest.mark.parametrize("backend", ["cpp", "cuda"])
def test_recompute_h_argument_picks_the_pair(backend, monkeypatch):
    """The public recompute_h (functions and nn modules): True keeps x itself for the backward, False a
    float32 H, None the device's default (_RECOMPUTE_H_DEVICES); the eager C++ node and the
    torch.library path alike, with the same spikes and gradients as the default."""
    device = device_for(backend)
    skip_unless_runnable(backend, device)
    from snnkd_fast import _library
    from snnkd_fast.lif import op as lif_op

    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(5, 2, 33, generator=g) * 1.5 + 0.4).to(device)
    weights = torch.randn(5, 2, 33, generator=g).to(device)
    default_recomputes = device in lif_op._RECOMPUTE_H_DEVICES
    for cxx_autograd in (True, False):
        monkeypatch.setattr(_library, "CXX_AUTOGRAD", cxx_autograd)
        results = {}
        for recompute_h in (None, True, False):
            x = x0.clone().requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                lif = snnkd_fast.lif_multistep(x, backend=backend, recompute_h=recompute_h)
                node = snnkd_fast.nn.IFNode(step_mode="m", backend=backend, recompute_h=recompute_h)
                if_spikes = node(x)
            kept = [t for t in saved if t.numel() >= x.numel()]
            assert len(kept) == 2, [tuple(t.shape) for t in kept]
            keeps_x = default_recomputes if recompute_h is None else recompute_h
            for t in kept:
                assert (t.data_ptr() == x.data_ptr()) == keeps_x, (cxx_autograd, recompute_h)
                assert keeps_x or t.dtype == torch.float32
            ((lif * weights).sum() + (if_spikes * weights).sum()).backward()
            results[recompute_h] = (lif, if_spikes, x.grad)
        for recompute_h in (True, False):
            for a, b in zip(results[recompute_h], results[None]):
                assert torch.equal(a, b), (cxx_autograd, recompute_h)


def test_recompute_h_argument_errors():
    """recompute_h=True/False on a backend with one BPTT pair, or with backward='rate', is refused
    with a reason; a non-bool is a TypeError (functions, modules, replace_neurons)."""
    x = torch.randn(3, 4)
    for backend in ("torch",) + (("triton",) if snnkd_fast.backends()["triton"] else ()):
        with pytest.raises(ValueError, match="recompute_h=True chooses between the cpp and cuda"):
            snnkd_fast.lif_multistep(x, backend=backend, recompute_h=True)
        snnkd_fast.lif_multistep(x, backend=backend, recompute_h=None)  # the default is always fine
    if snnkd_fast.backends()["cpp"]:
        with pytest.raises(ValueError, match="backward='rate' keeps"):
            snnkd_fast.if_multistep(x, backend="cpp", backward="rate", recompute_h=False)
        with pytest.raises(TypeError, match="recompute_h must be None, True or False"):
            snnkd_fast.plif_multistep(x, 0.0, backend="cpp", recompute_h=1)
    with pytest.raises(TypeError, match="LIFNode: recompute_h must be"):
        snnkd_fast.nn.LIFNode(recompute_h="yes")
    assert "recompute_h=True" in repr(snnkd_fast.nn.ParametricLIFNode(recompute_h=True))


def test_cpu_lean_pair_edges():
    """Empty sequences (T = 0, no neurons) and the argument checks of the lean pair; the empty
    sequences with a one-value v_init on every forward op."""
    if not snnkd_fast.backends()["cpp"]:
        pytest.skip(snnkd_fast.backends()["cpp"].reason)
    ops = torch.ops.snnkd_fast
    scalars = (1, 2.0, True, 1.0, 0.0, False, False, 0, 4.0)
    for shape in ((0, 4), (3, 0)):
        x = torch.zeros(shape)
        v_init = torch.full(shape[1:], 0.25)
        spikes, v_final = ops.lif_forward_lean(x, v_init, None, *scalars)
        assert spikes.shape == shape and torch.equal(v_final, v_init)
        for op in (ops.lif_forward, ops.lif_forward_lean, ops.lif_rate_forward):  # one value for every neuron
            spikes, v_final = op(x, torch.full((1,), 0.25), None, *scalars)[:2]
            assert spikes.shape == shape and torch.equal(v_final, v_init), op
        grad_x, grad_v_init, _ = ops.lif_backward_from_x(None, v_init, x, v_init, None, torch.float32, *scalars,
                                                         False)
        assert grad_x.shape == shape and torch.equal(grad_v_init, v_init)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="grad_dtype must be the dtype of x"):
        ops.lif_backward_from_x(None, None, x, torch.zeros(4), None, torch.bfloat16, *scalars, False)
    with pytest.raises(RuntimeError, match="v_init must be"):
        ops.lif_backward_from_x(None, None, x, torch.zeros(4, dtype=torch.float64), None, torch.float32, *scalars,
                                False)
    with pytest.raises(RuntimeError, match="h_seq must be float32"):
        ops.lif_backward(None, None, x.bfloat16(), torch.zeros(4), None, torch.bfloat16, *scalars, False)


def test_plif_weight_gradient_is_deterministic_across_thread_counts():
    """The PLIF w gradient is a reduction over neurons; the cpp kernel reduces fixed-size blocks in
    a fixed order, so the bits do not depend on the number of threads."""
    if not snnkd_fast.backends()["cpp"]:
        pytest.skip(snnkd_fast.backends()["cpp"].reason)
    x = torch.randn(8, 5000, dtype=torch.float32) * 1.5 + 0.3
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            w = torch.tensor(0.1, requires_grad=True)
            snnkd_fast.plif_multistep(x, w, backend="cpp").sum().backward()
            grads.append(w.grad.item())
    finally:
        torch.set_num_threads(threads)
    assert grads[0] == grads[1] == grads[2]


def test_auto_backend_picks_a_kernel():
    x = torch.randn(3, 4)
    expected = "cpp" if snnkd_fast.backends()["cpp"] else "torch"
    from snnkd_fast._backends import resolve_backend

    assert resolve_backend("auto", x.device, "test") == expected


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_probe_reports_a_broken_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 the triton backend is available exactly when the probe kernel runs; an
    interpreter that fails it (Triton <= 3.6 with NumPy >= 2.4) gives a reason that says what to do."""
    from snnkd_fast import _triton_interpreter_probe as probe
    from snnkd_fast._backends import triton_interpret

    if triton_interpret():
        problem = probe.interpreter_problem()
        assert snnkd_fast.backends("kd")["triton"].available == (problem == "")
        assert snnkd_fast.backends("lif")["triton"].available == (problem == "")

    class FailingLaunch:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(probe, "_count_to", FailingLaunch())
    reason = probe.interpreter_problem()
    assert "triton-lang/triton#9171" in reason and "only 0-dimensional arrays" in reason, reason

    class MiscountingLaunch:
        def __getitem__(self, grid):
            return lambda out, n: out.fill_(n - 1)

    monkeypatch.setattr(probe, "_count_to", MiscountingLaunch())
    assert "counted a 3-step loop to 2" in probe.interpreter_problem()
