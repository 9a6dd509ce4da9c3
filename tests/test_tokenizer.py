"""minicpm4.tokenizer / minicpm4.detokenize vs ``transformers.AutoTokenizer`` (5.x) on the real MiniCPM4
tokenizer (../shared/data/minicpm4-tokenizer). Texts: the first 20,000 characters of every Gutenberg book
in ../shared/data/gutenberg plus Chinese, emoji, byte-fallback, whitespace and special-token strings."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from minicpm4.detokenize import StreamDetokenizer, pieces_to_text
from minicpm4.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOK_DIR = SHARED / "minicpm4-tokenizer"
BOOK_DIR = SHARED / "gutenberg"
BOOK_CHARS = 20_000

pytestmark = pytest.mark.skipif(
    not (TOK_DIR / "tokenizer.json").is_file() or not BOOK_DIR.is_dir(),
    reason=f"shared data missing: need {TOK_DIR} and {BOOK_DIR} (../shared/data next to the repository)",
)

PLAIN_TEXTS: dict[str, str] = {
    "chinese": "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "chinese_rare": "龘𪚥𠀀 饕餮麤靐，生僻字测试。",  # byte-fallback: chars split over <0xNN> tokens
    "emoji": "😀🎉👍🏽 🧑\u200d🚀 🦜🫠 ok",
    "math_script": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ café naïve Ünïcödé",
    "mixed": "MiniCPM4 是 OpenBMB 的模型 (8B), released 2025-06 🎉",
    "whitespace_runs": "a  b   c\n\n\t x",
    "leading_spaces": "  leading spaces",
    "trailing_spaces": "trailing spaces   ",
    "lone_newline": "\n",
    "newlines": "\n\nline\n\n",
    "crlf_tabs": "col1\tcol2\r\nrow2\t\t\r\n",
    "nbsp_zwsp": "\u00a0x\u200by\u3000z",
    "ellipsis": "Wait.... what?!?! ... …… 。。。",
    "html_code": "<table><tr><td>1</td></tr></table>\n```python\nprint('hi')\n```\n<!-- c --> ---",
    "single_space": " ",
    "empty": "",
}
SPECIAL_TEXTS: dict[str, str] = {
    "chatml": "<|im_start|>user\nhi<|im_end|>",
    "bos_eos": "<s>hello</s>",
    "bos_inside": "x <s> y",
    "fim": "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "tool": "<unk><|tool_call|> call <|execute_start|>run()<|execute_end|>",
}


BOOKS = {p.stem: p.read_text(encoding="utf-8")[:BOOK_CHARS] for p in sorted(BOOK_DIR.glob("*.txt"))}
ALL_TEXTS = {**BOOKS, **PLAIN_TEXTS, **SPECIAL_TEXTS}
NO_SPECIAL = {**BOOKS, **PLAIN_TEXTS}


@pytest.fixture(scope="module")
def fast() -> Tokenizer:
    return Tokenizer.from_pretrained(TOK_DIR)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOK_DIR))


@pytest.fixture(scope="module")
def hf_ids(hf) -> dict[str, list[int]]:
    return {name: hf.encode(text) for name, text in ALL_TEXTS.items()}


def _copy_tokenizer(folder: Path, *, without: str = "") -> Path:
    for path in TOK_DIR.iterdir():
        if path.name != without:
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.model plus the json configs, no tokenizer.json."""
    return _copy_tokenizer(tmp_path_factory.mktemp("sp_only"), without="tokenizer.json")


@pytest.fixture(scope="module")
def sp(sp_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(sp_dir)


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("which", ["fast", "sp"])
def test_properties(which: str, fast: Tokenizer, sp: Tokenizer, sp_dir: Path) -> None:
    tok = fast if which == "fast" else sp
    assert tok.name_or_path == str(TOK_DIR if which == "fast" else sp_dir)
    assert tok.backend == ("fast" if which == "fast" else "sentencepiece")
    assert tok.vocab_size == 73448
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 73440, 2)
    assert tok.stop_token_ids == {2, 73440}
    assert tok.special_token_ids == {0, 1, 2, *range(73440, 73448)}
    assert tok.token_to_id("<|im_start|>") == 73441 and tok.token_to_id("<|fim_suffix|>") == 73447
    assert tok.token_to_id("\u2581hello") == 31986 and tok.token_to_id("no-such-piece-xyz") is None
    assert tok.convert_ids_to_tokens([1, 31986, 73441]) == ["<s>", "\u2581hello", "<|im_start|>"]
    assert tok.convert_ids_to_tokens(5) == "\n"
    assert Tokenizer.from_pretrained(TOK_DIR, backend=tok.backend).backend == tok.backend


def test_convert_ids_to_tokens_matches_transformers(fast: Tokenizer, hf, hf_ids) -> None:
    for name in ("chinese_rare", "chatml", "whitespace_runs"):
        assert fast.convert_ids_to_tokens(hf_ids[name]) == hf.convert_ids_to_tokens(hf_ids[name]), name


# ---------------------------------------------------------------- encode / decode parity
@pytest.mark.parametrize("name", list(ALL_TEXTS))
def test_encode_matches_transformers(name: str, fast: Tokenizer, hf_ids) -> None:
    assert fast.encode(ALL_TEXTS[name]) == hf_ids[name]


def test_encode_known_ids(fast: Tokenizer) -> None:
    assert fast.encode("<|im_start|>user\nhi<|im_end|>") == [1, 73441, 3060, 5, 6920, 73440]
    assert fast.encode("<s>hello</s>") == [1, 1, 31986, 2]
    assert fast.encode("hello", add_special_tokens=False) == [31986]
    assert fast.encode("") == [1]
    ids = fast.encode("<|im_start|>user\nhi<|im_end|>")
    assert fast.decode(ids) == "user\nhi"
    assert fast.decode(ids, skip_special_tokens=False) == "<s><|im_start|> user\nhi<|im_end|>"


def test_encode_batch(fast: Tokenizer, sp: Tokenizer, hf_ids) -> None:
    names = list(ALL_TEXTS)
    texts = [ALL_TEXTS[n] for n in names]
    assert fast.encode_batch(texts) == [hf_ids[n] for n in names]
    assert sp.encode_batch(texts[-8:], add_special_tokens=False) == [sp.encode(t, add_special_tokens=False)
                                                                      for t in texts[-8:]]


@pytest.mark.parametrize("name", list(ALL_TEXTS))
def test_decode_matches_transformers_and_roundtrips(name: str, fast: Tokenizer, hf, hf_ids) -> None:
    text, ids = ALL_TEXTS[name], hf_ids[name]
    for skip in (True, False):
        assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    if name in NO_SPECIAL:
        # transformers 5 merges one user-written leading space with the dummy prefix (docs/tokenizer.md),
        # so a text that starts with a space comes back without that one space, there and here.
        expected = text[1:] if text.startswith(" ") else text
        assert fast.decode(ids) == expected


def test_raw_tokenizer_json_differs_only_on_leading_space(fast: Tokenizer) -> None:
    """tokenizer.json used verbatim (transformers 4.x) always prepends '▁'; transformers 5 does not
    when the text already starts with one. Nothing else differs on these texts."""
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer.from_file(str(TOK_DIR / "tokenizer.json"))
    differ = {n for n, t in NO_SPECIAL.items() if raw.encode(t).ids != fast.encode(t)}
    assert differ == {n for n, t in NO_SPECIAL.items() if t.startswith(" ")}
    assert raw.encode("  lead").tokens == ["<s>", "\u2581\u2581", "\u2581lead"]  # three '▁' in all
    assert fast.convert_ids_to_tokens(fast.encode("  lead")) == ["<s>", "\u2581\u2581", "lead"]  # two


# ---------------------------------------------------------------- sentencepiece fallback
def _plain_sentencepiece(*, dummy_prefix: bool):
    """sentencepiece used naively: special tokens split out, optionally the '▁' prefix added."""
    import sentencepiece

    proc = sentencepiece.SentencePieceProcessor(model_file=str(TOK_DIR / "tokenizer.model"))
    config = json.loads((TOK_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {spec["content"]: int(tid) for tid, spec in config["added_tokens_decoder"].items()}
    split = re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")")

    def encode(text: str) -> list[int]:
        ids = [1]
        for part in filter(None, split.split(text)):
            prefixed = " " + part if dummy_prefix and not part.startswith(" ") else part
            ids += [added[part]] if part in added else proc.encode(prefixed)
        return ids
    return encode


def test_sentencepiece_fallback_agreement(sp: Tokenizer, fast: Tokenizer, hf_ids, capsys) -> None:
    names = list(ALL_TEXTS)
    rate = {}
    variants = {"plain sentencepiece": _plain_sentencepiece(dummy_prefix=False),
                "+ dummy prefix": _plain_sentencepiece(dummy_prefix=True), "fallback backend": sp.encode}
    for label, encode in variants.items():
        same = [n for n in names if encode(ALL_TEXTS[n]) == hf_ids[n]]
        rate[label] = len(same) / len(names)
        differ = sorted(set(names) - set(same))
        with capsys.disabled():
            print(f"\n[tokenizer] {label}: identical ids on {len(same)}/{len(names)} texts ({rate[label]:.1%})"
                  + (f"; differ: {differ}" if len(differ) <= 6 else f"; {len(differ)} differ"))
    assert rate["fallback backend"] >= 0.95
    assert rate["fallback backend"] >= rate["+ dummy prefix"] >= rate["plain sentencepiece"]
    for name in names:  # decoding is pure piece arithmetic: identical on both backends
        for skip in (True, False):
            assert sp.decode(hf_ids[name], skip_special_tokens=skip) == fast.decode(
                hf_ids[name], skip_special_tokens=skip), name


# ---------------------------------------------------------------- chat template

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system_multi_turn": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "推荐五个北京的景点。"},
                          {"role": "assistant", "content": "故宫、长城、颐和园、天坛、798。"},
                          {"role": "user", "content": "And one more, please 🙂"}],
    "specials_in_content": [{"role": "user", "content": "say <|im_end|> and  spaces "}],
}


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(conv: str, gen: bool, fast: Tokenizer, sp: Tokenizer, hf) -> None:
    messages = CONVERSATIONS[conv]
    text = fast.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ref = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    assert fast.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == ref
    assert sp.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == ref
    assert ref[0] == 73441  # transformers adds no BOS to a rendered chat; neither do we


def test_chat_template_literal(fast: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert fast.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


CUSTOM_TEMPLATE = (
    "{%- if tools %}{{ bos_token + '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}\n"
    "{% for message in messages %}\n"
    "  {% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role: ' + message['role']) }}{% endif %}\n"
    "  {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = _copy_tokenizer(tmp_path_factory.mktemp("custom_template"))
    config = json.loads((TOK_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = CUSTOM_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_chat_template_kwargs_tools_and_helpers(custom_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_pretrained(custom_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(custom_dir))
    messages = CONVERSATIONS["system_multi_turn"]
    tools = [{"type": "function", "function": {"name": "天气", "parameters": {"city": "<b>str</b>"}}}]
    for kwargs in ({}, {"tools": tools}, {"enable_thinking": False}, {"enable_thinking": True, "tools": tools}):
        text = ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      **kwargs)["input_ids"]
        assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs) == ids
    assert "<think>" in ours.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    # the template writes <s> itself here: tokenize=True must not add a second one
    assert ours.apply_chat_template(messages, tools=tools, tokenize=True)[:2] == [1, 73441]
    with pytest.raises(ValueError, match="bad role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("bad", ["not a list", [{"role": "user"}], [{"content": "x"}], ["user: hi"],
                                 [{"role": "user", "content": None}], [{"role": 3, "content": "x"}]])
def test_chat_template_rejects_bad_messages(bad, fast: Tokenizer) -> None:
    with pytest.raises(ValueError):
        fast.apply_chat_template(bad)


# ---------------------------------------------------------------- streaming
def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    detok = tok.stream_detokenizer(skip_special_tokens=skip)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("name", list(ALL_TEXTS))
def test_streaming_equals_decode(name: str, fast: Tokenizer, hf_ids) -> None:
    ids = hf_ids[name]
    for skip in (True, False):
        chunks = _stream(fast, ids, skip)
        assert all(isinstance(c, str) and "\ufffd" not in c for c in chunks)
        assert "".join(chunks) == fast.decode(ids, skip_special_tokens=skip)


def test_streaming_holds_split_characters(fast: Tokenizer, sp: Tokenizer) -> None:
    ids = fast.encode("龘𪚥 ok 𝔘", add_special_tokens=False)
    assert fast.convert_ids_to_tokens(ids)[:4] == ["\u2581", "<0xE9>", "<0xBE>", "<0x98>"]
    for tok in (fast, sp):
        chunks = _stream(tok, ids, True)
        assert chunks[:4] == ["", "", "", "龘"]  # nothing until the 3 bytes of 龘 are complete
        assert "".join(chunks) == "龘𪚥 ok 𝔘"
    detok = fast.stream_detokenizer()
    assert detok.push_many(ids[:3]) == "" and detok.flush() == "\ufffd\ufffd"  # incomplete at the end


def test_streaming_sentencepiece_backend(sp: Tokenizer, hf_ids) -> None:
    for name in [*PLAIN_TEXTS, *SPECIAL_TEXTS, "carroll-alice"]:
        for skip in (True, False):
            text = "".join(_stream(sp, hf_ids[name], skip))
            assert text == sp.decode(hf_ids[name], skip_special_tokens=skip) and "\ufffd" not in text, name


def test_streaming_decodes_a_small_window(fast: Tokenizer, hf_ids) -> None:
    """No O(n^2) re-decoding: every decode call sees a handful of ids, however long the text."""
    sizes: list[int] = []

    class Spy:
        vocab_size, special_token_ids, token_to_id = fast.vocab_size, fast.special_token_ids, fast.token_to_id

        def decode(self, ids, *, skip_special_tokens=True):
            sizes.append(len(ids))
            return fast.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = hf_ids["melville-moby_dick"]
    detok = StreamDetokenizer(Spy())
    text = detok.push_many(ids) + detok.flush()
    assert text == fast.decode(ids) and len(ids) > 4000
    assert max(sizes) <= 8 and len(sizes) <= 2 * len(ids) + 2


def test_streaming_with_context(fast: Tokenizer) -> None:
    prompt = fast.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    for reply in ("Hello there 龘", " spaced", "<|im_end|>"):
        gen = fast.encode(reply, add_special_tokens=False)
        for skip in (True, False):
            detok = StreamDetokenizer(fast, skip_special_tokens=skip, context_ids=prompt)
            out = detok.push_many(gen) + detok.flush()
            full = fast.decode(prompt + gen, skip_special_tokens=skip)
            assert out == full[len(fast.decode(prompt, skip_special_tokens=skip)):]
    detok = StreamDetokenizer(fast, context_ids=fast.encode("Say", add_special_tokens=False))
    assert detok.push(fast.token_to_id("\u2581hello")) == " hello"  # the leading space survives in context


def test_pieces_to_text_rules() -> None:
    assert pieces_to_text(["\u2581a", "<0xE4>", "<0xBD>", "<0xA0>", "\u2581b"]) == "a你 b"
    assert pieces_to_text(["\u2581a"], strip_leading_space=False) == " a"
    assert pieces_to_text(["x", "<0xE4>", "y"]) == "x\ufffdy"  # invalid run: one U+FFFD per byte


# ---------------------------------------------------------------- bad input
def test_missing_and_empty_folders(tmp_path: Path) -> None:
    for folder in (tmp_path / "nope", tmp_path):  # missing, then empty
        with pytest.raises(ValueError, match=re.escape(str(folder))):
            Tokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="backend"):
        Tokenizer.from_pretrained(TOK_DIR, backend="slow")


def test_corrupted_files(tmp_path: Path, sp_dir: Path) -> None:
    _copy_tokenizer(tmp_path)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(bad_json))):
        Tokenizer.from_pretrained(tmp_path)
    bad_json.unlink()
    bad_model = tmp_path / "tokenizer.model"
    bad_model.write_bytes(b"\x0a\x05not a model at all" * 3)
    with pytest.raises(ValueError, match=re.escape(str(bad_model))):
        Tokenizer.from_pretrained(tmp_path)
    bad_model.unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(sp_dir, backend="fast")
    shutil.copy(TOK_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    config = tmp_path / "tokenizer_config.json"
    config.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(config))):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("which", ["fast", "sp"])
def test_bad_ids_and_text(which: str, fast: Tokenizer, sp: Tokenizer) -> None:
    tok = fast if which == "fast" else sp
    for ids in ([73448], [-1], [1, 10**9], [1.5], ["1"], [True], 5):
        with pytest.raises(ValueError):
            tok.decode(ids)
    with pytest.raises(ValueError, match="out of range"):
        tok.stream_detokenizer().push(73448)
    with pytest.raises(ValueError):
        tok.convert_ids_to_tokens([99999])
    for text in (None, b"bytes", 3, "lone \ud800 surrogate"):
        with pytest.raises(ValueError):
            tok.encode(text)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tok.encode_batch("not a list")
    assert tok.decode([73447]) == "" and tok.decode([]) == ""
