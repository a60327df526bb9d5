//! adaquant-eval: see docs/ARCHITECTURE.md.
