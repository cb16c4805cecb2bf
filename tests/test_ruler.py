"""The RULER-style generators, the interval code and the one-prefill fan-out."""

import importlib.util
import json
import random
import re
from collections import Counter

import pytest

from kvcompress import ruler
from kvcompress.intervals import bootstrap, paired, wilson

LENGTHS = (500, 1000, 2000)


# ----------------------------------------------------------------- intervals


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_textbook(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="successes"):
        wilson(5, 4)
    with pytest.raises(ValueError, match="n: must be"):
        wilson(0, 0)


def test_bootstrap_constant_and_coverage():
    assert bootstrap([0.7] * 25) == (pytest.approx(0.7), pytest.approx(0.7))
    vals = [1.0] * 10 + [0.0] * 10
    lo, hi = bootstrap(vals)
    assert lo < 0.5 < hi and 0.2 < lo and hi < 0.8
    # stratified: mean of stratum means, each stratum constant -> the constant mean
    lo, hi = bootstrap([1.0] * 3 + [0.0] * 7, strata=["a"] * 3 + ["b"] * 7)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_paired_keeps_the_pairing():
    # items spread widely, b is a + 0.1 plus small noise: the methods' own
    # intervals overlap, the paired one excludes zero
    rnd = random.Random(3)
    a = [rnd.uniform(0.0, 2.0) for _ in range(12)]
    b = [x + 0.1 + rnd.uniform(-0.02, 0.02) for x in a]
    assert bootstrap(b)[0] < bootstrap(a)[1]  # unpaired: overlapping
    p = paired(a, b)
    assert p["mean"] == pytest.approx(sum(x - y for x, y in zip(a, b)) / 12)
    assert -0.12 < p["low"] <= p["mean"] <= p["high"] < -0.08
    assert p["lower"] == 12 and p["n"] == 12
    # a constant difference is its own interval; equal scores are lower nowhere
    c = paired([0.5, 0.1, 0.9], [0.2, -0.2, 0.6])
    assert (c["low"], c["mean"], c["high"]) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
    assert c["lower"] == 0 and paired(a, a)["lower"] == 0
    with pytest.raises(ValueError, match="b: expected one value per item"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="a: need at least one"):
        paired([], [])


# ----------------------------------------------------------------- generators


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def test_seed_splits_are_disjoint():
    for task in ruler.TASKS:
        dev = {ruler.case_seed(task, "dev", i) for i in range(500)}
        held = {ruler.case_seed(task, "heldout", i) for i in range(500)}
        assert len(dev) == 500 and not dev & held
    with pytest.raises(ValueError, match="split"):
        ruler.case_seed("qa", "test", 0)


def _count(text, word):
    return len(re.findall(r"(?<![0-9A-Za-z])" + re.escape(word) + r"(?![0-9A-Za-z])", text))


def _check_answers(case):
    ctx = case.context
    if case.task.startswith("niah"):
        for turn in case.turns:
            for a in turn.answers:
                assert _count(ctx, a) == 1, (case.task, a)
                key = re.search(r"for (\S+) is: " + a, ctx).group(1)
                assert key in turn.question
        n_needles = len(re.findall(r"special magic numbers for", ctx))
        assert n_needles == {"niah_single": 1}.get(case.task, 4)
    elif case.task == "vt":
        names = case.turns[0].answers
        assert len(set(names)) == 5
        value = re.search(r"value (\d+)", case.turns[0].question).group(1)
        assert _count(ctx, value) == 1
        # follow the chain in the text: exactly the answers hold the value
        holds = {re.search(r"VAR (\w+) = " + value, ctx).group(1)}
        for lhs, rhs in re.findall(r"VAR (\w+) = VAR (\w+)", ctx):
            if rhs in holds:
                holds.add(lhs)
        assert holds == set(names)
    elif case.task == "cwe":
        words = re.findall(r"\d+\. (\w+)", ctx)
        counts = Counter(words)
        top = case.turns[0].answers
        floor = min(counts[w] for w in top)
        assert all(counts[w] < floor for w in counts if w not in top), "the answers are the most common words"
    elif case.task == "fwe":
        counts = Counter(ctx.split())
        top = case.turns[0].answers
        floor = min(counts[w] for w in top)
        assert all(counts[w] <= floor for w in counts if w not in top)
    else:  # qa, multiturn: each asked person appears once, with the fact that answers
        for turn in case.turns:
            name = re.match(r"(?:In which town was |What is the job of |What is the favourite colour of |"
                            r"What kind of pet does )(\w+ \w+)", turn.question).group(1)
            assert ctx.count(name) == 1
            sentence = next(s for s in ctx.split("\n\n") if name in s)
            assert _count(sentence, turn.answers[0]) == 1


@pytest.mark.parametrize("task", ruler.TASKS)
def test_every_task_at_every_length_with_and_without_chat(task, tokenizer):
    for n in LENGTHS:
        case = ruler.make_case(task, n, tokenizer, split="dev", index=3)
        again = ruler.make_case(task, n, tokenizer, split="dev", index=3)
        assert case.context == again.context and case.turns == again.turns  # seeded
        other = ruler.make_case(task, n, tokenizer, split="heldout", index=3)
        assert other.context != case.context
        _check_answers(case)
        _check_answers(other)
        ctx_tokens = len(tokenizer(case.context, add_special_tokens=False)["input_ids"])
        assert 0.8 * n <= ctx_tokens <= 1.05 * n, (task, n, ctx_tokens)
        for chat in (False, True):
            r = ruler.render(case, tokenizer, chat=chat)
            assert len(r.chunks) == len(case.turns)
            text = tokenizer.decode(r.chunks[0])
            assert case.turns[0].question in text and text.rstrip().endswith(case.turns[0].prefix.rstrip())
            assert ("<|im_start|>" in text) == chat
            for turn, ids in zip(case.turns[1:], r.chunks[1:]):
                later = tokenizer.decode(ids)
                assert turn.question in later and case.context[:50] not in later
                if chat:
                    assert later.startswith("<|im_end|>")


def test_render_refuses_chat_without_template(tiny_lm):
    _, tok, _ = tiny_lm
    case = ruler.make_case("niah_single", 300, tok, split="dev", index=0)
    with pytest.raises(ValueError, match="chat"):
        ruler.render(case, tok, chat=True)
    assert not ruler.render(case, tok).chat


def test_list_answers_stop_when_complete():
    from kvcompress.suite import _stop

    class Tok:
        def decode(self, ids, **kw):
            return "".join(ids)

    case = ruler.make_case("niah_multivalue", 300, _Chars(), split="dev", index=0)
    turn = case.turns[0]
    a, b, c, d = turn.answers
    assert not _stop(Tok(), [":\n", f"- {a}\n", f"- {b}"], [], turn)      # the second may still grow
    assert not _stop(Tok(), [":\n", f"- {a}\n", f"- {b}\n- {c}\n"], [], turn)
    assert _stop(Tok(), [":\n", f"- {a}\n", f"- {b}\n- {c}\n- {d}."], [], turn)
    assert _stop(Tok(), [":\n", f"- {a}\n\n"], [], turn)                   # a blank line ends a list
    one = ruler.Turn("q", "p", ["x"], 8)
    assert not _stop(Tok(), ["\n", " Kel"], [], one) and _stop(Tok(), [" Kelmore", ".\n"], [], one)


class _Chars:
    """A character-level stand-in tokenizer (token counts = characters / 4)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text) // 4))}


def test_scoring_whole_words():
    case = ruler.RulerCase("niah_multivalue", 100, 0, "dev", "ctx",
                           [ruler.Turn("q", "p", ["1234567", "7654321"], 8)])
    assert case.score(0, " 1234567 and 7654321.") == 1.0
    assert case.score(0, " 12345678, 7654321") == 0.5
    assert case.score(0, "nothing") == 0.0


def test_make_case_validates():
    with pytest.raises(ValueError, match="task"):
        ruler.make_case("needle", 500, None)
    with pytest.raises(ValueError, match="length"):
        ruler.make_case("qa", 10, None)


# ----------------------------------------------------------------- fan-out


def test_fanout_matches_separate_runs(tiny_lm):
    """One prefill feeding several caches generates what separate runs do;
    the never-evicting child generates what DynamicCache does."""
    import torch

    import kvcompress as kvc
    from kvcompress import testing as T
    from kvcompress.compat import cache_kwargs
    from kvcompress.fanout import FanoutCache
    from kvcompress.suite import _chunk, _decode

    model, tok, _ = tiny_lm
    torch.manual_seed(1)
    ids = torch.randint(3, 250, (1, 300))
    methods = [kvc.StreamingLLM(ratio=0.0, sinks=0), kvc.EMS(ratio=0.75), kvc.SnapKV(ratio=0.5, window=8),
               kvc.AdaKV(budget=64, window=8), kvc.H2O(ratio=0.6), kvc.TOVA(ratio=0.8)]
    n = 40
    with T.method_context(model, None) as new:
        want_full, _ = T.greedy(model, new(), ids, n)
    expected = []
    for m in methods:
        with T.method_context(model, m) as new:
            expected.append(T.greedy(model, new(), ids, n)[0])
    assert expected[0] == want_full
    children = [kvc.KVCache(m, num_layers=4) for m in methods]
    kw = lambda c: cache_kwargs(model, c)  # noqa: E731
    with kvc.compress(model, methods[0]), torch.inference_mode():
        fan = FanoutCache(children)
        first = _chunk(model, fan, ids[0].tolist(), 0, kw)
        turn = ruler.Turn("q", "p", ["a", "b"], n)
        got = [_decode(model, _NeverStop(), c, first, 300, turn, [], kw)[0] for c in children]
        with pytest.raises(kvc.KVCompressValueError, match="one prefill"):
            _chunk(model, fan, [5, 6], 300, kw)
    for m, g, e in zip(methods, got, expected):
        assert g == e, m.describe()
    assert children[1].memory_bytes() < children[0].memory_bytes()


class _NeverStop:
    """A tokenizer stand-in whose text never holds a line break, so decoding
    runs the full token count (random tokens may decode to newlines)."""

    def decode(self, ids, **kw):
        return "x" * len(ids)


# ----------------------------------------------------------------- the suite run


def test_suite_cli_tiny_model(tiny_lm, tmp_path, capsys):
    """`eval --suite ruler` end to end: rows, intervals, bytes, outputs; the
    full row's generations equal plain greedy runs of the same prompts."""
    import json

    import torch

    from kvcompress import cli, suite
    from kvcompress import testing as T

    model, tok, folder = tiny_lm
    out = tmp_path / "suite"
    args = ["eval", "--suite", "ruler", "--model", str(folder), "--methods", "snapkv:window=8,ems:window=8",
            "--ratios", "0.5,0.9", "--tasks", "niah_single,multiturn", "--lengths", "200", "--cases", "2",
            "--split", "dev", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    results = json.loads((out / "suite.json").read_text())
    assert results["schema"] == suite.SCHEMA and results["chat"] is False
    rows = results["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("full", None), ("snapkv:window=8", 0.5), ("snapkv:window=8", 0.9), ("ems:window=8", 0.5),
        ("ems:window=8", 0.9)]
    for r in rows:
        assert set(r["tasks"]) == {"niah_single@200", "multiturn@200"}
        assert len(r["cases"]) == 4
        for t in r["tasks"].values():
            assert 0 <= t["low"] <= t["score"] <= t["high"] <= 1 and t["n"] == 2
        assert r["tasks"]["niah_single@200"]["interval"] == "wilson"
        assert r["tasks"]["multiturn@200"]["interval"] == "bootstrap"
        assert r["suite"]["low"] <= r["suite"]["score"] <= r["suite"]["high"]
    assert rows[0]["compression"] == 1.0
    assert rows[2]["bytes"] < rows[1]["bytes"] < rows[0]["bytes"]
    assert suite.markdown(results) in capsys.readouterr().out
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "suite_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="x: expected 'ratio' or 'bytes'"):
        suite.plot(results, out / "bad.png", x="budget")
    # the full row against plain greedy over the same first turn (DynamicCache)
    for rec in rows[0]["cases"]:
        if rec["task"] != "niah_single":
            continue
        index = next(i for i in range(2) if ruler.case_seed("niah_single", "dev", i) == rec["seed"])
        case = ruler.make_case("niah_single", 200, tok, split="dev", index=index)
        ids = torch.tensor([ruler.render(case, tok).chunks[0]])
        with T.method_context(model, None) as new:
            toks, _ = T.greedy(model, new(), ids, 14)
        text = tok.decode(toks, skip_special_tokens=True)
        assert text.startswith(rec["generated"][0])


@pytest.mark.parametrize("args, message", [
    (["--tasks", "niah_single,mmlu"], "unknown task 'mmlu'"),
    (["--cases", "0"], "cases"),
    (["--ratios", "0"], "ratios"),
    (["--budgets", "64"], "--budgets does not apply"),
    (["--lengths", "10"], "lengths"),
    # a repeated row used to count its cases once per copy and narrow its interval
    (["--methods", "snapkv,snapkv", "--ratios", "0.5"], "methods: 'snapkv' is given twice"),
    (["--methods", "snapkv", "--ratios", "0.5,0.5"], "ratios: 0.5 is given twice"),
    pytest.param(["--methods", "kvpress:SnapKV", "--ratios", "0.5"], "kvpress rows need the kvpress package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("kvpress") is not None,
                                          reason="kvpress is installed here")),
])
def test_suite_bad_options(args, message, capsys):
    from kvcompress import cli

    assert cli.main(["eval", "--suite", "ruler"] + args) == 2
    assert message in capsys.readouterr().err


def test_suite_only_options_refused_without_suite(capsys):
    from kvcompress import cli

    assert cli.main(["eval", "--cases", "3"]) == 2
    assert "--cases applies to --suite ruler only" in capsys.readouterr().err


def test_quick_preset_and_overrides():
    from kvcompress.suite import QUICK_TASKS, SuiteConfig

    q = SuiteConfig.quick()
    assert q.tasks == list(QUICK_TASKS) and q.cases == 5 and q.methods == ["ems", "snapkv"] and q.split == "heldout"
    assert SuiteConfig.quick(cases=2, ratios=[0.75]).ratios == [0.75]
    assert SuiteConfig().cases >= 20  # the floor for reported tables


def test_suite_chat_without_template_is_refused(tiny_lm, capsys):
    from kvcompress import cli

    _, _, folder = tiny_lm
    args = ["eval", "--suite", "ruler", "--model", str(folder), "--chat", "--methods", "snapkv:window=8",
            "--tasks", "niah_single", "--lengths", "200", "--cases", "1", "--no-progress"]
    assert cli.main(args) == 2
    assert "--chat: this tokenizer has no chat template" in capsys.readouterr().err


def test_combine_equals_one_run(tiny_lm):
    """Rows from two runs on the same cases, combined, equal one run of all
    the methods; a task subset equals a run of those tasks; mismatched runs
    are refused by name."""
    from kvcompress import suite

    model, tok, _ = tiny_lm
    base = dict(tasks=["niah_single", "multiturn"], lengths=[200], cases=2, split="dev", ratios=[0.5, 0.9])
    run = lambda methods, **kw: suite.run_suite(model, tok, suite.SuiteConfig(methods=methods, **{**base, **kw}),  # noqa: E731
                                                progress=False)
    a, b, both = run(["snapkv:window=8"]), run(["tova"]), run(["snapkv:window=8", "tova"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cases"} for r in rows]  # noqa: E731
    combined = suite.combine([a, b])
    assert strip(combined["rows"]) == strip(both["rows"])
    assert combined["full_agreement"] == [dict(result=1, agreement=1.0, transformers=b["machine"]["transformers"],
                                               tokenizer=None)]
    assert "2 runs combined" in suite.describe(combined)
    only = run(["snapkv:window=8", "tova"], tasks=["multiturn"])
    assert strip(suite.combine([a, b], tasks=["multiturn"])["rows"]) == strip(only["rows"])
    # a method's ratios split over runs come back as one block, ratios ascending
    hi, lo = run(["tova"], ratios=[0.9]), run(["tova"], ratios=[0.5])
    assert strip(suite.combine([hi, lo])["rows"]) == strip(b["rows"])
    assert suite.combine([hi, lo])["config"]["ratios"] == [0.5, 0.9]
    with pytest.raises(ValueError, match=r"results\[1\]: snapkv:window=8 @ 0.5 is in an earlier result"):
        suite.combine([a, a])
    # relabelled and chosen rows: the same scores under the new label, in the asked order
    picked = suite.combine([a, b], rename={"snapkv:window=8": "snapkv8"}, methods=["tova", "snapkv8"])
    assert [(r["method"], r["ratio"]) for r in picked["rows"]] == [
        ("full", None), ("tova", 0.5), ("tova", 0.9), ("snapkv8", 0.5), ("snapkv8", 0.9)]
    assert picked["config"]["methods"] == ["tova", "snapkv8"]
    by = {(r["method"], r["ratio"]): r["suite"] for r in both["rows"]}
    assert [r["suite"] for r in picked["rows"][3:]] == [by[("snapkv:window=8", 0.5)], by[("snapkv:window=8", 0.9)]]
    assert [(r["method"], r["ratio"]) for r in suite.combine([a, b], methods=["tova"])["rows"]] == [
        ("full", None), ("tova", 0.5), ("tova", 0.9)]
    with pytest.raises(ValueError, match="methods: 'snapkv:window=8' is not a row"):
        suite.combine([a, b], rename={"snapkv:window=8": "snapkv8"}, methods=["snapkv:window=8"])
    with pytest.raises(ValueError, match=r"results\[1\]: tova @ 0.5 is in an earlier result"):
        suite.combine([a, b], rename={"snapkv:window=8": "tova"})
    with pytest.raises(ValueError, match="rename: 'snapkv' is not a row"):
        suite.combine([a, b], rename={"snapkv": "s"})
    with pytest.raises(ValueError, match=r"results\[1\]: split"):
        suite.combine([a, run(["tova"], split="heldout")])
    with pytest.raises(ValueError, match="tasks: 'qa' was not run"):
        suite.combine([a, b], tasks=["qa"])
    # a run that only took another tokenizer (--tokenizer) joins; its agreement names it
    name = a["model"]["name"]
    retok = dict(b, model=dict(b["model"], name=name + ", tokenizer /saved/tok"))
    joined = suite.combine([a, retok])
    assert joined["full_agreement"][0]["tokenizer"] == "/saved/tok"
    assert "tokenizer /saved/tok) scored the same on 100% of cases" in suite.describe(joined)
    with pytest.raises(ValueError, match="model .* differs"):
        suite.combine([a, dict(b, model=dict(b["model"], name="other"))])


def test_join_tasks_equals_one_run_of_all_tasks(tiny_lm, tmp_path):
    """Two runs of the same rows on different tasks, joined, equal one run of
    both tasks (suite scores and intervals over all of them); rows only one
    run holds are left out and listed; runs that share a task or differ in
    split are refused by name; the joined run combines with a run whose
    tasks are listed in another order."""
    from kvcompress import suite

    model, tok, _ = tiny_lm
    base = dict(lengths=[200], cases=2, split="dev", ratios=[0.5, 0.9])
    run = lambda methods, **kw: suite.run_suite(model, tok, suite.SuiteConfig(methods=methods, **{**base, **kw}),  # noqa: E731
                                                progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cases"} for r in rows]  # noqa: E731
    a = run(["tova"], tasks=["niah_single"])
    b = run(["tova"], tasks=["multiturn"])
    both = run(["tova"], tasks=["niah_single", "multiturn"])
    joined = suite.join_tasks([a, b])
    assert joined["config"]["tasks"] == ["niah_single", "multiturn"]
    assert strip(joined["rows"]) == strip(both["rows"]) and joined["dropped"] == []
    # read back from files: one file as it is, `A.json+B.json` joined
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert suite.read_result(tmp_path / "a.json") == json.loads(json.dumps(a))
    read = suite.read_result(f"{tmp_path / 'a.json'}+{tmp_path / 'b.json'}")
    assert strip(read["rows"]) == strip(both["rows"])
    # one run without the 0.5 row: that row is left out, by name
    b9 = dict(b, rows=[r for r in b["rows"] if r["ratio"] != 0.5])
    part = suite.join_tasks([a, b9])
    assert [(r["method"], r["ratio"]) for r in part["rows"]] == [("full", None), ("tova", 0.9)]
    assert part["dropped"] == [["tova", 0.5]] and part["config"]["ratios"] == [0.9]
    # joined in the other task order, its rows combine with a run of both tasks
    # (here the full row of `both`), case by case
    ba = suite.join_tasks([b, a])
    assert ba["config"]["tasks"] == ["multiturn", "niah_single"]
    only_full = dict(both, rows=both["rows"][:1])
    assert strip(suite.combine([only_full, ba])["rows"]) == strip(both["rows"])
    with pytest.raises(ValueError, match=r"results\[1\]: task 'niah_single' is in an earlier result"):
        suite.join_tasks([a, a])
    with pytest.raises(ValueError, match=r"results\[1\]: split"):
        suite.join_tasks([a, run(["tova"], tasks=["multiturn"], split="heldout")])


def test_suite_resumes_from_its_checkpoint(tiny_lm, tmp_path, monkeypatch):
    """A run stopped mid-way keeps its finished cases; the resumed run skips
    them and ends with the rows of an uninterrupted run; another run's
    checkpoint is refused."""
    from kvcompress import suite

    model, tok, _ = tiny_lm
    cfg = suite.SuiteConfig(methods=["snapkv:window=8"], ratios=[0.5], tasks=["niah_single", "qa"], lengths=[200],
                            cases=2, split="dev")
    whole = suite.run_suite(model, tok, cfg, progress=False)
    path = tmp_path / "partial.jsonl"
    real, calls = ruler.make_case, []

    def stop_at_third(*a, **kw):
        calls.append(a[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ruler, "make_case", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        suite.run_suite(model, tok, cfg, progress=False, checkpoint=path)
    assert len(path.read_text().splitlines()) == 1 + 2  # header + the two finished cases
    other = suite.SuiteConfig(**{**cfg.__dict__, "cases": 3})
    with pytest.raises(suite.CheckpointError, match="checkpoint: .* belongs to another run"):
        suite.run_suite(model, tok, other, progress=False, checkpoint=path)
    calls.clear()
    monkeypatch.setattr(ruler, "make_case", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    resumed = suite.run_suite(model, tok, cfg, progress=False, checkpoint=path)
    assert len(calls) == 2 and not path.exists()  # only the two unfinished cases ran
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cases"} for r in rows]  # noqa: E731
    assert strip(resumed["rows"]) == strip(whole["rows"])
    assert [r["cases"] for r in resumed["rows"]] == [r["cases"] for r in whole["rows"]]


def test_kvpress_session_skips_sliding_layers_and_names_the_rope_layer():
    """kvpress compresses only Gemma 3's full-attention layers, but checks for
    the multimodal class alone; the suite applies that rule to any layer with
    ``is_sliding`` (else the first decode step fails on the sliding mask), and
    lets presses call Gemma 3's rotary embedding without a layer type while
    the press is on, and only then. A stand-in press registers hooks as
    kvpress does (``self.forward_hook`` looked up when entering)."""
    import contextlib

    import torch
    import transformers

    from kvcompress.suite import _press_session

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()

    class Press:
        def __init__(self):
            self.hooked = []

        def forward_hook(self, module, input, kwargs, output):
            self.hooked.append(module.layer_idx)
            return output

        @contextlib.contextmanager
        def __call__(self, model):
            handles = [layer.self_attn.register_forward_hook(self.forward_hook, with_kwargs=True)
                       for layer in model.model.layers]
            try:
                yield
            finally:
                for h in handles:
                    h.remove()

    press, rope, x = Press(), model.model.rotary_emb, torch.zeros(1, 3, 16)
    with _press_session(model, press):
        model(input_ids=torch.tensor([[5, 6, 7]]))
        cos, _ = rope(x, torch.arange(3)[None])  # no layer type: the full-attention rope
        full, _ = rope(x, torch.arange(3)[None], layer_type="full_attention")
        assert torch.equal(cos, full)
    assert press.hooked == [1, 3]
    with pytest.raises((AttributeError, TypeError)):
        rope(x, torch.arange(3)[None])  # restored: Gemma 3's own signature again
