"""Where does lambda's effect come from? The spread of the samples: mean squared norm per member.

The isotropy penalty pulls E||eps_theta||^2 / d towards 1; if it also shrinks the samples towards the
origin, it acts like sampling at a lower temperature (which raises precision and density and lowers recall
and coverage). This reads a finished study (``isofast toy2d --protocol ... --out DIR``), samples every
member of its last save again (``n`` points, tau = 1, the member's own sampler seed) and prints, per
lambda, the mean squared norm of the samples against that of the member's training points, with the
paired difference to lambda = 0 of the same seed::

    python -m isofast.experiments.study_norms DIR [--n 2000]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .paired import paired_interval, verdict

__all__ = ["sample_norms"]


def sample_norms(out: str | Path, n: int = 2000) -> dict[str, list[dict]]:
    """{dataset: [{lambda, seed, sample_sq_norm, train_sq_norm}, ...]} for every member of the study at ``out``."""
    from ..ensemble import EnsembleRun, ensemble_ddpm_sample
    from .protocols import Protocol, member_data

    out = Path(out)
    study = json.loads((out / "study.json").read_text())
    proto = Protocol(**{**study["protocol"], "references": tuple(study["protocol"]["references"])})
    result = {}
    for dataset in study["datasets"]:
        state = torch.load(out / "runs" / dataset / "ensemble.pt", weights_only=False)
        seeds, lambdas = state["seeds"], state["lambdas"]
        train = {s: member_data(proto, dataset, s)[0] for s in sorted(set(seeds))}
        run = EnsembleRun([train[s] for s in seeds], seeds, lambdas, proto.train_config(str(out)), model=proto.model)
        run.load_state_dict(state)
        samples = ensemble_ddpm_sample(run.ema_model, n, run.schedule, seeds).float()
        result[dataset] = [{"lambda": lam, "seed": s, "sample_sq_norm": float(samples[m].square().sum(1).mean()),
                            "train_sq_norm": float(train[s].square().sum(1).mean())}
                           for m, (lam, s) in enumerate(zip(lambdas, seeds, strict=True))]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isofast.experiments.study_norms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the --out folder of an isofast toy2d --protocol run")
    parser.add_argument("--n", type=int, default=2000, help="samples per member (default 2000)")
    args = parser.parse_args(argv)
    for dataset, rows in sample_norms(args.study, args.n).items():
        print(f"{dataset}: mean squared norm of {args.n} samples per member (training points: "
              f"{sum(r['train_sq_norm'] for r in rows) / len(rows):.4f})")
        print("| lambda | samples, mean ± std over seeds | paired difference to lambda = 0 (95% t) |\n|---|---|---|")
        base = {r["seed"]: r["sample_sq_norm"] for r in rows if r["lambda"] == 0}
        for lam in sorted({r["lambda"] for r in rows}):
            sel = [r for r in rows if r["lambda"] == lam]
            values = torch.tensor([r["sample_sq_norm"] for r in sel], dtype=torch.float64)
            spread = f" ± {values.std().item():.4f}" if len(sel) > 1 else ""
            cell = "–"
            if lam > 0:
                iv = paired_interval([r["sample_sq_norm"] - base[r["seed"]] for r in sel if r["seed"] in base])
                word = {"gain": "larger", "loss": "smaller", "n.s.": "n.s."}[verdict(iv)]
                cell = f"{iv['mean']:+.4f} [{iv['lo']:+.4f}, {iv['hi']:+.4f}] {word}"
            print(f"| {lam:g} | {values.mean().item():.4f}{spread} | {cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
