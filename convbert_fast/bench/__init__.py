"""`python -m convbert_fast bench`, by role, each file readable in one sitting:

- timing.py: how things are timed and measured (turns, medians, GEMM rate, copy bandwidth, memory, dynamo);
- providers.py: what is measured (the providers, the batches, a provider's run, the op summary);
- record.py: the run and its JSON record (versions, device, commit, summary);
- report.py: the table, the plot and the README's tables from committed records (`--markdown`);
- choose.py: `--choose`, MEASURED_CUDA_CHOICE from a CUDA op-benchmark record.
"""
