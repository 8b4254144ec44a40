"""stepsearch: StePPO training of LLMs that search while they reason (Wang et al., 2025, arXiv 2505.15107).

`import stepsearch` needs only torch, numpy and PyYAML: sglang, deepspeed, faiss, flash_attn, transformers and
triton are imported lazily by the code that uses them.
"""
__version__ = "0.1.0"
