"""`python -m qlib report`: size, output error and latency of a model's quantized forms."""
import copy
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
])
def test_cli_report_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", *args])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


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


def test_report_leaves_the_models_modes():
    m = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).train()
    m[2].eval()
    report.report(m, (4, 8), schemes=["int8"], repeat=1)
    assert [c.training for c in m] == [True, True, False] and m.training
