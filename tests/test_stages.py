"""The recipe as stages: a stage of one's own runs through `gptstack pipeline` with no edit to the pipeline or the
report; every typed choice of every config section is checked; the import graph has no cycle and train/
knows neither the world nor the stages; PPO runs on a user's own prompts with no world module imported."""
import ast
import dataclasses
import json
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from gptstack import config
from gptstack.cli import main
from gptstack.errors import GptstackError
from gptstack.stages import RunConfig, Stage, register
from gptstack.stages.base import sections, unregister

PACKAGE = Path(__file__).resolve().parent.parent / "gptstack"


# ---------------------------------------------------------------- a stage of one's own

@dataclass
class EchoConfig:
    word: str = "hello"
    times: int = 2
    style: Literal["plain", "shout"] = "plain"


def _echo(ctx):
    e = ctx.cfg.echo
    text = " ".join([e.word.upper() if e.style == "shout" else e.word] * e.times)
    return {"echo": {"text": text, "times": e.times}}


def _echo_markdown(run, report):
    return ["## Echo", "", f"The echo stage said: {report['echo']['text']}", ""]


@pytest.fixture
def echo_stage():
    register(Stage("echo", _echo, "repeats a word (a test's own stage)", config=EchoConfig, report=_echo_markdown,
                   default=False), after="eval")
    yield
    unregister("echo")


def test_a_registered_stage_runs_through_the_pipeline_and_the_report(echo_stage, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert "echo: repeats a word" in " ".join(capsys.readouterr().out.split())
    assert RunConfig.resolve("tiny").echo == EchoConfig()

    run = tmp_path / "run"
    assert main(["pipeline", "--out", str(run), "--stages", "echo", "echo.times=3", "echo.style=shout"]) == 0
    assert json.loads((run / "report.json").read_text())["echo"] == {"text": "HELLO HELLO HELLO", "times": 3}
    assert "The echo stage said: HELLO HELLO HELLO" in (run / "report.md").read_text()
    saved = RunConfig.load(run / "config.yaml")
    assert saved.echo == EchoConfig(times=3, style="shout")
    assert (run / "echo" / "summary.json").is_file()
    # finished: a rerun skips it, and a changed setting of a finished stage is refused
    assert main(["pipeline", "--out", str(run), "--stages", "echo", "echo.times=3", "echo.style=shout"]) == 0
    assert "[echo] finished already" in capsys.readouterr().out
    assert main(["pipeline", "--out", str(run), "--stages", "echo", "echo.times=4"]) == 2
    assert "echo.times: 3 -> 4" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(run), "--stages", "echo", "echo.style=whisper"]) == 2
    assert "config 'echo.style': 'whisper' is not one of plain, shout" in capsys.readouterr().err


def test_registering_a_taken_name_is_an_error():
    with pytest.raises(GptstackError, match="named 'sft' exists already"):
        register(Stage("sft", _echo, "again"))


# ---------------------------------------------------------------- every choice checked, generically

def _choice_fields(cls, prefix):
    """(key, allowed values) of every Literal field of a config dataclass, nested ones included."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _choice_fields(hint, f"{prefix}{f.name}.")
        elif config.choices(hint):
            yield f"{prefix}{f.name}", config.choices(hint)


ALL_CHOICES = [kv for name, cls in sections().items() for kv in _choice_fields(cls, f"{name}.")]


def test_the_typed_choices_include_those_that_were_once_unchecked():
    keys = {k for k, _ in ALL_CHOICES}
    assert {"sft.train.schedule", "rm.train.precision", "ppo.train.strategy", "model.norm_position",
            "finetune.truncate", "rm.labeler", "scale.compute"} <= keys


@pytest.mark.parametrize("key, allowed", ALL_CHOICES, ids=[k for k, _ in ALL_CHOICES])
def test_a_misspelt_choice_is_a_one_line_error_naming_key_and_values(key, allowed):
    with pytest.raises(GptstackError) as e:
        RunConfig.resolve("tiny", overrides=[f"{key}=zzz"])
    message = str(e.value)
    assert "\n" not in message and f"'{key}'" in message and "'zzz'" in message
    assert all(str(a) in message for a in allowed)
    assert RunConfig.resolve("tiny", overrides=[f"{key}={allowed[0]}"]) is not None  # and an allowed value is taken


# ---------------------------------------------------------------- the import graph

def _imports(path: Path, module: str) -> set[str]:
    """Every gptstack module `path` imports, at its top or inside functions (TYPE_CHECKING too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gptstack")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            if not base.startswith("gptstack"):
                continue
            for a in node.names:  # `from . import x` imports the module x; `from .m import y` the module m
                sub = f"{base}.{a.name}"
                out.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[module] = _imports(path, module) - {module}
    return graph


def test_no_import_cycles_and_train_knows_neither_world_nor_stages():
    graph = _graph()
    assert graph["gptstack.stages"] >= {"gptstack.stages.ppo", "gptstack.stages.sft"}  # the parser sees imports
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    for m, deps in graph.items():
        if m.startswith("gptstack.train"):
            bad = {d for d in deps if d.startswith(("gptstack.world", "gptstack.stages"))}
            assert not bad, f"{m} imports {bad}"
        if m == "gptstack.model":
            assert not {d for d in deps if d.startswith(("gptstack.train", "gptstack.evals", "gptstack.stages", "gptstack.world"))}


# ---------------------------------------------------------------- the instruction stages on your own data

NO_WORLD = """
import sys
from gptstack.cli import main
for argv in {runs!r}:
    assert main(argv) == 0, argv
loaded = sorted(m for m in sys.modules if m.startswith("gptstack.world"))
assert not loaded, loaded
print("no world module imported")
"""


def test_sft_rm_ppo_and_dpo_on_your_own_files_import_no_world_module(tmp_path, corpus, random_model_dir):
    """SFT records, rankings and prompts written here; `gptstack sft`, `rm`, `ppo --prompts` and `dpo` in a fresh
    process that never imports gptstack.world (its stdlib corpus included: ptx reads a folder of text)."""
    questions = [f"What is {a} plus {b}?" for a in range(2, 9) for b in range(3, 7)]
    sft = [{"prompt": q, "response": str(eval(q[8:-1].replace("plus", "+")))} for q in questions]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    rankings = [{"prompt": q, "responses": [r["response"], "I don't know.", "banana banana banana"], "ranks": [1, 2, 3]}
                for q, r in zip(questions, sft)]
    (tmp_path / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    prompts = [{"prompt": q} for q in questions[:12]] + [{"messages": [{"role": "system", "content": "Be brief."},
                                                                      {"role": "user", "content": q}]} for q in questions[12:]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    small = ["pretrain.eval_tokens=1024", f"data.sources=[{{path: {corpus}}}]"]  # the preset's n_ctx (256) > the policy's (64)
    runs = [["sft", "--from", str(random_model_dir), "--data", str(tmp_path / "sft.jsonl"), "--out", str(tmp_path / "sft"),
             "sft.epochs=2", "sft.train.batch_size=8"],
            ["rm", "--from", str(tmp_path / "sft"), "--data", str(tmp_path / "rankings.jsonl"), "--out", str(tmp_path / "rm"),
             "rm.epochs=2", "rm.train.batch_size=4"],
            ["ppo", "--policy", str(tmp_path / "sft"), "--rm", str(tmp_path / "rm"), "--prompts", str(tmp_path / "prompts.jsonl"),
             "--out", str(tmp_path / "ppo"), "--rbrm", "world", "ppo.rollouts=2", "ppo.rollout_batch=8", "ppo.ppo_epochs=1", "ppo.max_new_tokens=8",
             "ppo.eval_every_rollouts=1", "ppo.ptx_seq_len=16", "ppo.ptx_coef=0.1", *small],
            ["dpo", "--policy", str(tmp_path / "sft"), "--data", str(tmp_path / "rankings.jsonl"), "--rm", str(tmp_path / "rm"),
             "--out", str(tmp_path / "dpo"), "--loss", "listwise", "dpo.epochs=2", "dpo.train.batch_size=4"]]
    got = subprocess.run([sys.executable, "-c", NO_WORLD.format(runs=runs)], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    assert "no world module imported" in got.stdout
    r = json.loads((tmp_path / "ppo" / "summary.json").read_text())["ppo"]
    assert r["judge"] == "reward model" and r["rollouts"] == 2 and r["steps"] == 4
    assert 0.0 <= r["win_rate_vs_sft"] <= 1.0 and r["n"] == 3  # every 10th of 24 prompts held out
    assert {"rm_score", "sft_rm_score", "kl", "pretrain_val_loss_delta", "pretrain_val_loss_delta_no_ptx"} <= set(r)
    assert "gold_score" not in r and "accuracy" not in r  # no gold labeler without the world
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_rm_score" in x for x in rows) and not any("gold_score" in x for x in rows)
    from gptstack.stages.ppo import markdown
    text = "\n".join(markdown(tmp_path, {"ppo": r}))  # the report section without the gold labeler's figures
    assert "the reward model judges" in text and "| RM score |" in text and "accuracy" not in text
    assert (tmp_path / "plots" / "ppo.png").is_file()
    d = json.loads((tmp_path / "dpo" / "summary.json").read_text())["dpo"]
    assert d["loss_type"] == "listwise" and d["rankings"] == 25 and 0 <= d["val_accuracy"] <= 1
    assert "win_rate_vs_sft" not in d and "implicit_reward_gold_agreement" not in d  # no gold labeler without the world


@pytest.mark.parametrize("record, message", [
    ({"text": "hi"}, "p.jsonl:1: field 'prompt' missing"),
    ({"prompt": 3}, "p.jsonl:1: field 'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "must end with a user turn"),
    ({"messages": [{"role": "robot", "content": "a"}]}, r"field 'messages\[0\].role' must be system, user or assistant"),
])
def test_a_bad_prompt_record_names_file_line_and_field(tmp_path, record, message):
    from gptstack.data.records import read_prompt_records
    (tmp_path / "p.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(GptstackError, match=message):
        read_prompt_records(tmp_path / "p.jsonl")
