"""`python -m qlib report`: size, output error and latency of a model's quantized forms."""
import copy
import io
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import qlib
from qlib import __main__ as cli
from qlib import report


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 64))


def test_report_rows_measure_each_scheme():
    model = small_model()
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    rows = report.report(model, (7, 96), repeat=3)
    assert list(rows) == ["float", "int8", "nf4", "int4", "kmeans"]
    base = rows["float"]
    assert base["rel_error"] == 0 and base["cosine"] == pytest.approx(1.0)
    assert base["bytes"] == sum(p.numel() * 4 for p in model.parameters())
    # The same error as quantizing by hand, on the same seeded input.
    with torch.no_grad():
        ref, nf4 = model(x), qlib.quantize_weight_only(copy.deepcopy(model), "nf4")(x)
    assert rows["nf4"]["rel_error"] == pytest.approx(((nf4 - ref).norm() / ref.norm()).item(), rel=1e-6)
    assert rows["int8"]["rel_error"] < 0.03 < rows["nf4"]["rel_error"] < 0.2
    assert rows["int8"]["bytes"] < 0.35 * base["bytes"] and rows["nf4"]["bytes"] < 0.2 * base["bytes"]
    assert all(r["ms"] > 0 for r in rows.values())


def test_cli_report_from_a_file_and_from_a_factory(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(small_model(), path)
    assert cli.main(["report", str(path), "--input", "4x96", "--schemes", "int8,kmeans", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "input 4x96" in out and "int8" in out and "kmeans" in out and "nf4" not in out
    assert cli.main(["report", "qlib.digits:make_mlp", "--input", "3x64", "--repeat", "2"]) == 0
    assert "int4" in capsys.readouterr().out


def test_report_of_a_bfloat16_model():
    rows = report.report(small_model().bfloat16(), (3, 96), schemes=["int8", "nf4"], repeat=2)
    assert rows["nf4"]["rel_error"] < 0.2 and rows["float"]["bytes"] == (96 * 128 + 128 + 128 * 64 + 64) * 2


@pytest.mark.parametrize("args,message", [
    (["qlib.digits:make_mlp", "--input", "3xk"], "--input must look like 8x768"),
    (["qlib.digits:make_mlp", "--input", "0x64"], "--input must look like 8x768"),
    (["qlib.digits:make_mlp", "--input", "3x64", "--schemes", "int3"], "unknown schemes \\['int3'\\]"),
    (["no/such/file.pt", "--input", "3x64"], "neither a file nor package.module:factory"),
    (["qlib.digits:no_such", "--input", "3x64"], "cannot import 'qlib.digits:no_such'"),
    (["qlib:build_info", "--input", "3x64"], "gave a dict, not an nn.Module"),
    (["torch.nn:GELU", "--input", "3x64"], "has no nn.Linear"),
    (["qlib.digits:make_mlp", "--input", "8x768"], r"does not take one float tensor of shape 8x768 \(--input\): mat1 and mat2"),
    (["qlib.digits:batches", "--input", "8x64"], "must be callable with no arguments"),
    (["qlib.digits:make_mlp", "--input", "8x64", "--repeat", "0"], "--repeat: must be at least 1, got 0"),
    (["qlib.digits:make_mlp", "--input", "8x64", "--schemes", ""], "--schemes names no scheme \\(got ''\\)"),
    (["qlib.digits:make_mlp", "--input", "8x64", "--schemes", " , "], "--schemes names no scheme \\(got ' , '\\)"),
    (["qlib.digits:make_mlp", "--input", "8x64", "--seed", "-1"], r"--seed: must be in \[0, 2\*\*63\), got -1"),
])
def test_cli_report_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err)
    assert err.startswith("usage: python -m qlib report ")  # report's usage, not the top level's


def test_cli_report_files_it_cannot_load(tmp_path, capsys):
    """A file that is no torch.save(model), one whose model class cannot be imported here, and a
    TorchScript file get one line each (exit status 2), saying what is needed."""
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(8, 4))), script)
    code = ("import sys, torch\nclass Mine(torch.nn.Module):\n    def __init__(self):\n"
            "        super().__init__(); self.lin = torch.nn.Linear(8, 4)\n"
            "torch.save(Mine(), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "mine.pt")], check=True, timeout=300)
    for name, message in [("text.pt", "cannot load .* with torch.load \\(a file of torch.save\\(model\\) is needed\\)"),
                          ("empty.pt", "cannot load .* with torch.load"),
                          ("mine.pt", "The model's class must be importable here"),
                          ("script.pt", "holds a TorchScript module")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["report", str(tmp_path / name), "--input", "3x8"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(message, err) and "Traceback" not in err, (name, err)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, y):
        return self.lin(x + y)


class Int8Only(nn.Module):
    """Runs in float; its Linear refuses what the int8 swap makes of it."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        if not isinstance(self.lin, nn.Linear):
            raise RuntimeError("this model only runs float Linears")
        return self.lin(x)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x), x


@pytest.mark.parametrize("model,message", [
    (small_model().double(), r"parameters are torch.float64; the schemes take float32, float16 or bfloat16"),
    (TwoInputs(), r"does not take one float tensor of shape 3x8 \(--input\): .*missing 1 required"),
    (Int8Only(), r"the int8 scheme failed on this model: this model only runs float Linears"),
    (TupleOut(), r"the model must return one tensor, got a tuple"),
])
def test_report_refuses_in_one_line(model, message):
    """Models the schemes cannot take get a ValueError (one line from the CLI), not a traceback."""
    shape = (3, 96) if isinstance(model, nn.Sequential) else (3, 8)
    with pytest.raises(ValueError, match=message):
        report.report(model, shape, schemes=["int8"], repeat=1)


@pytest.mark.parametrize("model,shape,message", [
    (nn.Sequential(nn.Linear(8, 4)), (0, 8), r"output for an input of shape 0x8 \(--input\) is empty \(shape \(0, 4\)\)"),
    (nn.Sequential(nn.Linear(8, 0)), (3, 8), r"output for an input of shape 3x8 \(--input\) is empty \(shape \(3, 0\)\)"),
])
def test_report_refuses_an_empty_output(model, shape, message):
    """An empty output has no error to measure: the Python API (the CLI takes positive sizes
    only) reported rel. error 0 and cosine 0 for every scheme, as if perfect and unrelated."""
    with pytest.raises(ValueError, match=message):
        report.report(model, shape, schemes=["int8"], repeat=1)


def test_report_leaves_the_models_modes():
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).train()
    m[2].eval()
    report.report(m, (4, 8), schemes=["int8"], repeat=1)
    assert [c.training for c in m] == [True, True, False] and m.training


def test_report_schemes_must_name_one():
    with pytest.raises(ValueError, match=r"qlib report: schemes is empty; choose from \['int8'"):
        report.report(small_model(), (3, 96), schemes=[], repeat=1)


class CastedLinear(nn.Linear):
    """A subclass of nn.Linear (nanoGPT-style): the swaps take exactly nn.Linear, so it stays float."""
    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def qat_prepared():
    torch.manual_seed(0)
    return qlib.prepare_qat(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)))


@pytest.mark.parametrize("make,shape,message", [
    (lambda: nn.Sequential(CastedLinear(16, 16), nn.ReLU(), CastedLinear(16, 16)), (3, 16),
     r"the int8 scheme quantizes none of the model's 2 Linears \(2 CastedLinear\): the schemes swap modules of "
     r"exactly type nn.Linear"),
    (qat_prepared, (3, 16), r"none of the model's 2 Linears \(2 QATLinear\).*qlib.convert\(model\)"),
    (Attention, (2, 5, 16), r"none of the model's 1 Linears \(1 NonDynamicallyQuantizableLinear\)"),
    (lambda: CastedLinear(16, 4), (3, 16), r"none of the model's 1 Linears \(1 CastedLinear\)"),
])
def test_report_refuses_a_model_whose_linears_no_scheme_takes(make, shape, message):
    """Subclasses of nn.Linear pass the 'has a Linear' check but no swap takes them: the rows would
    be the float model's (1.00x bytes, error 0). The report says so instead."""
    model = make()
    assert not any(type(m) is nn.Linear for m in model.modules())
    swapped = qlib.quantize_dynamic(copy.deepcopy(model))  # (the swap takes none of them)
    assert [type(m) for m in model.modules()] == [type(m) for m in swapped.modules()]
    with pytest.raises(ValueError, match=message):
        report.report(model, shape, schemes=["int8", "nf4"], repeat=1)


def test_report_warns_and_marks_linears_left_float(capsys):
    """nn.TransformerEncoderLayer: linear1 and linear2 are swapped, self_attn.out_proj (a subclass that
    nn.MultiheadAttention reads by weight) stays float; the rows say so and a warning names it."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"the int8, nf4 schemes left 1 of 3 Linears float .*: "
                                         r"self_attn.out_proj \(NonDynamicallyQuantizableLinear\)"):
        rows = report.report(layer, (2, 5, 32), schemes=["int8", "nf4"], repeat=1)
    assert [(r["quantized"], r["linears"], r["left_float"]) for r in rows.values()] == [
        (0, 3, ["self_attn.out_proj", "linear1", "linear2"]), (2, 3, ["self_attn.out_proj"]),
        (2, 3, ["self_attn.out_proj"])]
    # Independent: the int8 row's bytes are the float model's less the two swapped Linears' float
    # state, plus what Int8Linear keeps of them (int8 weights, a float32 scale and bias per row).
    swapped_float = sum(t.numel() * 4 for n, t in layer.state_dict().items() if n.startswith(("linear1", "linear2")))
    int8 = (64 * 32 + 64 * 4 * 2) + (32 * 64 + 32 * 4 * 2)
    assert rows["int8"]["bytes"] == rows["float"]["bytes"] - swapped_float + int8
    assert 0 < rows["int8"]["rel_error"] < 0.03
    report.print_report(rows, "layer")
    out = capsys.readouterr().out
    assert re.search(r"^int8 .* 2/3\*$", out, re.M) and re.search(r"^float .* 0/3 $", out, re.M)
    assert "* int8, nf4 left 1 of 3 Linears float (the swaps take exactly nn.Linear): self_attn.out_proj" in out


def test_report_counts_every_linear_when_all_are_swapped():
    rows = report.report(small_model(), (3, 96), schemes=["int8", "kmeans"], repeat=1)
    assert [(r["quantized"], r["linears"]) for r in rows.values()] == [(0, 2), (2, 2), (2, 2)]
    assert rows["int8"]["left_float"] == rows["kmeans"]["left_float"] == []


class SharedStorage(nn.Module):
    """A buffer that views part of a bigger tensor: torch.save writes the whole storage."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.register_buffer("head", torch.randn(1000)[:10])

    def forward(self, x):
        return self.lin(x) + self.head.sum()


def tied():
    first, second = nn.Linear(128, 128), nn.Linear(128, 128)
    second.weight = first.weight
    return nn.Sequential(first, nn.ReLU(), second)


def saved_size(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@pytest.mark.parametrize("make,shape", [
    (lambda: (lambda lin: nn.Sequential(lin, nn.ReLU(), lin))(nn.Linear(256, 256)), (4, 256)),  # a Linear used twice
    (tied, (4, 128)),
    (SharedStorage, (4, 64)),
    (small_model, (4, 96)),
])
def test_report_bytes_count_each_storage_once_as_torch_save(make, shape):
    """bytes is what torch.save writes less its zip overhead: each storage once, whole."""
    torch.manual_seed(0)
    model = make()
    rows = report.report(model, shape, schemes=["int8", "nf4"], repeat=1)
    for name, quantized in [("float", model), ("int8", qlib.quantize_dynamic(copy.deepcopy(model))),
                            ("nf4", qlib.quantize_weight_only(copy.deepcopy(model), "nf4"))]:
        overhead = saved_size(quantized) - rows[name]["bytes"]
        assert 0 < overhead < 1024 * (1 + len(quantized.state_dict())), (name, rows[name]["bytes"], overhead)
    if isinstance(model, SharedStorage):
        assert rows["float"]["bytes"] == 1000 * 4 + (64 * 64 + 64) * 4


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(qlib.__file__)), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "qlib", "report", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_report_help_shows_the_defaults():
    out = run_cli("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # (argparse wraps lines)
    for default in ["(default: int8,nf4,int4,kmeans)", "(default: 60)", "(default: 0)"]:
        assert default in text, text
    assert "--seed SEED seeds torch before the factory builds the model (its random init)" in text


def test_cli_report_errors_show_reports_usage():
    for args, message in [(["qlib.digits:make_mlp", "--input", "8xa"], "--input must look like 8x768"),
                          (["qlib.digits:make_mlp", "--input", "8x64", "--schemes", ""], "--schemes names no scheme")]:
        out = run_cli(*args)
        assert out.returncode == 2 and out.stdout == "", (args, out)
        assert out.stderr.startswith("usage: python -m qlib report [-h] --input INPUT"), out.stderr
        assert "python -m qlib report: error: qlib report: " + message in out.stderr


def numbers(stdout):
    """scheme -> (bytes, rel. error, cosine): the columns that do not depend on timing."""
    rows = [line.split() for line in stdout.splitlines()[3:]]
    return {r[0]: (r[1], r[3], r[4]) for r in rows}


def test_cli_report_of_the_readme_example_repeats_its_numbers():
    """The factory's random init is seeded (--seed, default 0): two runs print the same numbers,
    another seed other ones."""
    args = ["qlib.digits:make_mlp", "--input", "8x64", "--repeat", "1", "--schemes", "int8,nf4"]
    first, second, other = run_cli(*args), run_cli(*args), run_cli(*args, "--seed", "1")
    assert first.returncode == second.returncode == other.returncode == 0, (first.stderr, other.stderr)
    assert list(numbers(first.stdout)) == ["float", "int8", "nf4"]
    assert numbers(first.stdout) == numbers(second.stdout)
    assert numbers(first.stdout)["int8"][1] != numbers(other.stdout)["int8"][1]


def test_load_model_seeds_the_factory():
    a, b = report.load_model("qlib.digits:make_mlp", seed=3), report.load_model("qlib.digits:make_mlp", seed=3)
    torch.manual_seed(3)
    reference = qlib.digits.make_mlp()
    for x, y, z in zip(a.state_dict().values(), b.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_report_counts_transformers_conv1d():
    """GPT-2's Linears are transformers Conv1D modules, which the schemes swap: the report took a
    model of only Conv1Ds for one with nothing to quantize."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 32), nn.GELU(), Conv1D(16, 48))  # (Conv1D(nf=out, nx=in))
    rows = report.report(model, (5, 32), schemes=["int8", "nf4"], repeat=1)
    assert [rows[s]["quantized"] for s in ("float", "int8", "nf4")] == [0, 2, 2]
    assert rows["int8"]["cosine"] > 0.99 and rows["int8"]["bytes"] < rows["float"]["bytes"]
