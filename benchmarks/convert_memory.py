"""Peak memory of `hf_to_flax` / `flax_to_hf` on a random Llama of a few hundred million parameters.

Writes a random Hugging Face directory (config.json + sharded float32 safetensors with an index;
numpy only, one shard in memory at a time), then runs each conversion in a fresh process under
``/usr/bin/time -v`` and prints its peak RSS next to the size of one model copy in the target
dtype. The "import floor" is the peak RSS of a process that only imports what the conversion
imports (python, jax, flax, orbax, safetensors), so ``peak - floor`` is the conversion's own memory.

  python benchmarks/convert_memory.py                  # ~320M params, float32 source
  python benchmarks/convert_memory.py --layers 4       # smaller, quicker

Needs GNU time at /usr/bin/time (Debian: apt-get install time).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_FLOOR = ("import jax, jax.numpy as jnp, numpy, orbax.checkpoint, safetensors.numpy, flax.nnx; "
          "import distfair_jax.convert.hf, distfair_jax.model.checkpoint_io, distfair_jax.model.llama; "
          "jnp.zeros(1).block_until_ready()")


def write_random_hf(path: Path, *, vocab: int, hidden: int, intermediate: int, layers: int,
                    heads: int, kv_heads: int, shard_bytes: int, seed: int = 0) -> int:
  """A random untied LlamaForCausalLM directory in float32; returns the parameter count."""
  from safetensors.numpy import save_file
  path.mkdir(parents=True)
  head_dim = hidden // heads
  shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes += [(p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
               (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
               (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
               (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
               (p + "mlp.gate_proj.weight", (intermediate, hidden)),
               (p + "mlp.up_proj.weight", (intermediate, hidden)),
               (p + "mlp.down_proj.weight", (hidden, intermediate)),
               (p + "input_layernorm.weight", (hidden,)),
               (p + "post_attention_layernorm.weight", (hidden,))]
  shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
  groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
  size = 0
  for name, shape in shapes:
    nbytes = math.prod(shape) * 4
    if groups[-1] and size + nbytes > shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append((name, shape))
    size += nbytes
  rng = np.random.default_rng(seed)
  weight_map = {}
  for i, group in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    tensors = {name: (np.ones(shape, np.float32) if len(shape) == 1
                      else rng.standard_normal(shape, dtype=np.float32) * 0.02)
               for name, shape in group}
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    weight_map.update({name: file for name, _ in group})
    del tensors
  total = sum(math.prod(s) for _, s in shapes)
  (path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total * 4}, "weight_map": weight_map}, indent=2))
  (path / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
      "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
      "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096,
      "tie_word_embeddings": False, "torch_dtype": "float32"}, indent=2))
  return total


def peak_rss_mib(code: str) -> tuple[float, float]:
  """Runs ``python -c code`` under /usr/bin/time -v -> (peak RSS MiB, wall seconds)."""
  cmd = ["/usr/bin/time", "-v", sys.executable, "-c", code]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-3000:])
    raise SystemExit(f"failed: {' '.join(cmd)}")
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)",
                   proc.stderr).group(1)
  seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
  return rss / 1024, seconds


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--intermediate", type=int, default=4096)
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--shard-mb", type=int, default=400, help="source shard size (MB)")
  ap.add_argument("--dtypes", default="bfloat16,float32", help="target dtypes to measure")
  ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed)")
  args = ap.parse_args()
  if not Path("/usr/bin/time").exists():
    raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time)")
  work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory-"))
  try:
    src = work / "hf"
    n = write_random_hf(src, vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate,
                        layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                        shard_bytes=args.shard_mb * 10**6)
    floor, _ = peak_rss_mib(_FLOOR)
    print(f"random LlamaForCausalLM: {n / 1e6:.1f}M parameters, float32 source "
          f"({n * 4 / 2**20:.0f} MiB in {len(list(src.glob('*.safetensors')))} shards)")
    print(f"import floor (python + jax + flax + orbax + safetensors): {floor:.0f} MiB")
    print(f"{'step':<28}{'one copy':>10}{'peak RSS':>10}{'- floor':>10}{'ratio':>8}{'wall':>8}")
    for dtype in args.dtypes.split(","):
      copy = n * {"bfloat16": 2, "float16": 2, "float32": 4}[dtype] / 2**20
      dst, back = work / f"flax-{dtype}", work / f"hf-{dtype}"
      steps = [
          (f"hf-to-flax -> {dtype}",
           f"from distfair_jax.convert.hf import hf_to_flax; hf_to_flax({str(src)!r}, {str(dst)!r}, "
           f"dtype={dtype!r})"),
          (f"flax-to-hf ({dtype})",
           f"from distfair_jax.convert.hf import flax_to_hf; flax_to_hf({str(dst)!r}, {str(back)!r}, "
           f"max_shard_size='200MB')"),
      ]
      for label, code in steps:
        peak, wall = peak_rss_mib(code)
        print(f"{label:<28}{copy:>9.0f}M{peak:>9.0f}M{peak - floor:>9.0f}M"
              f"{(peak - floor) / copy:>8.2f}{wall:>7.1f}s")
      shutil.rmtree(dst)
      shutil.rmtree(back)
  finally:
    if args.workdir is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
