"""Gemma 3 text: parity with transformers' Gemma3ForCausalLM through the converter (QK-norm, five
sliding layers to one global, two RoPE bases, linear RoPE scaling on the global layers, optional
final-logit soft-capping, tied and untied), KV-cache decoding past the window, the scan over layers,
LoRA, configs, presets and the round trip hf-to-flax -> flax-to-hf.

The Hugging Face models are small random ones built here with torch (nothing is downloaded); every
comparison is float32 on a padded batch whose rows are longer than the sliding window.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from distfair_jax.model import family, lora
from distfair_jax.model.gemma2 import GemmaRMSNorm
from distfair_jax.model.gemma3 import Gemma3
from distfair_jax.model.llama_config import LlamaConfig, sliding_layer_types
from distfair_jax.model.presets import get_preset, param_stats
from parity import assert_bad_config, assert_logical_axes, assert_same_safetensors, cached_decode
from parity import compare, convert_all, padded_batch, random_hf_dirs, randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# gemma-3-270m's config.json fields (transformers 4.x spelling).
GEMMA3_270M = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640, "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": list(sliding_layer_types(18, 6)), "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16",
    "use_bidirectional_attention": False, "vocab_size": 262144}
# Shrunk: window 5 < the 16-token rows, one global layer between two pairs of sliding ones, local
# base 100 and global 10000 (so picking the wrong one shows), scale 24 != head_dim 16.
SHRINK = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
              sliding_window=5, max_position_embeddings=64, rope_theta=10000.0,
              rope_local_base_freq=100.0, layer_types=["sliding_attention", "sliding_attention",
                                                       "full_attention", "sliding_attention"])
CASES = {
    "270m-like": dict(tie_word_embeddings=True),
    # the 4B's linear RoPE scaling on the global layers, final-logit soft-capping, untied, scanned
    "scaled-capped": dict(tie_word_embeddings=False, rope_scaling={"rope_type": "linear",
                                                                   "factor": 8.0},
                          final_logit_softcapping=3.0),
}


def _randomize(model) -> None:
  """O(1) logits; (1 + w) norms away from their zero init (so a missing QK-norm shows); the
  embeddings x sqrt(hidden) = 8 in the model."""
  randomize(model, embed_scale=0.3)
  with torch.no_grad():
    model.model.norm.weight.copy_(-0.7 + 0.1 * torch.randn_like(model.model.norm.weight))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
  """{case: (random Gemma3ForCausalLM directory, its model)}."""
  return random_hf_dirs(tmp_path_factory, "gemma3", transformers.Gemma3TextConfig,
                        transformers.Gemma3ForCausalLM, _randomize,
                        {case: dict(GEMMA3_270M, **SHRINK, **c) for case, c in CASES.items()},
                        drop=("architectures", "model_type"))


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict:
  return convert_all(hf_dirs, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_match_transformers(hf_dirs, converted, case):
  from distfair_jax.model.loader import load_pretrained
  model, _, config = load_pretrained(converted[case], scan_layers=case != "270m-like")
  assert type(model) is Gemma3 and config.model_type == "gemma3"
  assert config.is_sliding == (True, True, False, True) and config.sliding_window == 5
  assert (config.rope_theta, config.rope_local_base_freq) == (10000.0, 100.0)
  assert config.tie_word_embeddings == (case == "270m-like")
  c = compare(hf_dirs[case][1], model, config.vocab_size)  # rows longer than the window
  print(f"gemma3 {case} (scan={config.scan_layers}), float32, padded batch {c.ids.shape}, "
        f"window 5: max abs logit difference = {c.diff:.3e} (logit scale {c.scale:.1f})")
  assert c.diff <= 1e-5 and c.scale > 1.0


def test_flax_to_hf_round_trip_is_bit_exact(hf_dirs, converted, tmp_path):
  from distfair_jax.convert.hf import flax_to_hf
  src = hf_dirs["scaled-capped"][0]
  out = flax_to_hf(converted["scaled-capped"], tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
  assert "model.layers.3.self_attn.q_norm.weight" in assert_same_safetensors(src, out)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  original = hf_dirs["scaled-capped"][1]
  assert type(loaded).__name__ == "Gemma3ForCausalLM"
  for key in ("sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters",
              "attn_logit_softcapping", "final_logit_softcapping", "tie_word_embeddings"):
    assert getattr(loaded.config, key) == getattr(original.config, key), key
  assert LlamaConfig.from_hf(out) == LlamaConfig.from_hf(src)


def test_cached_decode_equals_full_forward():
  """Window 5 < the 10-token prompts: decoded tokens see a window that moves past them."""
  cfg = LlamaConfig(**SHRINK, architecture="Gemma3ForCausalLM", hidden_act="gelu_pytorch_tanh",
                    tie_word_embeddings=True)
  model = Gemma3(cfg, rngs=nnx.Rngs(3))
  for layer in model.layers:  # (1 + w) norms away from their zero init
    for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
      norm.scale[...] = 0.5 * jax.random.normal(jax.random.key(0), norm.scale.shape)
  ids, mask = padded_batch(128, length=10, seed=1)
  new = np.random.default_rng(2).integers(4, 128, size=(3, 4))
  got, full, real = cached_decode(model, ids, mask, new)
  np.testing.assert_allclose(got[real], full[real], atol=1e-5)


def test_lora_all_linear_and_logical_axes():
  cfg = LlamaConfig(**SHRINK, architecture="Gemma3ForCausalLM", hidden_act="gelu_pytorch_tanh")
  model = Gemma3(cfg, rngs=nnx.Rngs(0))
  assert lora.linear_projections(model) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj")
  lora.apply_lora(model, ["all-linear"], rank=2, alpha=4.0)
  attn = model.layers[0].self_attn
  assert isinstance(attn.v_proj, lora.LoRALinear) and isinstance(attn.k_norm, GemmaRMSNorm)
  assert_logical_axes(model)


def test_from_hf_of_the_published_config_and_presets(tmp_path):
  cfg = LlamaConfig.from_hf(GEMMA3_270M)
  assert (cfg.model_type, cfg.rope_theta, cfg.rope_local_base_freq, cfg.final_logit_softcapping,
          cfg.sliding_window, cfg.attention_scale) == ("gemma3", 1e6, 1e4, None, 512, 1 / 16)
  assert cfg == get_preset("gemma3-270m") and family.model_class(cfg) is Gemma3
  assert cfg.is_sliding == tuple((i + 1) % 6 != 0 for i in range(18))
  d = cfg.to_hf()
  assert LlamaConfig.from_hf(d) == cfg
  hf = transformers.Gemma3TextConfig(**{k: v for k, v in d.items() if k != "model_type"})
  hf.save_pretrained(tmp_path)  # transformers 5.x: rope_parameters nested per layer type
  assert LlamaConfig.from_hf(tmp_path) == cfg
  # transformers' defaults: pattern 6 from sliding_window_pattern alone, local base 10000
  sparse = {k: v for k, v in GEMMA3_270M.items() if k not in ("layer_types",
                                                                "rope_local_base_freq")}
  assert LlamaConfig.from_hf(dict(sparse, sliding_window_pattern=6)) == cfg
  four = get_preset("gemma3-4b")
  assert four.rope_scaling == {"rope_type": "linear", "factor": 8.0}
  assert LlamaConfig.from_hf(four.to_hf()) == four
  # The published sizes: gemma-3-270m 268,098,176, gemma-3-1b 999,885,952 and gemma-3-4b's text
  # tower 3,880,263,168 parameters.
  assert param_stats("gemma3-270m").num_params == 268_098_176
  assert param_stats("gemma3-1b").num_params == 999_885_952
  assert param_stats("gemma3-4b").num_params == 3_880_263_168


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling.rope_type: expected one of default, llama3, linear, got 'yarn'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "rope_parameters.sliding_attention.rope_type: expected default .*got 'linear'"),
    ({"attention_bias": True}, "attention_bias: expected false .*got True"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention: expected false"),
    ({"hidden_activation": "gelu"}, "hidden_activation: expected gelu_pytorch_tanh, got 'gelu'"),
    ({"rope_local_base_freq": -1}, "rope_local_base_freq: expected a positive number"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping: expected null .*got 50.0"),
])
def test_from_hf_bad_inputs(tmp_path, change, message):
  assert_bad_config(tmp_path, dict(GEMMA3_270M, **change), message)
