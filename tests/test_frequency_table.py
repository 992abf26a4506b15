"""Frequency tables (lmeval_dllm/samplers/frequency_table.py): building from text with a model's tokenizer, the
published JSON format, URLs (a local HTTP server), the command line, errors."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest
import torch

from lmeval_dllm.samplers import frequency_table as ft
from lmeval_dllm.samplers.frequency_table import FrequencyTable, build_frequency_table, main


@pytest.fixture(scope="module")
def tokenizer(llada_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llada_dir)


def test_build_counts_tokens_without_special_tokens(tokenizer):
    table = build_frequency_table(tokenizer, ["abca", "", "b\n"])  # byte-level tokenizer: one token per byte
    assert table.num_tokens == 6
    assert dict(zip(table.token_ids.tolist(), table.counts.tolist())) == {ord("a"): 2, ord("b"): 2, ord("c"): 1,
                                                                         ord("\n"): 1}
    with pytest.raises(ValueError, match="the corpus has no tokens"):
        build_frequency_table(tokenizer, ["", ""])


def test_frequencies_and_published_format(tmp_path):
    table = FrequencyTable.from_json({"num_token": 8, "p_baseline_dict": {"1": 4, "3": 2}})
    assert table.frequencies(5).tolist() == [0.125, 0.5, 0.125, 0.25, 0.125]  # unlisted ids: 1 / N
    assert table.frequencies(5).dtype == torch.float32
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table.to_json()))
    again = FrequencyTable.load(str(path))
    assert again.num_tokens == 8 and again.to_json() == {"num_token": 8, "p_baseline_dict": {"1": 4, "3": 2}}
    # PC-Sampler's own builder (utils/calculate_p_baseline.py) writes token_frequency_dict
    alias = FrequencyTable.from_json({"num_token": 8, "token_frequency_dict": {"1": 4}, "metadata": {}})
    assert alias.frequencies(2).tolist() == [0.125, 0.5]


@pytest.mark.parametrize("data,msg", [
    ({"p_baseline_dict": {}}, r'expected a JSON object \{"num_token": N, "p_baseline_dict"'),
    ([1, 2], "expected a JSON object"),
    ({"num_token": 0, "p_baseline_dict": {}}, "num_token must be a positive integer, got 0"),
    ({"num_token": 5, "p_baseline_dict": {"x": 1}}, "must map integer token ids to integer counts"),
    ({"num_token": 5, "p_baseline_dict": {"-1": 1}}, "token ids and counts must be >= 0"),
])
def test_invalid_tables(data, msg):
    with pytest.raises(ValueError, match=msg):
        FrequencyTable.from_json(data)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match=r"no such file\. To get a table, pass frequency_table=llada"):
        FrequencyTable.load(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        FrequencyTable.load(str(bad))


def test_url_is_downloaded_once(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "table.json").write_text(json.dumps({"num_token": 4, "p_baseline_dict": {"2": 4}}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(ft, "cache_dir", lambda: str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{server.server_address[1]}/table.json"
    try:
        assert FrequencyTable.load(url).frequencies(3).tolist() == [0.25, 0.25, 1.0]
        (served / "table.json").unlink()  # the second load reads the cached copy
        assert FrequencyTable.load(url).num_tokens == 4
        with pytest.raises(ValueError, match="could not download"):
            FrequencyTable.load(url.replace("table.json", "other.json"))
    finally:
        server.shutdown()


def test_published_names_point_at_pc_sampler():
    assert set(ft.PUBLISHED_TABLES) == {"llada", "dream"}
    prefix = "https://raw.githubusercontent.com/NEUIR/PC-Sampler/"
    assert all(u.startswith(prefix) for u in ft.PUBLISHED_TABLES.values())


def test_command_line(llada_dir, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("ab\nb\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "cc", "other": "zz", "n": 1}) + "\n\n")
    out = tmp_path / "table.json"
    main(["--tokenizer", llada_dir, "--corpus", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
          "--key", "text,n", "--out", str(out)])
    assert json.loads(out.read_text()) == {
        "num_token": 7, "p_baseline_dict": {str(ord("\n")): 2, str(ord("a")): 1, str(ord("b")): 2, str(ord("c")): 2}}
    assert "7 tokens, 4 distinct ids" in capsys.readouterr().out
