"""FLOP counts of the train steps, for tokens/s -> TFLOP/s and MFU.

Forward FLOPs of one token of a decoder-only Llama at context length ``length`` (multiply-adds count 2):

    F_token = 2 * N_matmul + 2 * hidden * vocab + 4 * layers * length * heads * head_dim

where ``N_matmul`` is the number of weights in the attention and MLP projections (no embeddings,
norms), ``2 * hidden * vocab`` the output projection, and the last term the attention scores and the
weighted sum over a full (non-causal-halved) ``length`` window, as in the PaLM / MaxText convention
(a sliding-window layer, Gemma 2's, counts ``min(length, sliding_window)``; soft-capping's tanh is
not counted).

A pass with gradient costs 3 forwards (forward, then activation and weight gradients); under LoRA the
frozen weights get no weight gradients, and we still count 3 (the usual, conservative for MFU,
convention). Per optimizer step:

- sft / ift: 3 F over the batch's tokens;
- hybrid, rows layout, reference online: 3 F (targets) + 1 F (mismatched pairs, no gradient) + 2 F
  (reference over targets and mismatched pairs) = 6 F;  reference cached: 4 F;
- hybrid, packed layout (one row per pair, prompt shared by its four sequences): the transformer
  runs over the packed tokens with gradient (3x) and in the reference (1x, online); the output
  projection runs only at the label positions: target labels 3x, mismatched labels 1x, and the
  reference over both;
- dpo: 3 F (chosen + rejected) + 1 F (reference over both); packed layout (one row per record,
  [prompt | chosen | rejected]): the same over the packed tokens, the output projection at the
  labels only.

Token counts are padded tokens (what the device computes), batch x padded length. Each stage
(``train.stages``) adds these up for its batches.
"""

from __future__ import annotations

from distfair_jax.tpu import CHIPS

__all__ = ["forward_flops_per_token", "sequence_flops", "packed_flops", "peak_tflops",
           "PEAK_TFLOPS"]

# Dense bf16 peak TFLOP/s per device kind, for MFU; unknown devices report no MFU. TPUs from the chip
# table (``distfair_jax.tpu.CHIPS``, with its sources; v5p's device kind is "TPU v5").
PEAK_TFLOPS = {
    **{chip.device_kind: chip.peak_tflops for chip in CHIPS.values()},
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def forward_flops_per_token(cfg, length: int) -> float:
  """cfg: a LlamaConfig. -> forward FLOPs of one token at context ``length``."""
  d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  attn = d * h * hd + 2 * d * kv * hd + h * hd * d
  mlp = 3 * d * cfg.intermediate_size
  n_matmul = cfg.num_hidden_layers * (attn + mlp)
  window = getattr(cfg, "sliding_window", None)
  sliding = getattr(cfg, "is_sliding", (False,) * cfg.num_hidden_layers)
  context = sum(min(length, window) if s else length for s in sliding)
  return 2.0 * n_matmul + 2.0 * d * cfg.vocab_size + 4.0 * context * h * hd


def sequence_flops(cfg, rows: int, length: int) -> float:
  """Forward FLOPs over ``rows`` padded sequences of ``length`` tokens."""
  return rows * length * forward_flops_per_token(cfg, length)


def packed_flops(cfg, rows: int, length: int, label_rows: int, label_length: int
                 ) -> tuple[float, float]:
  """Forward FLOPs of packed rows -> (the transformer over the ``rows x length`` packed tokens,
  the output projection at the ``label_rows x label_length`` label positions only)."""
  head = 2.0 * cfg.hidden_size * cfg.vocab_size
  return (rows * length * (forward_flops_per_token(cfg, length) - head),
          label_rows * label_length * head)


def peak_tflops(device) -> float | None:
  """The peak of the longest device kind in ``PEAK_TFLOPS`` that ``device.device_kind`` starts with
  ("TPU v5 lite" is v5e, "TPU v5" v5p)."""
  kind = getattr(device, "device_kind", "")
  names = [name for name in PEAK_TFLOPS if kind.startswith(name)]
  return PEAK_TFLOPS[max(names, key=len)] if names else None
