"""CLR builder: language shares within sampling error, English kept, a loopback HTTP endpoint that
fails (retries, reports, resumes), an interrupted run resumed, bad rows and empty translations."""

import http.server
import json
import re
import threading

import pytest

from megatron_conan.cli import build_clr as build_clr_command
from megatron_conan.data.jsonl import BadLineKind
from megatron_conan.datagen import clr
from megatron_conan.datagen.clr import (CLR_LANGUAGE_SHARES, CLRConfig, TableTranslator,
                                        assign_language, build_clr)

CHI_SQUARE_25_DF_P001 = 52.62  # the 0.999 quantile of chi-square with 25 degrees of freedom


def _write_rows(path, count, language=None):
    with open(path, "w", encoding="utf-8") as out:
        for index in range(count):
            row = {"task": "retrieval", "query": f"How does statement {index} behave?",
                   "positive": f"Statement {index} is described in the language reference.",
                   "negatives": [f"Unrelated topic {index}."]}
            if language:
                row["language"] = language
            out.write(json.dumps(row) + "\n")


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_language_shares_match_the_mix(tmp_path):
    rows = 3000
    source = tmp_path / "retrieval.jsonl"
    _write_rows(source, rows)
    table = tmp_path / "table.jsonl"
    with open(table, "w", encoding="utf-8") as out:
        for index in range(rows):
            for language in CLR_LANGUAGE_SHARES:
                if language != "en":
                    out.write(json.dumps({"text": f"How does statement {index} behave?",
                                          "language": language,
                                          "translation": f"<{language}> {index}"}) + "\n")
    report = build_clr(CLRConfig([str(source)], str(tmp_path / "clr.jsonl"), seed=5,
                                 progress=False), TableTranslator(str(table)))
    assert report.complete and report.rows == rows and report.failed == 0
    output = _read(tmp_path / "clr.jsonl")
    counts = {language: 0 for language in CLR_LANGUAGE_SHARES}
    for index, row in enumerate(output):
        counts[row["language"]] += 1
        assert row["task"] == "clr" and row["source_query"] == f"How does statement {index} behave?"
        assert row["positive"].startswith(f"Statement {index} ")  # passages untouched
        if row["language"] == "en":  # English source, English target: the original query
            assert row["query"] == row["source_query"]
        else:
            assert row["query"] == f"<{row['language']}> {index}"
    assert report.kept_original == counts["en"] and report.translated == rows - counts["en"]
    chi_square = sum((counts[language] - rows * share) ** 2 / (rows * share)
                     for language, share in CLR_LANGUAGE_SHARES.items())
    assert chi_square < CHI_SQUARE_25_DF_P001, counts
    assert len(CLR_LANGUAGE_SHARES) == 26 and sum(CLR_LANGUAGE_SHARES.values()) == pytest.approx(1)
    # per row, from (seed, key) alone
    assert [row["language"] for row in output] == [assign_language(5, f"0:{line}")
                                                   for line in range(1, rows + 1)]
    assert [assign_language(6, f"0:{line}") for line in range(1, 50)] != [
        row["language"] for row in output[:49]]


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint that fails some requests by the query
    number in the text: n % 5 == 1 fails once (503), n % 7 == 3 always (500), n % 11 == 4 is
    refused (400), n % 13 == 6 answers an empty translation."""

    failing = True
    attempts: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        number = int(re.search(r"statement (\d+)", prompt).group(1))
        target = re.search(r"into (\w+)\.", prompt).group(1)
        with self.lock:
            attempt = self.attempts[number] = self.attempts.get(number, 0) + 1
        status, content = 200, f"[{target}] Statement {number}?"
        if self.failing:
            if number % 5 == 1 and attempt == 1:
                status = 503
            elif number % 7 == 3:
                status = 500
            elif number % 11 == 4:
                status = 400
            elif number % 13 == 6:
                content = "  "
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode() if status == 200 else b'{"error": "injected"}')


@pytest.fixture
def endpoint():
    _Endpoint.attempts, _Endpoint.failing = {}, True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_http_endpoint_retries_reports_and_resumes(endpoint, tmp_path, capsys):
    rows = 40
    source = tmp_path / "retrieval.jsonl"
    _write_rows(source, rows, language="la")  # no target is Latin: every query is translated
    output = tmp_path / "clr.jsonl"
    tool = build_clr_command
    arguments = ["--input", str(source), "--output", str(output), "--translator", "http",
                 "--base-url", endpoint, "--model", "tiny", "--concurrency", "4", "--retries",
                 "2", "--backoff", "0.01", "--timeout", "10", "--no-progress", "--report-json",
                 str(tmp_path / "report.json")]
    assert tool.main(arguments) == 1  # failed rows: status 1, reported
    report = json.loads((tmp_path / "report.json").read_text())
    always = [n for n in range(rows) if n % 7 == 3]
    refused = [n for n in range(rows) if n % 11 == 4 and n % 7 != 3]
    empty = [n for n in range(rows) if n % 13 == 6 and n % 7 != 3 and n % 11 != 4]
    failed = sorted(always + refused + empty)
    assert report["failed"] == len(failed) and report["rows"] == rows - len(failed)
    reasons = {int(re.search(r":(\d+) ", failure).group(1)) - 1: failure
               for failure in report["failures"]}
    assert sorted(reasons) == failed[:10]
    for number, reason in reasons.items():
        expected = ("gave up after 3 attempts: HTTP 500" if number in always else
                    "HTTP 400" if number in refused else "empty translation")
        assert expected in reason, reason
    for number in range(rows):  # retried exactly as the policy says
        want = 3 if number in always else 2 if number % 5 == 1 else 1
        assert _Endpoint.attempts[number] == want, number
    written = _read(output)
    assert [int(re.search(r"(\d+)", row["source_query"]).group(1)) for row in written] == [
        n for n in range(rows) if n not in failed]
    assert all(row["query"].startswith("[") and row["language"] != "la" for row in written)
    assert "re-run the same command" in capsys.readouterr().out
    # the endpoint recovers: a re-run asks only for the failed rows and completes
    _Endpoint.failing, _Endpoint.attempts = False, {}
    assert tool.main(arguments) == 0
    assert sorted(_Endpoint.attempts) == failed
    complete = _read(output)
    assert len(complete) == rows and complete[:3] == written[:3]
    assert not (tmp_path / "clr.jsonl.progress.jsonl").exists()


class _Interrupting(clr.Translator):
    def __init__(self, stop_after=None):
        self.calls, self.stop_after = 0, stop_after

    def translate(self, text, source, target):
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return f"<{target}> {text}"


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    source = tmp_path / "retrieval.jsonl"
    _write_rows(source, 30, language="la")
    reference = build_clr(CLRConfig([str(source)], str(tmp_path / "reference.jsonl"), seed=1,
                                    progress=False), _Interrupting())
    assert reference.translated == 30
    config = CLRConfig([str(source)], str(tmp_path / "clr.jsonl"), seed=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_clr(config, _Interrupting(stop_after=12))
    assert not (tmp_path / "clr.jsonl").exists() and not list(tmp_path.glob(".clr.jsonl.tmp-*"))
    assert len(_read(config.progress_path)) == 12
    resumed = _Interrupting()
    report = build_clr(config, resumed)
    assert resumed.calls == 18 and report.resumed == 12 and report.translated == 18
    assert _read(tmp_path / "clr.jsonl") == _read(tmp_path / "reference.jsonl")


def test_bad_rows_and_empty_translations_are_reported(tmp_path):
    source = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"task": "retrieval", "query": "How does statement 0 behave?",
                         "positive": "p", "language": "la", "id": "a"}),
             "{broken",
             json.dumps({"task": "sts", "text1": "a", "text2": "b", "score": 1.0}),
             json.dumps({"query": "", "positive": "p"}),
             json.dumps({"query": "How does statement 4 behave?", "positive": "p",
                         "language": "la", "id": "b"})]
    source.write_text("\n".join(lines) + "\n")
    table = tmp_path / "table.jsonl"
    target_a = assign_language(0, "a")
    table.write_text(json.dumps({"text": "How does statement 0 behave?", "language": target_a,
                                 "translation": " "}) + "\n")
    report = build_clr(CLRConfig([str(source)], str(tmp_path / "clr.jsonl"), progress=False),
                       TableTranslator(str(table)))
    assert report.lines == 5 and report.rows == 0 and report.failed == 2
    assert report.failures == [f"{source}:1 ({target_a}): empty translation (TableTranslator)",
                               f"{source}:5 ({assign_language(0, 'b')}): no "
                               f"{assign_language(0, 'b')} translation in the table"]
    counts = {kind: report.bad_lines.count(kind) for kind in BadLineKind}
    assert counts[BadLineKind.MALFORMED_JSON] == counts[BadLineKind.INVALID_VALUE] == 1
    assert counts[BadLineKind.EMPTY_TEXT] == 1


def test_local_hf_model_translator(tmp_path):
    """A tiny random causal LM through the local-model path: every row is translated or fails
    with its reason (random weights may well generate nothing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_conan.testing.tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256))
    model.save_pretrained(tmp_path / "translator")
    tokenizer.save_pretrained(tmp_path / "translator")
    source = tmp_path / "retrieval.jsonl"
    _write_rows(source, 4, language="la")
    translator = clr.HFModelTranslator(str(tmp_path / "translator"), max_new_tokens=4)
    report = build_clr(CLRConfig([str(source)], str(tmp_path / "clr.jsonl"), progress=False),
                       translator)
    assert report.complete and report.translated + report.failed == 4
    assert all("empty translation" in failure for failure in report.failures)
    assert all(row["query"].strip() for row in _read(tmp_path / "clr.jsonl"))
    with pytest.raises(clr.InputError, match="does not exist"):
        clr.HFModelTranslator(str(tmp_path / "nowhere"))


def test_plain_http_beyond_this_host_is_refused_unless_allowed(tmp_path, capsys):
    source = tmp_path / "retrieval.jsonl"
    _write_rows(source, 2, language="la")
    base = ["--input", str(source), "--output", str(tmp_path / "clr.jsonl"), "--translator", "http",
            "--model", "tiny", "--no-progress"]
    for url in ("http://192.0.2.10:8000/v1", "http://translate.example.org/v1"):
        assert build_clr_command.main(base + ["--base-url", url]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--allow-insecure-http" in err, err
    for url in ("https://translate.example.org/v1", "http://localhost:1/v1", "http://[::1]:1/v1"):
        clr.HTTPTranslator(url, "tiny")  # accepted: encrypted, or to this host
    clr.HTTPTranslator("http://192.0.2.10:8000/v1", "tiny", allow_insecure_http=True)
    assert not (tmp_path / "clr.jsonl").exists()


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """Answers with a redirect (to a host that must never be asked) or an endless body."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if "redirect" in self.path:
            self.send_response(307)
            self.send_header("Location", "http://192.0.2.10:9/v1/chat/completions")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"choices": [{"message": {"content": "' + b"x" * (clr.MAX_ANSWER_BYTES + 10) + b'"}}]}')


def test_redirects_are_not_followed_and_answers_are_capped():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for path, reason in (("/redirect", "HTTP 307"), ("/huge", f"larger than {clr.MAX_ANSWER_BYTES} bytes")):
            translator = clr.HTTPTranslator(base + path, "tiny", retries=0)
            with pytest.raises(clr.TranslationError, match=reason):
                translator.translate("sort a list", "en", "fr")
    finally:
        server.shutdown()
        server.server_close()
