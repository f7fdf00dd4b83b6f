"""LoRA targets: ``all-linear`` (PEFT's convention) on every family, explicit lists, and the
one-line refusal of a projection the family lacks, from the config file to the loaded model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distfair_jax import config as C
from distfair_jax.errors import InputError
from distfair_jax.model import family, lora
from distfair_jax.model.llama import LlamaConfig

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64)
FAMILIES = {
    "llama": dict(architecture="LlamaForCausalLM"),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True),
    "gemma2": dict(architecture="Gemma2ForCausalLM", hidden_act="gelu_pytorch_tanh",
                   query_pre_attn_scalar=8, sliding_window=4, tie_word_embeddings=True),
}


def _model(name: str, scan: bool = False):
  return family.build(LlamaConfig(**SMALL, **FAMILIES[name], scan_layers=scan), rngs=nnx.Rngs(0))


def _wrapped(model) -> set[str]:
  return {name for _, owner, _ in lora._projection_owners(model)  # noqa: SLF001
          for name, mod in vars(owner).items() if isinstance(mod, lora.LoRALinear)}


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("scan", [False, True])
def test_all_linear_wraps_every_projection_and_merges_back(name, scan):
  model = _model(name, scan)
  assert lora.linear_projections(model) == ALL
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 7)), jnp.int32)
  model.eval()
  before = model(ids)
  lora.apply_lora(model, ["all-linear"], rank=2, alpha=4.0)
  assert _wrapped(model) == set(ALL)
  # every adapter trains: a gradient reaches each lora_a through its (perturbed) lora_b
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == "lora_b":
      var[...] = 0.05 * jax.random.normal(jax.random.key(len(path)), var.shape)
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
  loss = lambda p, r: jnp.sum(nnx.merge(graphdef, p, r, copy=True)(ids) ** 2)
  grads = jax.jit(jax.grad(loss))(params, rest)
  leaves = nnx.to_flat_state(grads)
  assert len(leaves) == 2 * len(ALL) * (1 if scan else SMALL["num_hidden_layers"])
  assert all(float(jnp.abs(v[...]).max()) > 0 for _, v in leaves)
  adapted = model(ids)
  assert float(jnp.abs(adapted - before).max()) > 1e-4
  merged = lora.merge_lora(model)
  assert not _wrapped(merged)
  np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(adapted), atol=2e-5)


def test_all_linear_equals_the_explicit_list():
  a = lora.apply_lora(_model("llama"), ["all-linear"], rank=2, seed=3)
  b = lora.apply_lora(_model("llama"), list(ALL), rank=2, seed=3)
  sa, sb = (nnx.to_pure_dict(nnx.state(m, nnx.LoRAParam)) for m in (a, b))
  jax.tree.map(np.testing.assert_array_equal, sa, sb)
  # duplicates and a mix with all-linear add nothing twice
  assert lora.resolve_targets(_model("llama"), ["v_proj", "all-linear", "q_proj"]) == (
      ("v_proj",) + tuple(t for t in ALL if t != "v_proj"))


@pytest.mark.parametrize("bad", ["lm_head", "c_attn", "embed_tokens"])
def test_a_projection_the_family_lacks_is_named_with_the_list(bad):
  with pytest.raises(ValueError) as e:
    lora.apply_lora(_model("gemma2"), ["q_proj", bad])
  msg = str(e.value)
  assert "\n" not in msg and repr(bad) in msg and "gemma2" in msg
  assert "all-linear or some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg


def test_config_takes_all_linear_as_a_string_or_a_list(tmp_path):
  cfg = C.load_config(None, ["run_dir=r", "lora.targets=all-linear"])
  assert cfg.lora.targets == ["all-linear"]
  path = tmp_path / "c.yaml"
  path.write_text("run_dir: r\nlora: {enabled: true, targets: all-linear}\n")
  assert C.load_config(str(path)).lora.targets == ["all-linear"]
  path.write_text("run_dir: r\nlora: {enabled: true, targets: [all-linear]}\n")
  assert C.load_config(str(path)).lora.targets == ["all-linear"]
  # a saved run's config reads back the same
  assert C.config_from_dict(C.config_to_dict(cfg)).lora.targets == ["all-linear"]


def test_load_model_refuses_an_unknown_target_in_one_line():
  from distfair_jax import sharding as shd
  from distfair_jax.model.loader import load_model
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
  bad = C.LoraConfig(enabled=True, rank=2, targets=["q_proj", "lm_head"])
  with pytest.raises(InputError, match=r"^lora: targets: 'lm_head' is not a linear projection "
                                       r"of llama \(expected all-linear or some of q_proj, "):
    load_model(C.ModelConfig(preset="tiny"), bad, mesh)
  m = load_model(C.ModelConfig(preset="tiny"), C.LoraConfig(enabled=True, rank=2,
                                                           targets=["all-linear"]), mesh)
  # adapters only are trained: 2 matrices per projection per layer
  assert len(jax.tree.leaves(m.params)) == 2 * len(ALL) * 2
