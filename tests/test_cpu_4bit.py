"""bitsandbytes 4-bit on the CPU: which path medtune's models take on each kind of CPU (with or without AVX512-BF16).

On a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place at the first eval-mode forward and
computes in bf16; medtune keeps every 4-bit layer on the fp32 path (medtune.inference.quantization.fp32_on_cpu). These
tests run a
branch per CPU kind, named in the test, and are never skipped: where the CPU has AVX512-BF16 they also show what
bitsandbytes does without medtune's switch, so that a bitsandbytes release that changes the switch's meaning fails
here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16  # noqa: E402

from medtune.inference.quantization import fp32_on_cpu  # noqa: E402

AVX512_BF16 = bool(has_avx512bf16())  # the native library answers 0 or 1
FUSED_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


def _nf4_layer(seed: int = 0) -> bnb.nn.Linear4bit:
    """One NF4 layer with double quantization, of SmolLM2's MLP shape (576 -> 1536), quantized on the CPU."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(576, 1536, bias=False)
    layer = bnb.nn.Linear4bit(576, 1536, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer)
    return layer.to("cpu").eval()  # .to() quantizes


def _reference(layer: bnb.nn.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """fp32 de-quantize-then-matmul from the layer's own, unpacked 4-bit weights."""
    return x @ dequantize_4bit(layer.weight.data, layer.weight.quant_state).t()


@pytest.mark.parametrize("cpu", ["avx512bf16" if AVX512_BF16 else "no-avx512bf16"])
def test_eval_forward_of_a_4bit_layer_is_fp32_and_unpacked_on_this_cpu_kind(cpu):
    x = torch.randn(2, 6, 576)
    if cpu == "avx512bf16":
        # What bitsandbytes does by itself here: repack in place and compute in bf16.
        native = _nf4_layer()
        assert native.support_avx512bf16_for_cpu
        expected = _reference(native, x)
        with torch.no_grad():
            out = native(x)
        assert native.weight.quant_state.packing_format_for_cpu is True
        assert (out - expected).abs().max() > 1e-3
    layer = fp32_on_cpu(torch.nn.Sequential(_nf4_layer()))[0]
    assert layer.support_avx512bf16_for_cpu is False
    packed_before = layer.weight.data.clone()
    expected = _reference(layer, x)
    with torch.no_grad():
        out = layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, packed_before)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cpu", ["avx512bf16" if AVX512_BF16 else "no-avx512bf16"])
def test_a_4bit_model_dequantized_after_an_eval_forward_has_its_original_weights_on_this_cpu_kind(
        cpu, tiny_model_dir):
    """medtune's 4-bit training model (medtune.training.model.load_model), an eval-mode forward as the end-of-training
    evaluation runs it, then transformers' dequantize (what the as-trained base and export use): every weight is
    bitsandbytes' own de-quantization of the bytes quantized at load."""
    from medtune.training.config import parse_recipe
    from medtune.training.model import load_model

    recipe = parse_recipe(["--config", "configs/recipes/tiny.yaml", "--model_name_or_path", str(tiny_model_dir),
                           "--load_in_4bit", "true", "--use_bnb_nested_quant", "true"])
    model = load_model(recipe)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers.values())
    original = {name: dequantize_4bit(m.weight.data.clone(), m.weight.quant_state) for name, m in layers.items()}
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 5, 9, 12, 7, 3]]))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    dense = model.dequantize(dtype=torch.float32)
    for name, weight in original.items():
        torch.testing.assert_close(dense.get_submodule(name).weight, weight, atol=0, rtol=0)


@pytest.mark.parametrize("cpu", ["avx512bf16" if AVX512_BF16 else "no-avx512bf16"])
def test_importing_bitsandbytes_through_medtune_prints_no_fused_kernel_warning_on_this_cpu_kind(cpu):
    def stderr(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr

    # bitsandbytes alone warns exactly where it would use the fused kernel: the filter matches its real message.
    assert (FUSED_KERNEL_WARNING in stderr("import bitsandbytes")) is (cpu == "avx512bf16")
    assert FUSED_KERNEL_WARNING not in stderr("import medtune, bitsandbytes")
