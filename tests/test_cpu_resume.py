"""torch.load onto ``cpu:N`` (what a multi-process CPU resume asks for) with opensloth.patching.cpu_resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_indexed_cpu_map_location_loads_only_with_the_deserializer(tmp_path):
    """In a fresh process: torch.load(map_location=cpu:1) fails as transformers' resume does, then works."""
    path = tmp_path / "optimizer.pt"
    code = textwrap.dedent(f"""
        import torch
        torch.save({{"exp_avg": torch.arange(4.0)}}, {str(path)!r})
        try:
            torch.load({str(path)!r}, map_location=torch.device("cpu", 1), weights_only=True)
            print("loaded-without")
        except RuntimeError as exc:
            assert "tagged with cpu:1" in str(exc), exc
            print("failed-without")
        from opensloth.patching.cpu_resume import allow_indexed_cpu_locations
        assert allow_indexed_cpu_locations() and not allow_indexed_cpu_locations()
        state = torch.load({str(path)!r}, map_location=torch.device("cpu", 1), weights_only=True)
        assert torch.equal(state["exp_avg"], torch.arange(4.0)) and state["exp_avg"].device.type == "cpu"
        assert torch.load({str(path)!r}, map_location="cpu", weights_only=True)["exp_avg"].sum() == 6
        print("loaded-with")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["failed-without", "loaded-with"]
