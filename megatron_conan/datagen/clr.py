"""Cross-lingual retrieval (CLR) data: the queries of retrieval JSONL translated into the paper's
26 languages (docs/DESIGN.md section 7), passages untouched.

    translator = HTTPTranslator("http://127.0.0.1:8000/v1", model="qwen", concurrency=8)
    report = build_clr(CLRConfig(inputs=["retrieval.jsonl"], output="clr.jsonl", seed=0),
                       translator)

Each row's target language is drawn from `CLR_LANGUAGE_SHARES` by a hash of (seed, row key) (the
row's `id`, else `<input index>:<line>`), so it depends on neither the order nor the other rows.
When the target is the query's own language (`language` of the row, else `source_language`,
English by default) the original query is kept and no translator is asked: English rows of an
English source stay as they are. The output rows are the input records with `task: clr`, the
translated `query`, `language` (the query's language) and `source_query`.

Translators (`Translator.translate(text, source, target) -> str`, raising `TranslationError`):
a precomputed table (`TableTranslator`), a local Hugging Face model directory
(`HFModelTranslator`, seq2seq or causal LM, offline) and an OpenAI-compatible chat-completions
endpoint (`HTTPTranslator`: concurrency, retries with exponential back-off, timeouts; standard
library only). An empty translation is a failure.

Resumable: every finished row is appended (and flushed) to `<output>.progress.jsonl`; a re-run
skips the rows done there and retries those that failed. The output is written to a temporary
file and renamed once every row is translated or failed; failed rows are listed with their reason
and location in the report (never dropped silently), and the progress file is kept while any row
failed so that the next run retries only those.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

from megatron_conan import atomic_write
from megatron_conan.data.jsonl import (BadLine, BadLineError, BadLineKind, BadLineReport,
                                       iter_file_lines, parse_json_object, read_line_batches, require_text)
from megatron_conan.errors import ConfigError, DataError, InputError

logger = logging.getLogger(__name__)

CLR_LANGUAGE_PERCENT = {
    "en": 25, "zh": 12, "es": 8, "fr": 6, "ja": 6, "de": 5, "ru": 5, "it": 4, "pt": 4, "ar": 3,
    "ko": 3, "bn": 2, "da": 2, "sv": 2, "th": 2, "ms": 2, "tr": 2, "vi": 2, "nl": 2, "pl": 2,
    "hi": 2, "km": 1, "fi": 1, "he": 1, "hu": 1, "no": 1,
}
"""The paper's Table 7 mix in percent. It sums to 106 (the table's rounding), so shares are these
numbers normalised: `CLR_LANGUAGE_SHARES`."""
CLR_LANGUAGE_SHARES = {language: percent / sum(CLR_LANGUAGE_PERCENT.values())
                       for language, percent in CLR_LANGUAGE_PERCENT.items()}
LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "es": "Spanish", "fr": "French", "ja": "Japanese",
    "de": "German", "ru": "Russian", "it": "Italian", "pt": "Portuguese", "ar": "Arabic",
    "ko": "Korean", "bn": "Bengali", "da": "Danish", "sv": "Swedish", "th": "Thai", "ms": "Malay",
    "tr": "Turkish", "vi": "Vietnamese", "nl": "Dutch", "pl": "Polish", "hi": "Hindi",
    "km": "Khmer", "fi": "Finnish", "he": "Hebrew", "hu": "Hungarian", "no": "Norwegian",
}
"""Language names for translation prompts."""


class TranslationError(Exception):
    """One text could not be translated; the message is the reason reported for its row."""


def assign_language(seed: int, key: str, shares: Mapping[str, float] = CLR_LANGUAGE_SHARES) -> str:
    """The target language of the row `key`: a SHA-256 of (seed, key) as a uniform draw over
    `shares` (deterministic, independent of order and of other rows)."""
    digest = hashlib.sha256(f"clr:{seed}:{key}".encode("utf-8")).digest()
    uniform = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    total = sum(shares.values())
    cumulative = 0.0
    for language, share in shares.items():
        cumulative += share / total
        if uniform < cumulative:
            return language
    return next(reversed(list(shares)))


# -- translators ------------------------------------------------------------------------------

class Translator(abc.ABC):
    """Translates one text; raises `TranslationError` with the reason."""

    concurrency = 1
    """Rows translated at once (threads)."""

    @abc.abstractmethod
    def translate(self, text: str, source: str, target: str) -> str:
        """The translation of `text` from `source` into `target` (language codes)."""

    def __call__(self, text: str, source: str, target: str) -> str:
        translation = self.translate(text, source, target)
        if not isinstance(translation, str) or not translation.strip():
            raise TranslationError(f"empty translation ({type(self).__name__})")
        return translation.strip()


class TableTranslator(Translator):
    """A precomputed table: JSONL rows `{"text", "language", "translation"}` (the target
    `language`); a missing entry is a failure."""

    def __init__(self, path: str):
        self.table: Dict[Tuple[str, str], str] = {}
        for line_number, line in enumerate(iter_file_lines(path), start=1):
            try:
                row = parse_json_object(line, None)
                self.table[row["text"], row["language"]] = row["translation"]
            except (BadLineError, KeyError, TypeError) as error:
                raise DataError(f"{path}:{line_number}: not a translation table row "
                                f"({type(error).__name__}: {error})") from None

    def translate(self, text: str, source: str, target: str) -> str:
        translation = self.table.get((text, target))
        if translation is None:
            raise TranslationError(f"no {target} translation in the table")
        return translation


def translation_prompt(text: str, source: str, target: str) -> str:
    return (f"Translate the following {LANGUAGE_NAMES.get(source, source)} text into "
            f"{LANGUAGE_NAMES.get(target, target)}. Reply with the translation only.\n\n{text}")


class HFModelTranslator(Translator):
    """A local Hugging Face model directory, loaded offline: a seq2seq model is given the prompt
    and generates the translation; a causal LM continues the prompt (its chat template when it
    has one) and the new tokens are the translation. Greedy decoding."""

    def __init__(self, path: str, max_new_tokens: int = 256, device: str = "cpu"):
        if not os.path.isdir(path):
            raise InputError(f"translator model directory {path!r} does not exist")
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                                  AutoTokenizer)

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
            model_class = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
            # weights from safetensors only: a pickled .bin from someone else could run code
            self.model = model_class.from_pretrained(path, local_files_only=True,
                                                     use_safetensors=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"translator {path!r} cannot be loaded: "
                             f"{' '.join(str(error).split())}") from None
        self.max_new_tokens, self.device = max_new_tokens, device
        self._lock = threading.Lock()

    def _prompt_ids(self, prompt: str):
        if not self.seq2seq and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True)
        return self.tokenizer(prompt, return_tensors="pt")

    def translate(self, text: str, source: str, target: str) -> str:
        import torch

        encoded = self._prompt_ids(translation_prompt(text, source, target))
        # only ids and mask: BERT-style tokenizers add token_type_ids, which a decoder refuses
        inputs = {key: encoded[key].to(self.device) for key in ("input_ids", "attention_mask")
                  if key in encoded}
        with self._lock, torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                         do_sample=False)
        new_tokens = output[0] if self.seq2seq else output[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)


MAX_ANSWER_BYTES = 1 << 20
"""The most an endpoint's answer may hold: a translated query is a few hundred bytes, and an answer
is read into memory, so a larger one fails the row instead."""


def check_endpoint(base_url: str, allow_insecure_http: bool) -> None:
    """An endpoint the API key may be sent to: ``https://``, or ``http://`` to this host (a loopback
    address or ``localhost``); plain http elsewhere only with `allow_insecure_http`."""
    parsed = urllib.parse.urlsplit(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--base-url must be an http:// or https:// URL with a host, got {base_url!r}")
    if parsed.scheme == "https" or allow_insecure_http or parsed.hostname == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(parsed.hostname).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        loopback = False
    if not loopback:
        raise ConfigError(f"--base-url {base_url} is plain http to another host: the API key and every query "
                          f"would cross the network unencrypted; use https, or pass --allow-insecure-http")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the API key to wherever it points: it fails the request instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class HTTPTranslator(Translator):
    """An OpenAI-compatible `POST {base_url}/chat/completions` endpoint. Connection errors,
    timeouts, 429 and 5xx are retried `retries` times after `backoff_s * 2**attempt` seconds;
    other HTTP errors (redirects included: they are not followed), malformed answers and answers
    over :data:`MAX_ANSWER_BYTES` fail the row at once. Plain http goes only to this host unless
    `allow_insecure_http` (:func:`check_endpoint`)."""

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = None,
                 concurrency: int = 4, retries: int = 4, timeout_s: float = 60.0,
                 backoff_s: float = 1.0, max_tokens: int = 512, allow_insecure_http: bool = False):
        if concurrency < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ConfigError("concurrency >= 1, retries >= 0, timeout_s > 0 and backoff_s >= 0 "
                              "are required")
        check_endpoint(base_url, allow_insecure_http)
        self._opener = urllib.request.build_opener(_NoRedirects)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.concurrency, self.retries = model, concurrency, retries
        self.timeout_s, self.backoff_s, self.max_tokens = timeout_s, backoff_s, max_tokens
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ConfigError(f"the API key variable {api_key_env} is not set")
        self.attempts = 0
        """Requests sent (retries included): for reports and tests."""
        self._count = threading.Lock()

    def _request(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._opener.open(request, timeout=self.timeout_s) as response:
            answer = response.read(MAX_ANSWER_BYTES + 1)
        if len(answer) > MAX_ANSWER_BYTES:
            raise TranslationError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
        return json.loads(answer.decode("utf-8"))

    def translate(self, text: str, source: str, target: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user",
                                         "content": translation_prompt(text, source, target)}]
                           }).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            with self._count:
                self.attempts += 1
            try:
                answer = self._request(body)
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code} {error.reason}"
                if error.code != 429 and error.code < 500:
                    raise TranslationError(last) from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
                continue
            except ValueError as error:
                raise TranslationError(f"the answer is not JSON: {error}") from None
            try:
                return answer["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise TranslationError(f"the answer has no choices[0].message.content: "
                                       f"{json.dumps(answer)[:200]}") from None
        raise TranslationError(f"gave up after {self.retries + 1} attempts: {last}")


# -- the builder ------------------------------------------------------------------------------

@dataclasses.dataclass
class CLRConfig:
    """One CLR build."""

    inputs: List[str]
    """Retrieval JSONL (`query`, `positive`, optional `negatives`/`candidates`/`language`/`id`)."""
    output: str
    """The clr JSONL to write."""
    seed: int = 0
    """Seed of the per-row language draw."""
    source_language: str = "en"
    """The queries' language when a row has no `language` field."""
    shares: Dict[str, float] = dataclasses.field(default_factory=lambda: dict(CLR_LANGUAGE_SHARES))
    """Target languages and their shares (normalised): the paper's 26 by default."""
    max_examples: int = 10
    """Failed rows and bad lines listed in the report, per kind."""
    progress: bool = True
    """A progress bar on stderr."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("inputs: at least one retrieval JSONL file is needed")
        for path in self.inputs:
            if not os.path.isfile(path):
                raise DataError(f"inputs: no such file {path!r}")
        if not self.shares or any(not share >= 0 for share in self.shares.values()) or sum(
                self.shares.values()) <= 0:
            raise ConfigError(f"shares must be >= 0 with a positive sum, got {self.shares}")

    @property
    def progress_path(self) -> str:
        return self.progress_file(self.output)

    @staticmethod
    def progress_file(output: str) -> str:
        """Where a run writing `output` keeps the rows it has translated (it resumes from there)."""
        return output + ".progress.jsonl"


@dataclasses.dataclass
class CLRReport:
    """Every input line is a written row, a failed row or a bad line."""

    output: str
    lines: int = 0
    rows: int = 0
    """Rows in the output."""
    translated: int = 0
    """Rows translated in this run (not resumed, not kept)."""
    kept_original: int = 0
    """Rows whose target is the query's own language (original query kept)."""
    resumed: int = 0
    """Rows taken from the progress file of an earlier run."""
    failed: int = 0
    failures: List[str] = dataclasses.field(default_factory=list)
    """The first failed rows as `file:line (language): reason`."""
    languages: Dict[str, int] = dataclasses.field(default_factory=dict)
    """Output rows per language."""
    complete: bool = False
    """The output was written (every row translated or failed)."""
    bad_lines: BadLineReport = dataclasses.field(default_factory=BadLineReport)

    def to_dict(self) -> Dict[str, object]:
        values = dataclasses.asdict(self)
        values["bad_lines"] = self.bad_lines.to_dict()
        return values

    def format(self) -> str:
        head = (f"wrote {self.rows:,} clr rows to {self.output}" if self.complete
                else f"interrupted: no output written to {self.output} (progress kept)")
        lines = [f"{head} from {self.lines:,} lines: {self.translated:,} translated now, "
                 f"{self.resumed:,} resumed, {self.kept_original:,} kept in their own language, "
                 f"{self.failed:,} failed"]
        lines += [f"  failed: {failure}" for failure in self.failures]
        if self.failed:
            lines.append("  re-run the same command to retry the failed rows")
        lines.append(self.bad_lines.format())
        return "\n".join(lines)


@dataclasses.dataclass
class _Row:
    index: int
    key: str
    where: str
    query: str
    source: str
    target: str


def _rows(config: CLRConfig, report: CLRReport) -> Iterator[Tuple[_Row, dict]]:
    index = 0
    for file_index, path in enumerate(config.inputs):
        for batch in read_line_batches([path]):
            for offset, raw in enumerate(batch.lines):
                line = batch.first_line_number + offset
                report.lines += 1
                try:
                    record = parse_json_object(raw, None)
                    task = record.get("task", "retrieval")
                    if task != "retrieval":
                        raise BadLineError(BadLineKind.INVALID_VALUE,
                                           f"task {task!r}: only retrieval rows are translated")
                    query = require_text(record, "query")
                    require_text(record, "positive")
                    source = record.get("language") or config.source_language
                    if not isinstance(source, str):
                        raise BadLineError(BadLineKind.NON_STRING_FIELD, "field 'language' is not "
                                                                         "a string")
                except BadLineError as error:
                    report.bad_lines.add(BadLine(path, line, error.kind, error.detail))
                    continue
                key = str(record["id"]) if record.get("id") is not None else f"{file_index}:{line}"
                target = assign_language(config.seed, key, config.shares)
                yield _Row(index, key, f"{path}:{line}", query, source, target), record
                index += 1


def _read_progress(path: str) -> Dict[str, dict]:
    """Finished rows of earlier runs by key (a line cut by a kill is ignored)."""
    done: Dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    for line in iter_file_lines(path):
        try:
            entry = parse_json_object(line, None)
            done[entry["key"]] = entry
        except (BadLineError, KeyError, TypeError):
            continue
    return done


def build_clr(config: CLRConfig, translator: Translator) -> CLRReport:
    """Translates the queries of `config.inputs` (module doc). Returns the report; the output
    exists when `report.complete`. Interrupted (Ctrl-C, SIGTERM), the progress file keeps what is
    done and the next run continues from it."""
    from tqdm import tqdm

    report = CLRReport(config.output, bad_lines=BadLineReport(config.max_examples))
    done = _read_progress(config.progress_path)
    translations: Dict[int, Tuple[str, str]] = {}  # row index -> (query, language)
    failures: List[Tuple[int, str]] = []
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    bar = tqdm(disable=not config.progress, unit=" rows", desc="clr", mininterval=1.0)

    def record_result(row: _Row, entry: dict, progress) -> None:
        if progress is not None:
            progress.write(json.dumps(entry, ensure_ascii=False) + "\n")
            progress.flush()
        if entry["status"] == "ok":
            translations[row.index] = (entry["query"], row.target)
        else:
            failures.append((row.index, f"{row.where} ({row.target}): {entry['reason']}"))
        bar.update(1)

    executor = concurrent.futures.ThreadPoolExecutor(max(1, translator.concurrency))
    pending: Dict[concurrent.futures.Future, _Row] = {}
    try:
        with open(config.progress_path, "a", encoding="utf-8") as progress:
            try:
                for row, _ in _rows(config, report):
                    earlier = done.get(row.key)
                    if _same_draw(earlier, row):
                        record_result(row, earlier, None)
                        report.resumed += 1
                    elif row.target == row.source:
                        record_result(row, {"key": row.key, "status": "ok", "query": row.query,
                                            "language": row.target, "source": row.query}, progress)
                        report.kept_original += 1
                    else:
                        pending[executor.submit(_translate, translator, row)] = row
                        if len(pending) >= 4 * translator.concurrency:
                            _drain(pending, record_result, progress, report, wait_all=False)
                _drain(pending, record_result, progress, report, wait_all=True)
            finally:
                _keep_finished(pending, record_result, progress, report)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    report.failed = len(failures)
    report.failures = [reason for _, reason in sorted(failures)[:config.max_examples]]
    _write_output(config, translations, report)
    if not failures:
        os.remove(config.progress_path)
    logger.info("%s", report.format())
    return report


def _same_draw(earlier: Optional[dict], row: _Row) -> bool:
    """Whether an earlier run's entry translated this very row into this very language."""
    return (earlier is not None and earlier["status"] == "ok" and earlier.get("source") == row.query
            and earlier.get("language") == row.target)


def _translate(translator: Translator, row: _Row) -> dict:
    """One row's progress entry: its translation, or why it failed."""
    try:
        query = translator(row.query, row.source, row.target)
        return {"key": row.key, "status": "ok", "query": query, "language": row.target, "source": row.query}
    except TranslationError as error:
        return {"key": row.key, "status": "failed", "reason": str(error)}


def _keep_finished(pending, record_result, progress, report: CLRReport) -> None:
    """A stopped run: record the translations that finished, so that the next run need not redo
    them, and cancel the rest."""
    for future, row in pending.items():
        if future.done() and not future.cancelled() and future.exception() is None:
            report.translated += future.result()["status"] == "ok"
            record_result(row, future.result(), progress)
        future.cancel()
    pending.clear()


def _drain(pending, record_result, progress, report: CLRReport, wait_all: bool) -> None:
    """Records finished translations (at least one; all with `wait_all`)."""
    while pending:
        finished, _ = concurrent.futures.wait(
            list(pending), return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            row = pending.pop(future)
            entry = future.result()
            report.translated += entry["status"] == "ok"
            record_result(row, entry, progress)
        if not wait_all:
            return


def _write_output(config: CLRConfig, translations: Dict[int, Tuple[str, str]],
                  report: CLRReport) -> None:
    """The output rows in input order, written atomically (a second pass over the inputs keeps
    only the translated queries in memory)."""
    counting = CLRReport(config.output)  # the second pass must not count lines twice
    with atomic_write.file(config.output) as temporary, open(temporary, "w", encoding="utf-8") as out:
        for row, record in _rows(config, counting):
            if row.index not in translations:
                continue
            query, language = translations[row.index]
            record = dict(record, task="clr", query=query, language=language,
                          source_query=row.query)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            report.rows += 1
            report.languages[language] = report.languages.get(language, 0) + 1
    report.complete = True
