"""Pure-torch StePPO maths: the specification of every Triton kernel and the CPU path.

Modules: `kl` (k1/k2/k3 KL estimators), `scatter` (token rewards), `gae` (GAE with skip semantics, whitening, the
peers' Python loop), `ppo_loss` (clipped policy/value losses, entropy, aggregation, diagnostics), `logprob`
(chunked LM-head log-prob and entropy). Use `stepsearch.ops` to pick between these and the kernels.
"""
