"""`benchmarks/benchmark_sampling.py --original-repo DIR`: the authors' checkout is imported, gated and timed.

The authors' code cannot be vendored or downloaded here, so these tests give the benchmark a stand-in checkout with
the authors' API (`libs/models.py::DiT(..., args=...)`, `libs/nat_misc.py::NATSchedule(...).generate(...)` with the
hard-coded null label 1000), built on the benchmark's own re-statement. They test the plumbing around the real code:
the import from the checkout, the strict load of the original-format weights (with the label table padded for the
authors' null label), the id gate (a wrong sampler must stop the benchmark), the variant's row and goal.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

MODELS_PY = """
from original_enat import OriginalENAT


class DiT(OriginalENAT):
    def __init__(self, input_size=32, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
                 class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, codebook_size=1024, args=None):
        super().__init__(input_size, hidden_size, num_heads, tuple(args.enc_dec), mlp_ratio, num_classes,
                         codebook_size)
        assert sum(args.enc_dec) == depth
"""

NAT_MISC_PY = """
from pathlib import Path

from original_enat import generate

CALLS = Path(__file__).with_name("calls.txt")


class NATSchedule:
    def __init__(self, codebook_size, device, ignore_ind=-1, smoothing=0.1, beta_alpha_beta=(12, 3), args=None):
        self.args = args

    def generate(self, sample_steps, _n_samples, nnet, decode_fn, latent_size, **kwargs):
        CALLS.write_text(str(int(CALLS.read_text()) + 1 if CALLS.exists() else 1))
        ids = generate(nnet, kwargs["context"].reshape(-1), sample_steps, self.args.cfg_scale, self.args.mask_temp,
                       self.args.samp_temp, null_label=1000)
        return decode_fn(ids.reshape(_n_samples, latent_size, latent_size){corruption})
"""


def make_checkout(root: Path, corruption: str = "") -> Path:
    (root / "libs").mkdir(parents=True)
    (root / "libs" / "models.py").write_text(MODELS_PY)
    (root / "libs" / "nat_misc.py").write_text(NAT_MISC_PY.replace("{corruption}", corruption))
    return root


def run_benchmark(json_path: Path, *extra) -> tuple:
    """benchmark_sampling.py on the tiny fixture model, one repeat, one thread, with `extra` arguments.

    Returns the finished process and the results it wrote with `--json` (None when it wrote none).
    """
    command = [sys.executable, str(ROOT / "benchmarks" / "benchmark_sampling.py"), "--model", "tiny", "--repeats", "1"]
    command += ["--json", str(json_path)] + [str(arg) for arg in extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    return result, json.loads(json_path.read_text()) if json_path.exists() else None


def test_authors_code_is_gated_and_timed(tmp_path):
    checkout = make_checkout(tmp_path / "ENAT")
    result, report = run_benchmark(tmp_path / "results.json", "--batch-size", 2, "--original-repo", checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["gate"] == {"A original-structure": True, "B ours (ENATPipeline)": True, "O authors' code": True}
    assert report["authors_ids_equal_original_structure"] is True
    variants = report["variants"]
    assert list(variants) == ["O authors' code", "A original structure", "B ours (reuse)", "C ours (no reuse)"]
    for name, row in variants.items():  # per image at batch 2: the analytic count equals torch's, FLOP/s add up
        assert len(row["times_s"]) == 1 and row["median_s"] > 0, name
        # exact for ours; the original's head (O, A) also computes the [MASK] logit that it drops
        exact = name.startswith(("B ", "C "))
        assert row["gflops_per_image"] == pytest.approx(row["gflops_per_image_counted"], rel=1e-9 if exact else 1e-3)
        assert row["tflops"] == pytest.approx(row["gflops_per_image"] * 2 / row["min_s"] / 1e3, rel=1e-9), name
        assert row["utilisation"] == pytest.approx(row["tflops"] / report["matmul_peak_tflops"], rel=1e-9), name
    goals = {goal["goal"]: goal for goal in report["goals"]}
    o, b = variants["O authors' code"]["median_s"], variants["B ours (reuse)"]["median_s"]
    assert goals["speed vs the authors' code, same dtype"]["value"] == pytest.approx(o / b, rel=1e-9)
    assert goals["utilisation of the matmul peak (B)"]["value"] == variants["B ours (reuse)"]["utilisation"]
    # the printed table is the same run's: its O row shows the median, rounded
    rows = [line for line in result.stdout.splitlines() if line.startswith("O authors' code ")]
    assert len(rows) == 1 and float(rows[0].split()[3]) == pytest.approx(o, abs=6e-4)
    # gate, id comparison, warm-up, FLOP count, one repeat: every O run went through the checkout's sampler
    assert int((checkout / "libs" / "calls.txt").read_text()) == 5
    assert "token_agreement_vs_float32" not in report  # the token agreement is for lower precisions only


def test_bfloat16_reports_its_token_agreement_with_float32(tmp_path):
    result, report = run_benchmark(tmp_path / "results.json", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stdout + result.stderr
    # the tiny model samples by argmax (temperatures 0): bf16 rounding flips none of its tokens here
    assert report["dtype"] == "bfloat16" and report["token_agreement_vs_float32"] == 1.0


def test_a_wrong_authors_sampler_stops_the_benchmark(tmp_path):
    checkout = make_checkout(tmp_path / "ENAT", corruption=".flip(-1)")  # the right ids in the wrong places
    result, report = run_benchmark(tmp_path / "results.json", "--original-repo", checkout)
    assert result.returncode != 0
    assert report["gate"]["O authors' code"] is False and "variants" not in report
    assert "correctness gate FAILED" in result.stderr


@pytest.mark.parametrize("missing", ["libs/models.py", "libs/nat_misc.py"])
def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path, missing):
    checkout = make_checkout(tmp_path / "ENAT")
    (checkout / missing).unlink()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from authors_enat import import_authors_code

        with pytest.raises(SystemExit, match=f"no {missing} \\(expected a checkout of LeapLabTHU/ENAT\\)"):
            import_authors_code(checkout)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_the_authors_timm_imports_torchvision_through_a_shim_limited_to_the_import(tmp_path):
    """The authors' vendored timm imports torchvision at import time; where it is missing, a shim stands in."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the authors' timm imports it, no shim is needed")
    checkout = make_checkout(tmp_path / "ENAT")
    (checkout / "timm").mkdir()
    (checkout / "timm" / "__init__.py").write_text(
        "import torchvision.transforms.functional as F\nfrom torchvision import transforms\n"
    )
    models = checkout / "libs" / "models.py"
    models.write_text("import timm\n" + models.read_text())
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from authors_enat import import_authors_code
models, nat_misc = import_authors_code({str(checkout)!r})
print("left in sys.modules:", sorted(name for name in sys.modules if name.startswith("torchvision")))
try:
    models.timm.F.normalize
except RuntimeError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "left in sys.modules: []" in result.stdout
    assert "torchvision.transforms.functional.normalize: torchvision is not installed" in result.stdout
