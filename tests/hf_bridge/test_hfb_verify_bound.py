"""``verify``'s float32 bound at real depth: a correct conversion passes, broken ones still fail.

The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV
heads, intermediate 4864, tied embeddings, RoPE base 1e6, RMSNorm eps 1e-6)
with a 1000-token vocab so that it stays cheap. The weights are random with
std 0.15. At an init-like std 0.02 random layers barely change the residual
stream: transformers' float32 logits stay ~3e-6 from float64 (logit scale
~2.5), far below any bound, so such a model would show nothing. With 0.15,
transformers' own float32 noise on verify's default batch (2 x 32 tokens)
is ~6e-4 at a logit scale of ~19: the regime of the trained Qwen2.5-0.5B
(noise 2.0e-4), where a correct conversion (1.6e-4) failed the old fixed
1e-4 bound.

The broken conversions are made by corrupting the imported megatron model in
place (and undoing it), one realistic converter mistake each. transformers'
side is the same for every run (same checkpoint, same batch), so it is
computed once and reused: each broken case costs only a megatron forward.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from plugtron.manager import PlugtronPluginManager
from plugtron.sharding import unwrap
from plugtron_hf_bridge import verify as verify_module
from plugtron_hf_bridge.importer import import_hf
from plugtron_hf_bridge.verify import TOLERANCE_FLOOR, reference_logits, verify

from hfb_helpers import make_hf

STD = 0.15
#: The layer a layout slip is planted in: mid-depth, so that half the network amplifies it.
LAYER = 12


def qwen_real_shape_config() -> Any:
    """Qwen2.5-0.5B's config with a small vocab (and without ``use_mrope``, which the converter may reject)."""
    import transformers

    return transformers.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, vocab_size=1000,
                                    max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=1e6,
                                    rms_norm_eps=1e-6)


def write_random_checkpoint(directory: Path, config: Any, std: float, seed: int = 0) -> Path:
    """Random weights straight to safetensors: skips transformers' own init, which costs ~10 s here."""
    import transformers
    from safetensors.torch import save_file

    transformers.utils.logging.disable_progress_bar()
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.Qwen2ForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.ones(shape) if "norm" in name else torch.randn(shape, generator=generator) * std
               for name, shape in shapes.items()}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def transformers_once() -> Iterator[None]:
    """Memoise ``reference_logits`` (transformers in float64 and float32) per checkpoint, dtype and batch."""
    real, memo = verify_module.reference_logits, {}

    def cached(adapter: Any, src: Any, tokens: torch.Tensor, dtype: str) -> Any:
        key = (str(src), dtype, tuple(tokens.shape), tuple(tokens.flatten().tolist()))
        if key not in memo:
            memo[key] = real(adapter, src, tokens, dtype)
        return memo[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify_module, "reference_logits", cached)
        yield


@pytest.fixture(scope="module")
def real_depth(tmp_path_factory: pytest.TempPathFactory, plugtron_single_rank: Any,
               transformers_once: None) -> Iterator[tuple[Path, Any]]:
    """The checkpoint and its import, shared by the module; the 1.4 GB directory goes afterwards."""
    src = write_random_checkpoint(tmp_path_factory.mktemp("qwen") / "hf", qwen_real_shape_config(), STD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = import_hf(src, pm=PlugtronPluginManager(), parallel=plugtron_single_rank)
    yield src, imported
    shutil.rmtree(src)


def _verify(real_depth: tuple[Path, Any]) -> Any:
    src, imported = real_depth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return verify(src, imported=imported)  # the default batch: 2 x 32 tokens


@pytest.mark.slow  # a 1.4 GB checkpoint run in float32 and float64: ~35 s for the module
def test_correct_conversion_at_real_depth_passes_where_the_fixed_bound_failed(real_depth) -> None:
    report = _verify(real_depth)
    assert report.ok and report.dtype == "float32" and report.reference_dtype == "float64", report
    assert report.reference_noise > TOLERANCE_FLOOR  # transformers itself is beyond the old fixed bound ...
    assert report.max_abs_diff > TOLERANCE_FLOOR  # ... and so is the correct conversion
    assert report.tolerance == pytest.approx(2 * report.reference_noise)
    assert report.max_abs_diff <= 1.5 * report.reference_noise and report.top1_agreement == 1.0, report


@contextmanager
def _swapped_query_and_key(model: Any, config: Any) -> Iterator[None]:
    """Query head 0 and the key head of group 0 trade rows: a q/k/v split off by one block."""
    qkv = model.decoder.layers[LAYER].self_attention.linear_qkv
    head = config.kv_channels
    key = config.num_attention_heads // config.num_query_groups * head
    saved = [t.detach().clone() for t in (qkv.weight, qkv.bias)]
    with torch.no_grad():
        for tensor in (qkv.weight, qkv.bias):
            tensor[: head], tensor[key : key + head] = tensor[key : key + head].clone(), tensor[: head].clone()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, original in zip((qkv.weight, qkv.bias), saved):
                tensor.copy_(original)


@contextmanager
def _megatron_default_norm_epsilon(model: Any, config: Any) -> Iterator[None]:
    """Every RMSNorm at megatron's default 1e-5 instead of the checkpoint's 1e-6."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert norms and all(n.eps == 1e-6 for n in norms)
    for norm in norms:
        norm.eps = 1e-5
    try:
        yield
    finally:
        for norm in norms:
            norm.eps = 1e-6


@contextmanager
def _megatron_default_rope_base(model: Any, config: Any) -> Iterator[None]:
    """RoPE base 10000 (megatron's default) instead of the checkpoint's rope_theta 1e6."""
    rope = model.rotary_pos_emb
    saved = rope.inv_freq.clone()
    dim = saved.numel() * 2
    rope.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    type(rope).forward.cache_clear()  # megatron memoises the rotary table per sequence length
    try:
        yield
    finally:
        rope.inv_freq = saved
        type(rope).forward.cache_clear()


BROKEN: dict[str, Callable[[Any, Any], Any]] = {
    "swapped-q-k": _swapped_query_and_key,
    "norm-eps-1e-5": _megatron_default_norm_epsilon,
    "rope-base-1e4": _megatron_default_rope_base,
}


@pytest.mark.slow  # a 1.4 GB checkpoint run in float32 and float64: ~35 s for the module
@pytest.mark.parametrize("mistake", list(BROKEN))
def test_broken_conversion_at_real_depth_still_fails(real_depth, mistake) -> None:
    _, imported = real_depth
    with BROKEN[mistake](unwrap(imported.built.chunks[0]), imported.plan.config):
        report = _verify(real_depth)
    assert not report.ok and report.max_abs_diff > 4 * report.tolerance, report


def test_tiny_model_is_judged_by_the_floor_and_an_explicit_tolerance_overrides(tmp_path, plugtron_single_rank) -> None:
    """Tiny models' float32 noise (~1e-7) is far below the floor: the floor is the bound, as before."""
    src = make_hf(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imported = import_hf(src, pm=PlugtronPluginManager(), parallel=plugtron_single_rank)
        report = verify(src, imported=imported)
        strict = verify(src, imported=imported, tolerance=1e-12)
    assert report.ok and report.reference_dtype == "float64" and report.tolerance == TOLERANCE_FLOOR, report
    assert 0 < report.reference_noise < 1e-5 and report.max_abs_diff < 1e-5, report
    assert not strict.ok and strict.tolerance == 1e-12 and strict.reference_noise == report.reference_noise


def test_a_model_that_cannot_run_float64_falls_back_to_the_fixed_bound(monkeypatch) -> None:
    """A custom model class without float64 kernels still verifies: float32 truth, fixed floor, a warning."""
    calls: list[str] = []

    def fake_hf_logits(adapter: Any, src: Any, tokens: torch.Tensor, dtype: str) -> torch.Tensor:
        calls.append(dtype)
        if dtype == "float64":
            raise RuntimeError('"addmm" not implemented for \'Double\'')
        return torch.zeros(1, 2, 3, dtype=torch.float64)

    monkeypatch.setattr(verify_module, "hf_logits", fake_hf_logits)
    adapter = type("Adapter", (), {"hf_model_class": "custom:Model"})()
    with pytest.warns(UserWarning, match="cannot run custom:Model in float64"):
        logits, truth, noise = reference_logits(adapter, "src", torch.zeros(1, 2, dtype=torch.long), "float32")
    assert (truth, noise, calls, tuple(logits.shape)) == ("float32", None, ["float64", "float32"], (1, 2, 3))
    assert verify_module.default_tolerance("float32", noise) == TOLERANCE_FLOOR
