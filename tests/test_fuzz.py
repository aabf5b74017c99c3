"""Property-based fuzzing (hypothesis) of every record reader and of the config resolver: any input gives records
(or a config), or one GptstackError line naming the file and line (or the key); never a traceback."""
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptstack.data.records import read_prompt_records, read_rankings, read_sft_records, read_task_records
from gptstack.errors import GptstackError
from gptstack.stages import RunConfig

FIELDS = ["prompt", "response", "system", "messages", "role", "content", "instruction", "input", "output", "responses",
          "ranks", "chosen", "rejected", "text", "label", "premise", "hypothesis", "text_a", "text_b", "context", "choices"]
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4),
                      max_leaves=12)
records = st.dictionaries(st.sampled_from(FIELDS), values, max_size=5)
# a line: a record, any JSON value, or bytes that are not JSON at all
lines = st.one_of(records.map(json.dumps), values.map(json.dumps), st.text(string.printable, max_size=20))

READERS = {"sft": read_sft_records, "rankings": read_rankings, "prompts": read_prompt_records,
           **{kind: (lambda p, k=kind: read_task_records(p, k))
              for kind in ("classification", "entailment", "similarity", "multiple_choice")}}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("reader", list(READERS))
@FUZZ
@given(body=st.lists(lines, min_size=0, max_size=4), bom=st.booleans(), crlf=st.booleans())
def test_every_record_file_gives_records_or_one_file_line_error(reader, body, bom, crlf, tmp_path):
    path = tmp_path / "data.jsonl"
    text = ("\r\n" if crlf else "\n").join(body)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"))
    try:
        out = READERS[reader](path)
    except GptstackError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(path)), message
    else:
        assert out and isinstance(out, list)


KEYS = ["pretrain.lr", "pretrain.steps", "pretrain.schedule", "pretrain.precision", "model.n_head", "model.n_embd",
        "model.dropout", "sft.train.batch_size", "sft.shares", "rm.k", "rm.labeler", "ppo.versus", "ppo.clip",
        "data.sources", "scale.rungs", "finetune.task_epochs", "nosuch.key", "pretrain", "model.n_layer.deeper"]
texts = st.one_of(st.sampled_from(["1", "-1", "0", "nan", "inf", "1e-3", "true", "[1, 2]", "{a: 1}", "cosine", "", "[{path: x}]",
                                   "{n_layer: 2}", "~", "'1'"]), st.text(string.printable, max_size=12))


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), texts), max_size=3))
def test_every_override_gives_a_config_or_one_line_naming_the_key(overrides):
    try:
        RunConfig.resolve("tiny", overrides=[f"{k}={v}" for k, v in overrides])
    except GptstackError as e:
        assert "\n" not in str(e) and "config" in str(e) or "override" in str(e), str(e)
