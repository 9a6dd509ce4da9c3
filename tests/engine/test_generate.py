"""Batched generation (engine/generate.py): padding, cache compaction, stops and streaming."""

from __future__ import annotations

import copy

import pytest
import torch

from minicpm4.engine.generate import GenerationOutput, generate, generate_stream
from minicpm4.engine.request import SamplingParams
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from tests.conftest import TOKENIZER_DIR, require, tiny_config

PROMPTS = [[5, 17, 300, 41, 9, 77, 123], [400], [8, 8, 250, 3]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _ids(outputs: list[GenerationOutput]) -> list[list[int]]:
    return [o.token_ids for o in outputs]


def _reference_greedy(model: MiniCPM4ForCausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache, no padding)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


# --------------------------------------------------------------------------- tiny_model
def test_batched_greedy_equals_single(tiny_model) -> None:
    batched = _ids(generate(tiny_model, PROMPTS, GREEDY))
    singles = [_ids(generate(tiny_model, [p], GREEDY))[0] for p in PROMPTS]
    assert batched == singles
    assert all(len(ids) == 12 for ids in batched)
    assert len({tuple(ids) for ids in batched}) == 3  # not a degenerate constant model


def test_cached_generation_equals_full_recompute(tiny_model) -> None:
    out = _ids(generate(tiny_model, PROMPTS, GREEDY))
    for prompt, ids in zip(PROMPTS, out):
        assert ids == _reference_greedy(tiny_model, prompt, 12)


def test_rows_leaving_the_batch_do_not_disturb_the_others(tiny_model) -> None:
    """Different max_tokens per row: finished rows are compacted out of the KV cache."""
    lengths = [3, 14, 6]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    batched = generate(tiny_model, PROMPTS, params)
    for prompt, n, out in zip(PROMPTS, lengths, batched):
        assert out.token_ids == _reference_greedy(tiny_model, prompt, n)
        assert out.finish_reason == "length"
        assert out.prompt_tokens == len(prompt)


def test_max_tokens_respected(tiny_model) -> None:
    for n in (1, 5):
        outs = generate(tiny_model, PROMPTS, SamplingParams(max_tokens=n, ignore_eos=True,
                                                            seed=0))
        assert [len(o.token_ids) for o in outs] == [n] * 3
        assert [o.finish_reason for o in outs] == ["length"] * 3


def test_stop_token_id_ends_row(tiny_model) -> None:
    free = _ids(generate(tiny_model, PROMPTS, GREEDY))
    row, pos = 0, 4
    stop_tok = free[row][pos]
    first = free[row].index(stop_tok)  # the row stops at the first occurrence
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                             stop_token_ids=(stop_tok,)), GREEDY, GREEDY]
    outs = generate(tiny_model, PROMPTS, params)
    assert outs[0].token_ids == free[0][:first + 1]
    assert outs[0].finish_reason == "stop"
    assert [o.token_ids for o in outs[1:]] == free[1:]
    assert [o.finish_reason for o in outs[1:]] == ["length", "length"]


def test_eos_from_config_stops_unless_ignored(tiny_model) -> None:
    model = tiny_model
    free = _ids(generate(model, PROMPTS[:1], GREEDY))[0]
    eos = free[2]
    model.config = model.config.replace(eos_token_id=(eos,))
    stopped = generate(model, PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert stopped.token_ids == free[:free.index(eos) + 1]
    assert stopped.finish_reason == "stop"
    ignored = generate(model, PROMPTS[:1], GREEDY)[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_seed_gives_reproducible_samples(tiny_model) -> None:
    def run(seed: int) -> list[list[int]]:
        params = SamplingParams(temperature=1.5, max_tokens=16, ignore_eos=True, seed=seed)
        return _ids(generate(tiny_model, PROMPTS, params))

    torch.manual_seed(1)
    a = run(7)
    torch.manual_seed(2)  # the global RNG does not matter when a seed is given
    b = run(7)
    assert a == b
    assert run(8) != a


def test_seeded_row_is_independent_of_its_batch(tiny_model) -> None:
    seeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3)
    alone = _ids(generate(tiny_model, [PROMPTS[0]], seeded))[0]
    other = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=99)
    batched = _ids(generate(tiny_model, PROMPTS, [seeded, other, GREEDY]))
    assert batched[0] == alone


def test_stream_concatenation_equals_generate(tiny_model) -> None:
    params = [SamplingParams(temperature=0.9, max_tokens=n, ignore_eos=True, seed=i)
              for i, n in enumerate((4, 9, 6))]
    expected = generate(tiny_model, PROMPTS, params)
    streamed: list[list[int]] = [[], [], []]
    reasons: list[list[str | None]] = [[], [], []]
    for ev in generate_stream(tiny_model, PROMPTS, params):
        assert ev.text == ""  # no tokenizer: no text
        streamed[ev.index].append(ev.token_id)
        reasons[ev.index].append(ev.finish_reason)
    assert streamed == _ids(expected)
    for r, out in zip(reasons, expected):  # exactly the last event carries the reason
        assert r[:-1] == [None] * (len(r) - 1) and r[-1] == out.finish_reason == "length"


def test_stream_is_lazy_and_interleaved(tiny_model) -> None:
    stream = generate_stream(tiny_model, PROMPTS, GREEDY)
    first = [next(stream) for _ in range(3)]
    assert [ev.index for ev in first] == [0, 1, 2]
    stream.close()


def test_overlong_prompt_rejected(tiny_model) -> None:
    limit = tiny_model.config.max_position_embeddings
    prompt = [7] * (limit - 10)
    ok = generate(tiny_model, [prompt], SamplingParams(max_tokens=10, ignore_eos=True, seed=0))
    assert len(ok[0].token_ids) == 10
    with pytest.raises(ValueError, match="max_tokens"):
        generate(tiny_model, [prompt], SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="prompt 1"):
        generate(tiny_model, [[1, 2], [7] * limit], SamplingParams(max_tokens=1))


def test_empty_prompt_rejected(tiny_model) -> None:
    with pytest.raises(ValueError, match="prompt 1.*empty"):
        generate(tiny_model, [[1, 2], []], GREEDY)
    with pytest.raises(ValueError):
        generate(tiny_model, [], GREEDY)


def test_params_count_must_match_prompts(tiny_model) -> None:
    with pytest.raises(ValueError):
        generate(tiny_model, PROMPTS, [GREEDY, GREEDY])


def test_stop_strings_need_a_tokenizer(tiny_model) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        generate(tiny_model, PROMPTS[:1], SamplingParams(stop=("x",), max_tokens=4))


def test_repetition_penalty_in_generation(tiny_model) -> None:
    """With a strong penalty, greedy decoding avoids repeating prompt and output tokens."""
    plain = _ids(generate(tiny_model, PROMPTS, GREEDY))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            repetition_penalty=10.0, presence_penalty=2.0)
    penalised = _ids(generate(tiny_model, PROMPTS, params))
    assert penalised != plain
    for prompt, ids in zip(PROMPTS, penalised):
        assert len(set(ids)) == len(ids)
        assert not set(ids) & set(prompt)
    # and each row still matches its own single-prompt run (penalty state is per row)
    assert penalised == [_ids(generate(tiny_model, [p], params))[0] for p in PROMPTS]


# --------------------------------------------------------------------------- real tokenizer
@pytest.fixture(scope="module")
def tokenizer():
    from minicpm4.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(require(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def vocab_model() -> MiniCPM4ForCausalLM:
    cfg = tiny_config(vocab_size=73448, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      eos_token_id=(2, 73440))
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg)
    model.init_weights(seed=0)
    return model.eval()


N_TEXT = 40


def _continuation(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """Text of `ids` decoded after the prompt (a first '\u2581word' keeps its space), as vLLM."""
    head = tokenizer.decode(prompt)
    full = tokenizer.decode(list(prompt) + list(ids))
    assert full.startswith(head)
    return full[len(head):]


@pytest.fixture(scope="module")
def free_run(tokenizer, vocab_model):
    """(prompt ids, greedy continuation ids, its text) without any stop string."""
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True)
    out = generate(vocab_model, [prompt], params, tokenizer=tokenizer)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == N_TEXT
    assert out.text == _continuation(tokenizer, prompt, out.token_ids)
    assert len(out.text) > 40
    return prompt, out.token_ids, out.text


def _stop_candidates(tokenizer, prompt: list[int], ids: list[int], text: str) -> list[str]:
    """Stop strings taken from the text: inside one token's text, and across tokens."""
    candidates = []
    for start in (len(text) // 4, len(text) // 2, (3 * len(text)) // 4):
        s = text[start:start + 3]
        if s.strip():
            candidates.append(s)
    # a string spanning a token boundary: the end of token k and the start of token k+1
    for k in range(5, len(ids) - 1):
        a = _continuation(tokenizer, prompt, ids[:k + 1])
        b = _continuation(tokenizer, prompt, ids[:k + 2])
        if len(a) >= 2 and len(b) >= len(a) + 2 and b.startswith(a):
            candidates.append(b[len(a) - 2:len(a) + 2])
            break
    assert len(candidates) >= 3
    return candidates


def _stream(model, prompt, params, tokenizer):
    events = list(generate_stream(model, [prompt], params, tokenizer=tokenizer))
    return [ev.text for ev in events], events


def test_stop_string_cuts_text(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, text = free_run
    for s in _stop_candidates(tokenizer, prompt, ids, text):
        params = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True, stop=(s,))
        out = generate(vocab_model, [prompt], params, tokenizer=tokenizer)[0]
        cut = text.find(s)
        assert out.text == text[:cut], s
        assert out.finish_reason == "stop", s
        assert s not in out.text
        # generation stopped at the token that completed the stop string
        assert out.token_ids == ids[:len(out.token_ids)]
        assert len(out.token_ids) < N_TEXT
        assert s in _continuation(tokenizer, prompt, out.token_ids)
        assert s not in _continuation(tokenizer, prompt, out.token_ids[:-1])


def test_include_stop_str_in_output(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, text = free_run
    for s in _stop_candidates(tokenizer, prompt, ids, text):
        params = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True, stop=(s,),
                                include_stop_str_in_output=True)
        out = generate(vocab_model, [prompt], params, tokenizer=tokenizer)[0]
        assert out.text == text[:text.find(s) + len(s)], s
        assert out.text.endswith(s) and out.finish_reason == "stop"


def test_streamed_text_never_leaks_stop_string(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, text = free_run
    for s in _stop_candidates(tokenizer, prompt, ids, text):
        params = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True, stop=(s,))
        pieces, events = _stream(vocab_model, prompt, params, tokenizer)
        joined = "".join(pieces)
        assert s not in joined, s
        for k in range(len(pieces)):  # no prefix of the stream ever showed it
            assert s not in "".join(pieces[:k + 1])
        assert joined == generate(vocab_model, [prompt], params, tokenizer=tokenizer)[0].text
        assert events[-1].finish_reason == "stop"
        assert all(ev.finish_reason is None for ev in events[:-1])


def test_streamed_text_equals_final_text(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, text = free_run
    params = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True)
    pieces, events = _stream(vocab_model, prompt, params, tokenizer)
    assert "".join(pieces) == text
    assert [ev.token_id for ev in events] == ids
    assert sum(1 for p in pieces if p) > N_TEXT // 4  # text really arrives incrementally


def test_stop_string_not_in_text_runs_to_length(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, text = free_run
    absent = "\u2603\u2603never\u2603"
    assert absent not in text
    params = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True,
                            stop=(absent,))
    pieces, events = _stream(vocab_model, prompt, params, tokenizer)
    assert "".join(pieces) == text and events[-1].finish_reason == "length"


def test_stop_string_in_batch_only_stops_its_row(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, text = free_run
    s = _stop_candidates(tokenizer, prompt, ids, text)[1]
    other = tokenizer.encode("Once upon a time")
    plain = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True)
    stopped = SamplingParams(temperature=0.0, max_tokens=N_TEXT, ignore_eos=True, stop=(s,))
    alone_other = generate(vocab_model, [other], plain, tokenizer=tokenizer)[0]
    outs = generate(vocab_model, [prompt, other], [stopped, plain], tokenizer=tokenizer)
    assert outs[0].text == text[:text.find(s)] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == alone_other.token_ids
    assert outs[1].text == alone_other.text and outs[1].finish_reason == "length"


def test_stop_token_ids_with_tokenizer(tokenizer, vocab_model, free_run) -> None:
    prompt, ids, _ = free_run
    out = generate(vocab_model, [prompt], SamplingParams(temperature=0.0, max_tokens=N_TEXT,
                                                         stop_token_ids=(ids[3],)),
                   tokenizer=tokenizer)[0]
    assert out.token_ids == ids[:ids.index(ids[3]) + 1] and out.finish_reason == "stop"
    assert out.text == _continuation(tokenizer, prompt, out.token_ids[:-1])


def test_tokenizer_eos_ids_end_generation(tokenizer, vocab_model, free_run) -> None:
    """`<|im_end|>` (73440), an EOS of the tokenizer, stops a row that does not ignore EOS
    even when the model config does not list it."""
    prompt, ids, _ = free_run
    im_end = 73440
    assert im_end in tokenizer.stop_token_ids
    model = copy.deepcopy(vocab_model)
    model.config = model.config.replace(eos_token_id=(2,))
    with torch.no_grad():  # make <|im_end|> win exactly where the free run produced ids[2]
        model.lm_head.weight[im_end] = model.lm_head.weight[ids[2]] * 1.01
    params = SamplingParams(temperature=0.0, max_tokens=N_TEXT)
    out = generate(model, [prompt], params, tokenizer=tokenizer)[0]
    assert out.token_ids == ids[:2] + [im_end] and out.finish_reason == "stop"
    assert out.text == _continuation(tokenizer, prompt, ids[:2])
    ignored = generate(model, [prompt], SamplingParams(temperature=0.0, max_tokens=6,
                                                       ignore_eos=True), tokenizer=tokenizer)[0]
    assert ignored.token_ids[:3] == ids[:2] + [im_end] and len(ignored.token_ids) == 6
    assert "<|im_end|>" not in ignored.text  # special tokens are skipped in the text
