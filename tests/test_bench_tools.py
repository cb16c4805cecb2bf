"""The benchmark helpers whose output goes into RESULTS.md: fidelity_paired's pairing of rows."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_paired.py"


def _module():
    spec = importlib.util.spec_from_file_location("fidelity_paired", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, budget, kls):
    kls = [float(x) for x in kls]
    return {"method": method, "budget": budget, "ratio": None,
            "fidelity": {"k": 128, "kl": float(np.mean(kls)), "kl_low": min(kls), "kl_high": max(kls),
                         "per_text_kl": kls}}


def _run(rows):
    return {"config": {"text": "t", "fidelity_texts": 4, "fidelity_context": 64, "k": 128, "seed": 0},
            "model": {"name": "m"}, "rows": rows}


def test_rows_pair_with_the_reference_at_their_budget_or_at_ref_budget():
    mod = _module()
    a128, b128, b96 = [0.3, 0.2, 0.4, 0.1], [0.2, 0.25, 0.3, 0.05], [0.1, 0.15, 0.2, 0.0]
    rows = mod.load_rows([_run([_row("a", 128, a128), _row("b", 128, b128), _row("b", 96, b96)])])
    same = mod.table(rows, "a").splitlines()
    assert "| b | 96 |" in same[2] and same[2].endswith("| – |")  # no reference at 96
    assert f"{np.mean(np.subtract(b128, a128)):+.3f}" in same[4] and "lower on 3/4" in same[4]
    cross = mod.table(rows, "a", ref_budget=128).splitlines()
    assert f"{np.mean(np.subtract(b96, a128)):+.3f}" in cross[2] and "lower on 4/4" in cross[2]
    assert cross[3].endswith("| – |")  # the reference row itself
    with pytest.raises(ValueError, match="ref_budget: no row of method 'a' at budget 64"):
        mod.table(rows, "a", ref_budget=64)
    assert mod.main([str(_PATH), "--ref", "a"]) == 2  # not a results file: an error message, exit 2


def test_bench_generate_runs_a_spec_at_its_own_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(_PATH.parent))  # bench_generate imports _common from its folder
    spec = importlib.util.spec_from_file_location("bench_generate", _PATH.parent / "bench_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.make_method("ems:interval=64", 128, None).budget == 128
    own = mod.make_method("ems:interval=64@96", 128, None)
    assert own.budget == 96 and own.interval == 64
    assert mod.make_method("snapkv@64", None, 0.5).budget == 64  # '@' wins over --ratio too
    for bad, why in (("ems@x", "must be an integer"), ("ems@0", "at least 1")):
        with pytest.raises(ValueError, match=why):
            mod.make_method(bad, 128, None)
    args = mod.parse_args(["--methods", "ems@96,ems", "--budget", "128", "--tokens", "512"])
    assert args.methods == ["ems@96", "ems"]


def test_bench_generate_loads_the_model_it_is_given(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(_PATH.parent))
    spec = importlib.util.spec_from_file_location("bench_generate", _PATH.parent / "bench_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    asked = []

    class Loaded(Exception):
        pass

    def load(name):
        asked.append(name)
        raise Loaded

    monkeypatch.setattr(mod, "load_model", load)
    monkeypatch.setattr(mod, "check_peak_reset", lambda: None)
    text = tmp_path / "t.txt"
    text.write_text("x")
    for argv, want in ((["--model", "gemma3"], "gemma3"), ([], None)):
        with pytest.raises(Loaded):
            mod.main(argv + ["--text", str(text), "--tokens", "64", "--no-write"])
        assert asked[-1] == want


def test_results_sections_start_after_a_blank_line(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(_PATH.parent))
    import _common

    monkeypatch.setattr(_common, "HERE", str(tmp_path))
    _common.write_results("x", {"a": 1}, ["## one", "", "text"])
    assert (tmp_path / "RESULTS.md").read_text() == "## one\n\ntext\n\n"
    with open(tmp_path / "RESULTS.md", "a") as f:
        f.write("a hand-written line\n")  # no blank line after it
    _common.write_results("x", {"a": 2}, ["## two"])
    assert (tmp_path / "RESULTS.md").read_text() == "## one\n\ntext\n\na hand-written line\n\n## two\n\n"
    assert (tmp_path / "results" / "x.json").read_text() == '{\n "a": 2\n}'


def _bench_module(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_auto_tests_times_each_test_and_checks_its_arguments(tmp_path, capsys):
    import json

    import torch

    from kvcompress import ops

    threads = (torch.get_num_threads(), ops.get_num_threads())
    mod = _bench_module("bench_auto_tests")
    try:
        out = tmp_path / "t.json"
        assert mod.main(["--slots", "64,96", "--reps", "1", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [r["slots"] for r in rows] == [64, 96]
        assert all(r[k] > 0 for r in rows for k in ("rotation_ms", "clip_ms", "pack_values_clip_ms"))
        assert "| 96 |" in capsys.readouterr().out
        for bad, msg in ((["--slots", "16"], "--slots: each must be >= 32"), (["--slots", "a"], "--slots"),
                         (["--reps", "0"], "--reps: must be >= 1")):
            with pytest.raises(SystemExit):
                mod.main(bad)
            assert msg in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads[0])
        ops.set_num_threads(threads[1])


def test_bench_packed_refuses_an_unknown_shape_by_name(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    mod = _bench_module("bench_packed")
    assert mod.SHAPES["llama2"] == (32, 32, 128)  # Llama-2-7B: no GQA
    assert mod.SHAPES["gemma3"] == (4, 1, 256)  # Gemma 3 270M: 4 query heads on 1 kv head, D = 256
    for bad in ("foo", ",", "smollm2,llama3"):
        with pytest.raises(SystemExit):
            mod.main(["--shapes", bad, "--no-write"])
        assert "--shapes: expected names among smollm2, llama8b, llama2" in capsys.readouterr().err


def test_ab_packed_refuses_bad_paths_and_shapes_by_name(monkeypatch, capsys):
    """ab_packed times one path of one build (--amx or --rows) or two builds;
    one path at a time, not with its own --no- switch, and known shapes only,
    each refused by name before anything loads."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    mod = _bench_module("ab_packed")
    assert mod.SHAPES["llama2"] == (32, 32, 128)
    cases = [
        (["x.so", "--amx", "--rows"], "--amx and --rows: one path at a time"),
        (["x.so", "--rows", "--no-rows"], "--no-rows: not with --rows"),
        (["x.so"], "give two builds, or one build with --amx or --rows"),
        (["x.so", "--rows", "--shapes", "llama3"], "--shapes: expected names among smollm2, llama8b, llama2"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            mod.main(argv)
        assert message in capsys.readouterr().err


def test_probe_code_layout_gives_the_same_bits_in_both_byte_orders(capfd):
    """The probe packs the same codes in the current and the blocked byte
    order and exits 1 unless both loops give the same bits; here it runs
    small, on CPUs with AVX-512 and gcc (it exits 2 elsewhere)."""
    import shutil

    mod = _bench_module("probe_code_layout")
    if "avx512f" not in mod.cpu_flags() or shutil.which("gcc") is None:
        pytest.skip("needs AVX-512 and gcc")
    assert mod.main(["--lengths", "64,4096", "--heads", "2", "--reps", "1"]) == 0
    out = capfd.readouterr().out  # the probe's own process writes it
    assert out.count("(same bits: yes)") == 2
    with pytest.raises(SystemExit):
        mod.main(["--lengths", "24"])
    assert "--lengths: each must be a positive multiple of 16" in capfd.readouterr().err


def test_probe_vector_rates_measures_each_loop(capsys):
    """The probe compiles and times its loops: every rate is positive, and
    twelve independent multiply-add chains issue faster per operation than
    one dependent chain (any pipelined FPU overlaps them). Refuses a bad
    --iters by name; needs gcc and AVX-512, as it says when missing."""
    mod = _bench_module("probe_vector_rates")
    with pytest.raises(SystemExit):
        mod.main(["--iters", "10"])
    assert "--iters: at least 1000" in capsys.readouterr().err
    if mod.problem() is not None:
        assert mod.main(["--iters", "1000"]) == 2
        pytest.skip(mod.problem())
    rates = mod.measure(200_000)
    assert set(rates) == {name for name, _, _ in mod.LOOPS}
    assert all(ns > 0 for ns in rates.values())
    assert rates["fma x12"] < rates["fma chain"]
    assert mod.main(["--iters", "1000"]) == 0
    assert capsys.readouterr().out.count("\n") == 2 + len(mod.LOOPS)
