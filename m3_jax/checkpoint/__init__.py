"""Every on-disk format of m3-jax, and the one checkpoint identity.

  params     a params pytree to / from an orbax directory: key and shape checks, checksum verification
  identity   per-array checksums (written at save time, verified on restore) and the identity string built from them
  m3dir      the m3 checkpoint directory: m3_config.json, params/, params.checksums.json, tokenizer, preprocessor
  workdir    the training workdir: config.json, checkpoints/ (orbax CheckpointManager), metrics.jsonl, tb/,
             tokenizer/, preprocessor_config.json, corrupt_checkpoints/
  lease      one writer per training workdir: lease.json (owner, host, heartbeat), taken over once stale
  reader     either kind of checkpoint (an m3 directory or a workdir step) as one record; `identity(ckpt, step)`

Nothing outside this package reads or writes those files' layout. Paths are `etils.epath.Path`, so an object-store
path (gs://...) goes through the same code as a local one.
"""
