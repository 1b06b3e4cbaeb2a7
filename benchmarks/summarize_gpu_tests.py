"""Turn the JUnit XML of a GPU test run into the JSON log kept in benchmarks/results/.

Usage::

    python benchmarks/summarize_gpu_tests.py gpu_tests.xml benchmarks/results/gpu_tests.json \
        --command "pytest tests/test_gpu.py ..." --gpu "NVIDIA H200" --commit abc123

Each test keeps its outcome, time and the properties it recorded (errors,
boundary-tie counts, memory); the summary holds counts and the largest error
per dtype.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict


def summarize(xml_path: str) -> dict:
    root = ET.parse(xml_path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = "failed" if tag in ("failure", "error") else "skipped"
        properties = {p.get("name"): float(p.get("value"))
                      for p in case.iter("property")}
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time", 0.0)),
                      "properties": properties})
    counts = defaultdict(int)
    worst = defaultdict(float)
    for test in tests:
        counts[test["outcome"]] += 1
        dtype = next((d for d in ("bfloat16", "float32", "float16") if d in test["name"]), "any")
        for key in ("out_error", "lse_error"):
            if key in test["properties"]:
                worst[f"{key}_{dtype}"] = max(worst[f"{key}_{dtype}"], test["properties"][key])
        if "boundary_ties" in test["properties"]:
            worst["boundary_ties_total"] += test["properties"]["boundary_ties"]
    return {"counts": dict(counts), "max_errors": dict(worst), "tests": tests}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("xml")
    parser.add_argument("out")
    parser.add_argument("--command", default="")
    parser.add_argument("--gpu", default="")
    parser.add_argument("--commit", default="")
    parser.add_argument("--wall-seconds", type=float, default=None)
    args = parser.parse_args()
    result = {"command": args.command, "gpu": args.gpu, "commit": args.commit,
              "wall_seconds": args.wall_seconds, **summarize(args.xml)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("counts", "max_errors")}, indent=1))


if __name__ == "__main__":
    main()
