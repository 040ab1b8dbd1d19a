"""examples/diffusers_unconditional.py: diffusers' training loop with isofast's q_sample + iso_ddpm_loss runs
20 steps on a folder of PNGs, and diffusers loads and runs the pipeline it saves."""
import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
from diffusers_helpers import TINY_UNET2D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "diffusers_unconditional.py"


def write_pngs(folder: Path, count: int = 16, size: int = 8) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{i:02d}.png")


def run_example(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET2D))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--train-data-dir", str(tmp_path / "images"), "--model-config", str(config),
         "--resolution", "8", "--train-batch-size", "4", "--lr-warmup-steps", "0", "--learning-rate", "1e-3",
         "--log-every", "5", "--output-dir", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_example_trains_20_steps_and_saves_a_pipeline_diffusers_runs(tmp_path):
    write_pngs(tmp_path / "images")
    proc = run_example(tmp_path, "--max-train-steps", "20", "--use-ema", "--save-pipeline", "--iso-lambda", "0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 20: loss" in proc.stdout
    out = tmp_path / "out"
    with open(out / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)

    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert pipe.scheduler.config.num_train_timesteps == 1000
    torch.manual_seed(0)  # the example seeds the model's initialisation with --seed 0: the weights moved from it
    initial = diffusers.UNet2DModel.from_config(TINY_UNET2D)
    assert not torch.equal(pipe.unet.conv_in.weight, initial.conv_in.weight)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def load_example():
    spec = importlib.util.spec_from_file_location("diffusers_unconditional", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_refuses_a_resolution_its_model_config_does_not_have(tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps(TINY_UNET2D))
    example = load_example()
    args = example.parse_args(["--train-data-dir", str(tmp_path), "--model-config", str(config), "--resolution", "16"])
    with pytest.raises(SystemExit, match="sample_size 8 differs from --resolution 16"):
        example.build_unet(args)
    assert example.build_unet(example.parse_args(["--train-data-dir", str(tmp_path), "--model-config", str(config),
                                                  "--resolution", "8"])).config.sample_size == 8


def test_the_readme_lists_the_lines_the_example_changes():
    """Each line marked `# isofast:` in the example, its code part, is quoted in the README's "With diffusers"."""
    lines = EXAMPLE.read_text().splitlines()
    with open(EXAMPLE) as f:
        comments = [tok for tok in tokenize.generate_tokens(f.readline)
                    if tok.type == tokenize.COMMENT and tok.string.startswith("# isofast:")]
    marked = [lines[tok.start[0] - 1][: tok.start[1]].strip() for tok in comments]
    assert 1 <= len(marked) <= 5, marked
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"## With diffusers\n(.+?)\n## ", readme, re.S).group(1)
    for code in marked:
        assert code in section, f"README's With diffusers does not list the example's line {code!r}"
