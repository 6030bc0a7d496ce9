"""One learned-scale run at a time, for exploring designs (the log of RESULTS.md section 3b).

Runs `quality.run_one` for each arm x starting lr x seed and prints one line: validation/test accuracy, the learned
gamma and the applied lr at seven points of the run. Arms are `mlrs_scale:<variant>` (a flat frozen net: only the
scale is learned) or `mlrs_learned:<variant>` (the net is meta-trained too), variants from `LEARNED_VARIANTS` in
quality.py. Appends every run's full record to benchmarks/results/scale_lab.jsonl.

    python benchmarks/scale_lab.py bbc mlrs_scale:g3c,mlrs_learned:g3c 1e-3 0

An optional fifth argument, a JSON object, overrides training arguments of every run (a one-off design without a new
variant, or a built-in schedule with a warmup):

    python benchmarks/scale_lab.py fashion tuned:warmup_stable_decay 1e-2 0,1,2 '{"warmup_steps": 0.3}'
    python benchmarks/scale_lab.py lm mlrs_learned:default 1e-2 0,1,2 '{"optimizer": "sgd"}'   # quality.py's SGD
    python benchmarks/scale_lab.py bbc mlrs_learned:default 1e-3 0,1,2 '{"patch": "fromstart"}'  # a lab design

(`"patch"`: one of frozen_scale_lab.py's designs that are not settings, patched into the library for the process.)
"""

import json
import os
import sys
import types
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402


def main(task: str, arms: str, lrs: str, seeds: str, overrides: str = "{}") -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shown, overrides = ("" if overrides == "{}" else overrides + " "), json.loads(overrides)
    # not a training argument: quality.py's optimizer ("sgd": SGD with momentum 0.9, as `--optimizer sgd`)
    options = types.SimpleNamespace(smoke=False, device="cpu", optimizer=overrides.pop("optimizer", "adamw"))
    patched = overrides.pop("patch", None)  # not a training argument either: a design of frozen_scale_lab.py
    if patched:
        import frozen_scale_lab

        if patched not in frozen_scale_lab.PATCHES:
            raise SystemExit(f"patch {patched!r}: frozen_scale_lab.py patches one of "
                             f"{sorted(frozen_scale_lab.PATCHES)} (its other designs are settings: pass them as "
                             f"overrides)")
        frozen_scale_lab.patch(patched)
    with open(HERE / "results" / "scale_lab.jsonl", "a") as out:
        for arm in arms.split(","):
            for lr in (float(x) for x in lrs.split(",")):
                for seed in (int(s) for s in seeds.split(",")):
                    r = quality.run_one(task, arm, lr, seed, options, overrides=overrides)
                    every = max(1, len(r["gammas"]) // 6)
                    r["overrides"] = {**overrides, **({"patch": patched} if patched else {})}
                    if r.get("meta_source") == "next_batch":  # the default since session 27: recorded as such, so
                        r["overrides"].setdefault("mlrs_meta_source", "next_batch")  # {} stays held-out batches
                    print(f"{task} {arm:24s} {shown}lr={lr:<8.2g} s={seed} val={r['val_accuracy']} "
                          f"test={r['test_accuracy']} "
                          f"vloss={r['val_loss']:.4f} gamma: {[f'{g:.2e}' for _, g in r['gammas'][::every]]} "
                          f"lrs: {[f'{x:.2e}' for _, x in r['lrs'][::every]]} ({r['seconds']:.0f}s)", flush=True)
                    out.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:6])
