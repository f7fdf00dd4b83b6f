"""Tests for the Flax NNX Llama family: HF parity, KV cache, remat, configs and presets."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax.errors import InputError
from distfair_jax.model import (KVCache, Llama, LlamaConfig, get_preset, param_stats,
                                positions_from_mask, rope_inv_freq)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Left-padded row, right-padded row, an unpadded row.
IDS = np.array([[0, 0, 0, 5, 17, 9, 33, 2],
                [7, 8, 9, 10, 11, 0, 0, 0],
                [3, 1, 4, 1, 5, 9, 2, 6]], dtype=np.int32)
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1],
                 [1, 1, 1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.int32)


def small_config(**kw) -> LlamaConfig:
  base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=64)
  base.update(kw)
  return LlamaConfig(**base)


# ------------------------------------------------------------------------------------------------
# Parity with transformers (PyTorch)
# ------------------------------------------------------------------------------------------------


def _torch_model(cfg: LlamaConfig):
  torch.manual_seed(0)
  hf_cls = {"LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
  conf_cls, model_cls = hf_cls[cfg.architecture]
  hf_conf = conf_cls(**cfg.to_hf())
  hf_conf._attn_implementation = "eager"
  model = model_cls(hf_conf).eval()
  with torch.no_grad():  # weights large enough that logits are O(1) and differences meaningful
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.3 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
  return model


def _copy_torch_into(model: Llama, hf_model) -> None:
  """Test-local HF -> NNX mapping (the real converter lives in distfair_jax/convert/hf.py)."""
  for name, tensor in hf_model.state_dict().items():
    value = tensor.detach().numpy()
    parts = name.split(".")
    if parts[0] == "model":
      parts = parts[1:]
    if parts == ["lm_head", "weight"] and model.config.tie_word_embeddings:
      continue
    obj = model
    for part in parts[:-1]:
      obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    if isinstance(obj, nnx.Embed):
      var = obj.embedding
    elif isinstance(obj, nnx.Linear):
      var = obj.kernel if parts[-1] == "weight" else obj.bias
      value = value.T if parts[-1] == "weight" else value
    else:  # RMSNorm
      var = obj.scale
    assert var[...].shape == value.shape, name
    var.value = jnp.asarray(value)


PARITY_CASES = {
    "llama_gqa_llama3_untied": dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0),
    "llama_tied_linear": dict(tie_word_embeddings=True,
                              rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM", attention_bias=True, rms_norm_eps=1e-6,
                       rope_theta=1000000.0),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(case):
  cfg = small_config(**PARITY_CASES[case])
  hf_model = _torch_model(cfg)
  model = Llama(cfg, rngs=nnx.Rngs(1))
  _copy_torch_into(model, hf_model)
  positions = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(IDS, dtype=torch.long),
                   attention_mask=torch.tensor(MASK, dtype=torch.long),
                   position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  ours = np.asarray(model.logits(model(jnp.asarray(IDS), jnp.asarray(MASK))))
  real = MASK.astype(bool)
  diff = np.abs(ours[real] - ref[real]).max()
  assert np.abs(ref[real]).max() > 1.0  # the comparison is not trivially small
  assert diff <= 1e-4, f"{case}: max abs logit difference {diff}"


def test_rope_inv_freq_matches_transformers():
  cfg = small_config(rope_theta=500000.0, head_dim=32, rope_scaling={
      "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64})
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**cfg.to_hf()), "cpu")
  np.testing.assert_allclose(rope_inv_freq(cfg), hf_inv.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_model():
  cfg = small_config(num_hidden_layers=2)
  return Llama(cfg, rngs=nnx.Rngs(3))


def test_kv_cache_decode_matches_full_forward(cached_model):
  model = cached_model
  graphdef, state = nnx.split(model)
  new_tokens = np.array([[11, 12, 13], [21, 22, 23], [31, 32, 33]], np.int32)
  n_new = new_tokens.shape[1]

  @jax.jit
  def prefill(state, ids, mask, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.prefill(ids, mask, cache)
    return m.logits(h), cache

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(state, tokens, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.decode_step(tokens, cache)
    return m.logits(h)[:, 0], cache

  cache = model.init_cache(IDS.shape[0], IDS.shape[1] + n_new + 2)
  assert isinstance(cache, KVCache) and cache.max_length == IDS.shape[1] + n_new + 2
  prefill_logits, cache = prefill(state, IDS, MASK, cache)
  decoded = []
  for j in range(n_new):
    logits, cache = step(state, new_tokens[:, j:j + 1], cache)
    decoded.append(np.asarray(logits))
  assert int(cache.index) == IDS.shape[1] + n_new
  np.testing.assert_array_equal(np.asarray(cache.positions), MASK.sum(1) + n_new)

  full_ids = np.concatenate([IDS, new_tokens], axis=1)
  full_mask = np.concatenate([MASK, np.ones_like(new_tokens)], axis=1)
  full = np.asarray(model.logits(model(jnp.asarray(full_ids), jnp.asarray(full_mask))))
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(prefill_logits)[real], full[:, :IDS.shape[1]][real],
                             atol=1e-5)
  for j in range(n_new):
    np.testing.assert_allclose(decoded[j], full[:, IDS.shape[1] + j], atol=1e-5)


def test_shared_prefix_packing_equals_separate_sequences():
  """[prompt | branch a | branch b | pad] with segment ids: each branch's hidden states equal those of
  the separate sequence prompt + branch, and the prompt's are computed once."""
  model = Llama(small_config(), rngs=nnx.Rngs(1))
  prompt, branches = [5, 17, 9, 33], [[40, 41, 42], [50, 51]]
  t = 12
  ids = np.zeros((1, t), np.int32)
  pos = np.zeros((1, t), np.int32)
  seg = np.zeros((1, t), np.int32)
  ids[0, :4], pos[0, :4], seg[0, :4] = prompt, np.arange(4), 1
  at = 4
  for c, br in enumerate(branches):
    n = len(br)
    ids[0, at:at + n], pos[0, at:at + n], seg[0, at:at + n] = br, np.arange(4, 4 + n), 2 + c
    at += n
  packed = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos),
                            segment_ids=jnp.asarray(seg)))
  at = 4
  for br in branches:
    alone = np.asarray(model(jnp.asarray([prompt + br], jnp.int32)))
    np.testing.assert_allclose(packed[0, :4], alone[0, :4], atol=1e-5)
    np.testing.assert_allclose(packed[0, at:at + len(br)], alone[0, 4:], atol=1e-5)
    at += len(br)
  assert np.isfinite(packed).all()  # padding rows see themselves: no empty softmax


def test_positions_from_mask():
  np.testing.assert_array_equal(np.asarray(positions_from_mask(jnp.asarray(MASK)))[0],
                                [0, 0, 0, 0, 1, 2, 3, 4])
  np.testing.assert_array_equal(np.asarray(positions_from_mask(jnp.asarray(MASK)))[1],
                                [0, 1, 2, 3, 4, 4, 4, 4])


# ------------------------------------------------------------------------------------------------
# dtype, remat
# ------------------------------------------------------------------------------------------------


def test_bfloat16_forward_dtypes():
  model = Llama(small_config(dtype="bfloat16", param_dtype="bfloat16", num_hidden_layers=1),
                rngs=nnx.Rngs(0))
  assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  h, logits = nnx.jit(lambda m, i, k: (m(i, k), m.logits(m(i, k))))(
      model, jnp.asarray(IDS), jnp.asarray(MASK))
  assert h.dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and logits.shape == IDS.shape + (96,)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_remat_policies_same_value_and_grad():
  results = []
  for policy in ("none", "full", "dots"):
    model = Llama(small_config(remat=policy, num_hidden_layers=1), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(state):
      m = nnx.merge(graphdef, state)
      return jnp.mean(m.logits(m(jnp.asarray(IDS), jnp.asarray(MASK))) ** 2)

    jaxpr = str(jax.make_jaxpr(loss)(state))
    expected = {"none": None, "full": "policy=None", "dots": "policy=DotsSaveable"}[policy]
    assert (expected is None and "remat" not in jaxpr) or (expected and expected in jaxpr)
    value, grads = jax.jit(jax.value_and_grad(loss))(state)
    results.append((float(value), jax.tree.leaves(grads)))
  for value, grads in results[1:]:
    assert value == pytest.approx(results[0][0], rel=1e-6)
    for a, b in zip(grads, results[0][1]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_tied_model_has_no_lm_head_and_unembedding_shapes():
  tied = Llama(small_config(tie_word_embeddings=True, num_hidden_layers=1), rngs=nnx.Rngs(0))
  untied = Llama(small_config(num_hidden_layers=1), rngs=nnx.Rngs(0))
  assert not hasattr(tied, "lm_head") and "lm_head" not in nnx.state(tied)
  assert untied.lm_head.kernel[...].shape == (64, 96)
  np.testing.assert_array_equal(np.asarray(tied.unembedding()),
                                np.asarray(tied.embed_tokens.embedding[...]).T)
  assert untied.unembedding().shape == (64, 96)
  bias = Llama(small_config(attention_bias=True, num_hidden_layers=1), rngs=nnx.Rngs(0))
  assert bias.layers[0].self_attn.k_proj.bias[...].shape == (32,)
  assert bias.layers[0].self_attn.o_proj.bias[...].shape == (64,)  # Llama: o_proj too, as HF
  qwen = Llama(small_config(attention_bias=True, num_hidden_layers=1,
                            architecture="Qwen2ForCausalLM"), rngs=nnx.Rngs(0))
  assert qwen.layers[0].self_attn.o_proj.bias is None  # Qwen2: q, k, v only


def test_every_parameter_has_logical_axes():
  model = nnx.eval_shape(lambda: Llama(small_config(attention_bias=True), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path
  attn = model.layers[0].self_attn
  assert attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
  assert model.embed_tokens.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")


# ------------------------------------------------------------------------------------------------
# Config: from_hf / to_hf and bad inputs
# ------------------------------------------------------------------------------------------------


def test_from_hf_roundtrip_and_both_rope_spellings(tmp_path):
  cfg = small_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16},
                     bos_token_id=1, eos_token_id=2)
  d = cfg.to_hf()
  assert LlamaConfig.from_hf(d) == cfg
  # transformers 5.x writes only rope_parameters; 4.x only rope_theta + rope_scaling.
  new_style = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling")}
  old_style = {k: v for k, v in d.items() if k != "rope_parameters"}
  assert LlamaConfig.from_hf(new_style) == cfg
  assert LlamaConfig.from_hf(old_style) == cfg
  nested = {**new_style, "rope_parameters": {"full_attention": d["rope_parameters"]}}
  assert LlamaConfig.from_hf(nested) == cfg
  hf_saved = tmp_path / "hf"
  transformers.LlamaConfig(**d).save_pretrained(hf_saved)
  assert LlamaConfig.from_hf(hf_saved) == cfg  # a directory
  assert LlamaConfig.from_hf(hf_saved / "config.json", dtype="bfloat16").dtype == "bfloat16"
  qwen = small_config(architecture="Qwen2ForCausalLM", attention_bias=True, eos_token_id=(2, 3))
  transformers.Qwen2Config(**qwen.to_hf()).save_pretrained(tmp_path / "qwen")
  assert LlamaConfig.from_hf(tmp_path / "qwen") == qwen


def test_from_hf_defaults():
  d = dict(architectures=["Qwen2ForCausalLM"], vocab_size=10, hidden_size=32,
           intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
  cfg = LlamaConfig.from_hf(d)
  assert cfg.attention_bias and cfg.head_dim == 8 and cfg.num_key_value_heads == 4
  assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0
  assert LlamaConfig.from_hf({**d, "architectures": None, "model_type": "llama"}).architecture == (
      "LlamaForCausalLM")
  hash(cfg)  # usable as static data in NNX graph definitions


def _write(tmp_path, data) -> str:
  path = tmp_path / "config.json"
  path.write_text(json.dumps(data))
  return str(path)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures: .* got MistralForCausalLM"),
    ({"hidden_size": None}, "config.json: hidden_size: expected a value"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None},
     "rope_scaling.rope_type: expected one of default, llama3, linear, got 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1.0}},
     "rope_parameters.rope_type: .* got 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1.0}},
     "rope_parameters.low_freq_factor: expected a number"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                          "sliding_attention": {"rope_type": "default"}}},
     "rope_parameters: expected one set of RoPE parameters"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: expected a divisor"),
    ({"hidden_act": "gelu"}, "hidden_act: expected silu"),
])
def test_from_hf_bad_inputs(tmp_path, change, message):
  data = small_config().to_hf()
  data.update(change)
  path = _write(tmp_path, data)
  with pytest.raises(InputError, match=message) as info:
    LlamaConfig.from_hf(path)
  assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_from_hf_missing_file_and_bad_fields(tmp_path):
  with pytest.raises(InputError, match="config.json: expected a Hugging Face config file"):
    LlamaConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(InputError, match="expected valid JSON"):
    LlamaConfig.from_hf(tmp_path)
  with pytest.raises(InputError, match="LlamaConfig: remat: expected one of none, full, dots"):
    small_config(remat="some")
  with pytest.raises(InputError, match="LlamaConfig: dtype: expected one of"):
    small_config(dtype="float8")


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------


def _count(v, d, f, n, h, kv, hd, *, tied, bias):
  attn = d * h * hd * 2 + d * kv * hd * 2 + (h * hd + 2 * kv * hd if bias else 0)
  layer = attn + 3 * d * f + 2 * d
  return v * d * (1 if tied else 2) + n * layer + d


def test_preset_param_counts_from_eval_shape():
  llama1b = param_stats("llama3.2-1b")
  assert llama1b.num_params == _count(128256, 2048, 8192, 16, 32, 8, 64, tied=True, bias=False)
  assert llama1b.num_params == 1_235_814_400
  qwen7b = param_stats("qwen2.5-7b", {"fsdp": 4, "tensor": 2})
  assert qwen7b.num_params == _count(152064, 3584, 18944, 28, 28, 4, 128, tied=False, bias=True)
  assert qwen7b.num_params == 7_615_616_512
  assert qwen7b.total_bytes == 4 * qwen7b.num_params
  # Almost everything is split 8 ways: per-device bytes close to an eighth.
  assert qwen7b.total_bytes / 8 <= qwen7b.bytes_per_device < qwen7b.total_bytes / 7.9


def test_presets_shapes_and_unknown_name():
  cfg = get_preset("llama3.1-8b")
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim) == (
      4096, 14336, 32, 128)
  assert cfg.rope_scaling["factor"] == 8.0 and not cfg.tie_word_embeddings
  q15 = get_preset("qwen2.5-1.5b", dtype="bfloat16")
  assert (q15.vocab_size, q15.num_key_value_heads, q15.attention_bias, q15.tie_word_embeddings,
          q15.dtype) == (151936, 2, True, True, "bfloat16")
  tiny = get_preset("tiny")
  assert tiny.vocab_size == 2048 and tiny.num_key_value_heads < tiny.num_attention_heads
  with pytest.raises(InputError, match="expected one of tiny, llama3.2-1b, llama3.1-8b, "
                                       "qwen2.5-1.5b, qwen2.5-7b, gemma2-2b, gemma2-9b, "
                                       "qwen3-0.6b, qwen3-8b, gemma3-270m, gemma3-1b, gemma3-4b, "
                                       "got 'llama-70b'"):
    get_preset("llama-70b")
  with pytest.raises(InputError, match="hidden: expected a LlamaConfig field"):
    get_preset("tiny", hidden=3)


def test_tiny_preset_is_a_causal_model_of_the_tiny_tokenizer():
  """The built-in default: its vocabulary holds the tiny tokenizer's, it is untied (see presets.py),
  and it is causal (a later token never changes an earlier position's logits)."""
  from distfair_jax.data.tokenizer import build_tiny_tokenizer
  cfg = get_preset("tiny")
  tok = build_tiny_tokenizer()
  assert len(tok) <= cfg.vocab_size and not cfg.tie_word_embeddings
  model = Llama(cfg, rngs=nnx.Rngs(0))
  ids = np.asarray([tok("A nurse walks in.")["input_ids"]] * 2, np.int32)
  ids[1, -1] = (ids[1, -1] + 7) % len(tok)  # the rows differ in their last token only
  forward = nnx.jit(lambda m, i: m.logits(m(i, jnp.ones_like(i))))
  logits = np.asarray(forward(model, jnp.asarray(ids)))
  assert logits.shape == (2, ids.shape[1], cfg.vocab_size) and np.isfinite(logits).all()
  np.testing.assert_allclose(logits[0, :-1], logits[1, :-1], rtol=1e-5, atol=1e-5)
  assert np.abs(logits[0, -1] - logits[1, -1]).max() > 1e-3
