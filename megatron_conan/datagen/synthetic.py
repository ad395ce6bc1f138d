"""Deterministic, realistic-looking synthetic corpora for demos, tests and benchmarks.

Nothing here downloads anything. Text is assembled from small hand-written word lists in several
scripts (Latin, Cyrillic, Arabic, CJK, Hangul, kana), so tokenizers trained on it see multilingual
character statistics, and the same seed always gives the same bytes.

- `iter_documents(source, seed)`: pretraining documents ``{"text", "source", "lang"}``.
- `write_pretraining_jsonl(path, num_docs=..., num_bytes=..., sources=..., seed=...)`.
- `write_contrastive_jsonl(path, examples_per_task, seed)`: every task of the contrastive schema.
- `write_sft_jsonl(path, num_examples, seed)`: ``{"instruction", "input", "output"}`` rows.
"""

import gzip
import json
import random
from typing import Dict, Iterator, List, Optional, Sequence

SOURCES = ("news", "qa", "web", "multilingual")

# Word lists written for this module. Latin-script languages get ~60 words each; CJK and Hangul
# lists are kept short so that tiny test tokenizers (vocab ~1000) cover their characters.
_WORDS: Dict[str, List[str]] = {
    "en": (
        "the of and to in a is that for it as was with be by on not he this are or his from at "
        "which but have an they you were her she there been one all we their has would when if "
        "city market river government report people school water energy company science music "
        "research student health policy season history museum council network village weather "
        "river bridge engineer doctor garden library project festival island station model data "
        "announced increased reported discovered opened reached expected described improved"
    ).split(),
    "fr": (
        "le la les de des du un une et est dans pour que qui sur avec par plus pas au ce il elle "
        "ville marché rivière gouvernement rapport école eau énergie entreprise science musique "
        "recherche étudiant santé politique saison histoire musée conseil réseau village météo "
        "pont ingénieur médecin jardin bibliothèque projet été annoncé augmenté découvert"
    ).split(),
    "es": (
        "el la los las de del un una y es en para que con por más no al lo se su como pero "
        "ciudad mercado río gobierno informe escuela agua energía empresa ciencia música "
        "investigación estudiante salud política temporada historia museo consejo red pueblo "
        "puente ingeniero médico jardín biblioteca proyecto anunció aumentó descubrió señal año"
    ).split(),
    "de": (
        "der die das und ist in den von zu mit sich des auf für nicht ein eine als auch es an "
        "Stadt Markt Fluss Regierung Bericht Schule Wasser Energie Unternehmen Wissenschaft Musik "
        "Forschung Student Gesundheit Politik Saison Geschichte Museum Rat Netzwerk Dorf Wetter "
        "Brücke Ingenieur Arzt Garten Bibliothek Projekt angekündigt gestiegen entdeckt größer über"
    ).split(),
    "ru": (
        "и в не на я что он с как а по это она к но мы из у за от так же все для "
        "город рынок река правительство доклад школа вода энергия компания наука музыка "
        "исследование студент здоровье политика сезон история музей совет сеть деревня погода "
        "мост инженер врач сад библиотека проект объявил вырос открыл большой новый"
    ).split(),
    "ar": (
        "في من على إلى عن مع هذا هذه التي الذي كان قد لا ما هو هي بين كل بعد "
        "مدينة سوق نهر حكومة تقرير مدرسة ماء طاقة شركة علم موسيقى بحث طالب صحة سياسة "
        "موسم تاريخ متحف مجلس شبكة قرية طقس جسر مهندس طبيب حديقة مكتبة مشروع أعلن"
    ).split(),
    "zh": (
        "城市 市场 河流 政府 报告 学校 水 能源 公司 科学 音乐 研究 学生 健康 政策 季节 "
        "历史 博物馆 会议 网络 村庄 天气 大桥 工程师 医生 花园 图书馆 项目 宣布 增加 发现 "
        "我们 他们 今天 明天 时间 问题 发展 经济 社会 国家 人民 工作 生活 文化 教育 技术 "
        "的 了 在 是 和 有 也 就 都 很"
    ).split(),
    "ja": (
        "都市 市場 川 政府 報告 学校 水 会社 科学 音楽 研究 学生 健康 政策 歴史 "
        "です ます した する ある いる こと もの ため よう から まで そして しかし "
        "は が を に で と の も へ や"
    ).split(),
    "ko": (
        "도시 시장 강 정부 보고서 학교 물 에너지 회사 과학 음악 연구 학생 건강 정책 "
        "역사 박물관 회의 마을 날씨 다리 의사 정원 도서관 프로젝트 발표했다 증가했다 "
        "은 는 이 가 을 를 에 에서 와 과 그리고 하지만"
    ).split(),
}
_NO_SPACE = {"zh", "ja"}
_SENTENCE_END = {"zh": "。", "ja": "。", "ar": ".", "ko": "."}
_QUESTION_END = {"zh": "？", "ja": "？", "ar": "؟"}
LANGUAGES = tuple(_WORDS)
# Pretraining-heavy mix: mostly English, like the paper's web data.
_LANGUAGE_WEIGHTS = {"en": 40, "zh": 15, "fr": 8, "es": 8, "de": 8, "ru": 7, "ja": 5, "ar": 5,
                     "ko": 4}
_TOPICS = ("sports", "politics", "science", "health", "finance", "travel", "music", "weather")
_AGENCIES = ("Reuters-like Wire", "Daily Ledger", "Metro Courier", "Global Desk")
_PLACES = ("Avonlea", "Brightwater", "Cedar Falls", "Dunmore", "Eastport", "Fairhaven")


def _sentence(rng: random.Random, lang: str, min_words: int = 5, max_words: int = 18,
              question: bool = False) -> str:
    words = rng.choices(_WORDS[lang], k=rng.randint(min_words, max_words))
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), str(rng.randint(2, 2030)))
    joiner = "" if lang in _NO_SPACE else " "
    text = joiner.join(words)
    if lang not in _NO_SPACE and text[:1].isalpha():
        text = text[0].upper() + text[1:]
    end = (_QUESTION_END.get(lang, "?") if question else _SENTENCE_END.get(lang, "."))
    return text + end


def _paragraph(rng: random.Random, lang: str, num_sentences: Optional[int] = None) -> str:
    count = num_sentences if num_sentences is not None else rng.randint(2, 7)
    joiner = "" if lang in _NO_SPACE else " "
    return joiner.join(_sentence(rng, lang) for _ in range(count))


def _pick_language(rng: random.Random) -> str:
    return rng.choices(list(_LANGUAGE_WEIGHTS), weights=list(_LANGUAGE_WEIGHTS.values()))[0]


def _document(rng: random.Random, source: str) -> Dict[str, str]:
    lang = _pick_language(rng)
    if source == "news":
        headline = _sentence(rng, lang, 4, 9)[:-1]
        dateline = f"{rng.choice(_PLACES).upper()}, {rng.randint(1, 28)} May {rng.randint(1990, 2025)} ({rng.choice(_AGENCIES)})"
        body = "\n\n".join(_paragraph(rng, lang) for _ in range(rng.randint(2, 5)))
        text = f"{headline}\n\n{dateline} - {body}"
    elif source == "qa":
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append(f"Question: {_sentence(rng, lang, 5, 12, question=True)}\n"
                         f"Answer: {_paragraph(rng, lang, rng.randint(1, 4))}")
        text = "\n\n".join(turns)
    elif source == "web":
        title = _sentence(rng, lang, 3, 7)[:-1]
        items = "\n".join(f"- {_sentence(rng, lang, 3, 9)}" for _ in range(rng.randint(2, 6)))
        url = f"https://www.{rng.choice(_PLACES).lower().replace(' ', '')}.example/{rng.randint(1, 99999)}"
        text = f"{title} | {url}\n{_paragraph(rng, lang)}\n{items}\n{_paragraph(rng, lang)}"
    elif source == "multilingual":
        langs = rng.sample(LANGUAGES, rng.randint(2, 4))
        lang = langs[0]
        text = "\n".join(f"[{code}] {_paragraph(rng, code, rng.randint(1, 3))}" for code in langs)
    else:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    return {"text": text, "source": source, "lang": lang}


def iter_documents(source: str = "web", seed: int = 0) -> Iterator[Dict[str, str]]:
    """An endless, deterministic stream of documents of one source."""
    rng = random.Random(f"{source}:{seed}")
    while True:
        yield _document(rng, source)


def _open_for_write(path: str):
    if str(path).endswith(".gz"):
        return gzip.open(path, "wt", encoding="utf-8")
    if str(path).endswith(".zst"):
        import zstandard

        return zstandard.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def write_pretraining_jsonl(path: str, num_docs: Optional[int] = None,
                            num_bytes: Optional[int] = None,
                            sources: Sequence[str] = SOURCES, seed: int = 0) -> int:
    """Writes JSONL documents cycling through `sources` until `num_docs` documents or `num_bytes`
    bytes of JSON (uncompressed) are written; `.gz` and `.zst` paths are compressed. Returns the
    number of documents written."""
    if (num_docs is None) == (num_bytes is None):
        raise ValueError("give exactly one of num_docs and num_bytes")
    streams = [iter_documents(source, seed) for source in sources]
    written_docs = written_bytes = 0
    with _open_for_write(path) as out:
        while (num_docs is None or written_docs < num_docs) and (
                num_bytes is None or written_bytes < num_bytes):
            line = json.dumps(next(streams[written_docs % len(streams)]), ensure_ascii=False) + "\n"
            out.write(line)
            written_docs += 1
            written_bytes += len(line.encode("utf-8"))
    return written_docs


def write_text_samples(path: str, num_docs: int, seed: int = 0) -> None:
    """Plain-text file, one paragraph per line (the tokenizer trainer also reads this form)."""
    rng = random.Random(f"text:{seed}")
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(num_docs):
            out.write(_paragraph(rng, _pick_language(rng)) + "\n")


def _passage(rng: random.Random, lang: str, topic: str) -> str:
    return f"{topic.capitalize()}: {_paragraph(rng, lang, rng.randint(1, 3))}"


def _query_for(rng: random.Random, passage: str, lang: str) -> str:
    words = passage.split()
    if lang in _NO_SPACE or len(words) < 4:
        return passage[: rng.randint(6, 14)] + _QUESTION_END.get(lang, "?")
    start = rng.randrange(0, len(words) - 3)
    return " ".join(words[start:start + rng.randint(3, 6)]) + "?"


def contrastive_example(rng: random.Random, task: str, index: int) -> Dict:
    """One example of `task` in the contrastive JSONL schema (see megatron_conan/data/README.md)."""
    lang = _pick_language(rng)
    topic = rng.choice(_TOPICS)
    if task == "pair":
        positive = _passage(rng, lang, topic)
        return {"task": "pair", "query": _query_for(rng, positive, lang), "positive": positive}
    if task in ("retrieval", "clr"):
        positive = _passage(rng, lang, topic)
        query_lang = rng.choice([code for code in LANGUAGES if code != lang]) if task == "clr" else lang
        query = _query_for(rng, positive, lang)
        if task == "clr":
            query = _sentence(rng, query_lang, 4, 10, question=True)
        others = [t for t in _TOPICS if t != topic]
        example = {
            "task": task,
            "query": query,
            "positive": positive,
            "negatives": [_passage(rng, lang, rng.choice(others)) for _ in range(rng.randint(1, 3))],
            "candidates": [_passage(rng, lang, rng.choice(others)) for _ in range(rng.randint(0, 4))],
        }
        if task == "clr":
            example["language"] = query_lang
        if index % 5 == 0:
            example["instruction"] = "Given a question, retrieve passages that answer it"
        return example
    if task == "classification":
        labels = rng.sample(_TOPICS, rng.randint(3, 5))
        return {"task": "classification", "text": _passage(rng, lang, labels[0]),
                "label": labels[0], "negative_labels": labels[1:]}
    if task == "sts":
        text1 = _sentence(rng, lang)
        score = round(rng.uniform(0.0, 5.0), 2)
        text2 = text1 if score > 4.5 else _sentence(rng, lang)
        return {"task": "sts", "text1": text1, "text2": text2, "score": score}
    raise ValueError(f"unknown contrastive task {task!r}")


def write_contrastive_jsonl(path: str, examples_per_task: int = 20,
                            tasks: Sequence[str] = ("pair", "retrieval", "clr", "classification",
                                                    "sts"),
                            seed: int = 0) -> int:
    """Writes `examples_per_task` examples of every task, interleaved. Returns the line count."""
    rng = random.Random(f"contrastive:{seed}")
    count = 0
    with _open_for_write(path) as out:
        for index in range(examples_per_task):
            for task in tasks:
                out.write(json.dumps(contrastive_example(rng, task, index), ensure_ascii=False) + "\n")
                count += 1
    return count


def write_sft_jsonl(path: str, num_examples: int = 50, seed: int = 0) -> int:
    """Writes instruction-tuning rows; about a third have an empty or absent `input`."""
    rng = random.Random(f"sft:{seed}")
    with _open_for_write(path) as out:
        for index in range(num_examples):
            lang = _pick_language(rng)
            row = {"instruction": rng.choice([
                "Summarise the following text in one sentence.",
                "Translate the text into English.",
                "Answer the question.",
                "Write a short paragraph about the topic.",
            ])}
            if index % 3 == 1:
                row["input"] = ""
            elif index % 3 == 2:
                row["input"] = _paragraph(rng, lang, rng.randint(1, 3))
            row["output"] = _paragraph(rng, lang, rng.randint(1, 3))
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return num_examples
