"""The toy JeDi: its benchmark, attribute classifier, diagnostics and reference-image maker (see docs/toy.md)."""
