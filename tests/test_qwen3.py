"""Qwen3: parity with transformers' Qwen3ForCausalLM through the converter (tied and untied,
head_dim independent of hidden / heads, QK-norm), KV-cache decoding, the scan over layers, LoRA, configs,
presets and the round trip hf-to-flax -> flax-to-hf.

The Hugging Face models are small random ones built here with torch (nothing is downloaded); every
comparison is float32 on a padded batch (unpadded, right- and left-padded rows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from distfair_jax.model import family, lora
from distfair_jax.model.layers import RMSNorm
from distfair_jax.model.llama_config import LlamaConfig
from distfair_jax.model.presets import get_preset, param_stats
from distfair_jax.model.qwen3 import Qwen3
from parity import assert_bad_config, assert_logical_axes, assert_same_safetensors, cached_decode
from parity import compare, convert_all, padded_batch, random_hf_dirs, randomize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Qwen3-0.6B's config.json fields (tied; 16 heads of 128 over a hidden size of 1024).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
# Shrunk: head_dim 24 != hidden / heads = 16, GQA 4:2.
SHRINK = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24,
              max_position_embeddings=64, rope_theta=10000.0)
CASES = {"tied": dict(tie_word_embeddings=True), "untied": dict(tie_word_embeddings=False)}


def _randomize(model) -> None:
  """O(1) logits; norms away from their ones init (so a missing QK-norm shows)."""
  randomize(model, norm_offset=1.0, embed_scale=0.5)
  with torch.no_grad():  # logits O(3): float32 rounding well under the 1e-5 tolerance
    model.model.norm.weight.mul_(0.3)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
  """{case: (random Qwen3ForCausalLM directory, its model)}."""
  return random_hf_dirs(tmp_path_factory, "qwen3", transformers.Qwen3Config,
                        transformers.Qwen3ForCausalLM, _randomize,
                        {case: dict(QWEN3_06B, **SHRINK, **c) for case, c in CASES.items()})


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict:
  return convert_all(hf_dirs, tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_match_transformers(hf_dirs, converted, case):
  from distfair_jax.model.loader import load_pretrained
  model, _, config = load_pretrained(converted[case], scan_layers=case == "untied")
  assert type(model) is Qwen3 and config.model_type == "qwen3" and not config.attention_bias
  assert config.head_dim == 24 and config.tie_word_embeddings == (case == "tied")
  assert isinstance(model.layers.self_attn.q_norm if config.scan_layers
                    else model.layers[0].self_attn.q_norm, RMSNorm)
  c = compare(hf_dirs[case][1], model, config.vocab_size)
  print(f"qwen3 {case} (scan={config.scan_layers}), float32, padded batch {c.ids.shape}: "
        f"max abs logit difference = {c.diff:.3e} (logit scale {c.scale:.1f})")
  assert c.diff <= 1e-5 and c.scale > 1.0


def test_flax_to_hf_round_trip_is_bit_exact(hf_dirs, converted, tmp_path):
  from distfair_jax.convert.hf import flax_to_hf
  src = hf_dirs["untied"][0]
  out = flax_to_hf(converted["untied"], tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
  assert "model.layers.1.self_attn.k_norm.weight" in assert_same_safetensors(src, out)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(loaded).__name__ == "Qwen3ForCausalLM" and loaded.config.head_dim == 24
  assert LlamaConfig.from_hf(out) == LlamaConfig.from_hf(src)


def test_cached_decode_equals_full_forward():
  model = Qwen3(LlamaConfig(**SHRINK, architecture="Qwen3ForCausalLM"), rngs=nnx.Rngs(3))
  ids, mask = padded_batch(128, length=10, seed=1)
  new = np.random.default_rng(2).integers(4, 128, size=(3, 4))
  got, full, real = cached_decode(model, ids, mask, new)
  np.testing.assert_allclose(got[real], full[real], atol=1e-5)


def test_lora_all_linear_and_logical_axes():
  model = Qwen3(LlamaConfig(**SHRINK, architecture="Qwen3ForCausalLM"), rngs=nnx.Rngs(0))
  assert lora.linear_projections(model) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj")
  lora.apply_lora(model, ["all-linear"], rank=2, alpha=4.0)
  attn = model.layers[0].self_attn
  assert isinstance(attn.q_proj, lora.LoRALinear) and isinstance(attn.q_norm, RMSNorm)
  assert_logical_axes(model)


def test_from_hf_of_the_published_config_and_presets(tmp_path):
  cfg = LlamaConfig.from_hf(QWEN3_06B)
  assert (cfg.model_type, cfg.head_dim, cfg.rope_theta, cfg.attention_bias) == (
      "qwen3", 128, 1e6, False)
  assert cfg == get_preset("qwen3-0.6b")
  assert family.model_class(cfg) is Qwen3
  d = cfg.to_hf()
  assert LlamaConfig.from_hf(d) == cfg
  transformers.Qwen3Config(**d).save_pretrained(tmp_path)
  assert LlamaConfig.from_hf(tmp_path) == cfg
  # The published sizes: Qwen3-0.6B 596,049,920 (tied), Qwen3-8B 8,190,735,360 parameters.
  assert param_stats("qwen3-0.6b").num_params == 596_049_920
  assert param_stats("qwen3-8b").num_params == 8_190_735_360


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True},
     "attention_bias: expected false \\(Qwen3 has no attention biases\\), got True"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling.rope_type: expected one of default, llama3, linear, got 'yarn'"),
    ({"use_sliding_window": True, "sliding_window": 4096},
     "use_sliding_window: expected false .*got True"),
    ({"hidden_act": "gelu"}, "hidden_act: expected silu, got 'gelu'"),
])
def test_from_hf_bad_inputs(tmp_path, change, message):
  assert_bad_config(tmp_path, dict(QWEN3_06B, **change), message)


# Qwen3's thinking switch, as its chat template writes it (the generation prompt and the final
# assistant turn; tools left out): an empty think block before the final answer, and in the
# generation prompt only when enable_thinking is false.
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def test_enable_thinking_false_puts_the_steering_token_first():
  from distfair_jax.data.chat import ChatFormat
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer()
  tok.chat_template = QWEN3_STYLE_TEMPLATE
  question = "Is this person male or female?"
  off = ChatFormat(tok, template_kwargs={"enable_thinking": False})
  prompt = off.prompt_text(question)
  assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert off.full_text(question, "0Male") == prompt + "0Male<|im_end|>\n"
  on = ChatFormat(tok)  # thinking on: the answer would start with <think>, not the digit
  assert on.full_text(question, "0Male")[len(on.prompt_text(question)):].startswith("<think>")
