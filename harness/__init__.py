"""The harness: what a first reading of the method can skip (run folders, input checks, the tool
server and embedded benchmark, formats, judges, model conversion, torchrun, benchmarks, comparisons)."""
