"""Does the calibration text transfer? 4-bit GPTQ on SmolLM2 calibrated on Python's pydoc topics
(zeropoint's first default) and on the mixed default (calibrate/texts.py), each scored by
perplexity on two held-out texts of domains that neither calibration set holds: news (gensim's
lee_background.cor) and Wikipedia articles (gensim's enwiki extract, markup stripped).
Round-to-nearest and the float model give the gap that GPTQ should close.

    python benchmarks/calibration_transfer.py [--calib-tokens 16384] [--json out.json]

Measured 2026-12-03 (2-vCPU VM at load ~20, --calib-tokens 8192 --scored-tokens 2048), int4 sym
g128, perplexity (share of RTN's gap to float closed):
                          news (lee_background)   Wikipedia (gensim enwiki)
    float                 30.885                  23.586
    rtn                   50.206                  38.414
    gptq, pydoc topics    45.362 (25%)            35.030 (23%)
    gptq, mixed default   44.822 (28%)            35.931 (17%)
The mix is not yet a clear win at this calibration size: better on news, worse on Wikipedia.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import torch

from zeropoint import QuantSpec, Recipe, quantize_model
from zeropoint.algorithms.sequential import calibration_ids, gptq_model
from zeropoint.calibrate.texts import default_calibration_text
from zeropoint.models.evaluate import default_text, lee_text, perplexity, wikipedia_text
from zeropoint.models.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scored-tokens", type=int, default=4096)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.manual_seed(0)

    smollm = load_model(None, progress=False)
    tok = smollm.tokenizer
    scored = {"news (lee_background)": lee_text(), "Wikipedia (gensim enwiki)": wikipedia_text()}
    calibrations = {"pydoc topics": default_text(), "mixed default": default_calibration_text()}
    recipe = Recipe.uniform(QuantSpec(args.bits, "symmetric", "per_group",
                                      group_size=args.group_size))
    sequences = args.calib_tokens // 512

    def score(model) -> dict:
        return {name: perplexity(model, tok, text, max_tokens=args.scored_tokens).perplexity
                for name, text in scored.items()}

    rows = {"float": score(smollm.model)}
    print(f"float: {rows['float']}", flush=True)
    model = copy.deepcopy(smollm.model)
    quantize_model(model, recipe)
    rows["rtn"] = score(model)
    print(f"rtn: {rows['rtn']}", flush=True)
    del model
    for name, text in calibrations.items():
        started = time.perf_counter()
        model = copy.deepcopy(smollm.model)
        gptq_model(model, recipe, calibration_ids(tok, text, sequences, 512))
        rows[f"gptq, {name}"] = score(model)
        print(f"gptq calibrated on {name}: {rows[f'gptq, {name}']}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        del model
        gc.collect()

    print(f"\nSmolLM2-135M, int{args.bits} sym g{args.group_size}; GPTQ calibrated on "
          f"{sequences} x 512 tokens; perplexity over the first {args.scored_tokens} tokens")
    print(f"{'':28}" + "".join(f"{n:>34}" for n in scored))
    for row, figs in rows.items():
        cells = []
        for n, v in figs.items():
            gap = rows["rtn"][n] - rows["float"][n]
            closed = "" if row in ("float", "rtn") else \
                f" ({(rows['rtn'][n] - v) / gap:.0%} of gap)"
            cells.append(f"{v:.3f}{closed}")
        print(f"{row:28}" + "".join(f"{c:>34}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
