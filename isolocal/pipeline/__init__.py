"""DeepSpeed pipeline parallelism over a LocalMIM's stages, global or gradient-isolated.

- `module`: `MIMPipe`, the `PipelineModule` whose layers are the model's stages;
- `engine`: DeepSpeed's default schedule with one fused backward, and the isolated schedule;
- `runner`: `pretrain_pipeline(cfg)`, run in every process of a torchrun/deepspeed launch;
- `checkpoint`: pipeline checkpoints <-> single-process LocalMIM state dicts.
Modules are imported explicitly (deepspeed is heavy to import).
"""
