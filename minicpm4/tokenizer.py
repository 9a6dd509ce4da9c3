"""MiniCPM4 tokenizer: text <-> token ids, special tokens and the ChatML chat template.

Responsibility: load a MiniCPM4 tokenizer folder (special tokens and ChatML template: spec §1.2)
and encode/decode exactly as ``transformers.AutoTokenizer`` (5.x) does on it. Backend ``fast``:
``tokenizers`` on tokenizer.json, rebuilt like transformers 5 rebuilds ``LlamaTokenizer`` (no
normalizer; Metaspace prepends '▁' to a segment unless it starts with one). Backend
``sentencepiece``: tokenizer.model, with special-token splitting, the dummy prefix and
user-defined pieces handled here (docs/tokenizer.md). BOS/EOS are added here, per
``add_bos_token``/``add_eos_token``, only when ``add_special_tokens=True``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from minicpm4.detokenize import StreamDetokenizer, check_token_ids, pieces_to_text

__all__ = ["Tokenizer", "StreamDetokenizer", "BACKENDS"]

BACKENDS = ("auto", "fast", "sentencepiece")
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
_SPM_NORMAL, _SPM_USER_DEFINED = 1, 4  # sentencepiece ModelProto.SentencePiece.Type


@dataclass
class _Config:
    add_bos: bool = True
    add_eos: bool = False
    named: dict[str, str] = field(default_factory=dict)  # bos/eos/unk/pad_token -> content
    added: dict[str, tuple[int, bool]] = field(default_factory=dict)  # content -> (id, special)
    chat_template: str | None = None
    gen_eos_ids: list[int] = field(default_factory=list)
    gen_pad_id: int | None = None
    tokenizer_class: str = ""
    prepend_scheme: str = "always"  # Metaspace semantics: always | first | never


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer file {path} must hold a JSON object")
    return data


def _content(value: Any) -> str | None:
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _int_list(value: Any) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if type(v) is int]


def _load_config(folder: Path) -> _Config:
    tc = _read_json(folder / "tokenizer_config.json")
    stm = _read_json(folder / "special_tokens_map.json")
    gen = _read_json(folder / "generation_config.json")
    extra = _read_json(folder / "added_tokens.json")
    cfg = _Config(add_bos=bool(tc.get("add_bos_token", True)), add_eos=bool(tc.get("add_eos_token", False)))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _content(stm.get(key)) or _content(tc.get(key))  # special_tokens_map wins
        if value is not None:
            cfg.named[key] = value
    try:
        for tid, spec in sorted((tc.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            cfg.added[spec["content"]] = (int(tid), bool(spec.get("special", False)))
        for content, tid in extra.items():
            cfg.added.setdefault(content, (int(tid), False))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed added tokens in {folder}: {exc}") from exc
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    cfg.chat_template = template if isinstance(template, str) else None
    cfg.gen_eos_ids = _int_list(gen.get("eos_token_id"))
    cfg.gen_pad_id = next(iter(_int_list(gen.get("pad_token_id"))), None)
    cfg.tokenizer_class = str(tc.get("tokenizer_class") or "")
    # transformers' LlamaTokenizer: add_prefix_space None -> True; legacy -> "always", else "first".
    add_prefix = tc.get("add_prefix_space") is None or bool(tc.get("add_prefix_space"))
    cfg.prepend_scheme = ("always" if tc.get("legacy", False) else "first") if add_prefix else "never"
    return cfg


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode (lone surrogate at index {exc.start})") from exc
    return text


def _special_ids(cfg: _Config, lookup: Callable[[str], int | None]) -> frozenset[int]:
    """Ids dropped by ``skip_special_tokens``: special added tokens and the named tokens."""
    named = (lookup(content) for content in cfg.named.values())
    return frozenset(i for i, special in cfg.added.values() if special) | frozenset(i for i in named if i is not None)


class _FastBackend:
    """``tokenizers`` on tokenizer.json (what transformers' AutoTokenizer and vLLM run)."""

    name = "fast"

    def __init__(self, path: Path, cfg: _Config) -> None:
        from tokenizers import AddedToken as HFAddedToken, Tokenizer as HFTokenizer, decoders, pre_tokenizers

        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust loader raises a plain Exception
            raise ValueError(f"cannot load tokenizer file {path}: {exc}") from exc
        if cfg.tokenizer_class in _LLAMA_CLASSES:
            tk.normalizer = None
            tk.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme=cfg.prepend_scheme, split=False)
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            if cfg.prepend_scheme != "never":
                steps.append(decoders.Strip(content=" ", left=1, right=0))
            tk.decoder = decoders.Sequence(steps)
        tk.no_truncation()
        tk.no_padding()
        known = tk.get_added_tokens_decoder()
        for content, (tid, special) in sorted(cfg.added.items(), key=lambda kv: kv[1]):
            if tid not in known and tk.token_to_id(content) is None:
                spec = HFAddedToken(content, special=special, normalized=False)
                (tk.add_special_tokens if special else tk.add_tokens)([spec])
        self._tk = tk
        self.vocab_size: int = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)


def _retype_user_defined(model_bytes: bytes, path: Path) -> bytes | None:
    """Turn multi-character user-defined pieces into normal BPE pieces (None without protobuf).

    sentencepiece matches user-defined pieces such as '...' or '<td>' atomically before BPE;
    tokenizer.json holds them as ordinary vocabulary, reachable only through merges.
    """
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except DecodeError as exc:
        raise ValueError(f"cannot parse tokenizer file {path}: {exc}") from exc
    for piece in proto.pieces:
        if piece.type == _SPM_USER_DEFINED and len(piece.piece) > 1:
            piece.type = _SPM_NORMAL
    return proto.SerializeToString()


class _SentencePieceBackend:
    """``sentencepiece`` on tokenizer.model plus the added tokens of the json configs."""

    name = "sentencepiece"

    def __init__(self, path: Path, cfg: _Config) -> None:
        import sentencepiece

        try:
            raw = path.read_bytes()
            proto = _retype_user_defined(raw, path)
            sp = sentencepiece.SentencePieceProcessor()
            sp.LoadFromSerializedProto(proto if proto is not None else raw)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot load tokenizer file {path}: {exc}") from exc
        self.retyped_user_defined = proto is not None
        self._sp = sp
        self._scheme = cfg.prepend_scheme
        self._added = {content: tid for content, (tid, _) in cfg.added.items()}
        self._added_by_id = {tid: content for content, tid in self._added.items()}
        alternatives = sorted(self._added, key=len, reverse=True)  # leftmost match, longest first
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self._n_pieces: int = sp.get_piece_size()
        self.vocab_size: int = max([self._n_pieces, *(i + 1 for i in self._added_by_id)])
        self._special = _special_ids(cfg, self.token_to_id)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        offset = 0
        for part in self._split.split(text) if self._split is not None else [text]:
            if part in self._added:
                ids.append(self._added[part])
            elif part:
                prepend = self._scheme == "always" or (self._scheme == "first" and offset == 0)
                prepend = prepend and not part.startswith((" ", "\u2581"))  # Metaspace rule
                ids.extend(self._sp.encode(" " + part if prepend else part))  # model adds no dummy prefix
            offset += len(part)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces = [self.id_to_token(t) or "" for t in ids if not (skip_special_tokens and t in self._special)]
        return pieces_to_text(pieces, strip_leading_space=self._scheme != "never")

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self._n_pieces else None

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        tid = self._sp.piece_to_id(token)
        return tid if tid != self._sp.unk_id() or token == self._sp.id_to_piece(tid) else None


def _compile_template(source: str) -> Any:
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, **options: Any) -> str:  # jinja's own escapes HTML
        return json.dumps(value, ensure_ascii=ensure_ascii, **options)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not compile: {exc}") from exc


class Tokenizer:
    """MiniCPM4 tokenizer with a ``tokenizers`` (fast) or ``sentencepiece`` backend."""

    def __init__(self, backend: _FastBackend | _SentencePieceBackend, cfg: _Config, name_or_path: str) -> None:
        self._backend = backend
        self._cfg = cfg
        self._name_or_path = name_or_path
        self._special_ids = _special_ids(cfg, backend.token_to_id)
        self._template: Any = None

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "auto") -> Tokenizer:
        """Load a tokenizer folder; backend "auto" = "fast" if tokenizer.json exists, else "sentencepiece"."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder not found: {folder}")
        json_file, model_file = folder / "tokenizer.json", folder / "tokenizer.model"
        if backend == "auto":
            if not (json_file.is_file() or model_file.is_file()):
                raise ValueError(f"no tokenizer.json or tokenizer.model in {folder}")
            backend = "fast" if json_file.is_file() else "sentencepiece"
        wanted = json_file if backend == "fast" else model_file
        if not wanted.is_file():
            raise ValueError(f"tokenizer file not found: {wanted} (backend={backend!r})")
        cfg = _load_config(folder)
        impl = _FastBackend(wanted, cfg) if backend == "fast" else _SentencePieceBackend(wanted, cfg)
        return cls(impl, cfg, str(folder))

    # ------------------------------------------------------------------ properties
    def _named_id(self, key: str) -> int | None:
        content = self._cfg.named.get(key)
        return None if content is None else self._backend.token_to_id(content)

    @property
    def backend(self) -> str:
        """Backend name: "fast" or "sentencepiece"."""
        return self._backend.name

    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (73448 for MiniCPM4)."""
        return self._backend.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's eos (``<|im_end|>`` = 73440 for MiniCPM4)."""
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Tokenizer pad token, else generation_config pad_token_id, else eos."""
        pad = self._named_id("pad_token")
        pad = self._cfg.gen_pad_id if pad is None else pad
        return self.eos_token_id if pad is None else pad

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """generation_config eos ids plus the tokenizer eos ({2, 73440} for MiniCPM4)."""
        eos = self.eos_token_id
        return frozenset(self._cfg.gen_eos_ids) | (frozenset() if eos is None else frozenset({eos}))

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``skip_special_tokens=True`` drops."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self._cfg.chat_template

    # ------------------------------------------------------------------ encode / decode
    def _wrap(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if not add_special_tokens:
            return ids
        bos, eos = self.bos_token_id, self.eos_token_id
        head = [bos] if self._cfg.add_bos and bos is not None else []
        return head + ids + ([eos] if self._cfg.add_eos and eos is not None else [])

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids."""
        return self._wrap(self._backend.encode(_check_text(text)), add_special_tokens)

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of str, not a str")
        batch = [_check_text(t) for t in texts]
        return [self._wrap(ids, add_special_tokens) for ids in self._backend.encode_batch(batch)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; one leading dummy-prefix space is removed, as transformers does."""
        return self._backend.decode(check_token_ids(ids, self.vocab_size), skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if type(ids) is int:
            return self.convert_ids_to_tokens([ids])[0]
        return [self._backend.id_to_token(t) or "" for t in check_token_ids(ids, self.vocab_size)]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary piece or added token, None if unknown."""
        return self._backend.token_to_id(token)

    def stream_detokenizer(self, *, skip_special_tokens: bool = True) -> StreamDetokenizer:
        return StreamDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render the chat template (ChatML, spec §1.2); extra kwargs (``tools``, ``enable_thinking``,
        ...) reach it. ``tokenize=True`` encodes with ``add_special_tokens=False`` like transformers
        and vLLM: a BOS appears only if the template writes one (MiniCPM4's does not)."""
        import jinja2

        if self._cfg.chat_template is None:
            raise ValueError(f"no chat_template in {self._name_or_path}")
        if not isinstance(messages, (list, tuple)):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
        for i, msg in enumerate(messages):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {msg!r}")
        if self._template is None:
            self._template = _compile_template(self._cfg.chat_template)
        variables = {**self._cfg.named, **kwargs}
        tools, documents = variables.pop("tools", None), variables.pop("documents", None)
        try:
            text = self._template.render(messages=[dict(m) for m in messages], tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer({self._name_or_path!r}, backend={self.backend!r}, vocab_size={self.vocab_size})"
