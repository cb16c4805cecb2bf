"""``kvcompress eval``: the JSON schema, the outputs, and that the full-cache
row scores what the model scores outside the harness."""

import json
import re
import math
import subprocess
import sys

import pytest
import torch

from kvcompress import cli
from kvcompress import eval as ev
from kvcompress import testing as T
from kvcompress.tasks import default_text, passkey_prompt

ROW_KEYS = {"method", "label", "budget", "ratio", "seconds", "cache_bytes", "compression"}
TINY = ["--quick", "--methods", "snapkv:window=8,h2o", "--budgets", "16,32", "--lengths", "60,90", "--depths", "0,0.5",
        "--new-tokens", "4", "--fidelity-context", "64", "-k", "4", "--ppl-context", "64", "--ppl-tokens", "16",
        "--no-progress"]


def check_schema(results, methods, settings, axis, tasks):
    """Structure and value ranges of a results.json."""
    assert results["schema"] == ev.SCHEMA
    for key in ("created", "kvcompress", "model", "machine", "config", "seconds", "rows"):
        assert key in results, key
    assert {"name", "layers", "kv_heads", "head_dim", "dtype"} <= set(results["model"])
    cfg = results["config"]
    assert cfg["tasks"] == tasks and cfg["methods"] == methods
    assert cfg[axis + "s"] == settings
    rows = results["rows"]
    assert [(r["method"], r[axis]) for r in rows] == [("full", None)] + [(m, s) for m in methods for s in settings]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["seconds"] > 0
        if "passkey" in tasks:
            pk = row["passkey"]
            assert 0.0 <= pk["accuracy"] <= 1.0
            assert len(pk["cases"]) == len(cfg["lengths"]) * len(cfg["depths"])
            assert pk["accuracy"] == sum(c["ok"] for c in pk["cases"]) / len(pk["cases"])
            for c in pk["cases"]:
                assert {"n_filler", "depth", "key", "answer", "ok", "prompt_tokens", "cache_bytes"} <= set(c)
            assert row["cache_bytes"] > 0 and row["compression"] > 0
        if "fidelity" in tasks:
            fid = row["fidelity"]
            assert fid["kl"] >= 0 and fid["kl_max"] >= fid["kl"] and 0 <= fid["top1"] <= 1 and fid["k"] == cfg["k"]
            # equal steps per text: the mean KL is the mean of the per-text means, inside its interval
            assert len(fid["per_text_kl"]) == fid["texts"] == cfg["fidelity_texts"]
            assert math.isclose(sum(fid["per_text_kl"]) / fid["texts"], fid["kl"], rel_tol=1e-9, abs_tol=1e-12)
            assert min(fid["per_text_kl"]) <= fid["kl_low"] <= fid["kl"] <= fid["kl_high"] <= max(fid["per_text_kl"])
        if "ppl" in tasks:
            ppl = row["ppl"]
            assert ppl["ppl"] > 1 and math.isclose(ppl["ppl"], math.exp(ppl["nll"]))
            # windows score equal token counts, so the mean per-window NLL is the NLL
            assert len(ppl["per_window_nll"]) == ppl["windows"]
            assert math.isclose(sum(ppl["per_window_nll"]) / ppl["windows"], ppl["nll"], rel_tol=1e-9)
            assert ppl["ppl_low"] <= ppl["ppl"] * (1 + 1e-12) and ppl["ppl"] <= ppl["ppl_high"] * (1 + 1e-12)
    full = rows[0]
    if "fidelity" in tasks:
        assert full["fidelity"]["kl"] == 0.0 and full["fidelity"]["top1"] == 1.0
    if "passkey" in tasks:
        assert full["compression"] == 1.0
    assert json.loads(json.dumps(results)) == results


def check_full_row_outside(results, model, tok, text=None):
    """Recompute the full-cache row with plain generate() and one uncached
    forward per perplexity window."""
    cfg = results["config"]
    full = results["rows"][0]
    text = text or default_text()
    if "passkey" in cfg["tasks"]:
        grid = [(n, d) for n in cfg["lengths"] for d in cfg["depths"]]
        for i, ((n, d), case) in enumerate(zip(grid, full["passkey"]["cases"])):
            prompt = passkey_prompt(tok, n, d, filler_text=text, seed=cfg["seed"] + i)
            out = model.generate(input_ids=prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                                 max_new_tokens=cfg["max_new_tokens"], do_sample=False)
            answer = tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
            assert case["key"] == prompt.key
            assert case["ok"] == prompt.answered(answer), (case, answer)
            assert case["answer"] == answer.strip()
    if "ppl" in cfg["tasks"]:
        C = cfg["ppl_context"]
        nll, count = 0.0, 0
        for ids in T.perplexity_windows(tok, text, context_tokens=C, continuation_tokens=cfg["ppl_tokens"],
                                        windows=cfg["ppl_windows"], seed=cfg["seed"]):
            with torch.inference_mode():
                logits = model(ids).logits[0].double()
            nll += float(torch.nn.functional.cross_entropy(logits[C:-1], ids[0, C + 1:], reduction="sum"))
            count += ids.shape[1] - C - 1
        assert full["ppl"]["tokens"] == count
        assert math.isclose(full["ppl"]["ppl"], math.exp(nll / count), rel_tol=1e-4)


def test_eval_tiny_model(tiny_lm, tmp_path, capsys):
    model, tok, folder = tiny_lm
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", str(folder), "--out", str(out)] + TINY) == 0
    stdout = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    check_schema(results, ["snapkv:window=8", "h2o"], [16, 32], "budget", ["passkey", "fidelity", "ppl"])
    check_full_row_outside(results, model, tok)
    compressed = [r for r in results["rows"][1:]]
    assert all(r["cache_bytes"] < results["rows"][0]["cache_bytes"] for r in compressed)
    assert ev.markdown(results) in stdout
    assert (out / "results.md").read_text().endswith(ev.markdown(results) + "\n")
    for png in ("scores.png", "passkey.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_ratios_one_task(tiny_lm, tmp_path):
    _, _, folder = tiny_lm
    out = tmp_path / "r"
    args = ["eval", "--model", str(folder), "--methods", "knorm", "--ratios", "0.5,0.75", "--tasks", "ppl",
            "--ppl-context", "64", "--ppl-tokens", "8", "--ppl-windows", "2", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    check_schema(results, ["knorm"], [0.5, 0.75], "ratio", ["ppl"])
    assert (out / "scores.png").exists() and not (out / "passkey.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--budgets", "0"], "budgets"),
    (["--methods", "snapkv,nope"], "unknown method 'nope'"),
    (["--tasks", "passkey,mmlu"], "unknown task 'mmlu'"),
    (["--ratios", "1.5"], "ratios"),
    (["--depths", "2"], "depths"),
    (["--methods", "ems:lamda=1"], "EMS has no option 'lamda'"),
    (["--methods", "ems:lam=2"], "lam: must be in [0.0, 1.0]"),
    (["--methods", "ems:lam"], "expected option=value"),
    (["--methods", "snapkv:head_budget=adaptive"], "SnapKV has no option 'head_budget'"),
    # empty and repeated lists: nothing would run, or a row would run twice
    (["--budgets", ""], "budgets: need at least one value"),
    (["--ratios", ""], "ratios: need at least one value"),
    (["--lengths", ""], "lengths: need at least one value"),
    (["--depths", ""], "depths: need at least one value"),
    (["--methods", "snapkv,SnapKV"], "methods: 'snapkv' is given twice"),
    (["--budgets", "64,64"], "budgets: 64 is given twice"),
    (["--methods", "kivi:bits=2:bits=4"], "option 'bits' is given twice"),
    (["--methods", "ems+"], "a method is missing around '+'"),
    (["--methods", "h2o:recent=abc"], "recent: expected a fraction in [0, 1], got 'abc'"),
    (["--methods", "headkv:profile=/no/such/Profile.json"], "profile: cannot read '/no/such/Profile.json'"),
    (["--methods", "kvsharer:calibration=abc"], "calibration: expected token ids"),
])
def test_eval_bad_options(args, message, capsys):
    assert cli.main(["eval"] + args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, args, message", [
    ("eval", ["--new-tokens", "0"], "argument --new-tokens: expected an int >= 1, got 0"),
    ("eval", ["--fidelity-texts", "0"], "argument --fidelity-texts: expected an int >= 1"),
    ("eval", ["-k", "0"], "argument -k: expected an int >= 1"),
    ("eval", ["--ppl-context", "0"], "argument --ppl-context: expected an int >= 1"),
    ("eval", ["--ppl-tokens", "1"], "argument --ppl-tokens: expected an int >= 2"),
    ("eval", ["--ppl-windows", "-1"], "argument --ppl-windows: expected an int >= 1"),
    ("eval", ["--threads", "0"], "argument --threads: expected an int >= 1"),
    ("eval", ["--cases", "x"], "argument --cases: invalid int value: 'x'"),
    ("eval", ["--text", "{missing}"], "argument --text: no readable file"),
    ("demo", ["--tokens", "-1"], "argument --tokens: expected an int >= 0"),
    ("demo", ["--depth", "2"], "argument --depth: expected a number in [0, 1]"),
    ("demo", ["--budget", "0"], "argument --budget: expected an int >= 1"),
    ("demo", ["--new-tokens", "0"], "argument --new-tokens: expected an int >= 1"),
    ("demo", ["--text", "{missing}"], "argument --text: no readable file"),
])
def test_bad_arguments_stop_before_any_model_loads(command, args, message, tmp_path, capsys, monkeypatch):
    """Every numeric and file argument is checked by argparse (exit 2, one
    line naming it) before anything loads; they used to fail with a
    traceback after the model had loaded, or in the middle of the run."""
    import kvcompress.model

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(kvcompress.model, "load_model", no_load)
    monkeypatch.setattr(kvcompress, "load_default_model", no_load, raising=False)
    args = [a.replace("{missing}", str(tmp_path / "missing.txt")) for a in args]
    with pytest.raises(SystemExit) as exit_:
        cli.main([command] + args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("suite", [False, True])
def test_an_unwritable_out_stops_before_any_model_loads(suite, tmp_path, capsys, monkeypatch):
    """``--out`` is created and written to before the run (which may take
    hours), not after it."""
    import kvcompress.model

    monkeypatch.setattr(kvcompress.model, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    blocker = tmp_path / "a file"
    blocker.write_text("")
    args = ["eval", "--out", str(blocker / "out"), "--methods", "snapkv"] + (["--suite", "ruler"] if suite else [])
    assert cli.main(args) == 2
    assert "--out: cannot write in" in capsys.readouterr().err


def test_a_missing_model_is_one_error_line(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "none"), "--methods", "snapkv"]) == 2
    err = capsys.readouterr().err
    assert "kvcompress eval: error:" in err and "Traceback" not in err


def test_eval_config_checks_every_count_and_the_text():
    for name, bad in (("max_new_tokens", 0), ("fidelity_texts", 0), ("fidelity_context", 0), ("k", 0),
                      ("ppl_context", 0), ("ppl_tokens", 1), ("ppl_windows", 0)):
        with pytest.raises(ValueError, match=f"{name}: must be >= "):
            ev.EvalConfig(**{name: bad})
    with pytest.raises(TypeError, match="k: expected an int"):
        ev.EvalConfig(k=2.5)
    with pytest.raises(ValueError, match="text: no such file"):
        ev.EvalConfig(text="/nonexistent/text.txt")


def test_method_specs_build_the_variants():
    from kvcompress.methods import EMS, method_from_spec, parse_method_spec

    assert parse_method_spec("EMS:lam=1:tau=inf:merge_bias=false:head_budget=adaptive:interval=0") == (
        "ems", dict(lam=1, tau=float("inf"), merge_bias=False, head_budget="adaptive", interval=0))
    m = method_from_spec("ems:tau=-inf:global_mode=probe", budget=64)
    assert m == EMS(budget=64, tau=float("-inf"), global_mode="probe")
    assert method_from_spec("ems:tau=none", ratio=0.5) == EMS(ratio=0.5, tau=None)
    assert method_from_spec("ems", ratio=0.5).tau == 0.8


def test_eval_rows_of_method_variants(tiny_lm, tmp_path):
    _, _, folder = tiny_lm
    out = tmp_path / "v"
    variants = ["ems:window=8", "ems:window=8:tau=inf", "ems:window=8:lam=1:merge_bias=false"]
    args = ["eval", "--model", str(folder), "--methods", ",".join(variants), "--budgets", "24", "--tasks", "ppl",
            "--ppl-context", "48", "--ppl-tokens", "8", "--ppl-windows", "1", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    check_schema(results, variants, [24], "budget", ["ppl"])
    labels = [row["label"] for row in results["rows"][1:]]
    assert "tau=inf" in labels[1] and "lam=1" in labels[2] and "merge_bias=False" in labels[2]
    assert "ems:window=8:tau=inf" in (out / "results.md").read_text()


def test_eval_reports_the_share_magicpig_read(tiny_lm, tmp_path):
    """A sampling reader's rows carry the share of held slots its decode
    steps read (from the op's own count), and the table shows it."""
    _, _, folder = tiny_lm
    out = tmp_path / "pig"
    args = ["eval", "--model", str(folder), "--methods", "magicpig:k=4:l=10:sinks=2:window=8:dense_layers=0,h2o",
            "--budgets", "32", "--tasks", "passkey", "--lengths", "90", "--depths", "0.5", "--new-tokens", "4",
            "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    pig = [r for r in rows if r["method"].startswith("magicpig")]
    assert len(pig) == 1 and 0 < pig[0]["read_fraction"] < 1
    assert all("read_fraction" not in r for r in rows if not r["method"].startswith("magicpig"))
    table = (out / "results.md").read_text()
    assert "| read |" in table and f"{pig[0]['read_fraction']:.1%}" in table


def test_eval_budgets_and_ratios_exclusive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--budgets", "64", "--ratios", "0.5"])
    assert "not allowed with" in capsys.readouterr().err


def test_quick_preset_overrides():
    cfg = ev.EvalConfig.quick(ratios=[0.5], budgets=None, methods=["SnapKV "])
    assert cfg.axis == "ratio" and cfg.settings() == [0.5] and cfg.methods == ["snapkv"]
    assert ev.EvalConfig.quick().settings() == [64, 128, 256]


@pytest.mark.slow
def test_eval_cli_default_model(default_model, tmp_path):
    """The installed entry point on the default model, tiny configuration;
    the full cache answers where plain generate() answers."""
    model, tok = default_model
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kvcompress", "eval", "--quick", "--methods", "snapkv,streamingllm",
           "--budgets", "128", "--lengths", "1000", "--depths", "0.5", "--fidelity-context", "256", "-k", "4",
           "--ppl-context", "256", "--ppl-tokens", "32", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    check_schema(results, ["snapkv", "streamingllm"], [128], "budget", ["passkey", "fidelity", "ppl"])
    check_full_row_outside(results, model, tok)
    assert results["rows"][0]["passkey"]["accuracy"] == 1.0
    assert "| full cache |" in proc.stdout


def test_tokenizer_option_loads_the_saved_tokenizer_and_names_it(tiny_lm, tmp_path, capsys):
    """--tokenizer DIR replaces the model's tokenizer and is recorded in the
    run's model name, which suite.combine reads back."""
    import json

    from kvcompress import cli, suite

    model, tok, folder = tiny_lm
    saved = tmp_path / "tok"
    tok.save_pretrained(saved)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(folder), "--tokenizer", str(saved), "--methods", "snapkv:window=8",
                     "--budgets", "16", "--tasks", "ppl", "--ppl-context", "96", "--ppl-tokens", "8",
                     "--ppl-windows", "1", "--no-progress", "--out", str(out)]) == 0
    name = json.loads((out / "results.json").read_text())["model"]["name"]
    assert name == f"{folder}{suite.TOKENIZER_TAG}{saved}"
    assert suite._tokenizer_note({"model": {"name": name}}) == str(saved)
    # a folder with no saved tokenizer: one error line naming it, exit 2
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(folder), "--tokenizer", str(tmp_path / "none"), "--methods",
                     "snapkv:window=8", "--budgets", "16", "--tasks", "ppl", "--no-progress"]) == 2
    assert re.search("kvcompress eval: error: tokenizer: .* no saved tokenizer", capsys.readouterr().err)


def test_threads_option_sets_torch_and_the_c_ops(tiny_lm, tmp_path):
    """--threads N sets torch's and the C ops' pools (two runs of --threads 1
    on a 2-core machine must not run four threads)."""
    import torch

    from kvcompress import cli, ops

    _, _, folder = tiny_lm
    before = (torch.get_num_threads(), ops.get_num_threads())
    try:
        ops.set_num_threads(2)
        assert ops.get_num_threads() == (2 if ops._C.has_openmp else 1)
        assert cli.main(["eval", "--model", str(folder), "--methods", "snapkv:window=8", "--budgets", "16",
                         "--tasks", "ppl", "--ppl-context", "96", "--ppl-tokens", "8", "--ppl-windows", "1",
                         "--threads", "1", "--no-progress", "--out", str(tmp_path / "eval")]) == 0
        assert torch.get_num_threads() == 1
        assert ops.get_num_threads() == 1  # (1 also without OpenMP, where the 2 above did nothing)
    finally:
        torch.set_num_threads(before[0])
        ops.set_num_threads(before[1])
