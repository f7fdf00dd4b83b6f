"""Qwen3: parity with transformers' Qwen3ForCausalLM through the converter (tied and untied,
head_dim independent of hidden / heads, QK-norm), KV-cache decoding, the scan over layers, LoRA, configs,
presets and the round trip hf-to-flax -> flax-to-hf.

The Hugging Face models are small random ones built here with torch (nothing is downloaded); every
comparison is float32 on a padded batch (unpadded, right- and left-padded rows).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax.errors import InputError
from distfair_jax.model import family, lora
from distfair_jax.model.layers import RMSNorm
from distfair_jax.model.llama_config import LlamaConfig
from distfair_jax.model.presets import get_preset, param_stats
from distfair_jax.model.qwen3 import Qwen3

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


def _padded_batch(vocab: int, batch: int = 3, length: int = 16, seed: int = 0):
  """[batch, length]: an unpadded row, a right-padded and a left-padded one."""
  ids = np.random.default_rng(seed).integers(4, vocab, size=(batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, length - 5:] = 0
  mask[2, :6] = 0
  return np.where(mask == 1, ids, 0), mask


def _randomize(model) -> None:
  """O(1) logits; norms away from their ones init (so a missing QK-norm shows)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "embed_tokens" in name or "lm_head" in name:
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
  with torch.no_grad():  # logits O(3): float32 rounding well under the 1e-5 tolerance
    model.model.norm.weight.mul_(0.3)


def _hf_logits(hf_model, ids, mask) -> np.ndarray:
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.float().numpy()


def _our_logits(model, ids, mask) -> np.ndarray:
  return np.asarray(nnx.jit(lambda m, i, a: m.logits(m(i, a)))(
      model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
  """{case: (random Qwen3ForCausalLM directory, its model)}."""
  out = {}
  for case, change in CASES.items():
    data = dict(QWEN3_06B, **SHRINK, **change)
    conf = transformers.Qwen3Config(**{k: v for k, v in data.items() if k != "architectures"})
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(conf).eval()
    _randomize(model)
    d = tmp_path_factory.mktemp("hf") / f"qwen3-{case}"
    model.save_pretrained(d, safe_serialization=True)
    out[case] = (d, model)
  return out


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict:
  from distfair_jax.convert.hf import hf_to_flax
  return {case: hf_to_flax(d, tmp_path_factory.mktemp("flax") / case, dtype="float32")
          for case, (d, _) in hf_dirs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_match_transformers(hf_dirs, converted, case):
  from distfair_jax.model.loader import load_pretrained
  model, _, config = load_pretrained(converted[case], scan_layers=case == "untied")
  assert type(model) is Qwen3 and config.model_type == "qwen3" and not config.attention_bias
  assert config.head_dim == 24 and config.tie_word_embeddings == (case == "tied")
  assert isinstance(model.layers.self_attn.q_norm if config.scan_layers
                    else model.layers[0].self_attn.q_norm, RMSNorm)
  ids, mask = _padded_batch(config.vocab_size)
  ref, got = _hf_logits(hf_dirs[case][1], ids, mask), _our_logits(model, ids, mask)
  real = mask.astype(bool)
  diff = float(np.abs(ref - got)[real].max())
  print(f"qwen3 {case} (scan={config.scan_layers}), float32, padded batch {ids.shape}: "
        f"max abs logit difference = {diff:.3e} (logit scale {np.abs(ref[real]).max():.1f})")
  assert diff <= 1e-5 and np.abs(ref[real]).max() > 1.0


def test_flax_to_hf_round_trip_is_bit_exact(hf_dirs, converted, tmp_path):
  from safetensors.numpy import load_file
  from distfair_jax.convert.hf import flax_to_hf
  src = hf_dirs["untied"][0]
  out = flax_to_hf(converted["untied"], tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
  a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
  assert sorted(a) == sorted(b) and "model.layers.1.self_attn.k_norm.weight" in b
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(loaded).__name__ == "Qwen3ForCausalLM" and loaded.config.head_dim == 24
  assert LlamaConfig.from_hf(out) == LlamaConfig.from_hf(src)


def test_cached_decode_equals_full_forward():
  model = Qwen3(LlamaConfig(**SHRINK, architecture="Qwen3ForCausalLM"), rngs=nnx.Rngs(3))
  ids, mask = _padded_batch(128, length=10, seed=1)
  new = np.random.default_rng(2).integers(4, 128, size=(3, 4))
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask, new, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.prefill(ids, mask, cache)
    out = [m.logits(h)]
    for j in range(new.shape[1]):
      h, cache = m.decode_step(new[:, j:j + 1], cache)
      out.append(m.logits(h))
    return jnp.concatenate(out, axis=1)

  got = np.asarray(run(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                       jnp.asarray(new, jnp.int32), model.init_cache(3, 14)))
  full = _our_logits(model, np.concatenate([ids, new], 1),
                     np.concatenate([mask, np.ones_like(new)], 1))
  real = np.concatenate([mask, np.ones_like(new)], 1).astype(bool)
  np.testing.assert_allclose(got[real], full[real], atol=1e-5)


def test_lora_all_linear_and_logical_axes():
  model = Qwen3(LlamaConfig(**SHRINK, architecture="Qwen3ForCausalLM"), rngs=nnx.Rngs(0))
  assert lora.linear_projections(model) == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj")
  lora.apply_lora(model, ["all-linear"], rank=2, alpha=4.0)
  attn = model.layers[0].self_attn
  assert isinstance(attn.q_proj, lora.LoRALinear) and isinstance(attn.q_norm, RMSNorm)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path


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
  path = tmp_path / "config.json"
  path.write_text(json.dumps(dict(QWEN3_06B, **change)))
  with pytest.raises(InputError, match=message) as info:
    LlamaConfig.from_hf(path)
  assert str(path) in str(info.value) and "\n" not in str(info.value)


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
