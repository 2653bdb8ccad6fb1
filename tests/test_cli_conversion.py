"""The conversion CLI as a module (`python -m enat_diffusers.conversion[.cli]`), its one-line errors and --debug."""

import runpy
import sys

import pytest
from conftest import FIXTURES, call_converter
from safetensors import SafetensorError

from enat_diffusers.conversion import CheckpointError


TINY = ["--transformer-checkpoint", FIXTURES / "enat_tiny.pth", "--num-attention-heads", 4, "--num-encoder-layers", 3]


def run_module(module, *args, monkeypatch):
    """`python -m module args...`, in this process (runpy runs the module as `__main__`, as `-m` does)."""
    monkeypatch.setattr(sys, "argv", [module, *map(str, args)])
    monkeypatch.delitem(sys.modules, "enat_diffusers.conversion.cli", raising=False)  # as a fresh `python -m`
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        return exit.code or 0
    return 0


def test_both_module_paths_run_the_converter(tmp_path, monkeypatch, capsys):
    assert (
        run_module("enat_diffusers.conversion.cli", *TINY, "--output-dir", tmp_path / "out", monkeypatch=monkeypatch)
        == 0
    )
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()
    assert run_module("enat_diffusers.conversion", "--help", monkeypatch=monkeypatch) == 0
    assert "--transformer-checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["enat_diffusers.conversion", "enat_diffusers.conversion.cli"])
def test_usage_errors_name_the_command_that_was_run(module, monkeypatch, capsys):
    assert run_module(module, "--output-dir", "out", monkeypatch=monkeypatch) == 2  # no --transformer-checkpoint
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"python -m {module}: error: ")


def test_a_failed_write_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr("diffusers.models.modeling_utils.safetensors.torch.save_file", full_disk)
    code, stderr = call_converter(*TINY, "--output-dir", tmp_path / "out")
    assert code == 1 and stderr.strip().startswith("error: ") and "No space left on device" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no lock, no partial output
    with pytest.raises(CheckpointError, match="not_a_checkpoint"):
        call_converter("--transformer-checkpoint", tmp_path / "not_a_checkpoint.pth", *TINY[2:], "--output-dir",
                       tmp_path / "out", "--debug")  # fmt: skip
