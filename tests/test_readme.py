"""The README's commands are the ones CI runs, and the README's example code runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README has no command block after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_command("test-command") in [line.strip() for line in ci]


def test_main_command_runs_the_benchmark():
    assert readme_command("main-command").endswith("python benchmarks/throughput.py")


def test_readme_example_runs(capsys):
    # the snippet as a newcomer pastes it: nothing defined beforehand
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.+?)\n```", text, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})
    assert re.search(r"loss after \d+ steps: \d+\.\d+", capsys.readouterr().out)


def test_readme_diffusers_example_runs():
    """The "With diffusers" block, on a tiny UNet2DModel: the loss backpropagates, the sampler runs."""
    import pytest

    pytest.importorskip("diffusers")
    import torch
    from diffusers_helpers import tiny_unet2d

    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- diffusers-example -->\s*```python\n(.+?)\n```", text, re.S)
    assert match, "README has no python block after <!-- diffusers-example -->"
    model = tiny_unet2d()
    namespace = {"clean_images": torch.randn(4, 1, 8, 8).clamp(-1, 1), "model": model}
    exec(match.group(1), namespace)
    assert namespace["loss"].ndim == 0 and model.conv_out.weight.grad is not None
    assert namespace["images"].shape == (16, 1, 8, 8) and torch.isfinite(namespace["images"]).all()
