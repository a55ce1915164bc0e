"""What XLA's autotuner measured for each GEMM of a program: the fastest cuBLASLt and Triton candidates.

Usage: python experiments/autotune_gemms.py LOG [LOG ...]

LOG is the text file XLA writes with XLA_FLAGS=--xla_gpu_dump_autotune_logs_to=FILE.txt (optionally
gzipped): for every instruction it autotuned, each candidate configuration and the run time it measured
on random inputs. Prints one JSON line per GEMM-like instruction (a cuBLAS custom call or a GEMM fusion):
its name, result shape and JAX op name, the number of candidates, and the fastest time per backend in
microseconds. Comparing the logs of two precisions shows whether one dtype's GEMMs are slower even after
XLA chose among the libraries' kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re


def profiles(text: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """(hlo_text, [(backend, microseconds), ...]) per autotuned instruction."""
    out = []
    for block in text.split("instruction_profiles {")[1:]:
        hlo = re.search(r'hlo_text: "(.*)"\n', block)
        candidates = []
        for config in block.split("config_profiles {")[1:]:
            backend = re.search(r"backend: (\w+)", config)
            run_time = re.search(r"run_time \{\s*(?:seconds: (\d+)\s*)?nanos: (\d+)", config)
            if backend and run_time:
                seconds = int(run_time.group(1) or 0)
                candidates.append((backend.group(1), seconds * 1e6 + int(run_time.group(2)) / 1e3))
        out.append((hlo.group(1) if hlo else "", candidates))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    args = parser.parse_args()
    for path in args.logs:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            text = f.read()
        for hlo, candidates in profiles(text):
            name, _, rest = hlo.partition(" = ")
            if not candidates or not ("gemm_fusion" in name or "__cublas" in rest):
                continue
            best: dict[str, float] = {}
            for backend, us in candidates:
                best[backend] = min(best.get(backend, float("inf")), us)
            op_name = re.search(r'op_name=\\"([^\\]*)', rest)
            print(
                json.dumps(
                    {
                        "log": path,
                        "instruction": name.lstrip("%"),
                        "result": rest.split("{", 1)[0],
                        "op_name": op_name.group(1) if op_name else None,
                        "candidates": len(candidates),
                        "best_us": {k: round(v, 1) for k, v in sorted(best.items(), key=lambda kv: kv[1])},
                    }
                )
            )


if __name__ == "__main__":
    main()
