"""The recipe, one module per stage, in the order the pipeline runs them. Adding a stage: a module that defines
`STAGE = Stage(...)` (see base.py) and one entry in this list."""
from . import (calibration, contamination, dpo, eval, finetune, import_model, long_context, pretrain, ppo, prompting, rm,
               scale, sft, tokenizer, vision)
from .base import STAGES, Context, RunConfig, Stage, register  # noqa: F401 (the package's interface)

for _module in (import_model, tokenizer, pretrain, eval, prompting, finetune, sft, rm, ppo, dpo, vision, long_context,
                contamination, calibration, scale):
    register(_module.STAGE)
