"""The probe's contract: shapes, errors, provenance; and the import direction of the package."""

import pytest
import torch
from conftest import assert_reproducible

from conservcheck import OUProcess, ProbeContractError, UsageError, VectorFieldProbe
from conservcheck.analytic.fields import GaussianMixture, as_probe
from conservcheck.batching import Batcher, evaluate


def test_wrong_output_shape_is_a_contract_error():
    probe = VectorFieldProbe(lambda x, t: x[:, :1], process=OUProcess(), sample_shape=(3,))
    with pytest.raises(ProbeContractError, match="expected"):
        probe.score(torch.zeros(2, 3), 0.5)


def test_wrong_input_shape_is_a_usage_error():
    probe = VectorFieldProbe(lambda x, t: x, process=OUProcess(), sample_shape=(3,))
    with pytest.raises(UsageError, match="sample shape"):
        probe.score(torch.zeros(2, 4), 0.5)


def test_unknown_parameterization():
    with pytest.raises(UsageError, match="unknown parameterization"):
        VectorFieldProbe(lambda x, t: x, sample_shape=(3,), parameterization="noise")


def test_engine_results_do_not_depend_on_batch_size(torch_threads):
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(3, 4, generator=g), 0.7)
    probe = as_probe(mix, (4,), mix.process)
    x = torch.randn(37, 4, generator=g, dtype=torch.float64)
    t = torch.rand(37, generator=g, dtype=torch.float64) + 0.1
    a = evaluate(probe, x, t, batch_size=5)
    b = evaluate(probe, x, t, batcher=Batcher(64))
    # Rows are computed independently, in input order; a field's kernels may still round differently for
    # 5 rows than for 37 (docs/report.md#reproducibility): the float64 tolerance, relative to each
    # sample's largest score component (a component near 0 is a cancelling sum of terms of that size).
    assert_reproducible(b, a, "fp64", scale=b.abs().amax(1, keepdim=True))
    # The same batches give the same bits.
    assert torch.equal(evaluate(probe, x, t, batch_size=5), a)


def test_describe_names_the_units():
    probe = VectorFieldProbe(lambda x, t: x, process=OUProcess(), sample_shape=(3,), parameterization="eps")
    d = probe.describe()
    assert d["parameterization"] == "epsilon" and d["process"]["name"] == "ou"


def test_bf16_precision_changes_only_the_forward_pass():
    lin = torch.nn.Linear(8, 8)
    probe32 = VectorFieldProbe(lambda x, t: lin(x), process=OUProcess(), sample_shape=(8,))
    probe16 = VectorFieldProbe(lambda x, t: lin(x), process=OUProcess(), sample_shape=(8,), precision="bf16")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = probe32.score(x, 0.5), probe16.score(x, 0.5)
    assert b.dtype == torch.float32 and probe16.describe()["precision"] == "bf16"
    # bfloat16 keeps 8 mantissa bits: relative error per output ≈ 2⁻⁸ ≈ 4e-3 times the sum's size.
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, rtol=0, atol=0.05 * float(a.abs().max()))


def test_unknown_precision():
    with pytest.raises(UsageError, match="unknown precision"):
        VectorFieldProbe(lambda x, t: x, sample_shape=(3,), precision="fp8")


def test_batcher_halves_on_out_of_memory_and_keeps_order():
    calls = []

    def fn(x):
        calls.append(x.shape[0])
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x * 2

    b = Batcher(32)
    x = torch.arange(50.0)
    assert torch.equal(b.map(fn, x), x * 2)  # doubling is exact in any batch
    assert b.batch_size == 8 and calls[:3] == [32, 16, 8]


def test_batcher_reraises_other_errors():
    def fn(x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        Batcher(4).map(fn, torch.zeros(3))
