import json

import numpy as np
import pytest

from gptstack.data.sources import DataConfig, SourceConfig
from gptstack.data.loader import TokenSampler, build_sampler
from gptstack.data.sources import iter_documents
from gptstack.data.tokens import tokenize_source
from gptstack.errors import GptstackError
from gptstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["def f(x): return x\n", "hello world, plain prose.\n"] * 20, vocab_size=300)


def docs(path, **kw):
    return list(iter_documents(SourceConfig(path=str(path), **kw)))


def test_folder_glob_jsonl_parquet_and_dataset_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    assert [d.text for d in docs(tmp_path)] == ["alpha text", "beta text"]
    assert [d.text for d in docs(tmp_path / "**" / "*.md")] == ["beta text"]

    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert [d.text for d in docs(jl, text_field="body")] == ["one", "two"]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "d.parquet")
    assert [d.text for d in docs(tmp_path / "d.parquet")] == ["p1", "p2", "p3"]

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["h1", "h2"]}).save_to_disk(str(tmp_path / "hfds"))
    assert [d.text for d in docs(tmp_path / "hfds")] == ["h1", "h2"]


def test_stdlib_corpus_has_code_and_prose_without_tests():
    ids = [d.id for d in iter_documents(SourceConfig(path="stdlib"))]
    assert any(i.endswith("stdlib/json/decoder.py") for i in ids)
    assert any(i.startswith("pydoc/") for i in ids)
    assert not any("/test/" in i or "/encodings/" in i for i in ids)


def test_bad_records_name_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok",\n')
    with pytest.raises(GptstackError, match=r"bad\.jsonl:2: invalid JSON"):
        docs(f)
    f.write_text('{"text": "ok"}\n{"txt": "no"}\n{"text": 3}\n')
    with pytest.raises(GptstackError, match=r"bad\.jsonl:2: field 'text' missing"):
        docs(f)
    g = tmp_path / "latin1.txt"
    g.write_bytes("line one\ncaf\xe9".encode("latin-1"))
    with pytest.raises(GptstackError, match=r"latin1\.txt:2: not valid UTF-8"):
        docs(g)


def test_skip_bad_drops_and_counts(tmp_path, tok):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"text": "good one"}\n{"nope": 1}\n{"text": 7}\n{"text": "good two"}\n')
    splits = tokenize_source(SourceConfig(path=str(f)), tok, 0.5, skip_bad=True)
    assert splits.documents == 2 and splits.skipped == 2


def test_empty_corpus_is_an_error(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptstackError, match="empty corpus"):
        tokenize_source(SourceConfig(path=str(tmp_path / "empty.txt")), tok, 0.1)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(GptstackError, match="no such file"):
        docs(tmp_path / "nope.txt")
    with pytest.raises(GptstackError, match="no files match"):
        docs(tmp_path / "*.zzz")


def test_tokens_are_cached_and_split_is_deterministic(tmp_path, tok, cache_dir):
    for i in range(40):
        (tmp_path / f"{i}.txt").write_text(f"document {i}: def f(x): return x * {i}\n" * 5)
    src = SourceConfig(path=str(tmp_path))
    a = tokenize_source(src, tok, 0.2)
    b = tokenize_source(src, tok, 0.2)
    assert a.train.filename == b.train.filename  # reused, not rewritten
    assert np.array_equal(a.val, b.val) and len(a.val) > 0 and len(a.train) > len(a.val)
    assert a.train.dtype == np.uint16
    assert (np.asarray(a.train) == tok.eot).sum() + (np.asarray(a.val) == tok.eot).sum() == 40
    assert a.train_bytes + a.val_bytes == sum(len(p.read_bytes()) for p in tmp_path.glob("*.txt"))


def test_single_document_falls_back_to_a_tail_split(tmp_path, tok):
    (tmp_path / "one.txt").write_text("def f(x): return x\n" * 200)
    s = tokenize_source(SourceConfig(path=str(tmp_path / "one.txt")), tok, 0.1)
    assert len(s.val) > 0 and len(s.train) > 5 * len(s.val)


def test_mixture_follows_weights_and_reports_epochs(tmp_path, tok):
    (tmp_path / "a.txt").write_text("aaaa bbbb " * 2000)
    (tmp_path / "b.txt").write_text("def f(x): return x\n" * 300)
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "a.txt"), weight=3), SourceConfig(path=str(tmp_path / "b.txt"), weight=1)])
    sampler = build_sampler(cfg, tok, seq_len=16, seed=0)
    a_ids = set(np.unique(sampler.splits[0].train).tolist()) - set(np.unique(sampler.splits[1].train).tolist())
    batch = sampler.train_batch(0, 2000)["input"]
    from_a = np.mean([bool(set(row.tolist()) & a_ids) for row in batch])
    assert abs(from_a - 0.75) < 0.04
    ep = sampler.epochs(2000)
    assert ep[0]["weight"] == 0.75
    assert ep[0]["epochs"] == pytest.approx(2000 * 16 * 0.75 / len(sampler.splits[0].train))


def test_batches_are_a_function_of_step(tmp_path, tok):
    (tmp_path / "a.txt").write_text("def f(x): return x\n" * 300)
    s = build_sampler(DataConfig(sources=[SourceConfig(path=str(tmp_path / "a.txt"))]), tok, 16, seed=3)
    b1, b2 = s.train_batch(5, 8), s.train_batch(5, 8)
    assert np.array_equal(b1["input"], b2["input"])
    assert np.array_equal(b1["input"][:, 1:], b1["target"][:, :-1])
    assert not np.array_equal(s.train_batch(6, 8)["input"], b1["input"])


def test_too_little_data_for_one_sequence(tmp_path, tok):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(GptstackError, match="fewer than one sequence"):
        TokenSampler([tokenize_source(SourceConfig(path=str(tmp_path)), tok, 0.5)], [1.0], 64, 0)
