"""The ``Config`` of one of the demo's training runs: every method's stages from one
settings object, so that the methods compare fairly."""

from __future__ import annotations

import dataclasses

from distfair_jax import config as C


def run_config(demo, run_dir: str, stages: list[str], *, lr: float = 1e-3, ablation: str = "full",
           sft_lr: float | None = None, sft_epochs: int | None = None,
           base_params: str | None = None, heldout_fraction: float | None = None,
           kl_pairs: str = "shifted") -> C.Config:
  s = demo.s
  optim = lambda lr_, warm: C.OptimConfig(learning_rate=lr_, warmup_steps=warm, weight_decay=0.0)
  # Stage 2 and DPO on length-grouped batches when stories are trained: a packed pair row holds
  # four completions, so one story pair would pad a whole batch of one-word pairs to ~5x their
  # length. Stage 1 (and the base) keep the plain shuffle, every batch a mix of answers and
  # stories: with every stage grouped, base included, the selected SFT's held-out exact answer
  # MAE was 0.19 against 0.07 with the plain shuffle (gender_real_us, seed 0).
  grouped = s.story_rows_per_occupation > 0
  return C.Config(
      run_dir=run_dir, seed=demo.seed, stages=stages,
      model=dataclasses.replace(
          C.ModelConfig(checkpoint=demo.base_model) if demo.base_model else
          C.ModelConfig(preset="tiny", tokenizer=demo.tokenizer_dir, params=base_params),
          scan_layers=s.scan_layers, remat=C.Remat(s.remat)),
      lora=C.LoraConfig(enabled=s.lora_rank > 0, rank=max(s.lora_rank, 1), alpha=s.lora_alpha,
                        dropout=s.lora_dropout if s.lora_rank > 0 else 0.0,
                        targets=list(s.lora_targets)),
      data=C.DataConfig(dataset=demo.dataset if demo.spec_path is None else "gender_real_us",
                        spec=demo.spec_path, rows_per_occupation=s.rows_per_occupation,
                        heldout_fraction=(s.heldout_fraction if heldout_fraction is None
                                          else heldout_fraction),
                        max_length=s.max_length, max_prompt_length=s.max_length - 16,
                        stories=s.story_rows_per_occupation > 0,
                        story_rows_per_occupation=s.story_rows_per_occupation or None,
                        # (recorded where pairs are trained: the SFT / IFT rows are the same)
                        pair_story_rows_per_occupation=(
                            s.pair_story_rows_per_occupation
                            if {"hybrid", "dpo"} & set(stages) else None),
                        length_buckets=C.LengthBuckets(s.length_buckets),
                        steering_placement=C.SteeringPlacement(s.steering_placement),
                        seed=demo.seed),
      sft=C.SFTConfig(epochs=s.sft_epochs if sft_epochs is None else sft_epochs,
                      batch_size=s.sft_batch_size or s.batch_size,
                      group_by_length=grouped and s.sft_group_by_length,
                      optim=optim(lr if sft_lr is None else sft_lr, 10)),
      # The miniature keeps the reference online, as its README figures were measured (its
      # stage 2 is a few percent of its time); from a given model ``auto`` pools it.
      hybrid=C.HybridConfig(epochs=s.stage2_epochs, batch_size=s.batch_size, beta=s.beta,
                            ablation=ablation, kl_pairs=C.KLPairs(kl_pairs),
                            nll_weight=s.nll_weight,
                            reference=(C.Reference.auto if demo.base_model
                                       else C.Reference.online),
                            group_by_length=grouped, optim=optim(lr, 5)),
      dpo=C.DPOConfig(epochs=s.stage2_epochs, batch_size=s.batch_size // 2, beta=s.beta,
                      group_by_length=grouped, optim=optim(lr, 5)),
      checkpoint=C.CheckpointConfig(every_steps=0, keep=1, async_save=False),
      heldout=C.HeldoutConfig(every_steps=0, max_batches=0),
      logging=C.LoggingConfig(every_steps=10, tensorboard=False, progress=demo.progress))
