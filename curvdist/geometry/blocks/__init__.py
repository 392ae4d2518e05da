"""Per-layer curvature blocks from curvdist's own kernels: module probes for Kronecker factors (:mod:`.probes`,
:mod:`.kronecker`), per-sample ``torch.func`` VJPs for exact diagonals (:mod:`.diagonal`), and block-wise
invariant spectra (:mod:`.spectra`)."""
