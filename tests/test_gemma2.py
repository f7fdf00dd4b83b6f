"""Gemma 2: parity with transformers' Gemma2ForCausalLM, KV-cache decoding, scan, LoRA, soft-capped
log-probs, configs, presets and the converter (both ways, `convert check`).

The Hugging Face models are small random ones built here with torch; the converter's takes its
config from ../shared/fixtures/hf-formats/gemma-2-it/config.json (gemma-2-2b-it), shrunk (hidden
size, layers, heads; the real 256000-token vocabulary and tying kept), or from a literal copy of its
fields when the fixture is absent. Every parity config has a sliding window (8) shorter than its
sequences and soft-capping values small enough that the raw scores and logits exceed them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax import losses as L
from distfair_jax.model import family, layout, lora
from distfair_jax.model.gemma2 import Gemma2, GemmaRMSNorm
from distfair_jax.model.llama_config import LlamaConfig, gemma2_layer_types
from distfair_jax.model.presets import get_preset, param_stats
from parity import assert_bad_config, assert_same_safetensors, compare, our_logits, padded_batch
from parity import random_hf_model, randomize, save_random_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "hf-formats" / "gemma-2-it"
# gemma-2-2b-it's config.json fields, for when the fixture is absent.
GEMMA2_2B_IT = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "bfloat16", "vocab_size": 256000}
# Shrunk: 3 layers (sliding, full, sliding), window 8, caps that bite.
SHRINK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)


def fixture_config() -> dict:
  """gemma-2-2b-it's config.json (the fixture's, else the literal copy)."""
  path = FIXTURE / "config.json"
  return json.loads(path.read_text()) if path.is_file() else copy.deepcopy(GEMMA2_2B_IT)


def small_config(**kw) -> LlamaConfig:
  base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              architecture="Gemma2ForCausalLM", hidden_act="gelu_pytorch_tanh",
              query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
              sliding_window=8, max_position_embeddings=64, tie_word_embeddings=True)
  base.update(kw)
  return LlamaConfig(**base)


# [4, 24]: an unpadded row, then right-, left-, right-padded rows (all longer than the window of 8).
BATCH = dict(batch=4, length=24)


def _padded_batch(vocab: int, **kw):
  return padded_batch(vocab, **{**BATCH, **kw})


def _randomize(model) -> None:
  """Weights large enough that logits are O(1), scores and logits exceed the small caps, and the
  (1 + w) norms are away from their zero init; embed_tokens x sqrt(hidden) = 8 in the model:
  residuals O(4)."""
  randomize(model, embed_scale=0.5, embed_names=("embed_tokens",))


def _torch_model(cfg: LlamaConfig, seed: int = 0):
  hf_conf = transformers.Gemma2Config(**cfg.to_hf())
  hf_conf._attn_implementation = "eager"
  return random_hf_model(hf_conf, transformers.Gemma2ForCausalLM, _randomize, seed)


def _copy_torch_into(model, hf_model) -> None:
  """Test-local HF -> NNX mapping (the real converter lives in distfair_jax/convert/hf.py)."""
  for name, tensor in hf_model.state_dict().items():
    value = tensor.detach().numpy()
    parts = name.split(".")
    parts = parts[1:] if parts[0] == "model" else parts
    if parts == ["lm_head", "weight"] and model.config.tie_word_embeddings:
      continue
    obj = model
    for part in parts[:-1]:
      obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    if isinstance(obj, nnx.Embed):
      var = obj.embedding
    elif isinstance(obj, nnx.Linear):
      var, value = obj.kernel, value.T
    else:
      assert isinstance(obj, GemmaRMSNorm), name
      var = obj.scale
    assert var[...].shape == value.shape, name
    var.value = jnp.asarray(value)


def _max_diff(a, b) -> float:
  return max(float(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------

PARITY_CASES = {
    # GQA, tied, sliding / full / sliding
    "tied_gqa": dict(),
    # untied, one kv head, a layer pattern of its own, other caps
    "untied_mqa_layer_types": dict(
        tie_word_embeddings=False, num_key_value_heads=1, num_hidden_layers=4,
        layer_types=("full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"), attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
        query_pre_attn_scalar=16),
}


@pytest.fixture(scope="module", params=list(PARITY_CASES))
def parity_pair(request):
  cfg = small_config(**PARITY_CASES[request.param])
  hf_model = _torch_model(cfg)
  model = Gemma2(cfg, rngs=nnx.Rngs(1))
  _copy_torch_into(model, hf_model)
  return request.param, cfg, hf_model, model


def test_logits_match_transformers(parity_pair):
  case, cfg, hf_model, model = parity_pair
  c = compare(hf_model, model, cfg.vocab_size, **BATCH)
  ids, mask, ours, real = c.ids, c.mask, c.got, c.real
  print(f"gemma2 {case}: max abs logit difference vs transformers (float32) = {c.diff:.3e}")
  assert c.diff <= 1e-5, f"{case}: {c.diff}"
  # The caps bite: raw output logits exceed the final cap; the capped ones stay inside it.
  raw = np.asarray(jnp.einsum("bld,dv->blv", model(jnp.asarray(ids), jnp.asarray(mask)),
                              model.unembedding()))
  assert np.abs(raw[real]).max() > 1.5 * cfg.final_logit_softcapping
  assert np.abs(ours).max() <= cfg.final_logit_softcapping
  # Each feature changes the result, so the parity covers it.
  for change in (dict(attn_logit_softcapping=None), dict(sliding_window=ids.shape[1]),
                 dict(query_pre_attn_scalar=100.0)):
    other = nnx.merge(nnx.graphdef(Gemma2(cfg.replace(**change), rngs=nnx.Rngs(0))),
                      nnx.state(model))
    assert np.abs(our_logits(other, ids, mask) - ours)[real].max() > 1e-2, change


def test_scan_layers_match_transformers(parity_pair):
  case, cfg, hf_model, model = parity_pair
  diff = compare(hf_model, _stacked_copy(model), cfg.vocab_size, **BATCH).diff
  print(f"gemma2 {case}, scan_layers: max abs logit difference = {diff:.3e}")
  assert diff <= 1e-5


def test_layer_types_and_norm_init():
  cfg = small_config(num_hidden_layers=5)
  assert cfg.layer_types == gemma2_layer_types(5) == (
      "sliding_attention", "full_attention", "sliding_attention", "full_attention",
      "sliding_attention")
  assert cfg.is_sliding == (True, False, True, False, True)
  hf = transformers.Gemma2Config(**small_config(num_hidden_layers=5, layer_types=None).to_hf())
  assert tuple(hf.layer_types) == cfg.layer_types
  model = Gemma2(cfg, rngs=nnx.Rngs(0))
  assert float(jnp.abs(model.layers[0].pre_feedforward_layernorm.scale[...]).max()) == 0.0
  assert not hasattr(model, "lm_head")
  assert type(family.build(cfg, rngs=nnx.Rngs(0))) is Gemma2
  from distfair_jax.model.llama import Llama
  with pytest.raises(ValueError, match="family.build"):
    Llama(cfg, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------
# KV cache, scan, LoRA
# ------------------------------------------------------------------------------------------------


def _stacked_copy(loop, **changes):
  cfg = loop.config.replace(scan_layers=True, **changes)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: family.build(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, layout.stack_layers(nnx.to_pure_dict(nnx.state(loop))))
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def decode_model():
  """Window 5 < the 12-token prompts, so decoded tokens see a window that moves past them."""
  return Gemma2(small_config(sliding_window=5, final_logit_softcapping=1.0), rngs=nnx.Rngs(3))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decode_equals_full_forward(decode_model, scan):
  model = _stacked_copy(decode_model) if scan else decode_model
  ids, mask = _padded_batch(96, batch=3, length=12, seed=1)
  new = np.random.default_rng(2).integers(4, 96, size=(3, 6))
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, ids, mask, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.prefill(ids, mask, cache)
    return m.logits(h), cache

  @jax.jit
  def step(state, tokens, cache):
    m = nnx.merge(graphdef, state)
    h, cache = m.decode_step(tokens, cache)
    return m.logits(h)[:, 0], cache

  cache = model.init_cache(3, 12 + new.shape[1])
  first, cache = prefill(state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), cache)
  decoded = []
  for j in range(new.shape[1]):
    logits, cache = step(state, jnp.asarray(new[:, j:j + 1], jnp.int32), cache)
    decoded.append(np.asarray(logits))
  full = our_logits(model, np.concatenate([ids, new], 1),
                     np.concatenate([mask, np.ones_like(new)], 1))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(first)[real], full[:, :12][real], atol=1e-5)
  for j, got in enumerate(decoded):
    np.testing.assert_allclose(got, full[:, 12 + j], atol=1e-5)


def test_scan_forward_and_gradients_equal_the_loop():
  loop = Gemma2(small_config(remat="full", num_hidden_layers=4), rngs=nnx.Rngs(0))
  scan = _stacked_copy(loop)
  assert scan.layers.post_feedforward_layernorm.scale.get_metadata()["out_sharding"] == (
      "layers", "norm")
  ids, mask = (jnp.asarray(x, jnp.int32) for x in _padded_batch(96))
  seg = jnp.asarray([[1] * 10 + [2] * 6 + [3] * 6 + [0] * 2] * 4)
  pos = jnp.asarray([list(range(10)) + list(range(10, 16)) * 2 + [0, 0]] * 4)
  assert _max_diff(loop(ids, mask), scan(ids, mask)) <= 2e-6
  assert _max_diff(loop(ids, segment_ids=seg, positions=pos),
                   scan(ids, segment_ids=seg, positions=pos)) <= 2e-6
  loss = lambda m: jnp.mean(m.logits(m(ids, mask)) ** 2)
  g_loop, g_scan = (nnx.to_pure_dict(nnx.grad(loss)(m)) for m in (loop, scan))
  assert _max_diff(layout.stack_layers(g_loop), g_scan) <= 1e-6
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_scan)) > 1e-4


def test_packed_branches_equal_separate_sequences_with_a_window():
  """A branch of a packed row sees the prefix and itself; the window counts positions."""
  model = Gemma2(small_config(sliding_window=4), rngs=nnx.Rngs(1))
  prompt, branches = [5, 17, 9, 33, 8, 21], [[40, 41, 42, 43], [50, 51, 52]]
  ids, pos, seg = (np.zeros((1, 16), np.int32) for _ in range(3))
  ids[0, :6], pos[0, :6], seg[0, :6] = prompt, np.arange(6), 1
  at = 6
  for c, br in enumerate(branches):
    n = len(br)
    ids[0, at:at + n], pos[0, at:at + n], seg[0, at:at + n] = br, np.arange(6, 6 + n), 2 + c
    at += n
  packed = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(pos),
                            segment_ids=jnp.asarray(seg)))
  at = 6
  for br in branches:
    alone = np.asarray(model(jnp.asarray([prompt + br], jnp.int32)))
    np.testing.assert_allclose(packed[0, at:at + len(br)], alone[0, 6:], atol=1e-5)
    at += len(br)


def test_lora_on_gemma_projections():
  model = Gemma2(small_config(), rngs=nnx.Rngs(0))
  targets = ("q_proj", "v_proj", "gate_proj", "down_proj")
  lora.apply_lora(model, targets, rank=4, alpha=8.0, dropout=0.1)
  for layer in model.layers:
    b = layer.self_attn.q_proj.lora_b
    b[...] = 0.1 * jax.random.normal(jax.random.key(1), b.shape)
    for i, proj in enumerate((layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.down_proj)):
      proj.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2 + i), proj.lora_b.shape)
  assert model.layers[0].mlp.gate_proj.lora_a.get_metadata()["out_sharding"] == ("embed", None)
  ids, mask = (jnp.asarray(x, jnp.int32) for x in _padded_batch(96))
  model.eval()
  with_adapters = model(ids, mask)
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    h = m(ids, mask)
    return -jnp.mean(L.token_logps_from_hidden(h, m.unembedding(), ids, mask,
                                               softcap=m.logit_softcap))

  grads = jax.grad(loss)(params)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))
  merged = lora.merge_lora(nnx.clone(model))  # W + AB folded: another rounding of the same sum
  assert _max_diff(merged(ids, mask), with_adapters) <= 1e-5
  # stacked adapters under the scan give the same forward
  scan = Gemma2(small_config(scan_layers=True), rngs=nnx.Rngs(0))
  lora.apply_lora(scan, targets, rank=4, alpha=8.0, dropout=0.1)
  state = nnx.state(scan)
  nnx.replace_by_pure_dict(state, layout.stack_layers(nnx.to_pure_dict(nnx.state(model))))
  nnx.update(scan, state)
  scan.eval()
  assert _max_diff(scan(ids, mask), with_adapters) <= 2e-6


def test_every_parameter_has_logical_axes():
  model = nnx.eval_shape(lambda: Gemma2(small_config(tie_word_embeddings=False),
                                        rngs=nnx.Rngs(0)))
  names = set()
  for path, var in nnx.to_flat_state(nnx.state(model)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), path
    names.add(path[-2] if path[-1] == "scale" else None)
  assert {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", "norm"} <= names


# ------------------------------------------------------------------------------------------------
# Soft-capped logits wherever logits are made
# ------------------------------------------------------------------------------------------------


def test_losses_and_sampler_see_the_capped_logits():
  from distfair_jax.evaluation import sample
  from distfair_jax.train.stages import common
  from distfair_jax.data import batches as B
  model = Gemma2(small_config(final_logit_softcapping=1.0), rngs=nnx.Rngs(4))
  ids, mask = (jnp.asarray(x, jnp.int32) for x in _padded_batch(96))
  labels = jnp.roll(ids, -1, axis=1)
  logits = model.logits(model(ids, mask))
  assert float(jnp.abs(logits).max()) < 1.0
  want = L.token_logps(logits, labels, mask)
  seq = B.Sequences(input_ids=ids, attention_mask=mask, labels=labels, label_mask=mask)
  _, _, tok, _ = common.sequence_logps(model, seq, tile_size=8)
  np.testing.assert_allclose(np.asarray(tok), np.asarray(want), atol=1e-5)
  pos = jnp.asarray([20, 10, 23, 15])
  steer = L.steering_logits_from_hidden(model(ids, mask), model.unembedding(), pos,
                                        softcap=model.logit_softcap)
  np.testing.assert_allclose(np.asarray(steer),
                             np.asarray(logits[jnp.arange(4), pos]), atol=1e-5)
  # The sampler's last-position logits (prefill, steering distribution) are capped too.
  last = sample._last_logits(model, model(ids, mask), mask)
  assert float(jnp.abs(last).max()) < 1.0


# ------------------------------------------------------------------------------------------------
# Config: from_hf / to_hf and bad inputs
# ------------------------------------------------------------------------------------------------


def test_from_hf_of_the_published_config(tmp_path):
  cfg = LlamaConfig.from_hf(fixture_config())
  assert (cfg.model_type, cfg.hidden_act, cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping,
          cfg.final_logit_softcapping, cfg.sliding_window) == (
              "gemma2", "gelu_pytorch_tanh", 256.0, 50.0, 30.0, 4096)
  assert cfg.tie_word_embeddings and cfg.eos_token_id == (1, 107) and cfg.pad_token_id == 0
  assert cfg.layer_types == gemma2_layer_types(26)
  assert cfg == get_preset("gemma2-2b", eos_token_id=(1, 107))
  d = cfg.to_hf()
  assert LlamaConfig.from_hf(d) == cfg
  transformers.Gemma2Config(**d).save_pretrained(tmp_path)
  assert LlamaConfig.from_hf(tmp_path) == cfg
  # transformers' defaults where a field is absent; an explicit null turns a cap off.
  sparse = {k: v for k, v in fixture_config().items()
            if k not in ("attn_logit_softcapping", "head_dim", "tie_word_embeddings")}
  sparse["final_logit_softcapping"] = None
  sparse["hidden_activation"] = None
  got = LlamaConfig.from_hf(sparse)
  assert got.hidden_act == "gelu_pytorch_tanh"
  assert (got.attn_logit_softcapping, got.final_logit_softcapping, got.head_dim,
          got.tie_word_embeddings) == (50.0, None, 256, True)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling.rope_type: expected one of default, llama3, linear, got 'yarn'"),
    ({"hidden_activation": "gelu"}, "hidden_activation: expected gelu_pytorch_tanh, got 'gelu'"),
    ({"attention_bias": True}, "attention_bias: expected false"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention: expected false"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types: expected one entry per layer \\(26\\)"),
    ({"layer_types": ["chunked_attention"] * 26}, "layer_types: expected a list of"),
    ({"sliding_window": None}, "sliding_window: expected a positive integer for the "
                               "sliding_attention layers"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar: expected a positive number"),
    ({"attn_logit_softcapping": "big"}, "attn_logit_softcapping: expected a positive number"),
])
def test_from_hf_bad_inputs(tmp_path, change, message):
  data = fixture_config()
  data.update(change)
  assert_bad_config(tmp_path, data, message)


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------


def test_preset_param_counts():
  """The published sizes: gemma-2-2b 2,614,341,888 and gemma-2-9b 9,241,705,984 parameters."""
  assert param_stats("gemma2-2b").num_params == 2_614_341_888
  nine = param_stats("gemma2-9b", {"fsdp": 4, "tensor": 4})
  assert nine.num_params == 9_241_705_984
  assert nine.total_bytes / 16 <= nine.bytes_per_device < nine.total_bytes / 15
  cfg = get_preset("gemma2-9b", num_hidden_layers=4)
  assert cfg.layer_types == gemma2_layer_types(4) and cfg.head_dim == 256


def test_flops_count_the_window_on_sliding_layers():
  from distfair_jax.train.flops import forward_flops_per_token
  cfg = get_preset("gemma2-2b")
  full = cfg.replace(sliding_window=None, layer_types=("full_attention",) * 26)
  assert forward_flops_per_token(cfg, 1024) == forward_flops_per_token(full, 1024)
  # 13 sliding layers see 4096 of 8192 positions
  saved = forward_flops_per_token(full, 8192) - forward_flops_per_token(cfg, 8192)
  assert saved == 4.0 * 13 * 4096 * 8 * 256


# ------------------------------------------------------------------------------------------------
# Converter: hf-to-flax, flax-to-hf, check
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
  """A shrunk random gemma-2-2b-it (its config, real vocabulary, tied) saved as safetensors, with
  the fixture's generation_config.json."""
  data = fixture_config()
  data.update(SHRINK)
  conf = transformers.Gemma2Config(**{k: v for k, v in data.items() if k != "architectures"})
  d, _ = save_random_hf(tmp_path_factory, "gemma2", conf, transformers.Gemma2ForCausalLM,
                        _randomize)
  if (FIXTURE / "generation_config.json").is_file():
    (d / "generation_config.json").write_text((FIXTURE / "generation_config.json").read_text())
  return d


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory) -> Path:
  from distfair_jax.convert.hf import hf_to_flax
  return hf_to_flax(hf_dir, tmp_path_factory.mktemp("flax") / "gemma2", dtype="float32")


@pytest.mark.parametrize("scan", [False, True])
def test_converted_logits_match_transformers(hf_dir, converted, scan):
  from distfair_jax.model.loader import load_pretrained
  model, _, config = load_pretrained(converted, scan_layers=scan)
  assert type(model) is Gemma2 and config.vocab_size == 256000 and config.tie_word_embeddings
  assert config.sliding_window == 8 and config.is_sliding == (True, False, True)
  hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  assert type(hf).__name__ == "Gemma2ForCausalLM"
  c = compare(hf, model, config.vocab_size, **BATCH)
  print(f"gemma2 converted (gemma-2-2b-it config shrunk, vocab 256000, scan={scan}): "
        f"max abs logit difference = {c.diff:.3e}")
  assert c.diff <= 1e-5 and c.scale > 0.5 * config.final_logit_softcapping


def test_flax_to_hf_round_trip_is_bit_exact(hf_dir, converted, tmp_path):
  from distfair_jax.convert.hf import flax_to_hf
  out = flax_to_hf(converted, tmp_path / "hf")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["Gemma2ForCausalLM"] and config["model_type"] == "gemma2"
  assert "lm_head.weight" not in assert_same_safetensors(hf_dir, out)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  assert type(loaded).__name__ == "Gemma2ForCausalLM"
  for key in ("sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
              "final_logit_softcapping", "hidden_activation", "tie_word_embeddings"):
    assert getattr(loaded.config, key) == getattr(original.config, key), key
  for name, value in original.state_dict().items():
    np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  if (FIXTURE / "generation_config.json").is_file():
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 107]


def test_cli_convert_and_check(hf_dir, tmp_path, monkeypatch, capsys):
  from distfair_jax import cli
  monkeypatch.setattr(cli, "COMMANDS", {"convert": "distfair_jax.commands.convert"})
  monkeypatch.chdir(tmp_path)
  src = os.path.relpath(hf_dir, tmp_path)
  assert cli.main(["convert", "hf-to-flax", src, "flax", "--dtype", "float32"]) == 0
  assert cli.main(["convert", "check", src, "flax", "--threshold", "1e-5"]) == 0
  out = capsys.readouterr().out
  assert "OK" in out
  value = float(out.split("max abs logit difference:")[1].split()[0])
  print(f"convert check: max abs logit difference {value:.3e}")
  assert cli.main(["convert", "flax-to-hf", "flax", "back"]) == 0
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in hf_dir.iterdir():
    (bad / f.name).write_bytes(f.read_bytes())
  data = json.loads((bad / "config.json").read_text())
  data["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
  data.pop("rope_parameters", None)
  (bad / "config.json").write_text(json.dumps(data))
  capsys.readouterr()
  assert cli.main(["convert", "hf-to-flax", "bad", "flax2"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "config.json" in err and "rope_type" in err
