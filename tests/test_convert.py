"""Hugging Face <-> distfair conversion: parity with transformers' PyTorch models, bit-exact round
trips, sharding, the `distfair convert` CLI and every bad-input case.

The Hugging Face models are tiny random ones built here with transformers + torch and saved with
``save_pretrained(safe_serialization=True)``; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from distfair_jax import cli  # noqa: E402
from distfair_jax.convert.hf import (_forward_logits, check, flax_to_hf, hf_to_flax,  # noqa: E402
                                  load_model_config, save_pretrained)
from distfair_jax.errors import InputError  # noqa: E402
from distfair_jax.model.loader import load_pretrained  # noqa: E402


def load_params(path, dtype=None, *, mesh=None):
  """(config, params) of a converted directory through the one model loader (on ``mesh``)."""
  import jax
  from distfair_jax import sharding as shd
  from distfair_jax.config import LoraConfig, ModelConfig
  from distfair_jax.model.loader import load_model
  mesh = mesh if mesh is not None else shd.make_mesh({"data": 1}, jax.devices()[:1])
  stored = load_model_config(path)
  m = load_model(ModelConfig(checkpoint=str(path), dtype=dtype or stored.dtype,
                             param_dtype=dtype or stored.param_dtype), LoraConfig(), mesh,
                 require_tokenizer=False)
  return m.config, m.params


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(20)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                              pad_token="[PAD]")


def _hf_model(kind: str):
  torch.manual_seed({"llama_tied": 0, "llama_untied": 1, "qwen2": 2, "llama_bias": 3}[kind])
  if kind == "qwen2":
    config = transformers.Qwen2Config(**TINY, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
  else:
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=(kind == "llama_tied"),
                                      rope_parameters=dict(LLAMA3_ROPE),
                                      max_position_embeddings=256,
                                      attention_bias=kind == "llama_bias")  # q, k, v and o
    model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # norms and biases away from their init so a mix-up shows
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
  """Three tiny HF directories (with a tokenizer): llama_tied, llama_untied, qwen2."""
  root = tmp_path_factory.mktemp("hf")
  tok = _tokenizer()
  out = {}
  for kind in ("llama_tied", "llama_untied", "qwen2", "llama_bias"):
    d = root / kind
    _hf_model(kind).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    out[kind] = d
  return out


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("flax")
  return {k: hf_to_flax(d, root / k, dtype="float32") for k, d in hf_dirs.items()}


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _padded_batch(vocab: int):
  """input_ids, attention_mask [4, 12]: full row, right-padded, left-padded, right-padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(2, vocab, size=(4, 12))
  mask = np.ones((4, 12), np.int64)
  mask[1, 8:] = 0
  mask[2, :5] = 0
  mask[3, 3:] = 0
  return np.where(mask == 1, ids, 0), mask


# -------------------------------------------------------------------------------------------------
# Parity and round trips


@pytest.mark.parametrize("kind,scan", [("llama_tied", False), ("llama_untied", False),
                                       ("qwen2", False), ("llama_untied", True), ("qwen2", True),
                                       ("llama_bias", False)])
def test_logits_match_torch_on_padded_batch(kind, scan, hf_dirs, converted):
  import jax.numpy as jnp
  model, tokenizer, config = load_pretrained(converted[kind], scan_layers=scan)
  assert config.scan_layers == scan
  if scan:  # one stacked module, read from the per-layer names on disk
    assert model.layers.mlp.up_proj.kernel.shape[0] == config.num_hidden_layers
  assert config.param_dtype == "float32"
  assert config.tie_word_embeddings == (kind == "llama_tied")
  assert tokenizer is not None and tokenizer.pad_token == "[PAD]"
  ids, mask = _padded_batch(config.vocab_size)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[kind], dtype=torch.float32)
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(positions)).logits.numpy()
  got = np.asarray(_forward_logits(model, jnp.asarray(ids, jnp.int32),
                                   jnp.asarray(mask, jnp.int32)))
  real = mask.astype(bool)
  diff = np.abs(ref - got)[real].max()
  print(f"{kind}: max abs logit difference vs torch (float32) = {diff:.3e}")
  assert diff <= 1e-4
  assert np.abs(ref[real]).max() > 1e-2  # not trivially zero


@pytest.mark.parametrize("kind", ["llama_tied", "llama_untied", "qwen2", "llama_bias"])
def test_flax_to_hf_round_trip_is_bit_exact(kind, hf_dirs, converted, tmp_path):
  out = flax_to_hf(converted[kind], tmp_path / "hf")
  assert (out / "model.safetensors").is_file()
  assert not (out / "model.safetensors.index.json").exists()
  assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
      os.listdir(out))
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [json.loads((hf_dirs[kind] / "config.json").read_text())
                                     ["architectures"][0]]
  original = _state_dict(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[kind]))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert type(loaded).__name__ == config["architectures"][0]
  reloaded = _state_dict(loaded)
  assert reloaded.keys() == original.keys()
  for name, value in original.items():
    assert reloaded[name].dtype == value.dtype, name
    np.testing.assert_array_equal(reloaded[name], value, err_msg=name)


def test_sharded_output_and_sharded_input(hf_dirs, converted, tmp_path):
  out = flax_to_hf(converted["llama_untied"], tmp_path / "hf", max_shard_size="40KB")
  shards = sorted(out.glob("model-*-of-*.safetensors"))
  assert len(shards) >= 3
  assert not (out / "model.safetensors").exists()
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == {s.name for s in shards}
  for s in shards:  # each shard respects the limit unless it holds one tensor larger than it
    tensors = load_file(s)
    assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 40_000
  assert index["metadata"]["total_size"] == sum(
      t.nbytes for s in shards for t in load_file(s).values())
  original = _state_dict(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama_untied"]))
  reloaded = _state_dict(transformers.AutoModelForCausalLM.from_pretrained(out))
  for name, value in original.items():
    np.testing.assert_array_equal(reloaded[name], value, err_msg=name)
  # and back: hf_to_flax reads the sharded directory through its index
  again = hf_to_flax(out, tmp_path / "again", dtype="float32")
  _, a = load_params(again)
  _, b = load_params(converted["llama_untied"])
  for (pa, va), (pb, vb) in zip(sorted(a.flat_state(), key=str), sorted(b.flat_state(), key=str)):
    assert pa == pb
    np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def test_bfloat16_source_round_trips_bit_exact(hf_dirs, tmp_path):
  src = tmp_path / "bf16"
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["qwen2"]).to(torch.bfloat16)
  model.save_pretrained(src, safe_serialization=True)
  flax_dir = hf_to_flax(src, tmp_path / "flax")  # default dtype: bfloat16
  model_, _, config = load_pretrained(flax_dir)
  assert config.param_dtype == "bfloat16"
  assert str(model_.embed_tokens.embedding[...].dtype) == "bfloat16"
  out = flax_to_hf(flax_dir, tmp_path / "hf")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and str(a[name].dtype) == "bfloat16", name
    np.testing.assert_array_equal(a[name].view(np.uint16), b[name].view(np.uint16), err_msg=name)


@pytest.mark.parametrize("scan", [False, True])
def test_save_pretrained_then_flax_to_hf(scan, hf_dirs, converted, tmp_path):
  """What training's final export does: a model in memory -> converted dir -> HF; a model with
  stacked layers is written per layer."""
  from distfair_jax.model.checkpoint_io import params_metadata
  model, tokenizer, config = load_pretrained(converted["llama_tied"], scan_layers=scan)
  mine = save_pretrained(tmp_path / "final", model, config, tokenizer)
  assert params_metadata(mine / "params").keys() == params_metadata(
      converted["llama_tied"] / "params").keys()
  out = flax_to_hf(mine, tmp_path / "hf")
  original = _state_dict(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama_tied"]))
  reloaded = _state_dict(transformers.AutoModelForCausalLM.from_pretrained(out))
  for name, value in original.items():
    np.testing.assert_array_equal(reloaded[name], value, err_msg=name)


# -------------------------------------------------------------------------------------------------
# CLI


def _main(argv: list[str], monkeypatch) -> int:
  monkeypatch.setattr(cli, "COMMANDS", {"convert": "distfair_jax.commands.convert"})
  return cli.main(argv)


def test_cli_check_exit_codes(hf_dirs, converted, tmp_path, monkeypatch, capsys):
  hf = str(hf_dirs["llama_untied"])
  assert _main(["convert", "check", hf, str(converted["llama_untied"])], monkeypatch) == 0
  out = capsys.readouterr().out
  assert "max abs logit difference" in out and "max KL" in out and "OK" in out
  # a bfloat16 conversion of a float32 model is a real, visible difference above 1e-3
  bf16 = tmp_path / "bf16"
  assert _main(["convert", "hf-to-flax", hf, str(bf16), "--dtype", "bfloat16"], monkeypatch) == 0
  assert _main(["convert", "check", hf, str(bf16)], monkeypatch) == 1
  assert "FAIL" in capsys.readouterr().out
  assert _main(["convert", "check", hf, str(bf16), "--threshold", "10"], monkeypatch) == 0


def test_cli_round_trip_and_bad_input_exit_code(hf_dirs, tmp_path, monkeypatch, capsys):
  src = str(hf_dirs["qwen2"])
  flax_dir, hf_out = tmp_path / "flax", tmp_path / "hf"
  assert _main(["convert", "hf-to-flax", src, str(flax_dir), "--dtype", "float32"],
               monkeypatch) == 0
  assert _main(["convert", "flax-to-hf", str(flax_dir), str(hf_out), "--max-shard-size", "30KB"],
               monkeypatch) == 0
  assert (hf_out / "model.safetensors.index.json").is_file()
  capsys.readouterr()
  assert _main(["convert", "hf-to-flax", src, str(flax_dir)], monkeypatch) == 2  # not empty
  err = capsys.readouterr().err
  assert "error:" in err and "overwrite" in err and len(err.strip().splitlines()) == 1
  assert _main(["convert", "hf-to-flax", src, str(flax_dir), "--overwrite"], monkeypatch) == 0


# -------------------------------------------------------------------------------------------------
# Bad input: each case raises InputError with a one-line message naming the problem


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def _edit_tensors(d: Path, edit) -> None:
  tensors = load_file(d / "model.safetensors")
  edit(tensors)
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _edit_config(d: Path, edit) -> None:
  config = json.loads((d / "config.json").read_text())
  edit(config)
  (d / "config.json").write_text(json.dumps(config))


def _error(src: Path, dst: Path, **kw) -> str:
  with pytest.raises(InputError) as e:
    hf_to_flax(src, dst, **kw)
  msg = str(e.value)
  assert "\n" not in msg
  assert not dst.exists()  # nothing half-written
  assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
  return msg


def test_missing_tensor(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  msg = _error(d, tmp_path / "out")
  assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg


def test_wrong_shape(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                       np.zeros((48, 64), np.float32)}))
  msg = _error(d, tmp_path / "out")
  assert "model.layers.0.self_attn.k_proj.weight" in msg
  assert "expected shape [32, 64]" in msg and "got [48, 64]" in msg


def test_unsupported_architecture(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  _edit_config(d, lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral"))
  msg = _error(d, tmp_path / "out")
  assert "MistralForCausalLM" in msg and "architectures" in msg and "config.json" in msg


def test_missing_config(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  (d / "config.json").unlink()
  msg = _error(d, tmp_path / "out")
  assert "config.json" in msg


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_incomplete_config(field, hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  _edit_config(d, lambda c: c.pop(field))
  msg = _error(d, tmp_path / "out")
  assert "config.json" in msg and field in msg


def test_vocab_size_differs_between_config_and_embedding(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_tied"], tmp_path / "src")
  _edit_config(d, lambda c: c.update(vocab_size=120))
  msg = _error(d, tmp_path / "out")
  assert "vocab" in msg and "120" in msg and "128" in msg
  assert "model.embed_tokens.weight" in msg


def test_unexpected_tensors_named_and_inv_freq_ignored(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  _edit_tensors(d, lambda t: t.update({
      "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
  hf_to_flax(d, tmp_path / "ok", dtype="float32")  # rotary buffers are ignored
  _edit_tensors(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)}))
  msg = _error(d, tmp_path / "out")
  assert "model.layers.0.mlp.extra.weight" in msg and "unexpected" in msg
  assert "inv_freq" not in msg


def test_pickle_bin_is_refused_and_never_loaded(hf_dirs, tmp_path):
  d = tmp_path / "src"
  d.mkdir()
  shutil.copy(hf_dirs["llama_untied"] / "config.json", d / "config.json")
  (d / "pytorch_model.bin").write_bytes(b"not a pickle, and never unpickled")
  msg = _error(d, tmp_path / "out")
  assert "pytorch_model.bin" in msg and "safetensors" in msg
  assert "save_pretrained" in msg and "safe_serialization=True" in msg


def test_no_weights_at_all(hf_dirs, tmp_path):
  d = tmp_path / "src"
  d.mkdir()
  shutil.copy(hf_dirs["llama_untied"] / "config.json", d / "config.json")
  msg = _error(d, tmp_path / "out")
  assert "safetensors" in msg


def test_index_naming_missing_shard(hf_dirs, tmp_path):
  d = _copy(hf_dirs["llama_untied"], tmp_path / "src")
  names = list(load_file(d / "model.safetensors"))
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      n: ("model.safetensors" if i else "model-00002-of-00002.safetensors")
      for i, n in enumerate(names)}}))
  msg = _error(d, tmp_path / "out")
  assert "model-00002-of-00002.safetensors" in msg and "index" in msg


def test_bad_dtype_and_shard_size(converted, hf_dirs, tmp_path):
  assert "dtype" in _error(hf_dirs["llama_tied"], tmp_path / "out", dtype="int8")
  with pytest.raises(InputError, match="max_shard_size"):
    flax_to_hf(converted["llama_tied"], tmp_path / "hf", max_shard_size="lots")
  assert not (tmp_path / "hf").exists()


def test_overwrite_refused_leaves_dst_untouched(hf_dirs, converted, tmp_path):
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  with pytest.raises(InputError, match="overwrite"):
    hf_to_flax(hf_dirs["llama_tied"], dst, dtype="float32")
  with pytest.raises(InputError, match="overwrite"):
    flax_to_hf(converted["llama_tied"], dst)
  assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["dst"]  # no temporary directories left behind
  # an empty directory is fine; overwrite=True replaces a non-empty one atomically
  hf_to_flax(hf_dirs["llama_tied"], dst, dtype="float32", overwrite=True)
  assert not (dst / "keep.txt").exists() and (dst / "model_config.json").is_file()
  assert sorted(os.listdir(tmp_path)) == ["dst"]
  empty = tmp_path / "empty"
  empty.mkdir()
  hf_to_flax(hf_dirs["llama_tied"], empty, dtype="float32")
  assert (empty / "params").is_dir()


_STALLED_CONVERT = """
import sys, time
from distfair_jax.model import checkpoint_io
from distfair_jax.convert import hf as convert
def stall(path, tree, **kw):  # the conversion is writing its temporary directory...
  (path.parent / "half-written").write_text("x" * 100000)
  time.sleep(600)
checkpoint_io.save_params = stall
convert.hf_to_flax(sys.argv[1], sys.argv[2], dtype="float32")
"""


def test_killed_conversion_leftover_is_removed_by_the_next_run(hf_dirs, tmp_path):
  """`convert hf-to-flax` killed with SIGKILL leaves its temporary directory beside DST; the next
  conversion to DST removes it (its process is gone), says so, and leaves nothing behind."""
  import signal
  import subprocess
  import time
  dst = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", _STALLED_CONVERT, str(hf_dirs["qwen2"]), str(dst)],
                          env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not list(tmp_path.glob(".out.tmp-*/half-written")):
    assert proc.poll() is None, proc.stderr.read()
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  (leftover,) = list(tmp_path.glob(".out.tmp-*"))
  assert str(proc.pid) in leftover.name
  run = subprocess.run([sys.executable, "-m", "distfair_jax.cli", "convert", "hf-to-flax",
                        str(hf_dirs["qwen2"]), str(dst), "--dtype", "float32"], env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"{leftover}: removed what an interrupted write of out left" in run.stderr
  assert sorted(os.listdir(tmp_path)) == ["out"] and (dst / "model_config.json").is_file()


def test_bad_converted_directory(tmp_path, converted):
  with pytest.raises(InputError, match="model_config.json"):
    load_pretrained(tmp_path)
  d = _copy(converted["llama_tied"], tmp_path / "c")
  cfg = json.loads((d / "model_config.json").read_text())
  cfg["num_hidden_layers"] = 3  # the checkpoint has 2 layers
  (d / "model_config.json").write_text(json.dumps(cfg))
  with pytest.raises(InputError, match="layers.2"):
    flax_to_hf(d, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()


def test_check_figures(hf_dirs, converted):
  r = check(hf_dirs["qwen2"], converted["qwen2"])
  assert r["torch"] is True and r["max_abs_weight_diff"] == 0.0
  assert r["max_abs_logit_diff"] <= 1e-4 and r["max_kl"] <= 1e-8


def test_check_without_torch_compares_weights(hf_dirs, converted, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  r = check(hf_dirs["qwen2"], converted["qwen2"])
  assert r == {"max_abs_weight_diff": 0.0, "torch": False}
  other = hf_to_flax(hf_dirs["llama_untied"], tmp_path / "other", dtype="bfloat16")
  assert _main(["convert", "check", str(hf_dirs["llama_untied"]), str(other)], monkeypatch) == 1
  out = capsys.readouterr().out
  assert "torch is not installed" in out and "FAIL" in out


def test_load_params_on_a_mesh_restores_sharded(converted):
  import jax
  from distfair_jax import sharding as shd
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, sharded = load_params(converted["qwen2"], mesh=mesh)
  _, plain = load_params(converted["qwen2"], dtype="bfloat16")
  _, plain32 = load_params(converted["qwen2"])
  flat = dict(sharded.flat_state())
  assert str(dict(plain.flat_state())[("norm", "scale")].get_value().dtype) == "bfloat16"
  for key, var in plain32.flat_state():
    got = flat[key].get_value()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(var.get_value()), err_msg=str(key))
    if key[-1] == "kernel":  # every matrix is split across devices, not replicated
      assert got.addressable_shards[0].data.size < got.size, key
