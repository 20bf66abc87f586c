"""load_tests.gpu, the GPU benchmark, runs end to end on a tiny Llama on the CPU: every scenario at
every concurrency, base interleaved, against the copy-bandwidth floor and HF generate; and
load_tests.cuda_check, the GPU's fidelity check, passes on the CPU."""
from __future__ import annotations

import json

from load_tests import gpu


def test_gpu_bench_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = gpu.main(["--tiny", "--device", "cpu", "--concurrency", "1", "3", "--tokens", "3",
                    "--json", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(out))
    scenarios = ["base", "lora-32-unmerged", "base", "prompt", "base", "bottleneck", "base", "lora-merged", "base"]
    for n in (1, 3):
        runs = [r for r in out["runs"] if r["concurrency"] == n]
        assert [r["scenario"] for r in runs] == scenarios
        assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["vs_hf_generate"] > 0 for r in runs)
    assert out["floor_ms"] > 0 and out["weight_bytes"] > 0
    assert [p["concurrency"] for p in out["hf_generate"]] == [1, 3]


def test_cuda_check_passes_on_the_cpu(capsys):
    """load_tests.cuda_check (every adapter kind against the references, alone and mixed) runs where
    CUDA is absent too, so it cannot rot between the sessions that are lent a GPU."""
    from load_tests import cuda_check

    assert cuda_check.main() == 0
    assert "CUDA CHECK PASSED" in capsys.readouterr().out
