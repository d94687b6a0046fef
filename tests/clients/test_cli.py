"""The ``propserve`` client verbs against a real server: in-process through ``main(argv)``
(the same entry point as the installed command) and as a subprocess for stdin and exit codes.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from propserve import wire
from propserve.cli import main
from propserve.clients import GrpcClient
from tests.support.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
N_FEATURES = 4
N_CLASSES = 3


def blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian blobs in 4-D: (n, 4) float32 and (n,) int labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    centers = np.eye(N_CLASSES, N_FEATURES) * 4.0
    x = centers[y] + rng.normal(0.0, 0.7, (n, N_FEATURES))
    return x.astype(np.float32), y


class Cli:
    """Runs ``propserve`` verbs in-process against one server; returns (code, out, err)."""

    def __init__(self, server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.capsys = capsys

    def __call__(self, *argv: str, transport: str = "grpc") -> tuple[int, str, str]:
        self.capsys.readouterr()
        connection = [
            "--grpc",
            self.server.grpc_target,
            "--rest",
            self.server.rest_url,
            "--transport",
            transport,
            "--timeout",
            "20",
        ]
        code = main([*argv, *connection])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def ok(self, *argv: str, transport: str = "grpc") -> str:
        code, out, err = self(*argv, transport=transport)
        assert code == 0, f"propserve {' '.join(argv)} failed with {code}: {err}"
        return out


@pytest.fixture
def cli(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server, capsys)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[GrpcClient]:
    with GrpcClient(server.grpc_target, timeout=20) as c:
        yield c


def create(cli: Cli, name: str, *extra: str) -> None:
    cli.ok(
        "models",
        "create",
        name,
        "--input-dim",
        str(N_FEATURES),
        "--layers",
        f"16:relu,{N_CLASSES}",
        "--optimizer",
        "adam",
        "--lr",
        "0.02",
        *extra,
    )


def write_csv(path: Path, x: np.ndarray, y: np.ndarray | None, header: bool = True) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(
                [f"f{i}" for i in range(x.shape[1])] + (["label"] if y is not None else [])
            )
        for i, row in enumerate(x):
            writer.writerow([f"{v:.6f}" for v in row] + ([str(int(y[i]))] if y is not None else []))


# ---------------------------------------------------------------- models


def test_create_from_flags_then_show_as_table_and_json(cli: Cli) -> None:
    out = cli.ok(
        "models",
        "create",
        "flags",
        "--input-dim",
        "4",
        "--layers",
        "8:tanh,3",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--dtype",
        "float64",
        "--seed",
        "7",
        "--retain",
        "3",
        "--autosave-every",
        "0",
    )
    assert "created model flags" in out and "67 parameters" in out  # (4+1)*8 + (8+1)*3
    table = cli.ok("models", "show", "flags")
    assert "8:tanh, 3:softmax" in table
    assert "sgd lr=0.05" in table
    shown = json.loads(cli.ok("models", "show", "flags", "--json"))
    assert shown["spec"]["layers"] == [
        {"units": 8, "activation": "tanh"},
        {"units": 3, "activation": "softmax"},
    ]
    assert shown["spec"]["optimizer"]["lr"] == 0.05
    assert shown["spec"]["dtype"] == "float64"
    assert shown["spec"]["seed"] == 7
    assert shown["settings"]["retain"] == 3
    assert shown["parameter_count"] == 67


def test_create_from_spec_file_with_flag_override_and_list(cli: Cli, tmp_path: Path) -> None:
    spec = {
        "input_dim": 4,
        "layers": [{"units": 5, "activation": "relu"}, {"units": 1, "activation": "identity"}],
        "loss": "mse",
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 1,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    cli.ok("models", "create", "from-file", "--spec", str(path), "--seed", "9")
    shown = json.loads(cli.ok("models", "show", "from-file", "--json"))
    assert shown["spec"]["loss"] == "mse"
    assert shown["spec"]["optimizer"]["lr"] == 0.01
    assert shown["spec"]["seed"] == 9  # the flag wins over the file

    listing = json.loads(cli.ok("models", "list", "--json"))
    assert "from-file" in [m["name"] for m in listing]
    table = cli.ok("models", "list").splitlines()
    assert table[0].split() == ["NAME", "STEP", "LATEST", "UNSAVED", "PARAMS", "LOSS", "LABELS"]
    row = next(line for line in table if line.startswith("from-file "))
    # Aligned: every column starts where its header does.
    assert row.index("31") == table[0].index("PARAMS")  # (4+1)*5 + (5+1)*1

    cli.ok("models", "delete", "from-file")
    assert "from-file" not in [m["name"] for m in json.loads(cli.ok("models", "list", "--json"))]


# ---------------------------------------------------------------- train


def test_train_npz_with_validation_split_and_save(
    cli: Cli, client: GrpcClient, tmp_path: Path
) -> None:
    x, y = blobs(400)
    data = tmp_path / "train.npz"
    np.savez(data, inputs=x, labels=y)
    create(cli, "npz")
    out = cli.ok(
        "train",
        "npz",
        str(data),
        "--x-key",
        "inputs",
        "--y-key",
        "labels",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--shuffle",
        "--seed",
        "3",
        "--validation-split",
        "0.25",
        "--save",
    )
    lines = out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 3
    for line in epochs:
        for field in ("loss", "acc", "val_loss", "val_acc", "samples/s"):
            assert f"{field} " in line or line.endswith(field), line
    last_val_acc = float(epochs[-1].split("val_acc ")[1].split()[0])
    assert last_val_acc >= 0.9, out
    assert lines[-1] == "saved version 1"

    steps = 3 * math.ceil(300 / 32)  # 100 of 400 rows held out
    model = client.get_model("npz")
    assert model.head_step == steps
    versions = client.list_versions("npz")
    assert [(v.version, v.step) for v in versions] == [(1, steps)]


def test_train_json_output_reports_epochs(cli: Cli, tmp_path: Path) -> None:
    x, y = blobs(200, seed=1)
    data = tmp_path / "train.npz"
    np.savez(data, x=x, y=y)
    create(cli, "json-train")
    code, out, err = cli(
        "train", "json-train", str(data), "--epochs", "2", "--json", "--validation-split", "0.5"
    )
    assert code == 0, err
    report = json.loads(out)  # stdout is only the JSON; epoch lines went to stderr
    assert report["steps"] == 2 * math.ceil(100 / 32)
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert all(e["samples"] == 100 for e in report["epochs"])
    assert 0.0 <= report["epochs"][-1]["val_accuracy"] <= 1.0
    assert report["saved"] == []
    assert err.count("epoch ") == 2


def test_train_csv_over_rest_saving_every_n_steps(
    cli: Cli, client: GrpcClient, tmp_path: Path
) -> None:
    x, y = blobs(100, seed=2)
    data = tmp_path / "train.csv"
    write_csv(data, x, y)
    create(cli, "csv")
    out = cli.ok(
        "train",
        "csv",
        str(data),
        "--target-column",
        "label",
        "--batch-size",
        "10",
        "--epochs",
        "2",
        "--save-every",
        "6",
        "--save",
        transport="rest",
    )
    # 20 steps: saves after steps 6, 12 and 18, then --save adds one at step 20.
    assert out.splitlines()[-1] == "saved versions 1, 2, 3, 4"
    assert [v.step for v in client.list_versions("csv")] == [6, 12, 18, 20]

    # A headerless CSV with the target named by index (the last column).
    bare = tmp_path / "bare.csv"
    write_csv(bare, x, y, header=False)
    cli.ok("train", "csv", str(bare), "--target-column", "-1", "--batch-size", "50")
    assert client.get_model("csv").head_step == 22


# ---------------------------------------------------------------- predict


_trained_names = itertools.count()


@pytest.fixture
def trained(cli: Cli, tmp_path: Path) -> tuple[str, np.ndarray]:
    """A fresh model trained for two epochs and saved as version 1; and 8 rows to predict."""
    name = f"pred{next(_trained_names)}"
    x, y = blobs(300, seed=4)
    np.savez(tmp_path / "t.npz", x=x, y=y)
    create(cli, name)
    cli.ok("train", name, str(tmp_path / "t.npz"), "--epochs", "2", "--save")
    return name, blobs(8, seed=5)[0]


def test_predict_from_npy_csv_and_json_files(
    cli: Cli, client: GrpcClient, trained: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    name, x = trained
    expected = client.predict(name, x).outputs
    np.save(tmp_path / "x.npy", x)
    body = json.loads(cli.ok("predict", name, str(tmp_path / "x.npy"), "--argmax"))
    np.testing.assert_allclose(body["outputs"], expected, rtol=1e-6)
    assert body["classes"] == expected.argmax(axis=1).tolist()
    assert body["version"] is None and body["step"] == client.get_model(name).head_step

    write_csv(tmp_path / "x.csv", x, None)
    body = json.loads(cli.ok("predict", name, str(tmp_path / "x.csv"), transport="rest"))
    np.testing.assert_allclose(body["outputs"], expected, rtol=1e-5)

    (tmp_path / "x.json").write_text(json.dumps({"inputs": x.tolist()}))
    body = json.loads(cli.ok("predict", name, str(tmp_path / "x.json"), "--version", "1"))
    assert body["version"] == 1
    assert np.asarray(body["outputs"]).shape == (8, N_CLASSES)


def test_options_may_come_before_an_optional_argument(
    server: ServerProcess,
    client: GrpcClient,
    trained: tuple[str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse alone would take predict's FILE (and rollback's VERSION) as absent here."""
    name, x = trained
    np.save(tmp_path / "x.npy", x)
    capsys.readouterr()
    assert main(["predict", name, "--grpc", server.grpc_target, str(tmp_path / "x.npy")]) == 0
    body = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(body["outputs"], client.predict(name, x).outputs, rtol=1e-6)

    client.train_step(name, x, np.zeros(len(x), dtype=np.int64))
    assert main(["versions", "rollback", name, "--grpc", server.grpc_target, "1"]) == 0
    assert client.get_model(name).head_step == client.list_versions(name)[0].step


def test_a_rest_url_alone_chooses_rest(
    server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["models", "list", "--json", "--rest", server.rest_url]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)

    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["models", "list", "--rest", dead, "--timeout", "5"]) == 3
    assert f"cannot reach the server at {dead} (rest)" in capsys.readouterr().err
    # Both given: gRPC, unless --transport says otherwise.
    both = ["models", "list", "--rest", server.rest_url, "--grpc", dead.removeprefix("http://")]
    assert main([*both, "--timeout", "5"]) == 3
    assert main([*both, "--transport", "rest", "--json"]) == 0


def test_predict_to_npy_by_label(
    cli: Cli, client: GrpcClient, trained: tuple[str, np.ndarray], tmp_path: Path
) -> None:
    name, x = trained
    cli.ok("versions", "label", name, "stable", "1")
    np.save(tmp_path / "x.npy", x)
    out_path = tmp_path / "out.npy"
    code, out, err = cli(
        "predict", name, str(tmp_path / "x.npy"), "--label", "stable", "--output", str(out_path)
    )
    assert code == 0, err
    assert out == "" and "wrote outputs of shape (8, 3)" in err
    np.testing.assert_array_equal(np.load(out_path), client.predict(name, x, version=1).outputs)


def test_predict_from_stdin_json_with_the_installed_command(
    server: ServerProcess, client: GrpcClient, trained: tuple[str, np.ndarray]
) -> None:
    name, x = trained
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "propserve",
            "predict",
            name,
            "-",
            "--transport",
            "rest",
            "--rest",
            server.rest_url,
        ],
        input=json.dumps(x[:2].tolist()),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outputs = np.asarray(json.loads(result.stdout)["outputs"])
    np.testing.assert_allclose(outputs, client.predict(name, x[:2]).outputs, rtol=1e-6)


# ---------------------------------------------------------------- versions


def test_versions_save_list_label_unlabel_rollback(
    cli: Cli, client: GrpcClient, tmp_path: Path
) -> None:
    x, y = blobs(64, seed=6)
    np.savez(tmp_path / "v.npz", x=x, y=y)
    create(cli, "vers")
    cli.ok("train", "vers", str(tmp_path / "v.npz"), "--batch-size", "32")
    assert cli.ok("versions", "save", "vers") == "saved vers version 1 (step 2)\n"
    cli.ok("train", "vers", str(tmp_path / "v.npz"), "--batch-size", "16")
    saved = json.loads(cli.ok("versions", "save", "vers", "--json"))
    assert (saved["version"], saved["step"], saved["parent"]) == (2, 6, 1)

    cli.ok("versions", "label", "vers", "stable", "1")
    assert client.get_model("vers").labels == {"stable": 1}
    table = cli.ok("versions", "list", "vers").splitlines()
    assert table[0].split()[:4] == ["VERSION", "STEP", "PARENT", "LABELS"]
    assert table[1].split()[:4] == ["1", "2", "-", "stable"]
    assert table[2].split()[:4] == ["2", "6", "1", "-"]
    listed = json.loads(cli.ok("versions", "list", "vers", "--json"))
    assert [(v["version"], v["labels"]) for v in listed] == [(1, ["stable"]), (2, [])]

    out = cli.ok("versions", "rollback", "vers", "--label", "stable")
    assert "head step 2" in out
    assert client.get_model("vers").head_step == 2
    cli.ok("versions", "rollback", "vers", "2")
    assert client.get_model("vers").head_step == 6

    cli.ok("versions", "unlabel", "vers", "stable")
    assert client.get_model("vers").labels == {}


# ---------------------------------------------------------------- errors


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_server_down_is_one_line_and_exit_3(transport: str) -> None:
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "propserve",
            "models",
            "list",
            "--transport",
            transport,
            "--grpc",
            f"127.0.0.1:{port}",
            "--rest",
            f"http://127.0.0.1:{port}",
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("propserve: cannot reach the server at ")
    assert str(port) in lines[0]


def test_unknown_model_exits_1(cli: Cli, tmp_path: Path) -> None:
    for argv in (
        ("models", "show", "ghost"),
        ("models", "delete", "ghost"),
        ("versions", "list", "ghost"),
    ):
        code, out, err = cli(*argv)
        assert code == 1 and out == ""
        assert err == "propserve: model 'ghost' not found\n"
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    code, _, err = cli("predict", "ghost", str(tmp_path / "x.npy"), transport="rest")
    assert code == 1 and "not found" in err


def test_bad_files_exit_2(cli: Cli, tmp_path: Path) -> None:
    create(cli, "files")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.savez(tmp_path / "keys.npz", a=np.zeros((2, 4)), b=np.zeros(2))
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5\n")
    (tmp_path / "words.csv").write_text("a,b\n1,x\n")
    cases = {
        ("train", "files", str(tmp_path / "missing.npz")): "no such file",
        ("train", "files", str(tmp_path / "notes.txt")): "expected .npz or .csv",
        ("train", "files", str(tmp_path / "broken.npz")): "broken.npz",
        ("train", "files", str(tmp_path / "keys.npz")): "no array 'x'; arrays: a, b",
        ("train", "files", str(tmp_path / "ragged.csv"), "--target-column", "0"): "row 2 has 2",
        ("train", "files", str(tmp_path / "words.csv"), "--target-column", "a"): "words.csv",
        ("train", "files", str(tmp_path / "ragged.csv")): "needs --target-column",
        ("predict", "files", str(tmp_path / "notes.txt")): "expected .npy, .npz, .csv or .json",
    }
    for argv, message in cases.items():
        code, _, err = cli(*argv)
        assert code == 2, (argv, err)
        assert err.startswith("propserve: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_stdin_is_a_usage_error(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"{not json")))
    code, _, err = cli("predict", "anything", "-")
    assert code == 2 and "bad JSON on stdin" in err


def test_bad_specs(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{input_dim: 4")
    (tmp_path / "list.json").write_text("[1, 2]")
    local: dict[tuple[str, ...], str] = {
        ("--spec", str(tmp_path / "bad.json")): "not valid JSON",
        ("--spec", str(tmp_path / "list.json")): "expected a JSON object",
        ("--spec", str(tmp_path / "none.json")): "cannot read spec file",
        ("--layers", "8:relu,3"): "missing input_dim",
        ("--input-dim", "4", "--layers", "eight,3"): "bad --layers entry 'eight'",
    }
    for extra, message in local.items():
        code, _, err = cli("models", "create", "bad", *extra)
        assert code == 2 and message in err, (extra, err)
    # The server's validator names the offending field; a bad spec exits 2 wherever found.
    code, _, err = cli("models", "create", "bad", "--input-dim", "4", "--layers", "8:nope,3")
    assert code == 2 and "spec.layers[0].activation" in err
    assert "bad" not in [m["name"] for m in json.loads(cli.ok("models", "list", "--json"))]


def test_exit_codes_follow_one_rule_whoever_finds_the_problem(cli: Cli, tmp_path: Path) -> None:
    """2: wrong as given (the CLI's, the client's or the server's invalid_argument); 1:
    refused for now or for you; 3 (test_server_down_is_one_line_and_exit_3): no answer."""
    create(cli, "rule")
    np.save(tmp_path / "x.npy", np.zeros((2, N_FEATURES), np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((2, N_FEATURES + 1), np.float32))
    x, wide = str(tmp_path / "x.npy"), str(tmp_path / "wide.npy")
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("predict", "rule", str(tmp_path / "none.npy")), 2, "no such file"),  # the CLI
        (("predict", "rule", x, "--version", "0"), 2, str(wire.source_problem(0, None))),
        (("predict", "rule", wide), 2, "features"),  # the server
        (("models", "create", "x", "--input-dim", "4", "--layers", "4:nope,3"), 2, "spec."),
        (("predict", "ghost", x), 1, "not found"),
        (("predict", "rule", x, "--version", "7"), 1, "not found"),
        (("models", "create", "rule", "--input-dim", "4", "--layers", "3"), 1, "exists"),
        (("versions", "label", "rule", "stable", "7"), 1, "not found"),
    ]
    for transport in ("grpc", "rest"):
        for argv, expected, message in cases:
            code, out, err = cli(*argv, transport=transport)
            assert (code, out) == (expected, ""), (transport, argv, err)
            assert err.startswith("propserve: ") and err.count("\n") == 1, (argv, err)
            assert message in err, (transport, argv, err)


@pytest.mark.parametrize("version", ["-1", "0", str(2**70)])
def test_versions_out_of_range_exit_2_with_one_line(
    cli: Cli, client: GrpcClient, tmp_path: Path, version: str
) -> None:
    create(cli, f"range{version[:3].strip('-')}")
    name = f"range{version[:3].strip('-')}"
    client.save_version(name)
    np.save(tmp_path / "x.npy", np.zeros((1, N_FEATURES), np.float32))
    for argv in (
        ("predict", name, str(tmp_path / "x.npy"), "--version", version),
        ("versions", "label", name, "stable", version),
        ("versions", "rollback", name, version),
    ):
        for transport in ("grpc", "rest"):
            code, out, err = cli(*argv, transport=transport)
            assert (code, out) == (2, ""), (argv, err)
            assert err == f"propserve: {wire.source_problem(int(version), None)}\n", argv
    assert client.get_model(name).labels == {}


def test_every_verbs_help_states_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from propserve.clients.cli import main as cli_main  # noqa: PLC0415 - the module itself

    for verb in (["train"], ["predict"], ["models", "create"], ["versions", "rollback"]):
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        assert cli_main.EXIT_CODES in capsys.readouterr().out, verb
    body = cli_main.EXIT_CODES.split("\n", 1)[1]
    assert body in (cli_main.__doc__ or ""), "the module docstring states the same codes"


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["models", "create"])
    assert stopped.value.code == 2
    assert "the following arguments are required: name" in capsys.readouterr().err


# ---------------------------------------------------------------- a bad file trains nothing


def test_a_bad_file_is_refused_before_the_first_step(
    cli: Cli, client: GrpcClient, tmp_path: Path
) -> None:
    """Checked against the model's spec before anything is sent: nothing is trained."""
    x, y = blobs(12, seed=7)
    create(cli, "checked")
    label10 = y.copy()
    label10[3] = 10
    fractional = y.astype(np.float64)
    fractional[5] = 1.5
    nan = x.copy()
    nan[4, 2] = np.nan
    huge = x.astype(np.float64)
    huge[6, 1] = 1e39  # finite, but not as the model's float32
    files = {
        "label10.npz": (
            (x, label10),
            "class label 10 at row 3 is out of range [0, 3) for model checked",
        ),
        "fractional.npz": ((x, fractional), "class labels must be whole numbers, row 5 has 1.5"),
        "nan.npz": ((nan, y), "inputs hold a non-finite value (nan) at row 4, column 2"),
        "huge.npz": ((huge, y), "inputs hold a non-finite value (inf) at row 6, column 1"),
        "wide.npz": (
            (np.ones((12, 5)), y),
            "inputs have 5 features per row, model checked takes 4",
        ),
        "onehot.npz": (
            (x, np.ones((12, 4))),
            "targets must be class labels (rows,) or probabilities (rows, 3) for model checked, "
            "got shape (12, 4)",
        ),
    }
    for file, ((fx, fy), message) in files.items():
        np.savez(tmp_path / file, x=fx, y=fy)
        for transport in ("grpc", "rest"):
            argv = ("train", "checked", str(tmp_path / file), "--batch-size", "2")
            code, out, err = cli(*argv, transport=transport)
            assert (code, out) == (2, ""), (file, err)
            assert (
                err
                == f"propserve: bad data file {tmp_path / file}: {message}; nothing was trained\n"
            )
    assert client.get_model("checked").head_step == 0


def test_a_refusal_midway_says_which_batches_stayed_applied(
    cli: Cli, client: GrpcClient, tmp_path: Path
) -> None:
    """A refusal no local check can foresee: finite targets whose squared error is not."""
    cli.ok("models", "create", "midway", "--input-dim", "4", "--layers", "3", "--loss", "mse",
           "--dtype", "float64")  # fmt: skip
    x = np.random.default_rng(8).normal(size=(6, 4))
    y = np.zeros((6, 3))
    y[2:4] = 1e200
    np.savez(tmp_path / "midway.npz", x=x, y=y)
    data = str(tmp_path / "midway.npz")
    for step, transport in enumerate(("grpc", "rest")):
        code, out, err = cli("train", "midway", data, "--batch-size", "2", transport=transport)
        assert (code, out) == (1, ""), err
        prefix = f"propserve: batches 0–0 applied (step {step} → {step + 1}); stopped at batch 1: "
        assert err.startswith(prefix) and "refused" in err and err.count("\n") == 1, err
        assert "batch 1: batch" not in err
    assert client.get_model("midway").head_step == 2

    # Several epochs: the epoch is named, and so are the versions saved before the refusal.
    y[2:4] = 0.0
    y[4:] = 1e200
    np.savez(tmp_path / "later.npz", x=x, y=y)
    code, _, err = cli(
        "train", "midway", str(tmp_path / "later.npz"), "--batch-size", "2", "--epochs", "2",
        "--save-every", "1",
    )  # fmt: skip
    assert code == 1
    assert err.startswith(
        "propserve: epoch 1/2: batches 0–1 applied (step 2 → 4); stopped at batch 2: "
    ), err
    assert err.rstrip().endswith("(saved before it: version 1, 2)"), err
    assert client.get_model("midway").head_step == 4


# ---------------------------------------------------------------- small things


def test_files_that_are_not_what_their_name_says(cli: Cli, tmp_path: Path) -> None:
    create(cli, "named")
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    np.save(tmp_path / "array.npy", np.zeros((2, N_FEATURES)))
    (tmp_path / "array.npy").rename(tmp_path / "single.npz")
    (tmp_path / "text.npy").write_text("1,2,3,4\n")
    cases = {
        ("train", "named", "text.npz"): "bad .npz file {}: not an .npz archive (a zip of "
        "named arrays, as numpy.savez writes)",
        ("predict", "named", "text.npz"): "bad .npz file {}: not an .npz archive",
        ("train", "named", "single.npz"): "bad .npz file {}: it is a single array (.npy, "
        "from numpy.save); an .npz holds named arrays (numpy.savez)",
        ("predict", "named", "text.npy"): "bad .npy file {}: not a NumPy array file",
    }
    for (*argv, file), message in cases.items():
        code, out, err = cli(*argv, str(tmp_path / file))
        assert (code, out) == (2, ""), (file, err)
        assert err.startswith("propserve: " + message.format(tmp_path / file)), err
        assert err.count("\n") == 1 and "pickle" not in err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_must_be_a_positive_number_of_seconds(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["models", "list", "--timeout", timeout])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --timeout: must be a positive number of seconds, got '{timeout}'" in err


@pytest.mark.parametrize("rest", ["localhost:8000", "127.0.0.1:8000"])
def test_a_rest_address_without_its_scheme_is_bad_usage_with_a_hint(
    rest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "list", "--rest", rest]) == 2
    assert capsys.readouterr().err == (
        f"propserve: --rest {rest} is not a URL: add the scheme, e.g. --rest http://{rest} "
        "(or https://)\n"
    )
    assert main(["models", "list", "--rest", "ftp://host:8000", "--grpc", "localhost:1"]) == 2
    assert capsys.readouterr().err == (
        "propserve: --rest ftp://host:8000: the REST API is http:// or https://\n"
    )


def test_train_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for option, default in {
        "--x-key X_KEY": "x",
        "--y-key Y_KEY": "y",
        "--batch-size BATCH_SIZE": "32",
        "--epochs EPOCHS": "1",
        "--seed SEED": "0",
        "--validation-split FRACTION": "0.0",
        "--lr LR": "the model's own",
        "--save-every N": "never",
        "--timeout TIMEOUT": "30.0",
        "--grpc HOST:PORT": "$PROPSERVE_GRPC or 127.0.0.1:50051",
        "--rest URL": "$PROPSERVE_REST or http://127.0.0.1:8000",
    }.items():
        described = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default}" in described, (option, described)


def test_the_connection_comes_from_flags_then_the_environment(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("PROPSERVE_GRPC", server.grpc_target)
    monkeypatch.setenv("PROPSERVE_REST", server.rest_url)
    for transport in ("grpc", "rest"):
        monkeypatch.setenv("PROPSERVE_TRANSPORT", transport)
        assert main(["models", "list", "--json"]) == 0
        # A flag wins over the environment.
        assert main(["models", "list", "--grpc", dead, "--rest", f"http://{dead}"]) == 3
        where = dead if transport == "grpc" else f"http://{dead}"
        assert f"cannot reach the server at {where} ({transport})" in capsys.readouterr().err
    monkeypatch.setenv("PROPSERVE_TRANSPORT", "carrier-pigeon")
    assert main(["models", "list"]) == 2
    assert "PROPSERVE_TRANSPORT=carrier-pigeon is not one of grpc, rest" in capsys.readouterr().err
    monkeypatch.delenv("PROPSERVE_TRANSPORT")
    monkeypatch.setenv("PROPSERVE_REST", "localhost:8000")
    assert main(["models", "list", "--transport", "rest"]) == 2
    assert capsys.readouterr().err == (
        "propserve: PROPSERVE_REST=localhost:8000 is not a URL: add the scheme, e.g. "
        "PROPSERVE_REST=http://localhost:8000 (or https://)\n"
    )
