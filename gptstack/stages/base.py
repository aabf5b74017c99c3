"""What a stage of the recipe is, the run's settings built from the stages, and the stage list.

A stage has a name, a config section of its own (a dataclass, or none), `run(context) -> summary`, and a
report section (markdown lines, drawing its own plots). `pipeline.py` runs the registered stages in order
and `report.py` asks each for its section; neither knows any stage by name. Adding a stage is one module
that defines a `Stage` and one entry in the list of `stages/__init__.py` (or `register(stage)` from code).

    RUN/NAME/summary.json   what run() returned, written by the pipeline last: a stage with it is finished
    report.json             the deep merge of every finished stage's summary, in stage order
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import config as configlib
from ..data.sources import DataConfig
from ..errors import GptstackError
from ..io import atomic_write_json, atomic_write_text, read_json
from ..model import ModelConfig
from ..perf import peak_rss_mb, reset_peak_rss
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["Context"], dict]  # -> the summary ({report key: figures}), written to RUN/NAME/summary.json
    help: str  # one line for `pipeline --help`
    config: type | None = None  # the dataclass of the config section NAME (None: no settings of its own)
    depends: tuple[str, ...] = ()  # other config sections its output depends on (a change would mix experiments)
    report: Callable[[Path, dict], list[str]] | None = None  # report.md lines from report.json; draws its plots
    default: bool = True  # in `pipeline`'s default stages
    named_only: bool = False  # runs only when --stages names it, never with 'all' (long experiments)
    all_ranks: bool = True  # under torchrun: every rank runs it (a Trainer inside); False: rank 0 alone
    headline: Callable[[dict], str | None] | None = None  # the line `pipeline` prints at its end, from report.json's section
    measured: bool = False  # its section gets its peak memory and LoRA rank (peak_rss_mb, lora_rank: the training stages)

    @property
    def sections(self) -> tuple[str, ...]:
        return self.depends + ((self.name,) if self.config else ())


STAGES: list[Stage] = []
SHARED = {"model": ModelConfig, "data": DataConfig}  # sections of no one stage


def register(stage: Stage, after: str | None = None) -> Stage:
    """Add a stage to the recipe: at the end, or right after the stage named `after`."""
    if any(s.name == stage.name for s in STAGES) or stage.name in SHARED or stage.name == "preset":
        raise GptstackError(f"a stage or config section named {stage.name!r} exists already")
    index = len(STAGES) if after is None else [s.name for s in STAGES].index(after) + 1
    STAGES.insert(index, stage)
    return stage


def unregister(name: str) -> None:
    STAGES[:] = [s for s in STAGES if s.name != name]


def sections() -> dict[str, type]:
    """Every config section, in order: the shared ones, then each stage's own."""
    return {**SHARED, **{s.name: s.config for s in STAGES if s.config}}


# ---------------------------------------------------------------- the run's settings

class RunConfig:
    """Every setting of a run: `preset`, the shared sections and one section per stage with settings, read as
    attributes the way the YAML keys read (`cfg.sft.train.lr` is `sft.train.lr`)."""

    def __init__(self, preset: str = "", **given):
        self.preset = preset
        for name, cls in sections().items():
            setattr(self, name, given.pop(name) if name in given else cls())
        if given:
            raise GptstackError(f"unknown config section(s) {', '.join(given)} (known: {', '.join(sections())})")

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = sections()
        for key in data:
            if key != "preset" and key not in known:
                raise GptstackError(f"unknown config key '{key}' (known: {', '.join(['preset', *known])})")
        if not isinstance(data.get("preset", ""), str):
            raise GptstackError(f"config 'preset': expected a string, got {data['preset']!r}")
        cfg = cls(data.get("preset", ""), **{name: configlib.from_dict(c, data[name], name)
                                            for name, c in known.items() if name in data})
        cfg.check()
        return cfg

    @classmethod
    def resolve(cls, preset: str | None = None, files: list[str] = (), overrides: list[str] = ()) -> "RunConfig":
        """The preset (following `base:`), then each YAML file, then each key=value override."""
        return cls.from_dict(configlib.merged(preset, files, overrides))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(configlib.load_yaml(Path(path)))

    def to_dict(self) -> dict:
        return {"preset": self.preset, **{name: configlib.to_dict(getattr(self, name)) for name in sections()}}

    def save(self, path: Path) -> None:
        import yaml
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **sections_) -> "RunConfig":
        """A copy with some sections swapped (e.g. one PPO round's settings)."""
        out = copy.copy(self)
        for name, value in sections_.items():
            setattr(out, name, value)
        return out

    def check(self) -> None:
        """Checks that span sections (each section checks its own fields as it is built)."""
        p = getattr(self, "pretrain", None)
        if p is not None and p.steps < 1:
            raise GptstackError(f"config 'pretrain.steps' must be at least 1, got {p.steps}")
        if p is not None and p.seq_len > self.model.n_ctx:
            raise GptstackError(f"config 'pretrain.seq_len' ({p.seq_len}) exceeds model.n_ctx ({self.model.n_ctx})")


# ---------------------------------------------------------------- what a stage runs with

@dataclass
class Context:
    """A stage's view of the run: the folder, the settings and the log (silent on ranks other than 0)."""
    run: Path
    cfg: RunConfig
    log: Callable = print
    rank: int = 0

    def folder(self, stage: str) -> Path:
        return self.run / stage

    def start_model(self) -> Path:
        """The model the fine-tuning stages start from: the run's imported one (the import stage), else its
        pretrained one."""
        imported = self.run / "import"
        return imported if (imported / "model.safetensors").is_file() else self.run / "pretrain"

    def tokenizer(self) -> Tokenizer:
        if not (self.run / "tokenizer.json").is_file():
            raise GptstackError(f"{self.run}: no tokenizer.json; run the tokenizer stage first")
        return Tokenizer.load(self.run / "tokenizer.json")

    def fit_vocab(self, tok: Tokenizer) -> None:
        """The model's vocabulary is the tokenizer's; the preset's number is only the target. When that changes
        it, rank 0 keeps config.yaml in step."""
        if self.cfg.model.vocab_size == tok.vocab_size:
            return
        self.cfg.model.vocab_size = tok.vocab_size
        if self.rank == 0 and (self.run / "config.yaml").is_file():
            self.cfg.save(self.run / "config.yaml")


def collect(run: Path) -> dict:
    """report.json: the deep merge of the finished stages' summaries, in stage order."""
    report: dict = {"run": {"name": Path(run).name}}
    for stage in STAGES:
        path = Path(run) / stage.name / "summary.json"
        if path.is_file():
            report = configlib.deep_merge(report, read_json(path))
    return report


def finished(run: Path, name: str) -> bool:
    """A stage is finished when its folder holds summary.json (written last, atomically)."""
    return (Path(run) / name / "summary.json").is_file()


def run_stage(stage: Stage, ctx: Context) -> dict:
    """One stage into ctx.run; rank 0 writes its summary.json last, which marks it finished. A `measured` stage's
    section also gets its peak memory and its LoRA rank (0: full fine-tuning); the stage reports its training's
    own peak (`train_peak_rss_mb`, from the Trainer)."""
    own_peak = reset_peak_rss()
    summary = stage.run(ctx)
    if ctx.rank == 0 and summary:
        if stage.measured:
            # the stage's own peak where the OS can reset the high-water mark; else the process's so far
            summary[stage.name] |= {"peak_rss_mb": peak_rss_mb(), "peak_rss_scope": "stage" if own_peak else "process",
                                    "lora_rank": getattr(ctx.cfg, stage.name).train.lora_rank}
        atomic_write_json(ctx.folder(stage.name) / "summary.json", summary)
    return summary


def run_stages(ctx: Context, names: list[str]) -> dict:
    """The named stages in recipe order into one folder in this process, finished ones skipped; the merged
    summaries (what report.json holds). The scale ladder trains each rung this way."""
    for stage in STAGES:
        if stage.name in names and not finished(ctx.run, stage.name):
            run_stage(stage, ctx)
    return collect(ctx.run)
