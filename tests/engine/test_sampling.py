import pytest
import torch

from server.demo_model import build_byte_tokenizer
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import Sampler
from server.engine.sampling import SamplingParams
from tests.engine.conftest import run_to_completion


def generate_text(engine, rid, prompt, params, adapter=None):
    engine.add_request(rid, prompt, params, adapter)
    text, out_tokens, finish, logprobs = "", [], None, []
    while engine.has_work:
        for out in engine.step()[0]:
            text += out.text
            out_tokens += out.token_ids
            logprobs += out.logprobs
            finish = out.finish_reason or finish
    return text, out_tokens, finish, logprobs


def test_seeded_sampling_is_reproducible_alone_or_batched(world_factory):
    world = world_factory(num_adapters=1)
    engine = world.engine()
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first = generate_text(engine, "a", [3, 4, 5], params, world.handle("a0"))
    second = generate_text(engine, "b", [3, 4, 5], params, world.handle("a0"))
    assert first[1] == second[1] and first[0] == second[0]
    other = generate_text(engine, "c", [3, 4, 5], SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True),
                          world.handle("a0"))
    assert other[1] != first[1]
    # the same seeded request inside a busy batch of unseeded ones
    for i in range(5):
        engine.add_request(f"noise{i}", [7, 8, 9 + i], SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
    engine.add_request("d", [3, 4, 5], params, world.handle("a0"))
    tokens, _, _ = run_to_completion(engine)
    assert tokens["d"] == first[1]


def test_stop_strings_stop_ids_eos_and_logprobs(world_factory):
    world = world_factory(num_adapters=0)
    engine = world.engine()
    greedy = dict(temperature=0, ignore_eos=True)
    _, ref_tokens, _, _ = generate_text(engine, "ref", [3, 4, 5], SamplingParams(max_tokens=12, **greedy))
    ref_text = world.loaded.tokenizer.decode(ref_tokens, skip_special_tokens=True)
    # stop token id: stops right at the first occurrence, reason "stop"
    stop_id = ref_tokens[4]
    _, toks, finish, _ = generate_text(engine, "s1", [3, 4, 5], SamplingParams(max_tokens=12, stop_token_ids=(stop_id,), **greedy))
    assert finish == "stop" and toks == ref_tokens[: ref_tokens.index(stop_id) + 1]
    # stop string taken from the middle of the reference text: output is cut before it
    stop = ref_text[3:5]
    text, _, finish, _ = generate_text(engine, "s2", [3, 4, 5], SamplingParams(max_tokens=12, stop=(stop,), **greedy))
    assert finish == "stop" and text == ref_text[: ref_text.index(stop)]
    # eos ends the request unless ignore_eos
    eos = world.loaded.tokenizer.eos_token_id
    engine.limits = engine.limits.__class__(engine.limits.max_model_len, engine.limits.vocab_size, frozenset({ref_tokens[2]}))
    _, toks, finish, _ = generate_text(engine, "s3", [3, 4, 5], SamplingParams(max_tokens=12, temperature=0))
    assert finish == "stop" and toks == ref_tokens[: ref_tokens.index(ref_tokens[2]) + 1] and eos is not None
    # logprobs: the chosen token's logprob and the top-3, matching a direct log_softmax
    _, toks, _, lps = generate_text(engine, "s4", [3, 4, 5], SamplingParams(max_tokens=3, logprobs=3, **greedy))
    with torch.no_grad():
        logits = world.reference_model(None)(input_ids=torch.tensor([[3, 4, 5]])).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    assert lps[0].token_id == toks[0] == int(expected.argmax())
    assert lps[0].logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t for t, _ in lps[0].top] == expected.topk(3).indices.tolist()


class _Seq:
    def __init__(self, params, rid="x"):
        self.params, self.request_id = params, rid


def test_sampler_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    sampler = Sampler(torch.device("cpu"))
    seqs = [_Seq(SamplingParams(temperature=1.5, top_k=1)), _Seq(SamplingParams(temperature=1.0, top_p=1e-6)),
            _Seq(SamplingParams(temperature=0)), _Seq(SamplingParams(temperature=0.7, top_k=1, seed=3), "s")]
    tokens, _ = sampler(logits, seqs)
    assert tokens == logits.argmax(-1).tolist()


def test_sampler_top_k_restricts_support():
    logits = torch.randn(1, 30).repeat(400, 1)
    seqs = [_Seq(SamplingParams(temperature=5.0, top_k=3), f"r{i}") for i in range(400)]
    tokens, _ = Sampler(torch.device("cpu"))(logits, seqs)
    assert set(tokens) <= set(logits[0].topk(3).indices.tolist()) and len(set(tokens)) == 3


@pytest.mark.parametrize("kw,message", [
    (dict(max_tokens=0), "max_tokens must be >= 1"), (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be in (0, 1]"), (dict(top_k=-2), "top_k must be >= 0"),
    (dict(logprobs=21), "logprobs must be in [0, 20]"), (dict(stop=("",)), "stop strings must be non-empty"),
])
def test_sampling_params_validation(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kw)


def test_detokenizer_streams_utf8_and_holds_back_stop_prefixes():
    tok = build_byte_tokenizer()
    text = "héllo wörld ✓ end"
    ids = tok(text)["input_ids"]
    detok = IncrementalDetokenizer(tok, [], stop=("ld ✓ e",))
    pieces, stopped = [], False
    for i in ids:
        stopped = detok.add_token(i)
        pieces.append(detok.take_delta(final=stopped))
        assert "\ufffd" not in pieces[-1]
        if stopped:
            break
    assert stopped and "".join(pieces) == "héllo wör"
    plain = IncrementalDetokenizer(tok, [])
    out = ""
    for i in ids:
        plain.add_token(i)
        out += plain.take_delta()
    assert out == text


@pytest.mark.parametrize("seed", range(4))
def test_detokenizer_deltas_equal_the_whole_decode_cut_at_the_first_stop(seed):
    import random

    from server.engine.detokenizer import _TRIM_TOKENS

    tok = build_byte_tokenizer()
    rng = random.Random(seed)
    alphabet = "ab c.é✓日🙂"
    text = "".join(rng.choice(alphabet) for _ in range(600))
    ids = tok(text)["input_ids"]
    stop = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4))) for _ in range(3)}) if seed % 2 else ()
    detok = IncrementalDetokenizer(tok, tok("x y")["input_ids"], stop)
    deltas, stopped = [], False
    for n, i in enumerate(ids):
        stopped = detok.add_token(i)
        deltas.append(detok.take_delta(final=stopped or n == len(ids) - 1))
        # O(1) a token: a bounded id window, and no more pending text than a stop string could still need
        assert len(detok._ids) <= _TRIM_TOKENS + 8 and len(detok._pending) < max(map(len, stop), default=1)
        if stopped:
            break
    whole = tok.decode(ids, skip_special_tokens=True)
    cuts = [whole.find(s) for s in stop if s in whole]
    assert "".join(deltas) == whole[: min(cuts)] if cuts else whole
    assert stopped == bool(cuts)
